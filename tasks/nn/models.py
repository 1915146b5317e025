"""Models: softmax classifiers (they return logits) with BatchNorm after every hidden layer.

``build_model`` knows nothing of DDP or SyncBatchNorm: distribution wraps the model from outside
(``tasks.train_loop.distribute``). Layers followed by BatchNorm have no bias: BN's beta makes it redundant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from schemas.artifacts import CheckpointState
from schemas.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, num_features: int, num_classes: int, hidden: tuple[int, ...], bn_eps: float, bn_momentum):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h, eps=bn_eps, momentum=bn_momentum), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class LeNet(nn.Module):
    """LeNet-5-style CNN: two 5x5 conv-BN-ReLU-maxpool blocks, then 120-84 BN MLP, then the classifier.

    Both convolutions pad by 2, so any image of side >= 4 works (28 -> 7x7 maps, 8 -> 2x2 maps).
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, bn_eps: float, bn_momentum):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
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
        x = x.view(x.shape[0], *self.image_shape)
        return self.classifier(self.features(x).flatten(1))


def build_model(cfg: ModelConfig, num_features: int, num_classes: int, image_shape=None) -> nn.Module:
    """The network of ``cfg``, initialized; inputs are flat (N, num_features) float32 rows."""
    if cfg.kind == "lenet":
        if not image_shape:
            raise ValueError("lenet needs image data (image_shape)")
        model = LeNet(tuple(image_shape), num_classes, cfg.bn_eps, cfg.bn_momentum)
    else:
        model = MLP(num_features, num_classes, tuple(cfg.hidden), cfg.bn_eps, cfg.bn_momentum)
    init_weights(model, cfg.init)
    return model


def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialize conv/linear weights against exploding or vanishing activations.

    xavier: Glorot uniform, variance 2 / (fan_in + fan_out); kaiming: He normal for ReLU,
    variance 2 / fan_in; lecun: normal with variance 1 / fan_in (weights scaled by 1/sqrt(fan_in)).
    Biases start at 0; BatchNorm at gamma = 1, beta = 0.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
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
    """The served model: raw features in, logits out, with the train split's normalization inside.

    Carries the exact statistics artifact numbers as buffers, so prediction-time inputs are
    normalized with the same shift and scale as training data.
    """

    def __init__(self, model: nn.Module, shift, scale):
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))
        self.register_buffer("inv_scale", 1.0 / torch.as_tensor(scale, dtype=torch.float64).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.shift) * self.inv_scale)


def model_from_checkpoint(state: CheckpointState) -> nn.Module:
    """Rebuild the plain-BatchNorm network stored in a train/recalibrate checkpoint."""
    cfg = ModelConfig.model_validate(state.config["model"])
    spec = state.spec
    model = build_model(cfg, spec.num_features, spec.num_classes, spec.image_shape)
    model.load_state_dict(state.model)
    return model.eval()


def served_model(state: CheckpointState) -> NormalizedClassifier:
    """Raw features -> logits: the checkpoint's network behind its normalization statistics."""
    return NormalizedClassifier(model_from_checkpoint(state), state.norm_stats.shift, state.norm_stats.scale).eval()
