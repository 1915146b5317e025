"""Every BatchNorm flavour a user's network may hold, through conversion, the pre-flight check and
recalibration: subclasses (one with an activation fused into its forward), frozen look-alikes that
are not ``_BatchNorm`` (torchvision's ``FrozenBatchNorm2d``), and subclasses bnflow cannot convert
exactly. Numerics are checked against float64 references written with plain tensor ops.
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from schemas.errors import ModelError
from tasks.nn import BatchNormNd, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from tasks.nn.bn_stats import collect_bn_stats, update_bn_stats
from tasks.nn.syncbn import bn_layers, check_bn_layers
from tests.gloo_group import run_group

EPS = 1e-5


class BNReLU2d(nn.BatchNorm2d):
    """An activation fused into the BN layer, with an extra child and an extra attribute."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.post = nn.Identity()
        self.tag = "fused"

    def forward(self, x):
        return torch.relu(self.post(super().forward(x)))


class TaggedBN1d(nn.BatchNorm1d):
    """A subclass that keeps BatchNorm1d's forward."""

    kind = "tagged"


class FrozenBN2d(nn.Module):
    """Look-alike of torchvision.ops.misc.FrozenBatchNorm2d: buffers only, a fixed affine forward."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + EPS).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class OwnBatchNormCall(nn.BatchNorm2d):
    """Normalizes with its own F.batch_norm call: never reaches _BatchNorm.forward."""

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps))


class PastTheMro(nn.BatchNorm2d):
    """Calls BatchNorm2d.forward by name, which skips whatever the MRO puts after BatchNorm2d."""

    def forward(self, x):
        return torch.relu(nn.BatchNorm2d.forward(self, x))


class Twice(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(super().forward(x))


def _bn_ref(x, w, b):
    """Train-mode BatchNorm in float64 with explicit ops; also returns the batch mean and biased var."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims)
    var = ((x - mean.view(shape)) ** 2).mean(dim=dims)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * w.view(shape) + b.view(shape), mean, var


def _channel_stats(z):
    """Mean and unbiased variance per channel of (N, C, *) float64 data."""
    z = z.transpose(0, 1).reshape(z.shape[1], -1)
    return z.mean(1), z.var(1, unbiased=True)


# --- synchronized training, 2 ranks -------------------------------------------------------------

def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), BNReLU2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                        TaggedBN1d(5)).double()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 2)
            bn.bias.normal_()
    return net


def _global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64)
    x[4:] = x[4:] * 2 + 3  # rank 1's half differs: local statistics would not match the global ones
    return x, torch.randn(8, 5, generator=g, dtype=torch.float64)


def _train_step_worker(rank, world):
    net = _net()
    keys = list(net.state_dict())
    seen = {}
    net[1].register_forward_hook(lambda m, i, out: seen.update(act=out.detach()))  # returns None: output kept
    convert_sync_batchnorm(net)
    converted = [isinstance(net[i], SyncBatchNorm) and not isinstance(net[i], nn.SyncBatchNorm) for i in (1, 4)]
    ddp = nn.parallel.DistributedDataParallel(net)  # refuses torch's SyncBatchNorm in a CPU model
    x, g = _global_batch()
    lo = rank * 4
    xr = x[lo:lo + 4].clone().requires_grad_(True)
    y = ddp(xr)
    y.backward(g[lo:lo + 4])
    revert_sync_batchnorm(net)
    return dict(y=y.detach(), grad_x=xr.grad, act=seen["act"], converted=converted, keys=keys,
                after_keys=list(net.state_dict()), types=[type(net[1]).__name__, type(net[4]).__name__],
                grads={n: p.grad for n, p in net.named_parameters()}, state=net.state_dict())


