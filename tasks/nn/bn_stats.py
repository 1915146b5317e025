"""Re-estimate BatchNorm running statistics for fixed weights (PreciseBN, Wu & Johnson 2021).

Note that:
  * The model runs in training mode, so every BN layer normalizes with the statistics of the
    current batch, exactly as during training; each layer's input moments are recorded by a
    forward pre-hook and merged over ALL batches with Chan's merge (``tasks.moments``). The result
    is the population mean and unbiased variance of each layer's input -- "an average over all
    mini-batches" rather than an exponentially weighted one, so it does not depend on momentum or
    on how far training moved the weights since the early batches.
  * Only BN buffers change: weights, biases and ``num_batches_tracked`` stay as they were, and
    the model is put back in its original mode.
  * Gradients are not computed.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tasks import moments


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BN layer's running mean/var by population statistics over ``batches``.

    Args:
        model: a model with plain (or single-process Sync) BatchNorm layers.
        batches: input tensors as the model's forward takes them; each must hold >= 2 rows.

    Returns:
        The number of rows seen.

    Raises:
        ValueError: no batch, or a model without BatchNorm layers.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        raise ValueError("update_bn_stats: the model has no BatchNorm layer with running statistics")
    acc: dict[nn.Module, moments.Moments] = {}

    def record(layer, inputs):
        x = inputs[0]
        m = moments.of_tensor(x, [0] + list(range(2, x.dim())))
        acc[layer] = m if layer not in acc else moments.merge(acc[layer], m)

    was_training = model.training
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    saved = [(layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()) for layer in layers]
    rows = 0
    try:
        model.train()
        for x in batches:
            model(x)
            rows += len(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if rows == 0:
        for layer, (rm, rv, nbt) in zip(layers, saved):
            layer.running_mean.copy_(rm), layer.running_var.copy_(rv), layer.num_batches_tracked.copy_(nbt)
        raise ValueError("update_bn_stats: no calibration batches")
    for layer, (_, _, nbt) in zip(layers, saved):
        m = acc[layer]
        layer.running_mean.copy_(m.mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(m.variance(ddof=1).to(layer.running_var.dtype))
        layer.num_batches_tracked.copy_(nbt)
    return rows
