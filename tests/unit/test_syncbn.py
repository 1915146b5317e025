"""SyncBatchNorm against ONE BatchNorm on the concatenated global batch, on real gloo groups.

Each world size is spawned once; every rank runs all cases in the same process group and returns
its pieces; the parent compares them with a float64 reference written with plain tensor ops.
"""

import pytest
import torch
from torch import nn

from tasks.nn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from tests.gloo_group import run_group

EPS = 1e-5
SHAPES = {1: (), 2: (7,), 3: (3, 4), 4: (2, 3, 2)}  # spatial dims for inputs of rank 2..5


def _cases(world):
    """(name, per-rank batch sizes, spatial shape, dtype, momentum, mean offset)."""
    even = [4] * world
    uneven = [5, 2, 3][:world]
    with_empty = [6, 0, 3][:world] if world == 3 else [5, 0]
    cases = []
    for k, spatial in SHAPES.items():
        for dtype in (torch.float64, torch.float32):
            cases.append((f"even-{k}-{dtype}", even, spatial, dtype, 0.1, 0.0))
    cases += [
        ("uneven", uneven, (3,), torch.float64, 0.1, 0.0),
        ("empty-rank", with_empty, (2, 2), torch.float64, 0.1, 0.0),
        ("momentum-none", uneven, (), torch.float64, None, 0.0),
        ("large-mean", [512] * world, (8,), torch.float32, 0.1, 1e4),
    ]
    return cases


def _global_input(sizes, spatial, dtype, offset, seed, c=3):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn((n, c) + spatial, generator=g, dtype=torch.float64) + offset
    grad = torch.randn((n, c) + spatial, generator=g, dtype=torch.float64)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return x.to(dtype), grad.to(dtype), w.to(dtype), b.to(dtype)


def _count_all_reduce(fn):
    """Sizes of the all-reduces SyncBatchNorm issues while ``fn`` runs (either transport)."""
    from tasks import collectives

    calls = []
    real = collectives.sum_across_ranks

    def counting(tensor, *a, **k):
        calls.append(tensor.numel())
        return real(tensor, *a, **k)

    collectives.sum_across_ranks = counting
    try:
        fn()
    finally:
        collectives.sum_across_ranks = real
    return calls


def _worker(rank, world, transport):
    from tasks import collectives

    out = {"transport": collectives.use_transport(None, "gloo" if transport == "gloo" else "auto")}
    for i, (name, sizes, spatial, dtype, momentum, offset) in enumerate(_cases(world)):
        x, g, w, b = _global_input(sizes, spatial, dtype, offset, seed=i)
        lo = sum(sizes[:rank])
        xr = x[lo : lo + sizes[rank]].clone().requires_grad_(True)
        gr = g[lo : lo + sizes[rank]]
        bn = SyncBatchNorm(3, eps=EPS, momentum=momentum).to(dtype)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        res = {}

        def step():
            y = bn(xr)
            res["fwd_calls"] = len(calls_holder)
            y.backward(gr)
            res["y"] = y.detach()

        calls_holder = []
        calls = _count_all_reduce(step)
        res.update(
            calls=calls, grad_x=xr.grad, grad_w=bn.weight.grad, grad_b=bn.bias.grad,
            running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
            nbt=int(bn.num_batches_tracked),
        )
        if momentum is None:  # a second step: the cumulative average over two batches
            x2, _, _, _ = _global_input(sizes, spatial, dtype, offset, seed=1000 + i)
            bn(x2[lo : lo + sizes[rank]])
            res["running_mean2"] = bn.running_mean.clone()
            res["running_var2"] = bn.running_var.clone()
        out[name] = res

    # Eval mode: plain BatchNorm with running statistics, no collective at all.
    bn = SyncBatchNorm(3).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    xe = torch.randn(4, 3, 5, dtype=torch.float64)
    ref = nn.BatchNorm1d(3).double().eval()
    ref.load_state_dict(bn.state_dict())
    ye = {}
    out["eval_calls"] = _count_all_reduce(lambda: ye.setdefault("y", bn(xe)))
    out["eval_diff"] = float((ye["y"] - ref(xe)).abs().max().detach())

    # A global batch with one value per channel raises on every rank.
    bn = SyncBatchNorm(3).double()
    tiny = torch.randn(1 if rank == 0 else 0, 3, dtype=torch.float64)
    try:
        bn(tiny)
        out["tiny_error"] = None
    except ValueError as e:
        out["tiny_error"] = str(e)
    return out


def _reference(x, g, w, b, momentum, eps=EPS):
    """Plain float64 BatchNorm over the whole batch, with autograd through explicit ops."""
    x = x.double().clone().requires_grad_(True)
    w = w.double().clone().requires_grad_(True)
    b = b.double().clone().requires_grad_(True)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims)
    var = ((x - mean.view(shape)) ** 2).mean(dim=dims)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)
    y.backward(g.double())
    n = x.numel() // x.shape[1]
    unbiased = var * n / (n - 1)
    f = 1.0 if momentum is None else momentum
    return dict(
        y=y.detach(), grad_x=x.grad, grad_w=w.grad, grad_b=b.grad,
        running_mean=f * mean.detach(), running_var=(1 - f) + f * unbiased.detach(),
        var=var.detach(),
    )


@pytest.fixture(scope="module", params=[(2, "shm"), (3, "shm"), (2, "gloo"), (3, "gloo")],
                ids=["world2-shm", "world3-shm", "world2-gloo", "world3-gloo"])
