"""ImageNet-style networks from ``torchvision.models``, returning ``(h, z)``.

Each network is built by torchvision itself (no weights, ``num_classes=C``) and
its class is then swapped for a subclass below that only overrides ``forward``
and adds the ``head`` property. The subclasses add no state, so ``state_dict``
keys are torchvision's own and a torchvision checkpoint loads unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _torchvision(name: str, cls: type[nn.Module]) -> Callable[[int], nn.Module]:
    """A builder for torchvision's ``name`` whose instances are of class ``cls``."""
    base = cls.__base__
    assert base is not None  # cls subclasses a torchvision class

    def build(num_classes: int) -> nn.Module:
        model: nn.Module = tvm.get_model(name, weights=None, num_classes=num_classes)
        if type(model) is not base:
            raise TypeError(f"torchvision {name} is {type(model).__name__}, expected "
                            f"{base.__name__}")
        model.__class__ = cls
        return model

    build.__name__ = name
    build.__doc__ = f"torchvision ``{name}`` (no weights) returning ``(h, z)``."
    return build


# name -> (builder, description); parameter counts checked by the tests.
IMAGENET_MODELS: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "resnet18": (_torchvision("resnet18", ResNet),
                 "ResNet-18 (torchvision), 11.7M params at 1000 classes"),
    "resnet34": (_torchvision("resnet34", ResNet),
                 "ResNet-34 (torchvision), 21.8M params at 1000 classes"),
    "resnet50": (_torchvision("resnet50", ResNet),
                 "ResNet-50 (torchvision), 25.6M params at 1000 classes"),
    "resnet101": (_torchvision("resnet101", ResNet),
                  "ResNet-101 (torchvision), 44.5M params at 1000 classes"),
    "wide_resnet50_2": (_torchvision("wide_resnet50_2", ResNet),
                        "Wide ResNet-50-2 (torchvision), 68.9M params at 1000 classes"),
    "resnext50_32x4d": (_torchvision("resnext50_32x4d", ResNet),
                        "ResNeXt-50 32x4d (torchvision), 25.0M params at 1000 classes"),
    "shufflenet_v2_x0_5": (_torchvision("shufflenet_v2_x0_5", ShuffleNetV2),
                           "ShuffleNet V2 x0.5 (torchvision), 1.4M params at 1000 classes"),
    "shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0", ShuffleNetV2),
                           "ShuffleNet V2 x1.0 (torchvision), 2.3M params at 1000 classes"),
    "mobilenet_v2": (_torchvision("mobilenet_v2", MobileNetV2),
                     "MobileNetV2 (torchvision), 3.5M params at 1000 classes"),
}