def test_subclasses_train_with_global_batch_statistics_on_two_ranks():
    ranks = run_group(_train_step_worker, 2)
    net = _net()
    x, g = _global_batch()
    p = {n: t.detach().clone().requires_grad_(True) for n, t in net.named_parameters()}
    xr = x.clone().requires_grad_(True)
    z1 = F.conv2d(xr, p["0.weight"])
    pre, mean1, var1 = _bn_ref(z1, p["1.weight"], p["1.bias"])
    h = torch.relu(pre).flatten(1) @ p["3.weight"].T + p["3.bias"]
    y, mean2, var2 = _bn_ref(h, p["4.weight"], p["4.bias"])
    (y * g).sum().backward()

    assert all(r["converted"] == [True, True] for r in ranks)
    assert float((torch.cat([r["y"] for r in ranks]) - y.detach()).abs().max()) <= 1e-12
    assert float((torch.cat([r["grad_x"] for r in ranks]) - xr.grad).abs().max()) <= 1e-12
    # The activation ran inside the converted layer: its output is relu of the globally normalized input.
    act = torch.cat([r["act"] for r in ranks])
    assert (pre < 0).any() and (act >= 0).all()
    assert float((act - torch.relu(pre.detach())).abs().max()) <= 1e-12
    n1, n2 = z1.numel() // 3, h.shape[0]
    expect = {"1.running_mean": 0.1 * mean1, "1.running_var": 0.9 + 0.1 * var1 * n1 / (n1 - 1),
              "4.running_mean": 0.1 * mean2, "4.running_var": 0.9 + 0.1 * var2 * n2 / (n2 - 1)}
    for r in ranks:
        assert r["types"] == ["BNReLU2d", "TaggedBN1d"] and r["after_keys"] == r["keys"]
        for name, want in expect.items():
            assert float((r["state"][name] - want.detach()).abs().max()) <= 1e-12, name
        assert int(r["state"]["1.num_batches_tracked"]) == int(r["state"]["4.num_batches_tracked"]) == 1
        for name, param in p.items():  # DDP averages the ranks' gradients: 1/world of the global one
            assert float((2 * r["grads"][name] - param.grad).abs().max()) <= 1e-12, name


# --- conversion ----------------------------------------------------------------------------------

def _no_op_hook(module, args, out):
    return None

def _model():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 3, 3), BNReLU2d(3), FrozenBN2d(3), nn.Sequential(BNReLU2d(3)),
                         nn.Flatten(), nn.Linear(3 * 16, 4), TaggedBN1d(4))


def test_convert_then_revert_keeps_class_state_and_extras():
    model = _model()
    model[1].weight.requires_grad_(False)
    model[1].running_mean.uniform_(-1, 1)
    model[1].register_forward_hook(_no_op_hook)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    layers = list(model.modules())
    attrs = {id(m): sorted(vars(m)) for m in layers}
    frozen = {k: v.clone() for k, v in model[2].named_buffers()}

    assert convert_sync_batchnorm(model) is model
    bns = [model[1], model[3][0], model[6]]
    assert all(isinstance(m, SyncBatchNorm) and not isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert isinstance(model[1], BNReLU2d) and isinstance(model[6], TaggedBN1d) and model[6].kind == "tagged"
    assert type(model[1]) is type(model[3][0])  # one derived class per original class
    assert type(model[2]) is FrozenBN2d
    assert list(model.modules()) == layers and list(model.state_dict()) == list(before)
    # A converted model pickles (Ray, torch.save) and deep-copies to the same classes.
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]
        assert all(torch.equal(v, before[k]) for k, v in clone.state_dict().items())

    assert revert_sync_batchnorm(model) is model
    assert [type(m) for m in bns] == [BNReLU2d, BNReLU2d, TaggedBN1d]
    assert list(model.modules()) == layers
    assert {id(m): sorted(vars(m)) for m in layers} == attrs  # nothing of ours left behind
    assert model[1].tag == "fused" and isinstance(model[1].post, nn.Identity) and len(model[1]._forward_hooks) == 1
    assert not model[1].weight.requires_grad
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], before[k]) and state[k].data_ptr() == tensors[k] for k in before)
    assert all(torch.equal(b, frozen[k]) for k, b in model[2].named_buffers())


def test_torch_and_standalone_syncbatchnorm_revert_to_plain_batchnorm():
    for layer in (nn.SyncBatchNorm(3), SyncBatchNorm(3)):
        layer.running_mean.fill_(0.5)
        model = revert_sync_batchnorm(nn.Sequential(layer))
        assert type(model[0]) is BatchNormNd and model[0].weight is layer.weight
        assert torch.all(model[0].running_mean == 0.5)


def test_a_frozen_lookalike_is_left_alone_by_convert_revert_and_recalibration():
    model = _model().double()
    frozen = {k: v.clone() for k, v in model[2].named_buffers()}
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    model.eval()
    y = model(x)
    revert_sync_batchnorm(convert_sync_batchnorm(model))
    assert type(model[2]) is FrozenBN2d and torch.equal(model(x), y)
    assert [name for name, _ in bn_layers(model)] == ["1", "3.0", "6"]

    batches = [torch.randn(n, 2, 6, 6, dtype=torch.float64) + 1 for n in (5, 9)]
    update_bn_stats(model, batches)
    for k, b in model[2].named_buffers():
        assert torch.equal(b, frozen[k]), k
    # The layer after it saw the frozen layer's fixed affine map of the calibrated BNReLU2d's output.
    with torch.no_grad():
        seen = []
        for b in batches:
            pre, _, _ = _bn_ref(model[0](b), model[1].weight, model[1].bias)
            seen.append(model[2](torch.relu(pre)))
    mean, var = _channel_stats(torch.cat(seen))
    assert torch.allclose(model[3][0].running_mean, mean, rtol=0, atol=1e-12)
    assert torch.allclose(model[3][0].running_var, var, rtol=0, atol=1e-12)


