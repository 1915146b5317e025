"""Train stage: DDP training on Ray Train workers, BatchNorm synchronized across them.

The per-worker loop is plain PyTorch, read top to bottom. Distribution wraps the model in one
place (``_distribute``): SyncBatchNorm conversion, then ``ray.train.torch.prepare_model``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schemas import arrow
from schemas.artifacts import Checkpoint, CheckpointState, Dataset, ModelSpec, NormStats, NormStatsFile, TrainHistory
from schemas.config import OptimizerConfig, ScheduleConfig, TrainConfig
from schemas.errors import DataError, TrainingDiverged
from tasks import arrow_io
from tasks.console import Progress, say
from tasks.nn import convert_sync_batchnorm
from tasks.nn.models import build_model

CHECKPOINT_FILE = "checkpoint.pt"
DIVERGED_FILE = "diverged.txt"
PROGRESS_FILE = "progress.json"  # rank 0 -> driver: where training is, for the bar and the epoch lines
EpochCallback = Callable[[int, dict], None]


def train(cfg: TrainConfig, data: Dataset, norm_stats: NormStatsFile, out_dir: Path, seed: int,
          on_epoch: Optional[EpochCallback] = None) -> tuple[Checkpoint, TrainHistory]:
    """Train on ``data``'s train split with ``cfg.workers`` Ray Train workers; validate on val.

    Resumable: every epoch's state (weights, optimizer, scheduler, RNG, history) is a Ray Train
    checkpoint under ``out_dir``. Calling this again with the same ``out_dir`` after an interrupted
    call continues from the last complete epoch, and a failed worker is restarted from it (up to
    ``cfg.max_failures`` times). The data order is a function of (seed, epoch, rank) only, so a
    resumed run ends with the same weights as an uninterrupted one.

    Args:
        on_epoch: called on rank 0 only, after each epoch's checkpoint is saved, with (epoch,
            metrics); must be picklable. Epochs restored from a checkpoint are not passed again.
            A string it returns is shown on the driver's console once (worker output is not).

    Returns:
        The final checkpoint and the per-epoch history.

    Raises:
        DataError: too few rows for one batch per worker, or split files that break the contract.
        TrainingDiverged: the train loss became NaN or inf.
    """
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.rendezvous import ScopedTorchConfig

    train_rows = data.split("train").rows
    if train_rows < cfg.workers * cfg.batch_size:
        raise DataError(
            f"train: {train_rows} training rows cannot fill one batch of train.batch_size={cfg.batch_size} on each of "
            f"train.workers={cfg.workers}; lower train.batch_size or train.workers")
    expected = arrow.example_schema(data.num_features)
    for name in ("train", "val"):
        arrow_io.check_split(data.split(name).path, expected, where=f"train input split '{name}'")
    out_dir.mkdir(parents=True, exist_ok=True)
    diverged = out_dir / DIVERGED_FILE
    diverged.unlink(missing_ok=True)
    progress = out_dir / PROGRESS_FILE
    progress.unlink(missing_ok=True)
    # Materialized in the object store before the workers start: the read tasks would otherwise
    # compete with the training workers for the same CPUs and could wait forever for one.
    datasets = {name: ray.data.read_parquet(data.split(name).path).materialize() for name in ("train", "val")}
    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "seed": seed,
        "spec": ModelSpec(num_features=data.num_features, num_classes=data.num_classes,
                          image_shape=data.image_shape, feature_names=data.feature_names).model_dump(mode="json"),
        "norm_stats": NormStats.load(norm_stats.path).model_dump(mode="json"), "on_epoch": on_epoch,
        "diverged_path": str(diverged.resolve()), "progress_path": str(progress.resolve()),
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=ScopedTorchConfig(),  # the DDP rendezvous listens on the node's Ray address only
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        # A fixed name under out_dir: a second call with the same out_dir restores the latest
        # checkpoint (Ray Train's job-level restoration), which is how an interrupted run resumes.
        run_config=RunConfig(name="ray_train", storage_path=str(out_dir.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    with Progress("train", total=None, unit="step") as bar:
        result = fit_interruptibly(trainer, _ProgressWatch(progress, cfg.epochs, bar))
    if diverged.exists():
        raise TrainingDiverged(diverged.read_text().strip())
    with result.checkpoint.as_directory() as d:
        state = CheckpointState.load(Path(d) / CHECKPOINT_FILE)
    state.save(out_dir / CHECKPOINT_FILE)
    (out_dir / "history.json").write_text(json.dumps(state.history, indent=1))
    path = out_dir / CHECKPOINT_FILE
    return (Checkpoint(path=str(path), digest=arrow_io.file_digest(path), epoch=state.epoch, bn_mode=cfg.bn_mode),
            TrainHistory(path=str(out_dir / "history.json"), epochs=state.history))


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


def _train_loop(config: dict) -> None:
    import ray.train

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    device = ray.train.torch.get_device()
    spec = ModelSpec.model_validate(config["spec"])

    x_train, y_train = _load(ray.train.get_dataset_shard("train"))
    x_val, y_val = _load(ray.train.get_dataset_shard("val")) if rank == 0 else (None, None)
    model = build_model(cfg.model, spec.num_features, spec.num_classes, spec.image_shape)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.epochs)
    history: list[dict] = []
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a restarted worker group or a resumed run: continue after its epoch
        with restored.as_directory() as d:
            state = CheckpointState.load(Path(d) / CHECKPOINT_FILE)
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.rng["torch"])
        history = state.history
    progress = _ProgressFile(config["progress_path"], steps=len(y_train) // cfg.batch_size, history=history) if rank == 0 else None
    ddp_model = _distribute(model, cfg.bn_mode, world)
    on_epoch = config["on_epoch"]

    # DDP and SyncBatchNorm need every rank to take the same number of steps, or the rank with an
    # extra step waits forever in a collective. Ray's equal=True split promises equal shards; check it.
    steps = len(y_train) // cfg.batch_size
    if world > 1:
        both = torch.tensor([steps, -steps], dtype=torch.float64)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(f"rank {rank}: {steps} steps per epoch, but ranks range over {-int(both[1])}..{int(both[0])}")
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        ddp_model.train()
        lr = optimizer.param_groups[0]["lr"]
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, rows
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(data_order_seed(config["seed"], epoch, rank)))
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            logits = ddp_model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            if progress is not None:
                progress.write(epoch, s + 1)
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * len(yb), (logits.argmax(1) == yb).sum().double(),
                                     torch.tensor(float(len(yb)), dtype=torch.float64)]).cpu()
        scheduler.step()
        if world > 1:  # one collective per epoch for the global train metrics
            torch.distributed.all_reduce(sums)
        metrics = {"train_loss": float(sums[0] / sums[2]), "train_accuracy": float(sums[1] / sums[2]), "lr": lr,
                   "epoch_seconds": time.perf_counter() - t0}
        if not math.isfinite(metrics["train_loss"]):
            # Every rank sees the same reduced loss and stops here together. A user error, not a
            # worker failure: no retry, no worker traceback; the driver raises it from this file.
            if rank == 0:
                Path(config["diverged_path"]).write_text(
                    f"train loss is {metrics['train_loss']} at epoch {epoch}: training diverged; lower train.optimizer.lr "
                    "or set train.grad_clip_norm\n")
            return
        if rank == 0:
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                metrics.update(evaluate_arrays(model, x_val, y_val, device, prefix="val_"))
            history.append({"epoch": epoch, **metrics})
            progress.write(epoch, steps, force=True)
            state = CheckpointState(
                # SyncBatchNorm and BatchNorm share their state-dict keys: no conversion needed.
                model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng={"torch": torch.get_rng_state()},
                epoch=epoch, config=config["cfg"], bn_mode=cfg.bn_mode, spec=spec,
                norm_stats=NormStats.model_validate(config["norm_stats"]), history=history)
            with tempfile.TemporaryDirectory() as d:
                state.save(Path(d) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            # After the checkpoint: an epoch is logged at most once (a crash in between leaves a gap
            # that the driver fills from the history, never a repeated step).
            if on_epoch is not None:
                note = on_epoch(epoch, metrics)
                if note:  # e.g. the tracking server is unreachable: the driver says it
                    progress.notes.append(note)
                    progress.write(epoch, steps, force=True)
        else:
            ray.train.report(metrics, checkpoint=None)


class _ProgressFile:
    """Rank 0's side of the progress report: a small JSON file beside the checkpoints (storage every
    node sees), replaced atomically and at most twice a second, so it costs the loop nothing."""

    def __init__(self, path: str, steps: int, history: list[dict]):
        self.path, self.steps, self.history = Path(path), steps, history
        self.resumed_after = len(history)
        self.notes: list[str] = []
        self.last = 0.0

    def write(self, epoch: int, step: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "step": step, "steps": self.steps,
                                   "resumed_after": self.resumed_after, "history": self.history,
                                   "notes": self.notes}))
        tmp.replace(self.path)


class _ProgressWatch:
    """The driver's side: reads the progress file and moves the bar (on a terminal) or says one line
    per finished epoch (in a log)."""

    def __init__(self, path: Path, epochs: int, bar: Progress):
        self.path, self.epochs, self.bar = path, epochs, bar
        self.said_epoch = None  # last epoch with a line; None before the first read
        self.said_resume = -1
        self.said_notes: set[str] = set()

    def __call__(self) -> None:
        try:
            p = json.loads(self.path.read_text())
        except (OSError, ValueError):  # not written yet, or on a filesystem that showed a partial file
            self.bar.tick()
            return
        if p["resumed_after"] and p["resumed_after"] != self.said_resume:
            self.said_resume = p["resumed_after"]
            say(f"train: resuming after epoch {p['resumed_after']} from its checkpoint")
        for note in p["notes"]:
            if note not in self.said_notes:
                self.said_notes.add(note)
                say(note)
        if self.said_epoch is None:
            self.said_epoch = p["resumed_after"]
        for h in p["history"]:
            if h["epoch"] > self.said_epoch:
                self.said_epoch = h["epoch"]
                if self.bar.bar is None:  # a log, not a terminal: the epoch's line is its progress
                    say(f"train epoch {h['epoch']}/{self.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in h.items() if k != "epoch"))
        last = p["history"][-1] if p["history"] else {}
        postfix = {k: f"{last[k]:.4g}" for k in ("train_loss", "val_accuracy") if k in last}
        self.bar.set((p["epoch"] - 1) * p["steps"] + p["step"], total=self.epochs * p["steps"],
                     desc=f"train epoch {p['epoch']}/{self.epochs}", **postfix)


def data_order_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the shuffle of ``rank``'s shard in ``epoch``: a function of these alone, so a resumed
    or restarted run visits the rows in the same order as an uninterrupted one."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def _load(shard) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker's shard as in-memory tensors: read once through Ray Data, reshuffled locally each epoch."""
    xs, ys = [], []
    for batch in shard.iter_batches(batch_size=None, batch_format="pyarrow"):
        xs.append(arrow_io.features_numpy(batch))
        ys.append(arrow_io.labels_numpy(batch))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys).astype(np.int64))


