"""CIFAR-size (32x32) networks of the RepDistiller / CA-MKD model zoo.

Names, module structure and ``state_dict`` keys match HobbitLong/RepDistiller's
``models/`` (plus CA-MKD's ``resnet20x4``), so their published checkpoints load
unchanged. Every model returns ``(h, z)`` and has a ``head`` property.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn

# name -> (builder, description), in registration order; the parameter counts
# are checked by the tests.
CIFAR_MODELS: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "resnet8": (resnet.resnet8, "ResNet-8 (RepDistiller), 0.08M params at 100 classes"),
    "resnet14": (resnet.resnet14, "ResNet-14 (RepDistiller), 0.18M params at 100 classes"),
    "resnet20": (resnet.resnet20, "ResNet-20 (RepDistiller), 0.28M params at 100 classes"),
    "resnet32": (resnet.resnet32, "ResNet-32 (RepDistiller), 0.47M params at 100 classes"),
    "resnet44": (resnet.resnet44, "ResNet-44 (RepDistiller), 0.67M params at 100 classes"),
    "resnet56": (resnet.resnet56, "ResNet-56 (RepDistiller), 0.86M params at 100 classes"),
    "resnet110": (resnet.resnet110, "ResNet-110 (RepDistiller), 1.74M params at 100 classes"),
    "resnet8x4": (resnet.resnet8x4, "ResNet-8x4 (RepDistiller), 1.23M params at 100 classes"),
    "resnet20x4": (resnet.resnet20x4, "ResNet-20x4 (CA-MKD), 4.33M params at 100 classes"),
    "resnet32x4": (resnet.resnet32x4, "ResNet-32x4 (RepDistiller), 7.43M params at 100 classes"),
    "wrn_16_1": (wrn.wrn_16_1, "WRN-16-1 (RepDistiller), 0.18M params at 100 classes"),
    "wrn_16_2": (wrn.wrn_16_2, "WRN-16-2 (RepDistiller), 0.70M params at 100 classes"),
    "wrn_40_1": (wrn.wrn_40_1, "WRN-40-1 (RepDistiller), 0.57M params at 100 classes"),
    "wrn_40_2": (wrn.wrn_40_2, "WRN-40-2 (RepDistiller), 2.26M params at 100 classes"),
    "vgg8": (vgg.vgg8, "VGG-8 with batch norm (RepDistiller vgg8_bn), 3.97M params at 100 classes"),
    "vgg11": (vgg.vgg11,
              "VGG-11 with batch norm (RepDistiller vgg11_bn), 9.28M params at 100 classes"),
    "vgg13": (vgg.vgg13,
              "VGG-13 with batch norm (RepDistiller vgg13_bn), 9.46M params at 100 classes"),
    "vgg16": (vgg.vgg16,
              "VGG-16 with batch norm (RepDistiller vgg16_bn), 14.77M params at 100 classes"),
    "vgg19": (vgg.vgg19,
              "VGG-19 with batch norm (RepDistiller vgg19_bn), 20.09M params at 100 classes"),
    "MobileNetV2": (mobilenetv2.mobile_half,
                    "MobileNetV2 x0.5 (RepDistiller mobile_half), 0.81M params at 100 classes"),
    "ShuffleV1": (shufflenetv1.ShuffleV1,
                  "ShuffleNet V1 g=3 (RepDistiller), 0.95M params at 100 classes"),
    "ShuffleV2": (shufflenetv2.ShuffleV2,
                  "ShuffleNet V2 x1 (RepDistiller), 1.36M params at 100 classes"),
}

__all__ = ["CIFAR_MODELS"]
