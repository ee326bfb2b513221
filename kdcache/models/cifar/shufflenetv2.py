"""ShuffleNet V2 of the RepDistiller / CA-MKD model zoo (``ShuffleV2``: net size 1, 32x32 input).

Names follow RepDistiller's ``models/ShuffleNetv2.py``: ``conv1``, ``bn1``,
``layer1..3`` (a ``DownBlock`` with ``conv1..5``/``bn1..5`` followed by
``BasicBlock``s with ``conv1..3``/``bn1..3``), ``conv2``, ``bn2`` and ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.models.pool import global_avg_pool

from .shufflenetv1 import channel_shuffle


class BasicBlock(nn.Module):
    """Split channels in half; transform the second half; concat and shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownBlock(nn.Module):
    """Stride-2 unit: two branches each making half the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid,
                               bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """Stem 1x1 conv, three stages, 1x1 conv to ``out_channels[3]``, linear."""

    def __init__(self, out_channels: tuple[int, int, int, int], num_blocks: tuple[int, int, int],
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1,
                               padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier: ``z = head(h)``."""
        return self.linear

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map, the input of the global pool (the official ``feat[-2]``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.relu(self.bn2(self.conv2(out)))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map (avg_pool2d(4) at 32 px, global at any size)."""
        return global_avg_pool(m)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


def ShuffleV2(num_classes: int) -> ShuffleNetV2:  # noqa: N802 - the zoo's name
    """ShuffleNet V2 net size 1, stage widths 116-232-464, 1024 features."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
