"""Recalibrate stage: re-estimate BatchNorm statistics of the final weights on Ray Train workers.

The stage runs on the train stage's workers (same count, CPUs and GPUs, read from the checkpoint's
train config). The driver draws the calibration rows (a seeded random sample of the split, in random
order) and cuts them into batches; each worker reads the Parquet files holding its contiguous run of
batches with pyarrow, runs them through the network (``tasks.nn.bn_stats``: each BN layer normalizes
with its batch's own statistics, dropout off) and the per-channel moments are pooled over every
worker in float64. Rank 0 writes the
checkpoint. The batches do not depend on the worker count, so 1, 2 or 3 workers give the same
statistics up to float64 rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from schemas import arrow
from schemas.artifacts import Checkpoint, CheckpointState, Dataset
from schemas.config import RecalibrateConfig, TrainConfig
from schemas.errors import DataError
from tasks import arrow_io
from tasks.console import Progress

CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_ROWS = 10_000  # Wu & Johnson 2021: 10^3-10^4 rows estimate BN statistics well


def recalibrate(cfg: RecalibrateConfig, checkpoint: Checkpoint, data: Dataset, out_dir: Path, seed: int) -> Checkpoint:
    """Write a copy of ``checkpoint`` whose BN running statistics come from ``cfg.estimator`` over
    calibration rows of ``cfg.split`` (normalized like training data), without the optimizer state.

    Raises:
        DataError: a split the run does not have, more calibration rows than the split holds, or
            calibration files that break the contract or cannot be read.
    """
    state = CheckpointState.load(checkpoint.path)
    info = {"estimator": cfg.estimator, "split": cfg.split, "rows": 0}
    path = out_dir / CHECKPOINT_FILE
    if cfg.estimator == "ema":
        out_dir.mkdir(parents=True, exist_ok=True)
        _strip(state, info).save(path)
    else:
        if cfg.split not in data.splits:
            raise DataError(f"recalibrate.split={cfg.split!r}: the run has no such split; use one of "
                            f"{', '.join(sorted(data.splits))}")
        split = data.split(cfg.split)
        files = arrow_io.check_split(split.path, arrow.example_schema(data.num_features),
                                     where=f"recalibrate input split '{cfg.split}'")
        rows = calibration_rows(cfg, split.rows)
        plan = batch_plan([pq.ParquetFile(f).metadata.num_rows for f in files], rows, cfg.batch_size, seed)
        train_cfg = TrainConfig.model_validate(state.config)
        out_dir.mkdir(parents=True, exist_ok=True)
        with Progress("recalibrate", total=rows, unit="rows") as bar:
            _on_workers(train_cfg, cfg, checkpoint.path, files, plan, info, path)
            bar.update(rows)
    return Checkpoint(path=str(path), digest=arrow_io.file_digest(path), epoch=checkpoint.epoch, bn_mode=checkpoint.bn_mode)


def calibration_rows(cfg: RecalibrateConfig, available: int) -> int:
    """How many rows calibrate: ``cfg.rows``, else 10,000 or the whole split when smaller.

    Raises:
        DataError: ``cfg.rows`` exceeds the split.
    """
    if cfg.rows is None:
        return min(DEFAULT_ROWS, available)
    if cfg.rows > available:
        raise DataError(f"recalibrate.rows={cfg.rows}: split '{cfg.split}' holds only {available} rows; "
                        "lower recalibrate.rows or leave it unset (10,000 or the whole split)")
    return cfg.rows


def batch_plan(file_rows: list[int], rows: int, batch_size: int, seed: int) -> dict:
    """The calibration rows and their batches, the same for any number of workers.

    Returns ``{"file_rows", "order", "bounds"}``: ``order`` holds ``rows`` global row indices (over
    the files in order) drawn without replacement, in a seeded random order, so batches mix classes
    even when the split is sorted by label; batch ``b`` is ``order[bounds[b]:bounds[b+1]]``. A trailing
    batch of one row joins the one before it (a single row has no batch statistics).
    """
    order = np.random.default_rng(seed).permutation(sum(file_rows))[:rows].astype(np.int64)
    bounds = list(range(0, rows, batch_size)) + [rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return {"file_rows": list(file_rows), "order": order, "bounds": bounds}


def rank_batches(plan: dict, rank: int, world: int) -> tuple[int, int]:
    """The contiguous run [lo, hi) of batch numbers rank ``rank`` of ``world`` calibrates (maybe empty)."""
    n = len(plan["bounds"]) - 1
    return rank * n // world, (rank + 1) * n // world


def read_rows(files: list[str], file_rows: list[int], index: np.ndarray) -> np.ndarray:
    """Features of the global rows ``index`` (in that order), reading only the files that hold them."""
    starts = np.concatenate([[0], np.cumsum(file_rows)])
    which = np.searchsorted(starts, index, side="right") - 1
    out = None
    for f in np.unique(which):
        pick = np.nonzero(which == f)[0]
        x = arrow_io.features_numpy(arrow_io.read_table(files[f], columns=[arrow.FEATURES]))
        if out is None:
            out = np.empty((len(index), x.shape[1]), dtype=np.float32)
        out[pick] = x[index[pick] - starts[f]]
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def _strip(state: CheckpointState, info: dict) -> CheckpointState:
    """The checkpoint as a model only: no optimizer, scheduler or RNG state; how it was calibrated."""
    return state.model_copy(update={"optimizer": None, "scheduler": None, "rng": None, "recalibration": info})


def _on_workers(train_cfg: TrainConfig, cfg: RecalibrateConfig, checkpoint_path: str, files: list[str], plan: dict,
                info: dict, out_path: Path) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.rendezvous import ScopedTorchConfig
    from tasks.train import fit_interruptibly

    trainer = TorchTrainer(
        _calibrate_loop,
        train_loop_config={"checkpoint": str(Path(checkpoint_path).resolve()), "files": files, "plan": plan,
                           "estimator": cfg.estimator, "info": info, "out": str(out_path.resolve()),
                           "cpus": train_cfg.cpus_per_worker},
        torch_config=ScopedTorchConfig(),
        scaling_config=ScalingConfig(num_workers=train_cfg.workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.cpus_per_worker}),
        run_config=RunConfig(name="ray_recalibrate", storage_path=str(out_path.parent.resolve()),
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures)),
    )
    fit_interruptibly(trainer, lambda: None)


def _calibrate_loop(config: dict) -> None:
    import ray.train
    import torch

    from tasks.nn.bn_stats import update_bn_stats
    from tasks.nn.models import model_from_checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["cpus"])
    device = ray.train.torch.get_device()
    state = CheckpointState.load(config["checkpoint"])
    model = model_from_checkpoint(state).to(device)
    plan = config["plan"]
    lo, hi = rank_batches(plan, rank, world)
    bounds = plan["bounds"]
    x = torch.from_numpy(read_rows(config["files"], plan["file_rows"], plan["order"][bounds[lo]:bounds[hi]]))
    batches = (x[bounds[b] - bounds[lo]: bounds[b + 1] - bounds[lo]].to(device) for b in range(lo, hi))
    rows = update_bn_stats(model, batches, estimator=config["estimator"])
    if rank == 0:
        state.model = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _strip(state, {**config["info"], "rows": rows, "workers": world}).save(Path(config["out"]))
