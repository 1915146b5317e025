"""BN recalibration pooled over 1, 2 and 3 real gloo ranks, against statistics computed by hand in float64.

The reference knows nothing of hooks, moments or merges: it runs the network's arithmetic on each
batch with NumPy-style torch ops in float64, concatenates every batch's BN inputs and takes their mean
and unbiased variance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks.nn.bn_stats import update_bn_stats
from tests.gloo_group import run_group

SIZES = (16, 7, 32, 5, 9)  # uneven batches; one of 5 rows
SHARDS = {  # world -> which batches each rank holds (uneven; an empty rank at world 3)
    1: [[0, 1, 2, 3, 4]],
    2: [[0, 1, 2, 3], [4]],
    3: [[0, 1], [], [2, 3, 4]],
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(3 * 4 * 4, 4, bias=True), nn.BatchNorm1d(4, momentum=0.3))
    for bn in (model[1], model[6]):
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.normal_()
        bn.running_mean.fill_(7.0)
        bn.num_batches_tracked.fill_(123)
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64) * 2 + 3 for n in SIZES]


@torch.no_grad()
def _reference(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: (mean, unbiased var) of its input over all rows, float64, by hand."""
    conv_w = model[0].weight.detach().double()
    bn1, lin, bn2 = model[1], model[5], model[6]
    z1s, z2s = [], []
    for x in batches:
        z1 = F.conv2d(x, conv_w)
        mu = z1.mean(dim=(0, 2, 3), keepdim=True)
        var = ((z1 - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (z1 - mu) / torch.sqrt(var + bn1.eps) * bn1.weight.double().view(1, -1, 1, 1) + bn1.bias.double().view(1, -1, 1, 1)
        h = torch.clamp(h, min=0).flatten(1)  # dropout is off during calibration
        z2 = h @ lin.weight.double().T + lin.bias.double()
        z1s.append(z1.permute(1, 0, 2, 3).reshape(3, -1))
        z2s.append(z2.T)
    out = []
    for zs in (z1s, z2s):
        z = torch.cat(zs, dim=1)
        mean = z.mean(1)
        out.append((mean, ((z - mean[:, None]) ** 2).sum(1) / (z.shape[1] - 1)))
    return out


def _calibrate_on_rank(rank: int, world: int, estimator: str):
    model = _model()
    model.train()  # the caller's mode must come back as it was
    mine = [_batches()[i].float() for i in SHARDS[world][rank]]
    rows = update_bn_stats(model, mine, estimator=estimator)
    return {"rows": rows, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "training": [m.training for m in model.modules()], "momentum": [model[1].momentum, model[6].momentum]}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exact_pools_every_row_of_every_rank_bitwise_equal_on_all_ranks(world):
    results = run_group(_calibrate_on_rank, world, "exact")
    expect = _reference(_model(), _batches())
    before = _model().state_dict()
    for r in results:
        assert r["rows"] == sum(SIZES)
        for key, (mean, var) in zip(("1", "6"), expect):
            got_mean, got_var = r["state"][f"{key}.running_mean"].double(), r["state"][f"{key}.running_var"].double()
            assert torch.allclose(got_mean, mean, rtol=1e-6, atol=1e-6 * float(mean.abs().max()))
            assert torch.allclose(got_var, var, rtol=1e-6, atol=0)
        # Only the running mean/var changed: weights, biases, num_batches_tracked are untouched.
        changed = {k for k in before if not torch.equal(before[k], r["state"][k])}
        assert changed == {"1.running_mean", "1.running_var", "6.running_mean", "6.running_var"}
        assert all(r["training"]) and r["momentum"] == [0.1, 0.3]
    for r in results[1:]:
        assert all(torch.equal(results[0]["state"][k], r["state"][k]) for k in before)


def test_batch_mean_pooled_over_ranks_is_the_mean_over_every_batch():
    results = run_group(_calibrate_on_rank, 3, "batch_mean")
    model = _model()
    conv_w = model[0].weight.detach().double()
    z1 = [F.conv2d(b, conv_w).permute(1, 0, 2, 3).reshape(3, -1) for b in _batches()]
    mean = torch.stack([z.mean(1) for z in z1]).mean(0)  # each batch weighs the same
    var = torch.stack([z.var(1, unbiased=True) for z in z1]).mean(0)
    for r in results:
        assert r["rows"] == sum(SIZES)
        assert torch.allclose(r["state"]["1.running_mean"].double(), mean, rtol=1e-6, atol=1e-6)
        assert torch.allclose(r["state"]["1.running_var"].double(), var, rtol=1e-6, atol=0)
    assert all(torch.equal(results[0]["state"]["1.running_var"], r["state"]["1.running_var"]) for r in results)


def _empty_everywhere(rank: int, world: int):
    model = _model()
    try:
        update_bn_stats(model, [])
    except ValueError as e:
        return str(e), model.state_dict()["1.running_mean"].clone()
    return None, None


def test_no_row_on_any_rank_raises_on_every_rank_and_changes_nothing():
    for message, mean in run_group(_empty_everywhere, 2):
        assert message and "no calibration batches" in message
        assert torch.all(mean == 7.0)
