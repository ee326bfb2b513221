"""A kdcache plug-in as a third party would write it: one architecture, one method, one data set.

tests/test_plugins.py installs it as a distribution with a ``kdcache.plugins`` entry
point and drives it through the command line. ``KDCACHE_TOY_FAIL`` makes it fail on purpose: ``forward`` in
the network's forward pass, ``kdcache`` by handing kdcache's ``stack_teachers`` no teachers in the method.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import kdcache
from kdcache.data import load_dataset
from kdcache.losses import Batch, LossTerms, Method, MethodInfo, MethodParam
from kdcache.losses.base import ce_per_sample, kl_per_sample, stack_teachers


class TinyNet(nn.Module):
    """One conv, a global pool and the classifier: the zoo's (h, z) interface."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))

    def pool_map(self, m: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(m, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if os.environ.get("KDCACHE_TOY_FAIL") == "forward":
            raise ValueError("toy-net's forward fails on purpose")
        h = self.pool_map(self.feature_map(x))
        return h, self.fc(h)


@kdcache.register_model("toy-net", input_size=32, description="a one-layer test network")
def toy_net(num_classes: int) -> nn.Module:
    return TinyNet(num_classes)


@kdcache.register_method
class MaxConfidenceKD(Method):
    """KD from the most confident teacher of each sample, its KL scaled by --toy-scale."""

    info = MethodInfo("toy-maxkd", "KD from each sample's most confident teacher (a test plug-in)", "K",
                      uses_features=False, uses_heads=False)
    params = (MethodParam("toy_scale", 1.0, "Factor on the KD term."),
              MethodParam("toy_pick", "max", "Which teacher: max or min confidence.", choices=("max", "min")))

    def forward(self, batch: Batch) -> LossTerms:
        self._check_batch(batch)
        z = stack_teachers([] if os.environ.get("KDCACHE_TOY_FAIL") == "kdcache" else batch.teacher_logits)  # (K, B, C)
        conf = torch.softmax(z, -1).amax(-1)                           # (K, B)
        pick = conf.argmax(0) if self.param("toy_pick") == "max" else conf.argmin(0)
        onehot = F.one_hot(pick, self.n_teachers).T.float()            # (K, B)
        kl = (onehot * kl_per_sample(batch.student_logits, z, self.temperature)).sum(0).mean()
        ce = ce_per_sample(batch.student_logits, batch.labels).mean()
        kd = self.param("toy_scale") * kl
        return LossTerms(self._combine(ce, kd), {"ce": ce, "kd": kd}, onehot.mean(1), onehot.T)


@kdcache.register_dataset("toy-digits", describe="the digits set again, under a plug-in's name")
def toy_digits(root: object = None) -> kdcache.DataSet:
    import dataclasses

    return dataclasses.replace(load_dataset("digits"), name="toy-digits")
