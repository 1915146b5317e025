"""Recalibrate stage: recompute BatchNorm statistics of the final weights from calibration data."""

from __future__ import annotations

from pathlib import Path

from schemas import arrow
from schemas.artifacts import Checkpoint, CheckpointState, Dataset
from schemas.config import RecalibrateConfig
from tasks import arrow_io
from tasks.console import Progress
from tasks.nn.bn_stats import update_bn_stats
from tasks.nn.models import model_from_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"


def recalibrate(cfg: RecalibrateConfig, checkpoint: Checkpoint, data: Dataset, out_dir: Path) -> Checkpoint:
    """Write a copy of ``checkpoint`` whose BN running statistics are population statistics of the
    calibration split (normalized like training data), without the optimizer state.

    Raises:
        DataError: calibration files that break the contract or cannot be read.
    """
    state = CheckpointState.load(checkpoint.path)
    model = model_from_checkpoint(state)
    rows = 0
    if cfg.enabled:
        files = arrow_io.check_split(data.split(cfg.split).path, arrow.example_schema(data.num_features),
                                     where=f"recalibrate input split '{cfg.split}'")
        total = min(data.split(cfg.split).rows, cfg.max_rows or data.split(cfg.split).rows)
        with Progress("recalibrate", total=total, unit="rows") as bar:
            rows = update_bn_stats(model, _counted(_batches(files, cfg.batch_size, cfg.max_rows), bar))
    state = state.model_copy(update={
        "model": model.state_dict(), "optimizer": None, "scheduler": None, "rng": None,
        "recalibration": {"rows": rows, "split": cfg.split}})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_FILE
    state.save(path)
    return Checkpoint(path=str(path), digest=arrow_io.file_digest(path), epoch=checkpoint.epoch, bn_mode=checkpoint.bn_mode)


def _counted(batches, bar: Progress):
    for batch in batches:
        yield batch
        bar.update(len(batch))


def _batches(files: list[str], batch_size: int, max_rows):
    """Feature batches of ``batch_size`` rows over the files in order, at most ``max_rows`` rows."""
    import torch

    budget = max_rows if max_rows is not None else float("inf")
    pending = []
    for f in files:
        if budget <= 0:
            break
        x = arrow_io.features_tensor(arrow_io.read_table(f, columns=[arrow.FEATURES]))
        x = x[: int(min(budget, len(x)))]
        budget -= len(x)
        pending.append(x)
        buf = torch.cat(pending)
        full = len(buf) // batch_size * batch_size
        yield from buf[:full].split(batch_size)
        pending = [buf[full:]]
    rest = torch.cat(pending) if pending else None
    if rest is not None and len(rest) >= 2:  # a trailing single row has no batch statistics
        yield rest