def _distribute(model: nn.Module, bn_mode: str, world: int) -> nn.Module:
    """The one place where distribution wraps the model: SyncBatchNorm, then DDP."""
    import ray.train.torch

    if world == 1:
        return model
    if bn_mode == "sync":
        convert_sync_batchnorm(model)
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs(bn_mode))


def ddp_kwargs(bn_mode: str) -> dict:
    """DDP options per BN mode. With synchronized BN every rank computes identical running
    statistics, so DDP's broadcast of rank 0's buffers before every forward is a redundant
    collective (measured: step-time ratio vs local BN 1.31 -> 1.22 with it off)."""
    return {"forward_sync_buffers": bn_mode != "sync"}


@torch.no_grad()
def evaluate_arrays(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, prefix: str = "",
                    batch_size: int = 2048) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every row (eval mode: BN uses running statistics)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for s in range(0, len(y), batch_size):
        logits = model(x[s : s + batch_size].to(device))
        yb = y[s : s + batch_size].to(device)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return {f"{prefix}loss": loss / len(y), f"{prefix}accuracy": correct / len(y)}


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``; weight decay only on conv/linear weights, not on BN or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps)
    return torch.optim.Adadelta(groups, lr=cfg.lr, rho=cfg.rho, eps=cfg.eps)


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """torch's per-epoch schedulers: ``cfg.kind`` after ``cfg.warmup_epochs`` of linear warm-up.

    Warm-up epoch e (0-based) runs at (e + 1) / (warmup + 1) of the base rate. Cosine anneals from
    the base rate to ``min_lr`` over the remaining epochs, reaching it after the last one (the last
    epoch still trains above it).
    """
    from torch.optim import lr_scheduler as S

    span = max(1, epochs - cfg.warmup_epochs)
    if cfg.kind == "step":
        main = S.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.kind == "exponential":
        main = S.ExponentialLR(optimizer, gamma=cfg.gamma)
    elif cfg.kind == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=span, eta_min=cfg.min_lr)
    else:
        main = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.warmup_epochs == 0:
        return main
    warm = S.LinearLR(optimizer, start_factor=1 / (cfg.warmup_epochs + 1), end_factor=1.0, total_iters=cfg.warmup_epochs)
    return S.SequentialLR(optimizer, [warm, main], milestones=[cfg.warmup_epochs])
