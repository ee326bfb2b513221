"""CIFAR ResNets of the RepDistiller / CA-MKD model zoo (basic blocks, 32x32 input).

Module and attribute names follow RepDistiller's ``models/resnet.py`` so its
checkpoints load unchanged: ``conv1``, ``bn1``, ``layer1..3`` of ``BasicBlock``
(``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample = Sequential(conv, bn)``)
and ``fc``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.pool import GlobalAvgPool


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn pairs with an identity or 1x1 conv-bn shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 with stage widths ``num_filters[1:]``."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"basic-block ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = GlobalAvgPool()  # AvgPool2d(8) at 32 px, global at any size
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1,
                          stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier: ``z = head(h)``."""
        return self.fc

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map, the input of the global pool (the official ``feat[-2]``)."""
        x = F.relu(self.bn1(self.conv1(x)))
        return cast(torch.Tensor, self.layer3(self.layer2(self.layer1(x))))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map."""
        return cast(torch.Tensor, self.avgpool(m))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


_THIN = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def resnet8(num_classes: int) -> ResNet:
    """ResNet-8: one basic block per stage, widths 16-32-64."""
    return ResNet(8, _THIN, num_classes)


def resnet14(num_classes: int) -> ResNet:
    """ResNet-14: two basic blocks per stage, widths 16-32-64."""
    return ResNet(14, _THIN, num_classes)


def resnet20(num_classes: int) -> ResNet:
    """ResNet-20: three basic blocks per stage, widths 16-32-64."""
    return ResNet(20, _THIN, num_classes)


def resnet32(num_classes: int) -> ResNet:
    """ResNet-32: five basic blocks per stage, widths 16-32-64."""
    return ResNet(32, _THIN, num_classes)


def resnet44(num_classes: int) -> ResNet:
    """ResNet-44: seven basic blocks per stage, widths 16-32-64."""
    return ResNet(44, _THIN, num_classes)


def resnet56(num_classes: int) -> ResNet:
    """ResNet-56: nine basic blocks per stage, widths 16-32-64."""
    return ResNet(56, _THIN, num_classes)


def resnet110(num_classes: int) -> ResNet:
    """ResNet-110: eighteen basic blocks per stage, widths 16-32-64."""
    return ResNet(110, _THIN, num_classes)


def resnet8x4(num_classes: int) -> ResNet:
    """ResNet-8x4: one basic block per stage, widths 64-128-256 (stem 32)."""
    return ResNet(8, _WIDE, num_classes)


def resnet20x4(num_classes: int) -> ResNet:
    """ResNet-20x4 (CA-MKD): three basic blocks per stage, widths 64-128-256."""
    return ResNet(20, _WIDE, num_classes)


def resnet32x4(num_classes: int) -> ResNet:
    """ResNet-32x4: five basic blocks per stage, widths 64-128-256 (stem 32)."""
    return ResNet(32, _WIDE, num_classes)
