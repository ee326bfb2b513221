"""MobileNetV2 of the RepDistiller / CA-MKD model zoo (``mobile_half``: T=6, width 0.5).

Names follow RepDistiller's ``models/mobilenetv2.py``: ``conv1`` and ``conv2`` are
conv-bn-relu ``Sequential``s, ``blocks`` a ``ModuleList`` of seven stages of
``InvertedResidual`` (its layers in ``.conv``), and ``classifier =
Sequential(Linear(1280, C))``, so the head's keys are ``classifier.0.*``.
"""

from __future__ import annotations

from typing import cast

import math

import torch
from torch import nn

from kdcache.models.pool import GlobalAvgPool


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand, depthwise 3x3, pointwise linear projection; residual if shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """RepDistiller's CIFAR MobileNetV2 with expansion ``T`` and width multiplier."""

    # (expansion, channels, repeats, first stride); expansion None means T.
    _SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]

    def __init__(self, T: int, width_mult: float, num_classes: int,
                 input_size: int = 32) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self._SETTING:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride,
                                               T if t is None else t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = GlobalAvgPool()  # RepDistiller's AvgPool2d(2, ceil_mode) at 32 px, global at any size

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier ``classifier[0]``: ``z = head(h)``."""
        head = self.classifier[0]
        assert isinstance(head, nn.Linear)  # built so in __init__
        return head

    def student_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last inverted-residual block's map, before ``conv2``: the official CA-MKD ``feat[-2]`` (``f4``), the
        map a student's aligner takes (160 x 2 x 2 for mobile_half at 32 px)."""
        out: torch.Tensor = self.conv1(x)
        for stage in self.blocks:
            out = stage(out)
        return out

    def pool_input(self, f: torch.Tensor) -> torch.Tensor:
        """``conv2`` (1x1 conv, BN, ReLU to 1280 channels) of :meth:`student_map`: what the global pool receives."""
        return cast(torch.Tensor, self.conv2(f))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map after ``conv2``, the input of the global pool (a teacher's stored map)."""
        return self.pool_input(self.student_map(x))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map."""
        return cast(torch.Tensor, self.avgpool(m))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


def mobile_half(num_classes: int) -> MobileNetV2:
    """RepDistiller's ``mobile_half``, registered as ``MobileNetV2``."""
    return MobileNetV2(T=6, width_mult=0.5, num_classes=num_classes)
