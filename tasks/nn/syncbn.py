"""SyncBatchNorm that runs on every backend and is exact to the global batch, and the conversion of
any BatchNorm network to it and back.

``torch.nn.SyncBatchNorm`` has CUDA/XPU kernels only and raises on CPU tensors. This module's
``SyncBatchNorm`` is a drop-in replacement (same constructor, same state-dict keys) but not a subclass
of torch's, which DDP refuses in CPU models: on CUDA tensors it delegates to torch's implementation;
everywhere else (CPU, gloo) it normalizes with the statistics of the concatenation of all ranks' batches (Ioffe &
Szegedy 2015), computed with one all-reduce of 2C+1 float64 values in the forward pass and one of
2C values in the backward pass (``tasks.collectives``: shared memory between ranks on one host,
gloo across hosts).

Note that:
  * Ranks may hold different batch sizes, including empty ones; every rank still joins every
    collective, so nothing hangs, and an empty rank returns an empty output with zero partial
    weight/bias gradients.
  * Weight and bias gradients are each rank's partial sums, as torch's SyncBatchNorm returns them;
    DDP's gradient all-reduce combines them.
  * ``running_var`` is updated with the unbiased variance of the global batch, as torch does;
    ``momentum=None`` gives the cumulative average over batches.
  * Eval mode, ``track_running_stats`` with stored statistics, and a world of one rank behave exactly
    like plain BatchNorm (``_BatchNorm.forward``) and issue no collective.

Conversion (``convert_sync_batchnorm``, ``revert_sync_batchnorm``) covers every BatchNorm flavour a
user's network may hold:
  * ``BatchNorm1d/2d/3d`` and any subclass of them or of ``_BatchNorm``, including subclasses whose
    ``forward`` adds something around ``super().forward(x)`` (an activation fused into the layer).
    The layer object is kept and only its class changes, to one derived from (its class,
    ``SyncBatchNorm``): C3 linearization puts ``SyncBatchNorm`` after every class of the original's
    MRO but before ``_BatchNorm``, so the synchronized forward runs exactly where ``_BatchNorm.forward``
    ran and everything the subclass does around it (activation, extra children, attributes,
    ``_check_input_dim``, hooks) stays. Reverting restores the original class; state-dict keys never
    change.
  * Layers frozen on purpose that are not ``_BatchNorm`` (torchvision's ``FrozenBatchNorm2d``) have
    fixed statistics, nothing to synchronize, and are left alone.
  * A ``_BatchNorm`` subclass whose forward computes its normalization some other way (its own
    ``F.batch_norm`` call, ``nn.BatchNorm2d.forward(self, x)`` past the MRO) would silently stay
    local after conversion. The class alone cannot tell, so ``check_bn_layers`` runs one forward
    before training and raises ``ModelError`` for such a layer.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from schemas.errors import ModelError
from tasks import collectives, moments


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, num_batches):
        dims = [0] + list(range(2, x.dim()))
        stats = moments.all_reduce(moments.of_tensor(x, dims), group=group)
        n = float(stats.count)
        if n <= 1:
            # Every rank sees the same global count, so every rank raises here together.
            raise ValueError(
                f"SyncBatchNorm: the global batch has {int(n)} value(s) per channel across all ranks; "
                "batch statistics need at least 2 -- increase the per-worker batch size"
            )
        var = stats.m2 / n
        if running_mean is not None:
            with torch.no_grad():
                factor = (1.0 / float(num_batches)) if momentum is None else momentum
                running_mean.mul_(1 - factor).add_(stats.mean.to(running_mean.dtype), alpha=factor)
                unbiased = stats.m2 / (n - 1)
                running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
        mean = stats.mean.to(x.dtype)
        var_x = var.to(x.dtype)
        c = mean.shape[0]
        # The kernel normalizes with the mean rounded to x's dtype, off from the float64 mean by up to
        # half an ulp of the mean (5e-4 at 1e4 in float32): every xhat is shifted by that times invstd.
        # The shift is per channel, so it is undone exactly in the bias (here) and in the weight
        # gradient (backward): O(C) work, and xhat carries no error from the mean's rounding.
        rounding = stats.mean - mean.double()
        invstd = torch.rsqrt(var + eps)
        w64 = weight.double() if weight is not None else torch.ones(c, dtype=torch.float64, device=x.device)
        b64 = bias.double() if bias is not None else torch.zeros(c, dtype=torch.float64, device=x.device)
        folded_bias = (b64 - w64 * invstd * rounding).to(x.dtype)
        # The elementwise part is plain eval-mode batch norm with the global statistics: one fused
        # CPU kernel instead of several broadcasted passes.
        if x.numel() == 0:  # torch's CPU kernels divide by the element count
            y = x.clone()
        else:
            y = F.batch_norm(x, mean, var_x, weight, folded_bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean, var_x, rounding, invstd)
        ctx.eps = eps
        ctx.group = group
        ctx.count = n
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var, rounding, invstd64 = ctx.saved_tensors
        n = ctx.count
        c = mean.shape[0]
        # Eval-mode backward gives, in one kernel: g * w * invstd, and the local partial sums
        # sum(g * xhat) and sum(g) that are exactly this rank's weight/bias gradients.
        w = weight if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
        if x.numel() == 0:
            grad_eval, gw_local, gb_local = grad_out, torch.zeros_like(w), torch.zeros_like(w)
        else:
            grad_eval, gw_local, gb_local = torch.ops.aten.native_batch_norm_backward(
                grad_out.contiguous(), x, w, mean, var, None, None, False, ctx.eps, [True, True, True]
            )
        # sum(g * xhat) with the exact xhat: the kernel's xhat is off by rounding * invstd per channel.
        gw_local = (gw_local.double() - rounding * invstd64 * gb_local.double()).to(gw_local.dtype)
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([gb_local, gw_local]).double()
            collectives.sum_across_ranks(sums, group=ctx.group)
            invstd = torch.rsqrt(var.double() + ctx.eps)
            w64 = w.double()
            # dx = w*invstd*(g - mean(g) - xhat*mean(g*xhat)), means over the global batch, i.e.
            # grad_eval - shift - (x - mean)*slope. The last two terms are one fused eval-mode
            # batch_norm of x with weight -slope/invstd and bias -shift.
            shift = w64 * invstd * sums[:c] / n
            slope = w64 * invstd * invstd * sums[c:] / n
            # (x - mean) with the float64 mean: the rounding of the kernel's mean folds into the bias.
            correction = F.batch_norm(x, mean, var, (-slope / invstd).to(x.dtype), (-shift + slope * rounding).to(x.dtype),
                                      training=False, eps=ctx.eps)
            grad_input = grad_eval.add_(correction) if grad_eval is not grad_out else grad_eval + correction
        grad_weight = gw_local if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = gb_local if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm`` that also runs on CPU tensors over gloo.

    Takes the constructor arguments of ``torch.nn.SyncBatchNorm`` and accepts inputs of shape
    (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W). It is deliberately not a subclass of
    torch's class: DDP rejects any ``torch.nn.SyncBatchNorm`` in a CPU model. Converted layers are
    instances of classes derived from (their own class, this one): its ``forward`` is their
    normalization step (module docstring).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self.process_group or dist.group.WORLD
        # Like torch's SyncBatchNorm, eval mode never synchronizes, even without running stats.
        distributed = (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        )
        if not distributed:
            # The next normalization in the MRO: _BatchNorm's own single-process forward, or a
            # calibration step placed before it (tasks.nn.bn_stats).
            return super().forward(input)
        if input.is_cuda:
            # torch's CUDA kernels (NCCL) are the fast path there; its forward reads only the
            # attributes this class shares with it.
            return nn.SyncBatchNorm.forward(self, input)

        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.eps, self.momentum, group,
            int(self.num_batches_tracked) if self.track_running_stats and self.momentum is None else 1,
        )


class BatchNormNd(_BatchNorm):
    """Plain BatchNorm for any input rank >= 2: the revert target of a SyncBatchNorm whose original
    BatchNorm class is unknown (one constructed directly, or torch's)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def with_norm_step(cls: type, step: type) -> type:
    """The class that behaves as ``cls`` except that ``step.forward`` (``step`` a direct subclass of
    ``_BatchNorm``) runs where ``_BatchNorm.forward`` would, for swapping into ``layer.__class__``.

    Why a class swap: the layer object, with its parameters, buffers, hooks, children and attributes,
    stays as it is, and only the normalization changes. C3 linearization of the bases (cls, step)
    keeps every class of ``cls``'s MRO up to ``_BatchNorm`` first, then ``step``, then ``_BatchNorm``:
    a forward that reaches the normalization by ``super().forward(x)``, or a class that does not
    override forward, lands on ``step.forward``, whose own ``super().forward`` is
    ``_BatchNorm.forward``. Layers that normalize by other means bypass it; ``check_bn_layers`` finds
    them. One class per (cls, step), cached: every layer of one class shares it, and
    ``revert_sync_batchnorm`` reads the original back from it.
    """
    return _derived((cls, step), cls)


_DERIVED: dict[tuple[type, ...], type] = {}


def _derived(bases: tuple[type, ...], origin: type) -> type:
    if bases not in _DERIVED:
        name = f"{bases[-1].__name__.lstrip('_')}[{origin.__name__}]"
        _DERIVED[bases] = type(name, bases, {"_bnflow_origin": origin, "_bnflow_bases": bases,
                                             "__reduce_ex__": _reduce_derived})
    return _DERIVED[bases]


def _reduce_derived(self, protocol):
    # The derived class has no importable name, so pickle (Ray, torch.save of a whole model) would
    # fail to find it; rebuild it from its bases instead, which are importable classes.
    return _new_derived, (type(self)._bnflow_bases, type(self)._bnflow_origin), self.__getstate__()


def _new_derived(bases: tuple[type, ...], origin: type):
    return object.__new__(_derived(bases, origin))


def _origin(layer: nn.Module) -> type:
    """The layer's class before any ``with_norm_step`` swap."""
    return type(layer).__dict__.get("_bnflow_origin", type(layer))


def _convertible(module: nn.Module) -> bool:
    """A BatchNorm layer that conversion swaps onto SyncBatchNorm: not one already (ours, or torch's,
    which runs on CUDA only and which DDP refuses on CPU)."""
    return isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm))


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Make every BatchNorm layer of ``module`` normalize with the statistics of the global batch.

    Each ``_BatchNorm`` layer (``BatchNorm1d/2d/3d`` or a subclass, module docstring) keeps its
    identity, parameters, buffers, ``requires_grad``, hooks and extra attributes; its class becomes
    ``with_norm_step(original class, SyncBatchNorm)``, so it is an instance of both. Layers that are
    SyncBatchNorm already and modules that are not ``_BatchNorm`` (``FrozenBatchNorm2d``) are left
    alone. Converting does not check that a subclass normalizes through ``super().forward``: run
    ``check_bn_layers`` first.

    Args:
        module: the network (or a single layer), converted in place.
        process_group: the group to synchronize over; None for the default (world) group.

    Returns:
        ``module`` itself.

    Raises:
        ModelError: a layer already holds an attribute ``process_group`` of its own.
    """
    layers = [(name, layer) for name, layer in module.named_modules() if _convertible(layer)]
    for name, layer in layers:  # all checked before any is converted: no half-converted model
        if "process_group" in vars(layer):
            raise ModelError(f"train.model: BatchNorm layer {_display(name)} ({_class_path(type(layer))}) has an "
                             "attribute 'process_group', which SyncBatchNorm needs for itself -- rename it")
    for _, layer in layers:
        layer.__class__ = with_norm_step(type(layer), SyncBatchNorm)
        layer.process_group = process_group
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo ``convert_sync_batchnorm``, for export, single-process inference and recalibration.

    Converted layers get their original class back (same object, same state). A SyncBatchNorm that
    was never converted (ours constructed directly, or torch's) is replaced by a ``BatchNormNd``
    sharing its parameters and buffers.

    Returns:
        ``module``, or its replacement if ``module`` itself is such a SyncBatchNorm.
    """
    if isinstance(module, SyncBatchNorm) and "_bnflow_origin" in type(module).__dict__:
        module.__class__ = type(module)._bnflow_origin
        del module.process_group
    elif isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        out = BatchNormNd(module.num_features, module.eps, module.momentum, module.affine,
                          module.track_running_stats)
        _copy_state(module, out)
        module = out
    for name, child in module.named_children():
        module.add_module(name, revert_sync_batchnorm(child))
    return module


