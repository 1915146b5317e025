"""Reading the train and val loss curves the way the course notes do: the cases below and what to do next.

The reading looks at the curves' recent trend over ``window`` points (epochs for the train loss, val
evaluations for the val loss) with the thresholds of ``CurvesConfig``, in this order -- the first
case that matches wins, because a diverging run also "does not converge" and so on:

1. diverging: a loss is non-finite, or the train loss ends above its minimum by more than
   ``diverge_rise`` times the larger of that minimum and the drop from the first epoch to it (so
   the noise of a near-zero loss is not a divergence). Next: lower the learning rate, clip gradients.
2. too short: fewer than ``window + 1`` points of either curve; no trend can be read.
3. data problem: the final val loss is below ``data_gap`` times the final train loss (val far
   easier than train), or the train loss is flat over the window while the val loss still falls.
   Next: check the splits (leakage, different distributions, label noise).
4. overfitting: the val loss ends more than ``overfit_rise`` above its minimum, or the train loss
   falls while the val loss is flat. Next: regularize (weight decay), more data, stop earlier.
5. still learning: both fall over the window. Next: train longer.
6. overfitting, by the gap: both flat, and the final val loss is more than ``overfit_gap`` times
   the final train loss (the network fits the train rows far better than new ones: high variance).
7. converged: both flat. Next: nothing to gain from more epochs; change the model or the data.

"Falls" means dropped by more than ``flat`` (a share of the value at the window's start); the val
curve's drop is that of its best value, so one noisy evaluation does not read as a trend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from schemas.config import CurvesConfig

KINDS = ("diverging", "too_short", "data_problem", "overfitting", "still_learning", "converged")


class Reading(NamedTuple):
    kind: str
    note: str


def read_curves(epochs: list[dict], cfg: CurvesConfig) -> Reading:
    """Classify a run from its per-epoch history (``train_loss`` every epoch, ``val_loss`` where evaluated)."""
    train = [float(e["train_loss"]) for e in epochs]
    val = [float(e["val_loss"]) for e in epochs if "val_loss" in e]
    w = cfg.window
    if not all(map(math.isfinite, train + val)):
        return Reading("diverging", "diverging: a loss became non-finite; lower train.optimizer.lr or set train.grad_clip_norm")
    low = min(train) if train else 0.0
    if train and train[-1] - low > cfg.diverge_rise * max(low, train[0] - low):
        return Reading("diverging", f"diverging: the train loss ends at {train[-1]:.3g}, up from its minimum {low:.3g}; "
                                    "lower train.optimizer.lr or set train.grad_clip_norm")
    if len(train) <= w or len(val) <= w:
        return Reading("too_short", f"too short to read: {len(train)} epochs and {len(val)} val points, the trend needs "
                                    f"{w + 1}; train more epochs or lower evaluate.curves.window")
    train_drop = _drop(train[-w - 1], train[-1])
    val_drop = _drop(min(val[:-w]), min(val[-w:]))
    val_rise = (val[-1] - min(val)) / max(abs(min(val)), 1e-12)
    if val[-1] < cfg.data_gap * train[-1]:
        return Reading("data_problem", f"data problem: val loss {val[-1]:.3g} is far below train loss {train[-1]:.3g}; "
                                       "check that val comes from the same distribution and does not overlap train")
    if train_drop <= cfg.flat and val_drop > cfg.flat:
        return Reading("data_problem", "data problem: the train loss is flat while the val loss still falls; "
                                       "check the splits and the labels")
    if val_rise > cfg.overfit_rise or (train_drop > cfg.flat and val_drop <= cfg.flat):
        best = int(np.argmin(val))
        at = int([e["epoch"] for e in epochs if "val_loss" in e][best])
        return Reading("overfitting", f"overfitting: val loss is lowest at epoch {at} and no longer improves while the "
                                      "train loss falls; add weight decay, more data, or stop earlier")
    if train_drop > cfg.flat:
        return Reading("still_learning", "still learning: train and val losses are both falling; train more epochs")
    if val[-1] > cfg.overfit_gap * train[-1]:
        return Reading("overfitting", f"overfitting: both losses have flattened with val loss {val[-1]:.3g} far above train loss "
                                      f"{train[-1]:.3g}; add weight decay or more data, or use a smaller model")
    return Reading("converged", "converged: train and val losses have flattened; more epochs will not help, "
                                "change the model or the data to do better")


def _drop(start: float, end: float) -> float:
    """Relative decrease from ``start`` to ``end`` (negative when the curve rose)."""
    return (start - end) / max(abs(start), 1e-12)
