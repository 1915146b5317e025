"""ResNet-18 with the layer shapes of He et al. 2016, Table 1 (the network torchvision's
``resnet18`` builds): a 7x7/2 stem with 3x3/2 max pooling, four stages of two basic blocks at 64,
128, 256 and 512 channels, 1x1 projection shortcuts where the shape changes, 20 BatchNorm2d
layers, 11.2 M parameters at 10 classes.

The SyncBatchNorm benchmark's stand-in where torchvision cannot be imported (its PyPI wheel for
torch 2.13 needs CUDA libraries: 'operator torchvision::nms does not exist' beside the CPU torch);
where it can, the benchmark uses ``torchvision.models.resnet18`` itself.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ``resnet18(weights=None, num_classes=...)`` when it imports, else ``ResNet18``."""
    try:
        from torchvision.models import resnet18 as tv_resnet18
    except Exception:  # noqa: BLE001 -- any import failure of torchvision means: use the stand-in
        return ResNet18(num_classes)
    return tv_resnet18(weights=None, num_classes=num_classes)