def _copy_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    if src.affine:
        with torch.no_grad():
            dst.weight = src.weight
            dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The ``_BatchNorm`` layers of ``model`` with their qualified names, in module order: the
    layers bnflow synchronizes and recalibrates (frozen look-alikes such as ``FrozenBatchNorm2d``
    are not among them)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def check_bn_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Pre-flight check that every BatchNorm layer of ``model`` can be synchronized and recalibrated
    exactly: one train-mode forward of ``example`` in which each layer ``convert_sync_batchnorm``
    would convert counts, per call of the layer, the passes through the point where
    ``_BatchNorm.forward`` runs (``with_norm_step``); each call must pass exactly once.

    The model is left as it was: parameters and buffers (running statistics, ``num_batches_tracked``)
    are restored, every module's training flag is restored, no gradient is computed, and the global
    RNG state (dropout in the forward) is forked and restored.

    Args:
        model: the unconverted network; lazy modules must be materialized already (one forward).
        example: a batch as the model's forward takes it, with >= 2 rows (train-mode BatchNorm).

    Returns:
        The qualified names of the model's BatchNorm layers (``bn_layers``); empty if it has none.

    Raises:
        ModelError: a layer whose forward does not normalize through ``_BatchNorm.forward`` exactly
            once per call, naming the layer and its class. An exception from the forward itself
            propagates unchanged.
    """
    layers = {name: m for name, m in bn_layers(model) if _convertible(m)}
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    flags = {m: m.training for m in model.modules()}
    devices = [example.device] if example.device.type == "cuda" else []
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=devices), norm_step(layers):
            model(example)
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        for m, training in flags.items():
            m.training = training
    return [name for name, _ in bn_layers(model)]


@contextlib.contextmanager
def norm_step(layers: dict[str, _BatchNorm], step: type | None = None) -> Iterator[None]:
    """Within the block, each of ``layers`` (qualified name -> layer) runs ``step.forward`` (a direct
    subclass of ``_BatchNorm``; None: ``_BatchNorm.forward`` itself) where ``_BatchNorm.forward``
    would run, and the passes through that point are counted per call of the layer.

    Leaving the block restores every layer's class and removes the counters. If the block ended
    normally, it then raises ``ModelError`` for the first layer a call of which did not pass exactly
    once (a forward that normalizes by other means would bypass ``step``).
    """
    originals = {name: type(layer) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer._bnflow_steps, layer._bnflow_per_call = 0, []
        bases = (_CountCalls, type(layer), _CountSteps) + ((step,) if step is not None else ())
        layer.__class__ = _derived(bases, type(layer))
    per_call = {}
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.__class__ = originals[name]
            per_call[name] = vars(layer).pop("_bnflow_per_call")
            del layer._bnflow_steps
    for name, counts in per_call.items():
        bad = [k for k in counts if k != 1]
        if bad:
            layer = layers[name]
            how = ("computes its normalization outside BatchNorm.forward" if bad[0] == 0
                   else f"runs BatchNorm.forward {bad[0]} times in one call")
            raise ModelError(
                f"train.model: BatchNorm layer {_display(name)} ({_class_path(_origin(layer))}) {how}; bnflow "
                "cannot synchronize or recalibrate it exactly -- make its forward call super().forward(x) once, "
                "or use a torch BatchNorm class")


class _CountCalls:
    """First base of an instrumented layer's class: wraps the layer's whole forward to count, per
    call, the passes through ``_CountSteps``."""

    def forward(self, *args, **kwargs):
        before = self._bnflow_steps
        out = super().forward(*args, **kwargs)
        self._bnflow_per_call.append(self._bnflow_steps - before)
        return out


class _CountSteps(_BatchNorm):
    """Sits where ``_BatchNorm.forward`` would run and counts the passes."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._bnflow_steps += 1
        return super().forward(input)


def _display(name: str) -> str:
    return repr(name) if name else "(the root module)"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