# --- pre-flight check ----------------------------------------------------------------------------

def _nested(odd):
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sequential(nn.Identity(), odd(3)), nn.ReLU())


@pytest.mark.parametrize("odd, how", [(OwnBatchNormCall, "outside BatchNorm.forward"),
                                      (PastTheMro, "outside BatchNorm.forward"),
                                      (Twice, "2 times")])
def test_check_refuses_a_layer_that_normalizes_outside_batchnorm_forward(odd, how):
    model = _nested(odd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError) as info:
        check_bn_layers(model, torch.randn(4, 2, 6, 6))
    msg = str(info.value)
    assert "\n" not in msg and "'1.1'" in msg and f"{odd.__module__}.{odd.__qualname__}" in msg and how in msg
    assert type(model[1][1]) is odd and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Recalibration refuses it as well instead of skipping its calibration step.
    with pytest.raises(ModelError, match="'1.1'"):
        collect_bn_stats(model, [torch.randn(4, 2, 6, 6)])
    assert type(model[1][1]) is odd


def test_check_passes_a_well_behaved_model_and_leaves_it_bitwise_unchanged():
    model = nn.Sequential(_model(), nn.Dropout(0.5))
    model[0][6].momentum = None  # its update reads num_batches_tracked
    model[0][3].eval()  # a mix of training flags
    model[0][0].register_buffer("scratch", torch.randn(3), persistent=False)
    with torch.no_grad():
        for bn in (model[0][1], model[0][3][0], model[0][6]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    during = []
    model[0][1].register_forward_hook(lambda m, i, o: during.append((m.training, int(m.num_batches_tracked))))
    state = {k: v.clone() for k, v in (*model.named_parameters(), *model.named_buffers())}
    flags = [m.training for m in model.modules()]
    attrs = [(type(m), sorted(vars(m))) for m in model.modules()]
    example = torch.randn(6, 2, 6, 6)
    rng = torch.get_rng_state()

    names = check_bn_layers(model, example)

    assert names == ["0.1", "0.3.0", "0.6"]
    assert during == [(True, 1)]  # the forward ran in train mode and moved the statistics ...
    after = dict((*model.named_parameters(), *model.named_buffers()))
    assert list(after) == list(state)
    for k, v in after.items():  # ... which are back, bit for bit
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    assert [(type(m), sorted(vars(m))) for m in model.modules()] == attrs
    assert torch.equal(torch.get_rng_state(), rng)
    assert check_bn_layers(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3)) == []


# --- recalibration -------------------------------------------------------------------------------

def test_recalibration_keeps_a_fused_activation_and_matches_float64_statistics():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), BNReLU2d(3), nn.BatchNorm2d(3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.normal_()
    batches = [torch.randn(n, 2, 6, 6, dtype=torch.float64) * 2 + 1 for n in (4, 11, 7)]
    nbt = [int(model[1].num_batches_tracked), int(model[2].num_batches_tracked)]
    recorded = []
    model[2].register_forward_pre_hook(lambda m, args: recorded.append(args[0].clone()))
    attrs = sorted(vars(model[1]))

    # Reference by hand: BNReLU2d normalizes each batch with that batch's own statistics, then relu.
    with torch.no_grad():
        z1 = [F.conv2d(b, model[0].weight) for b in batches]
        z2 = [torch.relu(_bn_ref(z, model[1].weight, model[1].bias)[0]) for z in z1]

    model.train()
    update_bn_stats(model, batches)

    for got, want in zip(recorded, z2):  # the next layer saw the activation's output
        assert (got >= 0).all() and (got == 0).any()
        assert float((got - want).abs().max()) <= 1e-12
    for bn, z in ((model[1], z1), (model[2], z2)):
        mean, var = _channel_stats(torch.cat(z))
        assert torch.allclose(bn.running_mean, mean, rtol=0, atol=1e-12)
        assert torch.allclose(bn.running_var, var, rtol=0, atol=1e-12)
    assert [int(model[1].num_batches_tracked), int(model[2].num_batches_tracked)] == nbt
    assert all(m.training for m in model.modules())
    assert type(model[1]) is BNReLU2d and sorted(vars(model[1])) == attrs