def world_results(request):
    world, transport = request.param
    ranks = run_group(_worker, world, transport)
    assert all(r["transport"] == transport for r in ranks)  # the path under test ran
    return world, ranks


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("case_index", range(len(_cases(2))))
def test_training_matches_one_batchnorm_on_global_batch(world_results, case_index):
    world, ranks = world_results
    name, sizes, spatial, dtype, momentum, offset = _cases(world)[case_index]
    x, g, w, b = _global_input(sizes, spatial, dtype, offset, seed=case_index)
    ref = _reference(x, g, w, b, momentum)
    got = [r[name] for r in ranks]
    y = torch.cat([r["y"] for r in got]).double()
    gx = torch.cat([r["grad_x"] for r in got]).double()
    gw = sum(r["grad_w"].double() for r in got)
    gb = sum(r["grad_b"].double() for r in got)
    if offset:  # the numerically hard case: check the normalization statistics, relative
        rv = got[0]["running_var"].double()
        var_ref = (ref["running_var"] - 0.9) / 0.1
        var_got = (rv - 0.9) / 0.1
        assert float(((var_got - var_ref) / var_ref).abs().max()) <= 1e-4
        # Exactness beyond torch: torch's own float32 BatchNorm on the same global batch loses half an
        # ulp of the mean in every xhat; ours folds that rounding out (>= 10x closer to float64).
        torch_bn = nn.BatchNorm1d(3, eps=EPS).float()
        with torch.no_grad():
            torch_bn.weight.copy_(w), torch_bn.bias.copy_(b)
        xt = x.float().clone().requires_grad_(True)
        torch_bn(xt).backward(g.float())
        err = lambda got, want: float((got.double() - want).abs().max())  # noqa: E731
        assert err(gw, ref["grad_w"]) * 10 <= err(torch_bn.weight.grad, ref["grad_w"]), (err(gw, ref["grad_w"]), err(torch_bn.weight.grad, ref["grad_w"]))
        assert err(y, ref["y"]) <= err(torch_bn(x.float()), ref["y"])
        assert err(gx, ref["grad_x"]) <= err(xt.grad, ref["grad_x"])
        return
    tol = _tol(dtype)
    scale = max(1.0, float(ref["grad_x"].abs().max()))
    assert float((y - ref["y"]).abs().max()) <= tol
    assert float((gx - ref["grad_x"]).abs().max()) <= tol * scale
    assert float((gw - ref["grad_w"]).abs().max()) <= tol * max(1.0, float(ref["grad_w"].abs().max()))
    assert float((gb - ref["grad_b"]).abs().max()) <= tol * max(1.0, float(ref["grad_b"].abs().max()))
    for r in got:  # every rank holds the same running statistics
        assert float((r["running_mean"].double() - ref["running_mean"]).abs().max()) <= tol
        assert float((r["running_var"].double() - ref["running_var"]).abs().max()) <= tol
        assert r["nbt"] == 1
        assert torch.isfinite(r["y"]).all() and torch.isfinite(r["grad_x"]).all()
        # One collective of 2C+1 values forward, one of 2C backward.
        assert r["calls"] == [7, 6], r["calls"]


def test_momentum_none_is_cumulative_average(world_results):
    world, ranks = world_results
    idx = [c[0] for c in _cases(world)].index("momentum-none")
    _, sizes, spatial, dtype, _, offset = _cases(world)[idx]
    x1, _, _, _ = _global_input(sizes, spatial, dtype, offset, seed=idx)
    x2, _, _, _ = _global_input(sizes, spatial, dtype, offset, seed=1000 + idx)
    n = x1.shape[0]
    expect_mean = (x1.mean(0) + x2.mean(0)) / 2
    expect_var = (x1.var(0, unbiased=True) + x2.var(0, unbiased=True)) / 2
    assert n > 1
    for r in ranks:
        res = r["momentum-none"]
        assert float((res["running_mean2"] - expect_mean).abs().max()) <= 1e-12
        assert float((res["running_var2"] - expect_var).abs().max()) <= 1e-12


def test_eval_mode_is_plain_batchnorm_without_collectives(world_results):
    _, ranks = world_results
    for r in ranks:
        assert r["eval_calls"] == []
        assert r["eval_diff"] == 0.0


def test_global_batch_of_one_raises_on_every_rank(world_results):
    _, ranks = world_results
    for r in ranks:
        assert r["tiny_error"] is not None and "at least 2" in r["tiny_error"]


def test_world_of_one_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    ref = nn.BatchNorm1d(4, momentum=None).double()
    sync = SyncBatchNorm(4, momentum=None).double()
    for _ in range(2):
        assert torch.equal(sync(x), ref(x))
    assert torch.equal(sync.running_var, ref.running_var)
    assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_convert_and_revert_keep_parameters_buffers_and_requires_grad():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4 * 4),
                          nn.Sequential(nn.BatchNorm3d(2)))
    model[1].weight.requires_grad_(False)
    model[1].running_mean.fill_(0.25)
    weight = model[1].weight
    conv = convert_sync_batchnorm(model)
    assert conv is model
    # Converted layers keep their object and class and gain SyncBatchNorm's forward (tasks.nn.syncbn).
    bns = [m for m in conv.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(isinstance(m, SyncBatchNorm) and not isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert [isinstance(conv[1], nn.BatchNorm2d), isinstance(conv[3], nn.BatchNorm1d)] == [True, True]
    assert conv[1].weight is weight and not conv[1].weight.requires_grad
    assert float(conv[1].running_mean[0]) == 0.25
    back = revert_sync_batchnorm(conv)
    assert [type(back[1]), type(back[3]), type(back[4][0])] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d]
    assert back[1].weight is weight
    root = convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert isinstance(root, SyncBatchNorm)
