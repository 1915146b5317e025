"""Early stopping rules and gradient-health flags (tasks/convergence.py), the flags on real
gradients of networks built to vanish and to explode."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from schemas.config import EarlyStoppingConfig, GradHealthConfig
from tasks.convergence import GradMonitor, best_epoch, grad_health, stop_reason


def _history(train, val=None):
    val = val or [None] * len(train)
    return [{"epoch": i + 1, "train_loss": t, **({"val_loss": v} if v is not None else {})}
            for i, (t, v) in enumerate(zip(train, val))]


def test_patience_counts_evaluations_without_an_improvement_larger_than_min_delta():
    h = _history([1.0] * 6, [1.0, 0.8, 0.79, 0.795, 0.81, 0.82])
    assert stop_reason(h[:4], EarlyStoppingConfig(patience=2)) is None  # 0.79 improved on 0.8
    assert "3 evaluations" in stop_reason(h, EarlyStoppingConfig(patience=3))
    # with min_delta 0.05, 0.79 is no improvement on 0.8: four evaluations without one
    assert "best 0.8 at epoch 2" in stop_reason(h, EarlyStoppingConfig(patience=4, min_delta=0.05))
    assert stop_reason(h, EarlyStoppingConfig()) is None  # off by default


def test_patience_skips_epochs_without_validation():
    h = _history([1.0] * 6, [None, 0.5, None, 0.6, None, 0.7])
    assert stop_reason(h[:4], EarlyStoppingConfig(patience=2)) is None
    assert stop_reason(h, EarlyStoppingConfig(patience=2)) is not None


def test_train_window_stops_a_converged_run():
    h = _history([1.0, 0.5, 0.3, 0.2999, 0.2998, 0.2998])
    assert "converged" in stop_reason(h, EarlyStoppingConfig(train_window=3, train_min_change=1e-3))
    assert stop_reason(h, EarlyStoppingConfig(train_window=4, train_min_change=1e-3)) is None


def test_best_epoch_is_the_lowest_val_loss():
    assert best_epoch(_history([1] * 4, [0.9, 0.5, 0.5, 0.7])) == 2
    assert best_epoch(_history([1] * 2)) is None


def _digits_batch(rows=256):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:rows] - d.data.mean(0)) / (d.data.std(0) + 1e-6)
    return torch.from_numpy(x).float(), torch.from_numpy(d.target[:rows])


def _grads_of(model, steps=3):
    x, y = _digits_batch()
    monitor = GradMonitor(model, GradHealthConfig())
    for _ in range(steps):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        monitor.step()
    return monitor.epoch_metrics(), monitor


def _mlp(widths, act, bn=False, gain=None):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers.append(nn.Linear(a, b))
        if gain is not None:
            nn.init.normal_(layers[-1].weight, std=gain / math.sqrt(a))
        if b != widths[-1]:
            layers += ([nn.BatchNorm1d(b)] if bn else []) + [act()]
    return nn.Sequential(*layers)


def test_a_deep_sigmoid_mlp_without_bn_is_flagged_vanishing():
    m, monitor = _grads_of(_mlp([64] + [64] * 10 + [10], nn.Sigmoid))
    assert m["grad_vanishing"] == 1.0 and m["grad_exploding"] == 0.0
    assert m["grad_first_to_last"] < 1e-3
    assert len([k for k in m if k.startswith("grad_norm/")]) == 11  # one per Linear, none for the rest


def test_too_large_an_init_is_flagged_exploding():
    m, _ = _grads_of(_mlp([64] + [64] * 6 + [10], nn.ReLU, gain=8.0))
    assert m["grad_exploding"] == 1.0 and m["grad_norm_max"] > 1e3


def test_a_bn_relu_mlp_is_healthy_and_the_norms_are_the_layers_own():
    model = _mlp([64, 128, 64, 10], nn.ReLU, bn=True)
    m, monitor = _grads_of(model, steps=1)
    assert m["grad_vanishing"] == 0.0 and m["grad_exploding"] == 0.0
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    expect = [float(p.grad.double().norm()) for p in weights]  # the one step's gradients, still in place
    got = [m[f"grad_norm/{name}"] for name, _ in monitor.layers]
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    assert m["grad_first_to_last"] == pytest.approx(expect[0] / expect[-1], rel=1e-6)


def test_grad_health_names_the_first_flagged_epoch():
    h = [{"epoch": 1, "grad_vanishing": 0.0, "grad_exploding": 0.0, "grad_first_to_last": 0.5, "grad_norm_max": 2.0},
         {"epoch": 2, "grad_vanishing": 1.0, "grad_exploding": 0.0, "grad_first_to_last": 1e-5, "grad_norm_max": 2.0}]
    kind, note = grad_health(h)
    assert kind == "vanishing" and "epoch 2" in note and "1e-05" in note
    assert grad_health(h[:1]) == ("ok", "")
    assert grad_health([{"epoch": 1, "train_loss": 1.0}])[0] == "unmeasured"
