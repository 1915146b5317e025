"""BN recalibration against statistics recomputed independently with plain float64 ops."""

import torch
from torch import nn

from tasks.nn.bn_stats import update_bn_stats


def test_population_statistics_of_every_bn_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4)).double()
    for bn in (model[1], model[4]):
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.normal_()
    batches = [torch.randn(n, 5, dtype=torch.float64) * 3 + 1 for n in (16, 7, 32)]
    nbt = [int(model[1].num_batches_tracked), int(model[4].num_batches_tracked)]

    # Reference: layer-1 input is Linear(x); layer-2 input depends on layer 1 normalizing each
    # batch with that batch's own statistics (train mode), computed here by hand.
    with torch.no_grad():
        z1 = [model[0](b) for b in batches]
        z2 = []
        for z in z1:
            h = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + model[1].eps) * model[1].weight + model[1].bias
            z2.append(model[3](torch.relu(h)))
    expect = [(torch.cat(z).mean(0), torch.cat(z).var(0, unbiased=True)) for z in (z1, z2)]

    model.eval()
    rows = update_bn_stats(model, batches)
    assert rows == 55
    assert not model.training
    for bn, (mean, var) in zip((model[1], model[4]), expect):
        assert torch.allclose(bn.running_mean, mean, rtol=0, atol=1e-12)
        assert torch.allclose(bn.running_var, var, rtol=0, atol=1e-12)
    assert [int(model[1].num_batches_tracked), int(model[4].num_batches_tracked)] == nbt


def test_no_batches_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].running_mean.fill_(0.5)
    try:
        update_bn_stats(model, [])
    except ValueError as e:
        assert "no calibration batches" in str(e)
    else:
        raise AssertionError("expected ValueError")
    assert torch.all(model[1].running_mean == 0.5)

