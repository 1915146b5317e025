"""SyncBatchNorm that runs on every backend and is exact to the global batch.

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
    like plain BatchNorm and issue no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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
    torch's class: DDP rejects any ``torch.nn.SyncBatchNorm`` in a CPU model.
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
        if input.is_cuda:
            # torch's CUDA kernels (NCCL) are the fast path there; its forward reads only the
            # attributes this class shares with it.
            return nn.SyncBatchNorm.forward(self, input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)

        use_batch_stats = self.training or not self.track_running_stats or self.running_mean is None
        group = self.process_group or dist.group.WORLD
        # Like torch's SyncBatchNorm, eval mode never synchronizes, even without running stats.
        distributed = (
            self.training and use_batch_stats and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        if not distributed:
            return super().forward(input)  # _BatchNorm's own single-process forward

        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        update = self.training and self.track_running_stats
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.eps, self.momentum, group,
            int(self.num_batches_tracked) if update and self.momentum is None else 1,
        )


class BatchNormNd(_BatchNorm):
    """Plain BatchNorm for any input rank >= 2: the revert target of a SyncBatchNorm whose original
    BatchNorm class is unknown (one constructed directly rather than converted)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_ORIGIN_ATTR = "_bnflow_origin"


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


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` in ``module`` by a ``SyncBatchNorm``.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: parameters, buffers and
    ``requires_grad`` are kept (shared, not copied); children are replaced in place and the
    (possibly new) root is returned.
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group,
        )
        _copy_state(module, out)
        setattr(out, _ORIGIN_ATTR, type(module))
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm (ours or torch's) by plain BatchNorm, for export, single-process
    inference and recalibration. Converted layers get their original class back."""
    out = module
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        cls = getattr(module, _ORIGIN_ATTR, BatchNormNd)
        out = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)
        _copy_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out
