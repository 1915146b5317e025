"""Train stage: DDP training on Ray Train workers, BatchNorm synchronized across them.

This module is the stage's driver side: it checks the inputs, builds the ``TorchTrainer`` that
runs ``tasks.train_loop.train_loop`` on every worker, watches its progress
(``tasks.train_progress``), and returns the final checkpoint and history.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from schemas import arrow
from schemas.artifacts import (Checkpoint, CheckpointState, Dataset, ModelSpec, NormStats, NormStatsFile, TrainHistory,
                               Weights)
from schemas.config import TrainConfig
from schemas.errors import DataError, TrainingDiverged
from tasks import arrow_io
from tasks.console import QUIET, Console
from tasks.convergence import best_epoch
from tasks.nn.network import check_network, load_weights, network_of, read_weights
from tasks.train_loop import CHECKPOINT_FILE, train_loop
from tasks.train_progress import EPOCHS_FILE, PROGRESS_FILE, EpochCallback, ProgressWatch

DIVERGED_FILE = "diverged.txt"
TIMINGS_FILE = "timings.json"  # where the stage's seconds went (last attempt), see _write_timings


def train(cfg: TrainConfig, data: Dataset, norm_stats: NormStatsFile, out_dir: Path, seed: int,
          weights: Optional[Weights] = None, on_epoch: Optional[EpochCallback] = None,
          console: Console = QUIET) -> tuple[Checkpoint, TrainHistory]:
    """Train on ``data``'s train split with ``cfg.workers`` Ray Train workers; validate on val.

    Resumable: every epoch's state (weights, optimizer, scheduler, RNG, history) is a Ray Train
    checkpoint under ``out_dir``. Calling this again with the same ``out_dir`` after an interrupted
    call continues from the last complete epoch, and a failed worker is restarted from it (up to
    ``cfg.max_failures`` times). The data order is a function of (seed, epoch, rank) only, so a
    resumed run ends with the same weights as an uninterrupted one.

    Args:
        weights: a warm start (``train.model.weights`` resolved by ``pipeline.warm_start``): the
            network starts from these tensors instead of its initialization.
        on_epoch: called in this process (the driver) with (epoch, metrics) for each epoch whose
            checkpoint is persisted, within half a second of it; never inside the training loop,
            which it cannot slow down. Epochs restored from a checkpoint are not passed again.

    Returns:
        The final checkpoint and the per-epoch history.

    Raises:
        DataError: too few rows for one batch per worker, or split files that break the contract.
        ModelError: a network that cannot be built or run on this data (``tasks.nn.network``), or
            warm-start weights that do not fit it.
        TrainingDiverged: the train loss became NaN or inf.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.rendezvous import ScopedTorchConfig

    train_rows = data.split("train").rows
    if train_rows < cfg.workers * cfg.batch_size:
        raise DataError(
            f"train: {train_rows} training rows cannot fill one batch of train.batch_size={cfg.batch_size} on each of "
            f"train.workers={cfg.workers}; lower train.batch_size or train.workers")
    # The pre-flight again, now with the data's exact shape and class count: seconds, not a worker group's start.
    network = network_of(cfg.model, data.input_shape, data.num_classes)
    model = check_network(cfg.model, data.input_shape, data.num_classes, say=lambda line: None)
    if weights is not None:
        load_weights(model, read_weights(weights.path), weights.source)
    expected = arrow.example_schema(data.num_features)
    files = {name: arrow_io.check_split(data.split(name), expected, where=f"train input split '{name}'")
             for name in ("train", "val")}
    out_dir.mkdir(parents=True, exist_ok=True)
    diverged = out_dir / DIVERGED_FILE
    diverged.unlink(missing_ok=True)
    for name in (PROGRESS_FILE, EPOCHS_FILE):  # an earlier attempt's: this attempt's workers write their own
        (out_dir / name).unlink(missing_ok=True)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "seed": seed, "network": network.model_dump(mode="json"),
        "weights": weights.path if weights is not None else None,
        "spec": ModelSpec(num_features=data.num_features, num_classes=data.num_classes,
                          image_shape=data.image_shape, feature_names=data.feature_names,
                          features_column=data.features_column, class_names=data.class_names).model_dump(mode="json"),
        "norm_stats": NormStats.load(norm_stats.path).model_dump(mode="json"),
        "diverged_path": str(diverged.resolve()), "out_dir": str(out_dir.resolve()),
        "files": {name: [str(Path(f).resolve()) for f in fs] for name, fs in files.items()},
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=ScopedTorchConfig(),  # the DDP rendezvous listens on the node's Ray address only
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        # A fixed name under out_dir: a second call with the same out_dir restores the latest
        # checkpoint (Ray Train's job-level restoration), which is how an interrupted run resumes.
        run_config=RunConfig(name="ray_train", storage_path=str(out_dir.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    fit_called = time.time()
    # Ray Train takes seconds to start its controller and workers: the bar says what it waits for.
    with console.progress(f"train: starting {cfg.workers} Ray Train worker(s)", total=None, unit="step") as bar:
        watch = ProgressWatch(out_dir, cfg.epochs, bar, console, on_epoch)
        result = fit_interruptibly(trainer, watch)
    _write_timings(out_dir / EPOCHS_FILE, fit_called, time.time(), watch.on_epoch_s, out_dir / TIMINGS_FILE)
    if diverged.exists():
        raise TrainingDiverged(diverged.read_text().strip())
    with result.checkpoint.as_directory() as d:
        state = CheckpointState.load(Path(d) / CHECKPOINT_FILE)
    best = best_epoch(state.history)
    if state.best_model is not None:  # early stopping: the trained weights are the best epoch's
        state = state.model_copy(update={"model": state.best_model, "best_model": None})
        console.say(f"train: {'stopped after epoch ' + str(state.epoch) + ': ' + state.stop_reason if state.stop_reason else 'ran every epoch'}; "
            f"the trained weights are epoch {best}'s (lowest val loss)")
    state.save(out_dir / CHECKPOINT_FILE)
    (out_dir / "history.json").write_text(json.dumps(state.history, indent=1))
    path = out_dir / CHECKPOINT_FILE
    return (Checkpoint(path=str(path), digest=arrow_io.file_digest(path), epoch=state.epoch, bn_mode=cfg.bn_mode),
            TrainHistory(path=str(out_dir / "history.json"), epochs=state.history, stop_reason=state.stop_reason,
                         best_epoch=best))


def fit_interruptibly(trainer, watch: Callable[[], None]):
    """``trainer.fit()`` in a helper thread, calling ``watch`` twice a second meanwhile. On the main
    thread Ray Train installs its own SIGINT handler, which aborts the run and exits the process with
    a code of its own; from a helper thread Ctrl-C stays a KeyboardInterrupt in the caller, which
    decides what an interruption means."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=target, name="bnflow-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: signals are handled between them
        watch()
    watch()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _write_timings(epochs_file: Path, fit_called: float, fit_returned: float, on_epoch_s: float, path: Path) -> None:
    """Where the last ``trainer.fit()`` spent its seconds, from rank 0's clock (wall-clock seconds;
    per-epoch spans summed over the epochs this attempt ran). ``on_epoch_s`` ran on the driver,
    beside the loop, not in it."""
    try:
        report = json.loads(epochs_file.read_text())
    except (OSError, ValueError):
        return  # the loop never wrote its clock: nothing to say
    m, spans = report["clock"]["marks"], report["clock"]["spans"]
    epochs = report["history"][report["resumed_after"]:]
    out = {
        "fit_to_loop_s": m["loop_start"] - fit_called,  # Ray Train starts its controller and worker group
        "data_load_s": m["data_ready"] - m["loop_start"],
        "model_setup_s": m.get("model_ready", m["data_ready"]) - m["data_ready"],  # build, restore, DDP
        "ddp_setup_s": m.get("ddp_ready", m["data_ready"]) - m.get("model_built", m["data_ready"]),  # SyncBN, DDP's broadcast
        "fit_to_first_step_s": m.get("first_step", m["data_ready"]) - fit_called,
        "epochs_compute_s": sum(h["epoch_seconds"] for h in epochs),
        "validation_s": spans.get("validation", 0.0),
        "checkpoint_s": spans.get("checkpoint", 0.0),
        "driver_mlflow_s": on_epoch_s,
        "loop_s": m.get("loop_end", fit_returned) - m["loop_start"],
        "loop_end_to_fit_return_s": fit_returned - m.get("loop_end", fit_returned),
        "fit_s": fit_returned - fit_called,
        "rank0_peak_rss_mb": report["clock"].get("peak_rss_bytes", 0) / 2**20,  # the worker process, at its last epoch
    }
    path.write_text(json.dumps(out, indent=1))
