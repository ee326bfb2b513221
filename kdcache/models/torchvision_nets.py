"""The torchvision classes of kdcache's ImageNet family: each only overrides ``forward`` to return
``(h, z)`` and adds the ``head`` property, ``feature_map`` and ``pool_map``.

Kept apart from :mod:`kdcache.models.imagenet` (the registry's table), so that importing
torchvision (seconds) waits until a network of this family is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn


class ResNet(tvm.ResNet):
    """torchvision ResNet / Wide ResNet / ResNeXt with an ``(h, z)`` forward."""

    @property
    def head(self) -> nn.Linear:
        """The final linear classifier ``fc``: ``z = head(h)``."""
        return self.fc

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``layer4`` gives, the input of the global pool."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

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
        return self.fc

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``conv5`` gives, the input of the global pool."""
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.stage4(self.stage3(self.stage2(x))))

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
        return self.classifier[1]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``features`` gives, the input of the global pool."""
        return self.features(x)

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``h`` of a last-block map (pool, then the classifier's dropout)."""
        return self.classifier[0](torch.flatten(F.adaptive_avg_pool2d(m, (1, 1)), 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(h, z)``: pooled (post-dropout) penultimate features and logits."""
        h = self.pool_map(self.feature_map(x))
        return h, self.head(h)
