"""The train stage's worker side: the loop every Ray Train worker runs, read top to bottom.

Data (its share of the split, streamed: ``tasks.stream``), model (built, restored from a checkpoint, then wrapped for
distribution in one place: ``distribute``), the steps, validation on every rank, and rank 0's
checkpoint per epoch. The driver side (the trainer, progress, timings) is ``tasks.train``.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from schemas.artifacts import CheckpointState, ModelSpec, Network, NormStats
from schemas.config import LRScheduleConfig, OptimizerConfig, TrainConfig
from tasks.convergence import GradMonitor, best_epoch, stop_reason
from tasks.nn import convert_sync_batchnorm
from tasks.nn.models import from_network
from tasks.nn.network import load_weights, read_weights
from tasks.stream import ShardStream
from tasks.train_progress import ProgressWriter

CHECKPOINT_FILE = "checkpoint.pt"


def train_loop(config: dict) -> None:
    """One Ray Train worker: read its shard, build and wrap the model, train, validate, checkpoint."""
    import ray.train

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    device = ray.train.torch.get_device()
    spec = ModelSpec.model_validate(config["spec"])

    clock = Clock()  # where the seconds go; rank 0's is reported
    train_data = ShardStream(config["files"]["train"], rank, world, spec.input_shape, cfg.shuffle_buffer_rows)
    val_data = ShardStream(config["files"]["val"], rank, world, spec.input_shape, cfg.shuffle_buffer_rows)
    clock.mark("data_ready")
    network = Network.model_validate(config["network"])
    model = from_network(network, cfg.model.init_scheme)
    if config.get("weights"):  # a warm start; a resumed run's checkpoint below replaces it
        load_weights(model, read_weights(config["weights"]), cfg.model.weights)
    freeze_bn(model, cfg.model.bn)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.epochs)
    history: list[dict] = []
    best_model, stopped = None, None
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a restarted worker group or a resumed run: continue after its epoch
        with restored.as_directory() as d:
            state = CheckpointState.load(Path(d) / CHECKPOINT_FILE)
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.rng["torch"])
        history, best_model, stopped = state.history, state.best_model, state.stop_reason
    steps = train_data.steps(cfg.batch_size)
    progress = ProgressWriter(config["out_dir"], steps=steps, history=history,
                              clock=clock) if rank == 0 else None
    clock.mark("model_built")
    ddp_model = distribute(model, cfg.bn_mode, world)
    clock.mark("ddp_ready")

    # DDP and SyncBatchNorm need every rank to take the same number of steps, or the rank with an
    # extra step waits forever in a collective. ShardStream promises equal shares; check it.
    if world > 1:
        both = torch.tensor([steps, -steps], dtype=torch.float64)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(f"rank {rank}: {steps} steps per epoch, but ranks range over {-int(both[1])}..{int(both[0])}")
    grads = GradMonitor(model, cfg.grad_health)
    keep_best = cfg.early_stopping.patience is not None or cfg.early_stopping.train_window is not None
    clock.mark("model_ready")
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if stopped:  # restored after the epoch that decided to stop
            break
        t0 = time.perf_counter()
        ddp_model.train()
        freeze_bn(model, cfg.model.bn)  # after train(): frozen layers stay in eval mode
        lr = optimizer.param_groups[0]["lr"]
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, rows
        for s, (xb, yb) in enumerate(train_data.epoch(epoch, config["seed"], cfg.batch_size)):
            xb, yb = xb.to(device), yb.to(device)
            logits = ddp_model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads.step()  # the all-reduced gradients, before clipping can hide an explosion
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            clock.mark("first_step")
            if progress is not None:
                progress.step(epoch, s + 1)
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
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            with clock.span("validation"):
                metrics.update(validate(model, val_data, device, world, cfg.bn_mode))
        metrics.update(grads.epoch_metrics())
        # Every rank keeps the history: the stopping rule reads it, and its inputs (all-reduced
        # losses) are the same on every rank, so all ranks stop after the same epoch.
        history.append({"epoch": epoch, **metrics})
        stopped = stop_reason(history, cfg.early_stopping)
        if keep_best and rank == 0 and best_epoch(history) == epoch:
            best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            with clock.span("checkpoint"):
                state = CheckpointState(
                    # SyncBatchNorm and BatchNorm share their state-dict keys: no conversion needed.
                    model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng={"torch": torch.get_rng_state()},
                    epoch=epoch, config=config["cfg"], bn_mode=cfg.bn_mode, spec=spec, network=network,
                    norm_stats=NormStats.model_validate(config["norm_stats"]), history=history,
                    best_model=best_model, stop_reason=stopped)
                with tempfile.TemporaryDirectory() as d:
                    state.save(Path(d) / CHECKPOINT_FILE)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            # The driver learns of an epoch (and logs it to MLflow) only once its checkpoint is
            # persisted: a crash in between leaves a gap that it fills from the history, never a
            # logged epoch that a resumed run trains again.
            progress.epoch_done(epoch)
        else:
            ray.train.report(metrics, checkpoint=None)
        if stopped:
            break
    clock.mark("loop_end")
    if progress is not None:
        progress.epoch_done(len(history))


class Clock:
    """Wall-clock marks (first time only) and summed spans of one worker's loop, in seconds."""

    def __init__(self):
        self.marks = {"loop_start": time.time()}
        self.spans: dict[str, float] = {}
        self._open: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = time.time()

    def start(self, name: str) -> None:
        self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self.spans[name] = self.spans.get(name, 0.0) + time.perf_counter() - self._open.pop(name)

    @contextlib.contextmanager
    def span(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)


def freeze_bn(model: nn.Module, policy: str) -> None:
    """``train.model.bn``: with ``freeze_stats`` or ``freeze`` every BatchNorm layer normalizes with
    its running statistics and never moves them (eval mode; no collective under SyncBatchNorm
    either); ``freeze`` also fixes gamma and beta (no gradient: the optimizer leaves them out).
    Layers that are not ``_BatchNorm`` (torchvision's ``FrozenBatchNorm2d``) are frozen by their
    own class. Call after every ``model.train()``."""
    if policy == "train":
        return
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            if policy == "freeze":
                m.requires_grad_(False)


def distribute(model: nn.Module, bn_mode: str, world: int) -> nn.Module:
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
def validate(model: nn.Module, data: ShardStream, device, world: int, bn_mode: str,
             batch_size: int = 2048) -> dict[str, float]:
    """``val_loss`` (mean cross-entropy) and ``val_accuracy`` over every val row, on every rank.

    Each rank scores its own part of the rows (``ShardStream.in_order``; eval mode: BN uses running
    statistics) and the sums are all-reduced, so validation costs each rank 1/world of it instead of
    rank 0 all of it while the others wait. The model scored is rank 0's: parameters are identical
    under DDP, and with local BN the running statistics (which differ per rank) are first taken from
    rank 0, as DDP itself does before every training forward; under sync BN they are identical already.
    """
    if world > 1 and bn_mode != "sync":
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, rows
    for xb, yb in data.in_order(batch_size):
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        sums += torch.stack([F.cross_entropy(logits, yb, reduction="sum").double(), (logits.argmax(1) == yb).sum().double(),
                             torch.tensor(float(len(yb)), dtype=torch.float64)]).cpu()
    model.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(sums)
    return {"val_loss": float(sums[0] / sums[2]), "val_accuracy": float(sums[1] / sums[2])}


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


def build_scheduler(cfg: LRScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int):
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
