"""Pure parts of the train stage: schedules, optimizers, initialization, models, curve diagnosis."""

import math

import pytest
import torch

from schemas.config import ModelConfig, OptimizerConfig, ScheduleConfig
from tasks.evaluate import diagnose
from tasks.nn.models import build_model
from tasks.train import build_optimizer, lr_factor


def test_schedules():
    step = ScheduleConfig(kind="step", step_size=2, gamma=0.5)
    assert [lr_factor(step, e, 6, 0.1) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    exp = ScheduleConfig(kind="exponential", gamma=0.9)
    assert lr_factor(exp, 3, 10, 0.1) == pytest.approx(0.9 ** 3)
    cos = ScheduleConfig(kind="cosine", min_lr=0.01)
    vals = [lr_factor(cos, e, 5, 0.1) for e in range(5)]
    assert vals[0] == 1.0 and all(a > b for a, b in zip(vals, vals[1:]))
    assert vals[-1] > 0.1  # the last epoch still learns
    assert lr_factor(cos, 5, 5, 0.1) == pytest.approx(0.1)  # reaches min_lr / lr after the last epoch
    warm = ScheduleConfig(kind="constant", warmup_epochs=3)
    assert [lr_factor(warm, e, 6, 0.1) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("name, cls, check", [
    ("sgd", torch.optim.SGD, lambda g: g["momentum"] == 0.8 and g["nesterov"]),
    ("adam", torch.optim.Adam, lambda g: g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8),
    ("rmsprop", torch.optim.RMSprop, lambda g: g["alpha"] == 0.99),
    ("adagrad", torch.optim.Adagrad, lambda g: g["eps"] == 1e-8),
    ("adadelta", torch.optim.Adadelta, lambda g: g["rho"] == 0.9),
])
def test_optimizers_and_weight_decay_groups(name, cls, check):
    model = build_model(ModelConfig(kind="mlp", hidden=(8,)), 4, 3)
    opt = build_optimizer(OptimizerConfig(name=name, lr=0.01, momentum=0.8, nesterov=True, weight_decay=1e-4), model)
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert check(decay)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


@pytest.mark.parametrize("init, var", [("lecun", lambda fi, fo: 1 / fi), ("kaiming", lambda fi, fo: 2 / fi),
                                       ("xavier", lambda fi, fo: 2 / (fi + fo))])
def test_init_variance(init, var):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=(512,), init=init), 400, 10)
    w = model.body[0].weight.detach()
    assert float(w.var()) == pytest.approx(var(400, 512), rel=0.05)


def test_models_produce_logits_and_have_no_redundant_bias():
    lenet = build_model(ModelConfig(kind="lenet"), 784, 10, (1, 28, 28))
    assert lenet(torch.randn(4, 784)).shape == (4, 10)
    small = build_model(ModelConfig(kind="lenet"), 64, 10, (1, 8, 8))
    assert small(torch.randn(3, 64)).shape == (3, 10)
    layers = list(lenet.features) + list(lenet.classifier)
    for layer, nxt in zip(layers, layers[1:]):
        if isinstance(nxt, torch.nn.modules.batchnorm._BatchNorm):
            assert layer.bias is None


def test_diagnosis_reads_the_curves():
    def h(train, val):
        return [{"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val))]
    assert diagnose(h([1, 0.5, 0.3, 0.2, 0.1, 0.05], [1, 0.6, 0.5, 0.6, 0.8, 1.0])).startswith("overfitting")
    assert diagnose(h([1, 0.8, 0.6, 0.4], [1, 0.8, 0.6, 0.45])).startswith("still learning")
    assert diagnose(h([1, 0.5, 0.4, 0.399, 0.398], [1, 0.5, 0.45, 0.45, 0.45])).startswith("converged")
    assert diagnose(h([1, 0.5, 2.0, math.inf], [1, 1, 1, 1])).startswith("diverging")
    assert diagnose(h([1.0, 0.99, 0.98, 0.98], [1, 1, 1, 1])).startswith("data problem")
