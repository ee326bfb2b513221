"""ShuffleNet V1 of the RepDistiller / CA-MKD model zoo (``ShuffleV1``: g=3, 32x32 input).

Names follow RepDistiller's ``models/ShuffleNetv1.py``: ``conv1``, ``bn1``,
``layer1..3`` of ``Bottleneck`` (``conv1..3``, ``bn1..3``) and ``linear``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.pool import global_avg_pool


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*c, H, W] -> [N, c*g, H, W]: interleave the channels of the ``groups`` groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; concat shortcut when striding."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        # The first 1x1 conv after the 24-channel stem is not grouped.
        self.shuffle_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.shuffle_groups,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            out = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            out = out + x
        return F.relu(out)


class ShuffleNet(nn.Module):
    """Stem 1x1 conv (no stride, no max pool) and three stages of bottlenecks."""

    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int,
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The first block concatenates its pooled input, so it makes fewer channels.
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes,
                                     stride=2 if i == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier: ``z = head(h)``."""
        return self.linear

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map, the input of the global pool (the official ``feat[-2]``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return cast(torch.Tensor, self.layer3(self.layer2(self.layer1(out))))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map (avg_pool2d(4) at 32 px, global at any size)."""
        return global_avg_pool(m)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


def ShuffleV1(num_classes: int) -> ShuffleNet:  # noqa: N802 - the zoo's name
    """ShuffleNet V1, 3 groups, stage widths 240-480-960."""
    return ShuffleNet([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)
