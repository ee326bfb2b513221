"""The global average pool of the CIFAR family, sized by the map it receives.

RepDistiller's CIFAR models pool with a fixed kernel (``AvgPool2d(8)`` for the
ResNets and WRNs at 32 px, 4 for the ShuffleNets, 2 for MobileNetV2), which is a
global pool only at 32 px and breaks the classifier's shape at any other size.
Pooling with a kernel of the map's own size is the same operation at 32 px (the
same kernel, so bit-identical outputs and official checkpoints unchanged) and a
global pool at every other size. ``adaptive_avg_pool2d`` would also be global but
sums in another order, so its float32 results differ in the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def global_avg_pool(m: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, C)``: ``avg_pool2d`` with an H×W kernel."""
    return torch.flatten(F.avg_pool2d(m, kernel_size=tuple(m.shape[-2:])), 1)


class GlobalAvgPool(nn.Module):
    """:func:`global_avg_pool` as a module (no state, so no ``state_dict`` keys)."""

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(m)
