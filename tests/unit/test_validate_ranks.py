"""The train stage's validation on 1, 2 and 3 gloo ranks: every rank scores its strided share of the
val rows, and the all-reduced result is rank 0's model scored over every row by one process."""

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


def _validate_on_rank(rank, world):
    from tasks.train_loop import validate

    model, x, y = _model_and_data(rank)
    return validate(model, x[rank::world], y[rank::world], "cpu", world, bn_mode="local", batch_size=16)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_on_every_rank_equals_rank_0s_model_over_every_row(world):
    results = run_group(_validate_on_rank, world)
    model, x, y = _model_and_data(0)
    model.eval()
    with torch.no_grad():
        reference = model.double()(x.double())
    expect_loss = float(F.cross_entropy(reference, y))
    expect_acc = float((reference.argmax(1) == y).double().mean())
    for r in results:
        assert r == results[0]  # every rank holds the same metrics
        assert r["val_loss"] == pytest.approx(expect_loss, rel=1e-5)
        assert r["val_accuracy"] == pytest.approx(expect_acc, abs=1e-12)
