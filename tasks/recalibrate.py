"""Recalibrate stage: recompute BatchNorm statistics of the final weights from calibration data."""

from __future__ import annotations

from pathlib import Path

import torch

from schemas.artifacts import Checkpoint, Dataset
from schemas.config import RecalibrateConfig
from tasks import arrow_io
from tasks.nn.bn_stats import update_bn_stats
from tasks.nn.models import model_from_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"


def recalibrate(cfg: RecalibrateConfig, checkpoint: Checkpoint, data: Dataset, out_dir: Path) -> Checkpoint:
    """Write a copy of ``checkpoint`` whose BN running statistics are population statistics of the
    calibration split (read with Ray Data, normalized like training data)."""
    import ray.data

    state = torch.load(checkpoint.path, weights_only=False)
    model = model_from_checkpoint(state)
    if cfg.enabled:
        ds = ray.data.read_parquet(data.split(cfg.split).path)
        if cfg.max_rows is not None:
            ds = ds.limit(cfg.max_rows)

        def batches():
            for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow", drop_last=False):
                x = arrow_io.features_tensor(batch)
                if len(x) >= 2:  # a trailing single row has no batch statistics
                    yield x

        rows = update_bn_stats(model, batches())
    else:
        rows = 0
    state = {**state, "model": model.state_dict(), "optimizer": None, "recalibration": {"rows": rows, "split": cfg.split}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_FILE
    torch.save(state, path)
    return Checkpoint(path=str(path), epoch=checkpoint.epoch, bn_mode=checkpoint.bn_mode)
