"""The train stage's validation on 1, 2 and 3 gloo ranks: every rank streams its part of the val
split (``ShardStream.in_order``), and the all-reduced result is rank 0's model scored over every
row by one process."""

import pytest
import torch
import torch.nn.functional as F

from schemas.config import ModelConfig
from tasks.nn.models import build_model
from tests.gloo_group import run_group

ROWS, FEATURES, CLASSES = 101, 6, 3  # 101 rows: shares differ by one row on 2 and 3 ranks


def _model_and_data(rank: int):
    torch.manual_seed(0)  # identical weights on every rank, as DDP keeps them
    model = build_model(ModelConfig(kind="mlp", hidden=(8,)), (FEATURES,), CLASSES)
    with torch.no_grad():  # local BN: each rank's running statistics are its own
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.fill_(0.5 * rank)
                m.running_var.fill_(1.0 + rank)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, FEATURES, generator=g) * 2
    y = torch.randint(0, CLASSES, (ROWS,), generator=g)
    return model, x, y


def _validate_on_rank(rank, world, files):
    from tasks.stream import ShardStream
    from tasks.train_loop import validate

    model, _, _ = _model_and_data(rank)
    return validate(model, ShardStream(files, rank, world, (FEATURES,), 64), "cpu", world, bn_mode="local", batch_size=16)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_on_every_rank_equals_rank_0s_model_over_every_row(world, tmp_path):
    import pyarrow.parquet as pq

    from schemas import arrow
    from tasks import arrow_io

    model, x, y = _model_and_data(0)
    table = arrow_io.to_table(x.numpy(), y.numpy(), arrow.example_schema(FEATURES))
    files = []
    for i, (a, b) in enumerate([(0, 40), (40, 41), (41, ROWS)]):  # uneven files, row groups of 16
        pq.write_table(table.slice(a, b - a), tmp_path / f"p{i}.parquet", row_group_size=16)
        files.append(str(tmp_path / f"p{i}.parquet"))
    results = run_group(_validate_on_rank, world, files)
    model.eval()
    with torch.no_grad():
        reference = model.double()(x.double())
    expect_loss = float(F.cross_entropy(reference, y))
    expect_acc = float((reference.argmax(1) == y).double().mean())
    for r in results:
        assert r == results[0]  # every rank holds the same metrics
        assert r["val_loss"] == pytest.approx(expect_loss, rel=1e-5)
        assert r["val_accuracy"] == pytest.approx(expect_acc, abs=1e-12)
