"""Re-estimate BatchNorm running statistics for fixed weights: collect, merge, apply.

Estimators (``ESTIMATORS``):
  * ``exact`` (PreciseBN, Wu & Johnson 2021): each BN layer's running mean and variance become the
    mean and unbiased variance of that layer's input over EVERY calibration row. Each share of the
    batches (``collect_bn_stats``, one per Ray task in the recalibrate stage) accumulates (count,
    mean, M2) per channel with Chan's merge in float64 (``tasks.moments``); shares merge
    count-weighted (``merge_bn_stats``) in any grouping. An empty share contributes count 0.
  * ``batch_mean`` (the course's formula; Ioffe & Szegedy 2015, Alg. 2): the mean over mini-batches
    (of all shares) of each batch's mean and of each batch's unbiased variance. Every batch weighs the
    same, whatever its size, and the spread BETWEEN batch means is left out, so the variance is
    underestimated when batches differ (e.g. sorted by class). Kept for comparison.
  * ``ema``: no pass at all: the running averages training left. Callers skip this function.

The calibration forward (the contract the tests check):
  * The chosen BN layers normalize with the statistics of the batch they see, as in training mode
    (the batch's mean and biased variance, computed once in float64 and also recorded); every
    module, these included, is in eval mode (dropout off, frozen BN layers normalize with their
    stored statistics, no buffer moves during the pass). A layer's recorded input therefore
    depends on the batches the calibration rows are cut into, not only on the set of rows: shares
    collected apart and merged equal one pass over the same batches.
  * Only the normalization step of a chosen layer changes: its class is swapped, for the pass, to
    one whose MRO runs the calibration step where ``_BatchNorm.forward`` would
    (``tasks.nn.syncbn.norm_step``), so whatever a BatchNorm subclass does around
    ``super().forward(x)`` -- an activation fused into the layer, extra children -- runs as in
    training and the next layer records what it would see. A chosen layer whose forward normalizes
    by other means (its own ``F.batch_norm``) would bypass the step: ``ModelError``, never a silent
    miscalibration. Modules that are not ``_BatchNorm`` (torchvision's ``FrozenBatchNorm2d``) are
    never chosen and run as they are.
  * The forward is plain BatchNorm with no collective: shares are collected independently, in any
    process, and only their accumulators travel.

Hygiene: only the running mean/var buffers of the chosen layers change. ``num_batches_tracked``,
momentum, every module's training flag, weights and biases are as they were afterwards. BN layers
frozen on purpose -- affine parameters that do not require gradients, e.g. after
``layer.requires_grad_(False)`` -- keep their statistics unless ``include_frozen``. Gradients are
never computed.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tasks import moments
from tasks.nn.syncbn import norm_step

ESTIMATORS = ("exact", "ema", "batch_mean")


def is_frozen(layer: _BatchNorm) -> bool:
    """A BN layer whose affine parameters exist and none of them requires a gradient."""
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return bool(params) and not any(p.requires_grad for p in params)


def calibrated_layers(model: nn.Module, include_frozen: bool = False) -> list[_BatchNorm]:
    """The BN layers whose statistics a calibration pass re-estimates, in module order."""
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
            and (include_frozen or not is_frozen(m))]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], estimator: str = "exact",
                    include_frozen: bool = False) -> int:
    """Replace the running mean/var of ``model``'s BN layers with statistics of ``batches``, in this
    process (``collect_bn_stats`` then ``apply_bn_stats``).

    Args:
        model: a model with BatchNorm layers (``tasks.nn.revert_sync_batchnorm`` first).
        batches: input tensors as the model's forward takes them; each must hold >= 2 rows.
        estimator: ``exact`` or ``batch_mean`` (module docstring).
        include_frozen: re-estimate frozen BN layers too.

    Returns:
        The number of calibration rows.

    Raises:
        ValueError: an unknown estimator, no BN layer to calibrate, torch's SyncBatchNorm in the
            model, or no row (the model is left untouched).
        ModelError: a calibrated layer that normalizes outside ``_BatchNorm.forward``.
    """
    return apply_bn_stats(model, collect_bn_stats(model, batches, estimator, include_frozen), include_frozen)


@torch.no_grad()
def collect_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], estimator: str = "exact",
                     include_frozen: bool = False) -> dict:
    """One shard's share of a calibration: the calibration forward over ``batches`` (module
    docstring), recording each calibrated layer's input; nothing in ``model`` changes.

    Returns ``{"estimator", "rows", "layers"}``, ``layers`` holding one float64 accumulator per
    calibrated layer (``exact``: a ``Moments`` or None for no row; ``batch_mean``: [batches, sum of
    means, sum of variances]). Shares of disjoint batch sets merge with ``merge_bn_stats`` in any
    grouping, and ``apply_bn_stats`` writes the result into a model.

    Raises:
        ValueError: an unknown estimator, no BN layer to calibrate, or torch's SyncBatchNorm in the
            model (revert it first).
        ModelError: a calibrated layer that normalizes outside ``_BatchNorm.forward``, named.
    """
    if estimator not in ("exact", "batch_mean"):
        raise ValueError(f"update_bn_stats: estimator {estimator!r} is not one of 'exact', 'batch_mean'")
    layers = calibrated_layers(model, include_frozen)
    if not layers:
        raise ValueError("update_bn_stats: the model has no BatchNorm layer with running statistics to calibrate")
    names = {m: name for name, m in model.named_modules()}
    for layer in layers:
        if isinstance(layer, nn.SyncBatchNorm):  # its forward never reaches _BatchNorm.forward
            raise ValueError(f"update_bn_stats: layer {names[layer]!r} is torch's SyncBatchNorm -- "
                             "tasks.nn.revert_sync_batchnorm(model) first")
    recorders = [(_Exact(layer) if estimator == "exact" else _BatchMean(layer)) for layer in layers]
    flags = {m: m.training for m in model.modules()}
    rows = 0
    try:
        model.eval()  # dropout off; frozen BN layers normalize with their stored statistics
        for layer, rec in zip(layers, recorders):
            layer._bnflow_recorder = rec
        with norm_step({names[layer]: layer for layer in layers}, _CalibrationStep):
            for x in batches:
                model(x)
                rows += len(x)
    finally:
        for layer in layers:
            vars(layer).pop("_bnflow_recorder", None)
        for m, training in flags.items():
            m.training = training
    return {"estimator": estimator, "rows": rows, "layers": [rec.state() for rec in recorders]}


def merge_bn_stats(a: dict, b: dict) -> dict:
    """Two shares of one calibration (``collect_bn_stats``) as one: moments merged with Chan's
    formula, batch-mean sums added, all in float64."""
    if a["estimator"] != b["estimator"] or len(a["layers"]) != len(b["layers"]):
        raise ValueError("merge_bn_stats: the shares come from different estimators or models")
    if a["estimator"] == "exact":
        layers = [x if y is None else y if x is None else moments.merge(x, y) for x, y in zip(a["layers"], b["layers"])]
    else:
        layers = [x + y.to(x.device) for x, y in zip(a["layers"], b["layers"])]
    return {"estimator": a["estimator"], "rows": a["rows"] + b["rows"], "layers": layers}


@torch.no_grad()
def apply_bn_stats(model: nn.Module, stats: dict, include_frozen: bool = False) -> int:
    """Write a (merged) calibration's mean and unbiased variance into ``model``'s calibrated BN
    layers; returns its row count. A layer the calibration forward never called (a branch the
    network's forward does not take) keeps its statistics.

    Raises:
        ValueError: no calibration row (the model is left untouched).
    """
    if stats["rows"] == 0:
        raise ValueError("update_bn_stats: no calibration batches")
    layers = calibrated_layers(model, include_frozen)
    for layer, acc in zip(layers, stats["layers"]):
        if _unused(acc, stats["estimator"]):
            continue  # a layer the forward never called (an unused branch): nothing to estimate it from
        if stats["estimator"] == "exact":
            mean, var = acc.mean, acc.variance(ddof=1)
        else:
            c = layer.num_features
            k = torch.clamp(acc[0], min=1.0)
            mean, var = acc[1: c + 1] / k, acc[c + 1:] / k
        layer.running_mean.copy_(mean.to(layer.running_mean.device, layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.device, layer.running_var.dtype))
    return int(stats["rows"])


def _unused(acc, estimator: str) -> bool:
    if estimator == "exact":
        return acc is None or float(torch.as_tensor(acc.count).max()) == 0
    return float(acc[0]) == 0


class _CalibrationStep(_BatchNorm):
    """A calibrated layer's normalization step during the pass (swapped in by
    ``tasks.nn.syncbn.norm_step``): normalize with the batch's own statistics (as training mode
    does), computed once, in float64, and handed to the layer's ``_bnflow_recorder``. The layer stays
    in eval mode and ``_BatchNorm.forward`` is not called, so its buffers and ``num_batches_tracked``
    are not touched. Costs one moments pass plus eval-mode BN: no second statistics pass inside a
    train-mode BN kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        m = moments.of_tensor(input, _channels_dims(input))
        self._bnflow_recorder.add(m)
        var = m.m2 / torch.clamp(m.count, min=1.0)  # biased, as BN normalizes
        return F.batch_norm(input, m.mean.to(input.dtype), var.to(input.dtype), self.weight, self.bias,
                            False, 0.0, self.eps)


def _channels_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


class _Exact:
    """(count, mean, M2) of every input row, merged per batch."""

    def __init__(self, layer: _BatchNorm):
        self.acc = None

    def add(self, m: moments.Moments) -> None:
        self.acc = m if self.acc is None else moments.merge(self.acc, m)

    def state(self):
        return self.acc


class _BatchMean:
    """Sum over batches of each batch's mean and unbiased variance, and the number of batches."""

    def __init__(self, layer: _BatchNorm):
        c = layer.num_features
        self.buf = torch.zeros(2 * c + 1, dtype=torch.float64, device=layer.running_mean.device)
        self.c = c

    def add(self, m: moments.Moments) -> None:
        self.buf[0] += 1
        self.buf[1: self.c + 1] += m.mean
        self.buf[self.c + 1:] += m.variance(ddof=1)

    def state(self):
        return self.buf
