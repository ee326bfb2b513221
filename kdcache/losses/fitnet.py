"""``fitnet`` (Romero et al. 2015) with a last-layer hint: the student's feature, through a trained
regressor ``r_1``, regresses the teacher's, ``L_feat = (1/B) Σ_i (1/D_1) ‖h_1,i − r_1(g_i)‖²``;
``α = 0``, ``β = 100`` by default.

The hint is on whatever the teacher stores hold: pooled penultimate vectors (linear
regressor) or last-block maps (the official CA-MKD aligner, 1x1 conv + BN + ReLU,
with the distance a mean over C·H·W). The official RepDistiller/CA-MKD FitNet hints
an intermediate layer (``--hint_layer 2``) through a ``ConvReg``; kdcache stores only
the last block, so its hint is on that block. As in the official training loop, the
hint joins the loss from epoch 2 (epoch 1 trains on CE, and KD where α ≠ 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdcache.losses.base import (Batch, FeatureShape, LossTerms, Method, MethodInfo, MethodOptions, ce_per_sample,
                                 feature_distance, kl_per_sample, make_aligner, stack_teachers)


def hint_distances(aligners: nn.ModuleList, batch: Batch) -> Tensor:
    """``(1/D_k) ‖h_k,i − r_k(g_i)‖²`` for every teacher and sample, ``(K, B)``; gradients reach ``r_k``
    and the student feature (unlike the official multi-teacher hint, see ``fitnet_mkd``)."""
    g = batch.student_feature
    return torch.stack([feature_distance(r(g), h) for r, h in zip(aligners, batch.teacher_features)], dim=0)


class FitNet(Method):
    """Single-teacher hint learning on the teacher's stored feature (plus CE, and KD if α ≠ 0)."""

    info = MethodInfo("fitnet", "FitNet hint: regress one teacher's penultimate feature", "1",
                      uses_features=True, uses_heads=False)
    default_alpha = 0.0
    default_beta = 100.0

    def __init__(self, *, num_classes: int, student_dim: FeatureShape, teacher_dims: list[FeatureShape],
                 options: MethodOptions) -> None:
        super().__init__(num_classes=num_classes, student_dim=student_dim, teacher_dims=teacher_dims,
                         options=options)
        self.aligners = nn.ModuleList([make_aligner(self.student_dim, d) for d in self.teacher_dims])

    def forward(self, batch: Batch) -> LossTerms:
        """CE, the KD term (reported; weighted by α, 0 by default) and the hint term."""
        self._check_batch(batch, features=True)
        ce = ce_per_sample(batch.student_logits, batch.labels).mean()
        kd = kl_per_sample(batch.student_logits, stack_teachers(batch.teacher_logits), self.temperature).mean()
        active = self._feature_active(batch)
        with self._feature_grad(active):
            feat = hint_distances(self.aligners, batch).mean()
        return LossTerms(total=self._combine(ce, kd, feat, active), terms={"ce": ce, "kd": kd, "feat": feat},
                         teacher_weights=self._constant_weights(1.0, ce), sample_weights=None)
