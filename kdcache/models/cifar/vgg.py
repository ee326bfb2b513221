"""Batch-norm VGGs of the RepDistiller / CA-MKD model zoo (single linear classifier).

RepDistiller's ``vgg8_bn`` ... ``vgg19_bn`` are registered under the plain names
``vgg8`` ... ``vgg19``, as its ``model_dict`` does. Each of ``block0..4`` is a
``Sequential`` of conv(bias)-bn-relu triples whose last ReLU is dropped (the
forward applies it), so keys are e.g. ``block4.4.running_var``; ``pool0..4``
hold no state; the classifier is ``classifier = Linear(512, C)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_CFG: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512],
          [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks with max pooling between them, global average pool, linear."""

    def __init__(self, cfg: list[list[int]], num_classes: int) -> None:
        super().__init__()
        self.block0 = _make_block(cfg[0], 3)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
                assert m.bias is not None  # every conv here is built with a bias
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier: ``z = head(h)``."""
        return self.classifier

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map, the input of the global pool (the official ``feat[-2]``)."""
        size = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        # RepDistiller pools after block3 only for 64x64 input (Tiny-ImageNet).
        if size == 64:
            x = self.pool3(x)
        return F.relu(self.block4(x))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map (``pool4`` is already adaptive)."""
        return torch.flatten(self.pool4(m), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


def vgg8(num_classes: int) -> VGG:
    """VGG-8 with batch norm (RepDistiller ``vgg8_bn``, configuration 'S')."""
    return VGG(_CFG["S"], num_classes)


def vgg11(num_classes: int) -> VGG:
    """VGG-11 with batch norm (RepDistiller ``vgg11_bn``, configuration 'A')."""
    return VGG(_CFG["A"], num_classes)


def vgg13(num_classes: int) -> VGG:
    """VGG-13 with batch norm (RepDistiller ``vgg13_bn``, configuration 'B')."""
    return VGG(_CFG["B"], num_classes)


def vgg16(num_classes: int) -> VGG:
    """VGG-16 with batch norm (RepDistiller ``vgg16_bn``, configuration 'D')."""
    return VGG(_CFG["D"], num_classes)


def vgg19(num_classes: int) -> VGG:
    """VGG-19 with batch norm (RepDistiller ``vgg19_bn``, configuration 'E')."""
    return VGG(_CFG["E"], num_classes)
