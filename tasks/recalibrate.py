"""Recalibrate stage: re-estimate BatchNorm statistics of the final weights with Ray tasks.

The driver draws the calibration rows (a seeded random sample of the split, in random order) and
cuts them into batches. As many Ray tasks as the train stage had workers (with the same CPUs and
GPUs each, read from the checkpoint's train config) each read the Parquet files holding their
contiguous run of batches with pyarrow and run them through the network (``tasks.nn.bn_stats``:
each BN layer normalizes with its batch's own statistics, dropout off), returning per-channel
moments in float64; the driver merges them and writes the checkpoint. The batches do not depend on
the number of tasks, so 1, 2 or 3 give the same statistics up to float64 rounding.

Tasks rather than a Ray Train worker group: the calibration forward needs no collective (every
layer's statistics come from one pass), and Ray runs tasks in its pooled worker processes, so the
stage skips a worker group's start (controller and worker actors, ~10 s on 2 cores). A worker that
dies is retried up to ``train.max_failures`` times, as the train stage's workers are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas import arrow
from schemas.artifacts import Checkpoint, CheckpointState, Dataset
from schemas.config import RecalibrateConfig, TrainConfig
from schemas.errors import DataError
from tasks import arrow_io
from tasks.console import QUIET, Console
from tasks.reader import Split

CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_ROWS = 10_000  # Wu & Johnson 2021: 10^3-10^4 rows estimate BN statistics well


def recalibrate(cfg: RecalibrateConfig, checkpoint: Checkpoint, data: Dataset, out_dir: Path, seed: int,
                console: Console = QUIET) -> Checkpoint:
    """Write a copy of ``checkpoint`` whose BN running statistics come from ``cfg.estimator`` over
    calibration rows of ``cfg.split`` (normalized like training data), without the optimizer state.

    Raises:
        DataError: a split the run does not have, more calibration rows than the split holds, or
            calibration files that break the contract or cannot be read.
    """
    from tasks.nn.bn_stats import calibrated_layers
    from tasks.nn.models import model_from_checkpoint

    state = CheckpointState.load(checkpoint.path)
    train_cfg = TrainConfig.model_validate(state.config)
    info = {"estimator": cfg.estimator, "split": cfg.split, "rows": 0}
    path = out_dir / CHECKPOINT_FILE
    # train.model.bn=freeze_stats/freeze: every BN layer kept the statistics it came with on purpose.
    include_frozen = cfg.include_frozen or train_cfg.model.bn == "train"
    nothing = include_frozen and not calibrated_layers(model_from_checkpoint(state), cfg.include_frozen)
    if cfg.estimator == "ema" or not include_frozen or nothing:
        if cfg.estimator != "ema":
            info["skipped"] = ("no BatchNorm layer to recalibrate" if nothing else
                               f"train.model.bn={train_cfg.model.bn}: BatchNorm statistics are frozen")
            console.say(f"recalibrate: {info['skipped']}; the statistics are kept"
                        + ("" if nothing else " (set recalibrate.include_frozen=true to re-estimate them)"))
        out_dir.mkdir(parents=True, exist_ok=True)
        _strip(state, info).save(path)
    else:
        if cfg.split not in data.splits:
            raise DataError(f"recalibrate.split={cfg.split!r}: the run has no such split; use one of "
                            f"{', '.join(sorted(data.splits))}")
        split = data.split(cfg.split)
        files = arrow_io.check_split(split, arrow.example_schema(data.num_features),
                                     where=f"recalibrate input split '{cfg.split}'")
        rows = calibration_rows(cfg, split.rows)
        plan = batch_plan(Split(files).file_rows, rows, cfg.batch_size, seed)
        out_dir.mkdir(parents=True, exist_ok=True)
        with console.progress("recalibrate", total=rows, unit="rows") as bar:
            _on_tasks(train_cfg, cfg, checkpoint.path, files, plan, info, path)
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


def read_rows(files: list[str], index: np.ndarray) -> np.ndarray:
    """Features of the global rows ``index`` (in that order), reading only the row groups that hold them."""
    table = Split(files).take(index, columns=[arrow.FEATURES])
    return arrow_io.features_numpy(table) if table.num_rows else np.empty((0, 0), dtype=np.float32)


def _strip(state: CheckpointState, info: dict) -> CheckpointState:
    """The checkpoint as a model only: no optimizer, scheduler or RNG state; how it was calibrated."""
    return state.model_copy(update={"optimizer": None, "scheduler": None, "rng": None, "recalibration": info})


def _on_tasks(train_cfg: TrainConfig, cfg: RecalibrateConfig, checkpoint_path: str, files: list[str], plan: dict,
              info: dict, out_path: Path) -> None:
    """One Ray task per shard (as many as the train stage's workers, with their CPUs and GPUs);
    the driver merges their float64 shares and writes the checkpoint. Plain tasks, not a Ray Train
    worker group: the calibration forward needs no collective, and tasks run in Ray's pooled worker
    processes, so the stage does not pay a worker group's start (~10 s on 2 cores)."""
    import ray

    from tasks.nn.bn_stats import apply_bn_stats, merge_bn_stats
    from tasks.nn.models import model_from_checkpoint

    shard = ray.remote(_calibrate_shard).options(
        num_cpus=train_cfg.cpus_per_worker, num_gpus=1 if train_cfg.use_gpu else 0,
        max_retries=train_cfg.max_failures, retry_exceptions=False)
    world = train_cfg.workers
    checkpoint = str(Path(checkpoint_path).resolve())
    plan_ref = ray.put(plan)
    shares = ray.get([shard.remote(checkpoint, files, plan_ref, rank, world, cfg.estimator, cfg.include_frozen,
                                   train_cfg.cpus_per_worker, train_cfg.use_gpu) for rank in range(world)])
    total = shares[0]
    for share in shares[1:]:
        total = merge_bn_stats(total, share)
    state = CheckpointState.load(checkpoint)
    model = model_from_checkpoint(state)
    rows = apply_bn_stats(model, total, cfg.include_frozen)
    state.model = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _strip(state, {**info, "rows": rows, "workers": world}).save(out_path)


def _calibrate_shard(checkpoint: str, files: list[str], plan: dict, rank: int, world: int, estimator: str,
                     include_frozen: bool, cpus: int, use_gpu: bool) -> dict:
    """Rank ``rank``'s contiguous run of batches through the calibration forward; its share (on the CPU)."""
    import torch

    from tasks.nn.bn_stats import collect_bn_stats
    from tasks.nn.models import model_from_checkpoint

    torch.set_num_threads(cpus)
    device = torch.device("cuda") if use_gpu else torch.device("cpu")
    state = CheckpointState.load(checkpoint)
    model = model_from_checkpoint(state).to(device)
    lo, hi = rank_batches(plan, rank, world)
    bounds = plan["bounds"]
    x = torch.from_numpy(read_rows(files, plan["order"][bounds[lo]:bounds[hi]])).view(-1, *state.spec.input_shape)
    batches = (x[bounds[b] - bounds[lo]: bounds[b + 1] - bounds[lo]].to(device) for b in range(lo, hi))
    share = collect_bn_stats(model, batches, estimator=estimator, include_frozen=include_frozen)
    return {**share, "layers": [None if a is None else _to_cpu(a) for a in share["layers"]]}


def _to_cpu(acc):
    import dataclasses

    import torch

    if isinstance(acc, torch.Tensor):
        return acc.cpu()
    return dataclasses.replace(acc, **{f.name: getattr(acc, f.name).cpu() for f in dataclasses.fields(acc)})
