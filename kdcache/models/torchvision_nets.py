"""The torchvision classes of kdcache's ImageNet family: each only overrides ``forward`` to return
``(h, z)`` and adds the ``head`` property, ``feature_map`` and ``pool_map`` (and, where the official CA-MKD's
``feat[-2]`` is not the pool's input, ``student_map`` and ``pool_input``).

Kept apart from :mod:`kdcache.models.imagenet` (the registry's table), so that importing
torchvision (seconds) waits until a network of this family is built.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn


class ResNet(tvm.ResNet):
    """torchvision ResNet / Wide ResNet / ResNeXt with an ``(h, z)`` forward."""

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier ``fc``: ``z = head(h)``."""
        return cast(nn.Linear, self.fc)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``layer4`` gives, the input of the global pool."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return cast(torch.Tensor, self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map."""
        return torch.flatten(self.avgpool(m), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


class ShuffleNetV2(tvm.ShuffleNetV2):
    """torchvision ShuffleNet V2 with an ``(h, z)`` forward."""

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier ``fc``: ``z = head(h)``."""
        return cast(nn.Linear, self.fc)

    def student_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``stage4`` gives, before ``conv5``: the official CA-MKD ``feat[-2]`` (its ImageNet
        ShuffleNetV2's last hidden layer), the map a student's aligner takes."""
        x = self.maxpool(self.conv1(x))
        return cast(torch.Tensor, self.stage4(self.stage3(self.stage2(x))))

    def pool_input(self, f: torch.Tensor) -> torch.Tensor:
        """``conv5`` of :meth:`student_map`: what the global pool receives."""
        return cast(torch.Tensor, self.conv5(f))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``conv5`` gives, the input of the global pool (a teacher's stored map)."""
        return self.pool_input(self.student_map(x))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map (torchvision's own mean)."""
        return m.mean([2, 3])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)


class MobileNetV2(tvm.MobileNetV2):
    """torchvision MobileNetV2 with an ``(h, z)`` forward.

    ``classifier`` is ``Sequential(Dropout, Linear)``; ``h`` is the Linear's
    input, i.e. after dropout (the pooled features themselves in eval mode).
    """

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier ``classifier[1]``: ``z = head(h)``."""
        return cast(nn.Linear, self.classifier[1])

    # features[18] is the last ConvBNReLU (320 -> 1280 channels); the official CA-MKD's ImageNet MobileNetV2 takes
    # its feat[-2] before it, after features[14:18]
    _POOL_INPUT = 18

    def student_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map of the last inverted-residual block (``features[:18]``, 320 channels): the official CA-MKD
        ``feat[-2]``, the map a student's aligner takes."""
        return cast(torch.Tensor, self.features[:self._POOL_INPUT](x))

    def pool_input(self, f: torch.Tensor) -> torch.Tensor:
        """``features[18:]`` (the 1x1 ConvBNReLU to 1280 channels) of :meth:`student_map`: what the pool receives."""
        return cast(torch.Tensor, self.features[self._POOL_INPUT:](f))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``features`` gives, the input of the global pool (a teacher's stored map)."""
        return self.pool_input(self.student_map(x))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map (pool, then the classifier's dropout)."""
        return cast(torch.Tensor, self.classifier[0](torch.flatten(F.adaptive_avg_pool2d(m, (1, 1)), 1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled (post-dropout) penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)
