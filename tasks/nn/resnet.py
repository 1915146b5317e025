"""The built-in ResNet for small images: the CIFAR-style 6n+2 network of He et al. 2016 (sec. 4.2).

A 3x3 convolution, then three stages of n basic blocks (two 3x3 conv-BN layers and a shortcut) at
``width``, 2 x ``width`` and 4 x ``width`` channels, the last two starting with stride 2, then global
average pooling and the classifier: 6n + 2 weight layers. Where a block changes the shape, its
shortcut is a 1x1 convolution with BatchNorm (the paper's option B) rather than zero padding (option
A): it keeps every block a plain ``nn.Module`` and every BatchNorm layer a torch class that
SyncBatchNorm and recalibration handle. Any image side works (pooling is adaptive).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn: dict):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, **bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, **bn)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, **bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-``depth`` (20, 32, 44, 56, 110, ...) on (N, in_channels, H, W) images; returns logits."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, width: int = 16,
                 bn_eps: float = 1e-5, bn_momentum: float | None = 0.1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth}: a CIFAR-style ResNet has 6n+2 layers (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        bn = dict(eps=bn_eps, momentum=bn_momentum)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, **bn), nn.ReLU())
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, bn))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
