"""When to stop training, and whether the gradients are healthy: pure rules over the per-epoch history
and the model's gradients, used by the train loop on every rank (their inputs are identical on every
rank, so every rank reaches the same decision without a collective).

Early stopping (``train.early_stopping``), checked after each epoch:

- ``patience``: stop when the val loss has not improved on its best by more than ``min_delta`` for
  ``patience`` consecutive val evaluations (every ``train.eval_every`` epochs);
- ``train_window``: stop when the train loss changed by less than ``train_min_change`` (a share of
  its value) over the last ``train_window`` epochs -- converged.

The trained checkpoint then holds the best epoch's weights (lowest val loss), not the last ones.

Gradient health (``train.grad_health``), per epoch from the gradients of the weight layers (Linear and
convolution weights, in the order the model registers them, ``named_parameters``: the forward order
for the built-in networks and for most ``nn.Sequential`` stacks, but not for a network that defines
its head before its body) after DDP's all-reduce, so they are the global gradients, and before
clipping, so clipping does not hide an explosion:

- ``grad_norm/<layer>``: the layer's gradient L2 norm, averaged over the epoch's steps;
- ``grad_first_to_last``: first registered layer's over last registered layer's norm; below ``vanishing_ratio`` flags
  vanishing gradients (the early layers barely learn: Glorot & Bengio 2010);
- ``grad_norm_max``: the largest global norm of a step; above ``exploding_norm`` or non-finite flags
  exploding gradients. Flags are metrics ``grad_vanishing`` / ``grad_exploding`` (0 or 1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from schemas.config import EarlyStoppingConfig, GradHealthConfig


def stop_reason(history: list[dict], cfg: EarlyStoppingConfig) -> Optional[str]:
    """Why training should stop after the last epoch of ``history``, or None to go on."""
    val = [(int(e["epoch"]), e["val_loss"]) for e in history if "val_loss" in e]
    if cfg.patience is not None and len(val) > cfg.patience:
        best_epoch, best = val[0]
        waited = 0
        for epoch, loss in val[1:]:
            if loss < best - cfg.min_delta:
                best_epoch, best, waited = epoch, loss, 0
            else:
                waited += 1
        if waited >= cfg.patience:
            return (f"val loss has not improved by more than {cfg.min_delta} for {waited} evaluations "
                    f"(best {best:.4g} at epoch {best_epoch})")
    train = [e["train_loss"] for e in history]
    if cfg.train_window is not None and len(train) > cfg.train_window:
        start, end = train[-cfg.train_window - 1], train[-1]
        change = abs(start - end) / max(abs(start), 1e-12)
        if change < cfg.train_min_change:
            return f"train loss changed by {change:.2%} over the last {cfg.train_window} epochs (converged)"
    return None


def best_epoch(history: list[dict]) -> Optional[int]:
    """The epoch with the lowest val loss (the first one on a tie), or None without val losses."""
    val = [(e["val_loss"], int(e["epoch"])) for e in history if "val_loss" in e and math.isfinite(e["val_loss"])]
    return min(val)[1] if val else None


class GradMonitor:
    """Accumulates per-layer gradient norms over an epoch's steps; ``epoch_metrics`` ends the epoch."""

    def __init__(self, model: nn.Module, cfg: GradHealthConfig):
        self.cfg = cfg
        self.layers = [(name.removesuffix(".weight"), p) for name, p in model.named_parameters()
                       if name.endswith("weight") and p.dim() > 1]  # Linear / conv weights, not BN's
        self._reset()

    def _reset(self):
        self.sums, self.max_total, self.steps = None, None, 0

    def step(self) -> None:
        """Call after ``backward()`` (and DDP's all-reduce), before clipping and ``optimizer.step()``.
        Sums stay on the gradients' device: no host sync per step."""
        grads = [p.grad for _, p in self.layers]
        if any(g is None for g in grads):
            return
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads]).double()
        total = norms.square().sum().sqrt()  # over the weight layers; NaN and inf propagate
        if self.sums is None:
            self.sums, self.max_total = torch.zeros_like(norms), torch.zeros_like(total)
        self.sums += norms
        self.max_total = torch.maximum(self.max_total, total)
        self.steps += 1

    def epoch_metrics(self) -> dict[str, float]:
        if not self.steps:
            return {}
        mean = (self.sums / self.steps).cpu().tolist()
        max_total = float(self.max_total)
        out = {f"grad_norm/{name}": v for (name, _), v in zip(self.layers, mean)}
        ratio = mean[0] / mean[-1] if mean[-1] > 0 else math.inf
        out.update({"grad_first_to_last": ratio, "grad_norm_max": max_total,
                    "grad_vanishing": float(ratio < self.cfg.vanishing_ratio),
                    "grad_exploding": float(not math.isfinite(max_total) or max_total > self.cfg.exploding_norm)})
        self._reset()
        return out


def grad_health(history: list[dict]) -> tuple[str, str]:
    """(tag value, note) for a run's history: ``ok``, ``vanishing`` or ``exploding`` (the first epoch flagged)."""
    for key, kind, advice in (("grad_exploding", "exploding", "lower the learning rate, set train.grad_clip_norm, "
                                                              "or scale the initial weights down"),
                              ("grad_vanishing", "vanishing", "keep BatchNorm, use ReLU and a scaled init (kaiming, xavier)")):
        flagged = [e for e in history if e.get(key, 0.0) > 0]
        if flagged:
            e = flagged[0]
            what = (f"largest gradient norm {e['grad_norm_max']:.3g}" if kind == "exploding"
                    else f"first-to-last layer gradient ratio {e['grad_first_to_last']:.2g}")
            return kind, f"gradients {kind} from epoch {int(e['epoch'])} ({what}): {advice}"
    if any("grad_vanishing" in e for e in history):
        return "ok", ""
    return "unmeasured", ""
