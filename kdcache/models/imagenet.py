"""ImageNet-style networks from ``torchvision.models``, returning ``(h, z)``.

Each network is built by torchvision itself (no weights, ``num_classes=C``) and
its class is then swapped for a subclass (:mod:`kdcache.models.torchvision_nets`,
imported with torchvision when the first one is built) that only overrides ``forward``
and adds the ``head`` property. The subclasses add no state, so ``state_dict``
keys are torchvision's own and a torchvision checkpoint loads unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _torchvision(name: str, cls_name: str) -> Callable[[int], nn.Module]:
    """A builder for torchvision's ``name`` whose instances are of class ``torchvision_nets.<cls_name>``."""

    def build(num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        from kdcache.models import torchvision_nets

        cls: type[nn.Module] = getattr(torchvision_nets, cls_name)
        base = cls.__base__
        assert base is not None  # cls subclasses a torchvision class
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
    "resnet18": (_torchvision("resnet18", "ResNet"),
                 "ResNet-18 (torchvision), 11.7M params at 1000 classes"),
    "resnet34": (_torchvision("resnet34", "ResNet"),
                 "ResNet-34 (torchvision), 21.8M params at 1000 classes"),
    "resnet50": (_torchvision("resnet50", "ResNet"),
                 "ResNet-50 (torchvision), 25.6M params at 1000 classes"),
    "resnet101": (_torchvision("resnet101", "ResNet"),
                  "ResNet-101 (torchvision), 44.5M params at 1000 classes"),
    "wide_resnet50_2": (_torchvision("wide_resnet50_2", "ResNet"),
                        "Wide ResNet-50-2 (torchvision), 68.9M params at 1000 classes"),
    "resnext50_32x4d": (_torchvision("resnext50_32x4d", "ResNet"),
                        "ResNeXt-50 32x4d (torchvision), 25.0M params at 1000 classes"),
    "shufflenet_v2_x0_5": (_torchvision("shufflenet_v2_x0_5", "ShuffleNetV2"),
                           "ShuffleNet V2 x0.5 (torchvision), 1.4M params at 1000 classes"),
    "shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0", "ShuffleNetV2"),
                           "ShuffleNet V2 x1.0 (torchvision), 2.3M params at 1000 classes"),
    "mobilenet_v2": (_torchvision("mobilenet_v2", "MobileNetV2"),
                     "MobileNetV2 (torchvision), 3.5M params at 1000 classes"),
}
