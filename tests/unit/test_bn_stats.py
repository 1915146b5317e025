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



def _sorted_by_class_batches():
    """Two classes far apart; batches hold one class each, as in a split sorted by label."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 3, generator=g, dtype=torch.float64)
    b = torch.randn(64, 3, generator=g, dtype=torch.float64) + 4.0
    return torch.cat([a, b]), list(torch.cat([a, b]).split(16))


def test_batch_mean_underestimates_the_variance_of_class_sorted_batches_exact_does_not():
    rows, batches = _sorted_by_class_batches()
    true_var = rows.var(0, unbiased=True)  # identity before the BN: its input is the rows themselves
    got = {}
    for estimator in ("exact", "batch_mean"):
        model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(3)).double()
        update_bn_stats(model, batches, estimator=estimator)
        got[estimator] = model[1].running_var.clone()
    assert torch.allclose(got["exact"], true_var, rtol=1e-12, atol=0)
    # Within-class variance is ~1, between-class spread adds ~4: batch_mean misses it.
    assert torch.all(got["batch_mean"] < 0.5 * true_var)


def test_frozen_bn_layers_keep_their_statistics_unless_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3, bias=False),
                          nn.BatchNorm1d(3)).double()
    model[1].requires_grad_(False)  # frozen on purpose
    model[1].running_mean.fill_(0.25)
    model[1].running_var.fill_(2.0)
    batches = [torch.randn(20, 4, dtype=torch.float64) + 1 for _ in range(3)]
    update_bn_stats(model, batches)
    assert torch.all(model[1].running_mean == 0.25) and torch.all(model[1].running_var == 2.0)
    # The frozen layer normalized with its stored statistics during the pass (eval mode), so the
    # next layer's input is computed with them.
    with torch.no_grad():
        model[1].eval()
        z = [model[3](torch.relu(model[1](model[0](x)))) for x in batches]
    assert torch.allclose(model[4].running_mean, torch.cat(z).mean(0), atol=1e-12)
    update_bn_stats(model, batches, include_frozen=True)
    with torch.no_grad():
        z1 = torch.cat([model[0](x) for x in batches])
    assert torch.allclose(model[1].running_var, z1.var(0, unbiased=True), atol=1e-12)


def test_an_unknown_estimator_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    try:
        update_bn_stats(model, [torch.randn(4, 3)], estimator="median")
    except ValueError as e:
        assert "median" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_shares_collected_apart_and_merged_equal_one_pass_over_every_batch():
    """The recalibrate stage's tasks: each collects its run of batches (one of them none), the
    driver merges the shares; the result is the one-process result, for both estimators."""
    import copy

    from tasks.nn.bn_stats import apply_bn_stats, collect_bn_stats, merge_bn_stats

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3)).double()
    batches = [torch.randn(n, 6, dtype=torch.float64) * 2 + 5 for n in (9, 16, 4, 30, 11)]
    for estimator in ("exact", "batch_mean"):
        whole = copy.deepcopy(model)
        update_bn_stats(whole, batches, estimator=estimator)
        shares = [collect_bn_stats(model, run, estimator) for run in (batches[:2], [], batches[2:3], batches[3:])]
        merged = shares[0]
        for s in shares[1:]:
            merged = merge_bn_stats(merged, s)
        split = copy.deepcopy(model)
        assert apply_bn_stats(split, merged) == sum(len(b) for b in batches)
        for key, want in whole.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                assert not torch.equal(want, model.state_dict()[key])  # the statistics did move
                assert torch.allclose(split.state_dict()[key], want, rtol=0, atol=1e-12), (estimator, key)


def test_a_layer_the_forward_never_calls_keeps_its_statistics():
    """Regression: a BN layer on a branch the forward does not take (an auxiliary head) made
    apply_bn_stats fail on its empty accumulator (exact) or write zeros (batch_mean)."""
    import torch
    from torch import nn

    from tasks.nn.bn_stats import update_bn_stats

    class WithUnusedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.aux = nn.BatchNorm1d(3)  # never called

        def forward(self, x):
            return self.bn(x)

    x = torch.randn(64, 3, dtype=torch.float64) * 2 + 1
    for estimator in ("exact", "batch_mean"):
        model = WithUnusedHead().double()
        with torch.no_grad():
            model.aux.running_mean.fill_(0.5)
        update_bn_stats(model, x.split(16), estimator=estimator)
        assert torch.equal(model.aux.running_mean, torch.full((3,), 0.5, dtype=torch.float64))
        assert torch.equal(model.aux.running_var, torch.ones(3, dtype=torch.float64))
        if estimator == "exact":
            assert torch.allclose(model.bn.running_mean, x.mean(0))
