"""Wide ResNets (pre-activation) of the RepDistiller / CA-MKD model zoo.

Names follow RepDistiller's ``models/wrn.py``: ``conv1``, ``block1..3`` (each a
``NetworkBlock`` whose blocks sit in ``.layer``), ``bn1`` and ``fc``; a block
has ``bn1``, ``conv1``, ``bn2``, ``conv2`` and, when its width changes, a 1x1
``convShortcut``.
"""

from __future__ import annotations

from typing import cast

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.pool import global_avg_pool


class BasicBlock(nn.Module):
    """Pre-activation block: bn-relu-conv3x3, bn-relu-conv3x3, plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out: torch.Tensor = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in RepDistiller: the projection shortcut sees the pre-activated
        # input, the identity shortcut the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """``nb_layers`` blocks; only the first changes width and stride."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.layer(x))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 input; depth must be 6n+4."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier: ``z = head(h)``."""
        return self.fc

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map after the final BN and ReLU, the input of the global pool (``feat[-2]``)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(out))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map (avg_pool2d(8) at 32 px, global at any size)."""
        return global_avg_pool(m)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


def wrn_16_1(num_classes: int) -> WideResNet:
    """WRN-16-1: two blocks per stage, widths 16-32-64."""
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int) -> WideResNet:
    """WRN-16-2: two blocks per stage, widths 32-64-128."""
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int) -> WideResNet:
    """WRN-40-1: six blocks per stage, widths 16-32-64."""
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int) -> WideResNet:
    """WRN-40-2: six blocks per stage, widths 32-64-128."""
    return WideResNet(40, 2, num_classes)
