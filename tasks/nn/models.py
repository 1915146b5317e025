"""Models: softmax classifiers (they return logits) with BatchNorm after every hidden layer.

The built-ins (``mlp``, ``lenet``; ``resnet`` in ``tasks.nn.resnet``) and the served wrapper. Any
network, built-in or the user's, is built through ``tasks.nn.network``; ``build_model`` knows nothing
of DDP or SyncBatchNorm: distribution wraps the model from outside (``tasks.train_loop.distribute``).
Layers followed by BatchNorm have no bias: BN's beta makes it redundant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torch.nn.modules.conv import _ConvNd

from schemas.artifacts import CheckpointState, Network
from schemas.config import ModelConfig
from tasks.nn.network import construct, network_of


class MLP(nn.Module):
    """Linear-BN-ReLU blocks, then the classifier; image inputs are flattened first."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 128), bn_eps: float = 1e-5,
                 bn_momentum: float | None = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h, eps=bn_eps, momentum=bn_momentum), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class LeNet(nn.Module):
    """LeNet-5-style CNN: two 5x5 conv-BN-ReLU-maxpool blocks, then 120-84 BN MLP, then the classifier.

    Takes (N, C, H, W) images of ``input_shape`` (C, H, W). Both convolutions pad by 2, so any image
    of side >= 4 works (28 -> 7x7 maps, 8 -> 2x2 maps).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, bn_eps: float = 1e-5,
                 bn_momentum: float | None = 0.1):
        super().__init__()
        c, h, w = input_shape
        bn = dict(eps=bn_eps, momentum=bn_momentum)
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2, bias=False), nn.BatchNorm2d(6, **bn), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16, **bn), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120, bias=False), nn.BatchNorm1d(120, **bn), nn.ReLU(),
            nn.Linear(120, 84, bias=False), nn.BatchNorm1d(84, **bn), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network of ``cfg`` for examples of ``input_shape``, initialized by ``cfg.init``."""
    return from_network(network_of(cfg, input_shape, num_classes), cfg.init_scheme)


def from_network(net: Network, init: str) -> nn.Module:
    """``net`` built, then initialized by ``init`` (``none``: as its own code left it)."""
    model = construct(net)
    if init != "none":
        init_weights(model, init)
    return model


def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialize conv/linear weights against exploding or vanishing activations.

    xavier: Glorot uniform, variance 2 / (fan_in + fan_out); kaiming: He normal for ReLU,
    variance 2 / fan_in; lecun: normal with variance 1 / fan_in (weights scaled by 1/sqrt(fan_in)).
    Biases start at 0. BatchNorm and every other layer keep their own initialization.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, _ConvNd)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class NormalizedClassifier(nn.Module):
    """The served model: raw feature rows (N, D) in, logits out, with the train split's normalization
    inside and the rows shaped as the network takes them ((N, C, H, W) for images).

    Carries the exact statistics artifact numbers as buffers, so prediction-time inputs are
    normalized with the same shift and scale as training data.
    """

    def __init__(self, model: nn.Module, shift, scale, input_shape: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))
        self.register_buffer("inv_scale", 1.0 / torch.as_tensor(scale, dtype=torch.float64).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(((x - self.shift) * self.inv_scale).reshape(-1, *self.input_shape))

    def __setstate__(self, state):
        super().__setstate__(state)
        if "input_shape" not in self.__dict__:
            # Pickled (a registered model) before 2026-12-01, when networks shaped flat rows themselves.
            self.input_shape = tuple(getattr(self.model, "image_shape", None) or (int(self.shift.numel()),))


def model_from_checkpoint(state: CheckpointState) -> nn.Module:
    """Rebuild the plain-BatchNorm network stored in a train/recalibrate checkpoint, in eval mode.
    A checkpoint records how its network was built (``state.network``); one written before it did
    names a built-in in its config."""
    net = state.network or network_of(ModelConfig.model_validate(state.config["model"]), state.spec.input_shape,
                                      state.spec.num_classes)
    model = construct(net)
    model.load_state_dict(state.model)
    return model.eval()


def served_model(state: CheckpointState) -> NormalizedClassifier:
    """Raw features -> logits: the checkpoint's network behind its normalization statistics."""
    return NormalizedClassifier(model_from_checkpoint(state), state.norm_stats.shift, state.norm_stats.scale,
                                state.spec.input_shape).eval()
