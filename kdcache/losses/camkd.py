"""``camkd``: Confidence-Aware Multi-teacher KD (Zhang, Chen, Wang, ICASSP 2022), as in docs/LOSSES.md.

Logits path: a teacher's weight on sample i grows as its cross-entropy against the
label falls, ``w_k,i = (1 − softmax_k(CE(z_·,i, y_i))[k]) / (K − 1)``, and
``L_KD = (1/(B·K)) Σ_i Σ_k w_k,i KL_k,i`` (the official normalisation, with its 1/K).

Feature path: the student feature is aligned to each teacher, ``r_k(g)``, and sent
through that teacher's frozen classifier, ``ẑ_k = W_k r_k(g) + b_k``; the same
softmax-over-teachers of ``CE(ẑ_k,i, y_i)`` gives ``v_k,i``, and
``L_feat = (1/(B·K)) Σ_i Σ_k v_k,i (1/D_k) ‖h_k,i − r_k(g_i)‖²``. As in the official
code, ``v`` is not detached: gradients flow through it (and through ``W_k, b_k``,
which are buffers and never change) into ``r_k`` and the student.

Feature forms: with pooled vectors (kdcache's compact form) ``r_k`` is a linear +
BN + ReLU aligner and ``D_k`` the vector's width. With last-block maps (the official
form, ``feat[-2]``) the student's map is resized to teacher k's H×W and aligned by
1x1 conv + BN + ReLU (:class:`~kdcache.losses.base.MapAligner`), the distance is the
mean over C·H·W, and ``ẑ_k`` is teacher k's global average pool and classifier
applied to the aligned map, exactly the official ``CalWeight`` + ``CAMKD`` path.

First epoch: ``L_feat`` is computed and reported in ``terms["feat"]`` for the log
(under ``no_grad``, so it costs no graph; BN running statistics still update, as
they do in the official code) but left out of ``total``; ``β`` acts from epoch 2.
For ``K = 1`` the weights are 1 (the ``K − 1`` denominator would be 0).

Ablations (the paper's Table 4): ``camkd_weights="uniform"`` sets ``w = v = 1/K``;
``camkd_feature_weights="w"`` weights the feature term by ``w`` instead of ``v``;
``beta=0`` drops the feature term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import KdcacheError
from kdcache.losses.base import (Batch, FeatureShape, LossTerms, Method, MethodInfo, MethodOptions, MethodParam, as_float,
                                 ce_per_sample, feature_distance,
                                 kl_per_sample, make_aligner, pool_feature, pooled_width, stack_teachers,
                                 teachers_ce)


def confidence_weights(losses: Tensor) -> Tensor:
    """``(1 − softmax over teachers of the per-sample CE) / (K − 1)`` for losses ``(K, B)``; ones for ``K = 1``.

    A sample's weights sum to 1; the teacher with the lower loss gets the larger weight.
    Differentiable: gradients flow through it wherever ``losses`` carries them.
    """
    k = losses.shape[0]
    if k == 1:
        return torch.ones_like(losses)
    return (1.0 - torch.softmax(losses, dim=0)) / (k - 1)


class ConfidenceAwareMKD(Method):
    """CA-MKD: confidence-weighted KD plus confidence-weighted feature alignment through the teacher heads."""

    info = MethodInfo("camkd", "CA-MKD: confidence-aware weights on logits and aligned features", "K",
                      uses_features=True, uses_heads=True)
    default_beta = 50.0
    params = (
        MethodParam("camkd_weights", "confidence", "CA-MKD ablation: confidence weights (the paper) or uniform 1/K.",
                    choices=("confidence", "uniform")),
        MethodParam("camkd_feature_weights", "v", "CA-MKD ablation: weight the feature term by v (the paper) or by "
                    "the KD weights w.", choices=("v", "w")),
    )

    def __init__(self, *, num_classes: int, student_dim: FeatureShape, teacher_dims: list[FeatureShape],
                 teacher_heads: list[tuple[Tensor, Tensor]], options: MethodOptions) -> None:
        super().__init__(num_classes=num_classes, student_dim=student_dim, teacher_dims=teacher_dims,
                         options=options)
        if len(teacher_heads) != self.n_teachers:
            raise KdcacheError(f"camkd: {len(teacher_heads)} teacher heads for {self.n_teachers} teachers")
        self.uniform = self.param("camkd_weights") == "uniform"
        self.feature_weights = self.param("camkd_feature_weights")
        self.aligners = nn.ModuleList([make_aligner(self.student_dim, d) for d in self.teacher_dims])
        for k, (weight, bias) in enumerate(teacher_heads):
            dim = pooled_width(self.teacher_dims[k])
            weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
            if tuple(weight.shape) != (self.num_classes, dim) or tuple(bias.shape) != (self.num_classes,):
                raise KdcacheError(f"camkd: teacher {k}'s head is {tuple(weight.shape)} + {tuple(bias.shape)}, "
                                   f"expected ({self.num_classes}, {dim}) + ({self.num_classes},)")
            # Buffers, never parameters: they move with .to(device) but no optimizer ever sees them.
            # Not persistent: they come from the teacher store on every build, resume included.
            self.register_buffer(f"head_weight_{k}", as_float(weight.detach()).clone(), persistent=False)
            self.register_buffer(f"head_bias_{k}", as_float(bias.detach()).clone(), persistent=False)

    def head(self, k: int) -> tuple[Tensor, Tensor]:
        """Teacher k's frozen classifier ``(W_k, b_k)``."""
        return getattr(self, f"head_weight_{k}"), getattr(self, f"head_bias_{k}")

    def forward(self, batch: Batch) -> LossTerms:
        """CE, the confidence-weighted KD, and the confidence-weighted feature term (from epoch 2)."""
        self._check_batch(batch, features=True)
        z = stack_teachers(batch.teacher_logits)
        n, k = z.shape[1], self.n_teachers
        ce = ce_per_sample(batch.student_logits, batch.labels).mean()
        kl = kl_per_sample(batch.student_logits, z, self.temperature)                   # (K, B)
        if self.uniform:
            w = torch.full_like(kl, 1.0 / k)
        else:
            w = confidence_weights(teachers_ce(batch, z)).detach()
        kd = (w * kl).sum() / (n * k)

        feat_active = self._feature_active(batch)
        with self._feature_grad(feat_active):
            feat = self._feature_term(batch, w)
        return LossTerms(total=self._combine(ce, kd, feat, feat_active), terms={"ce": ce, "kd": kd, "feat": feat},
                         teacher_weights=w.mean(1).detach(), sample_weights=w.t().detach().contiguous())

    def _feature_term(self, batch: Batch, w: Tensor) -> Tensor:
        """``(1/(B·K)) Σ_i Σ_k v_k,i (1/D_k) ‖h_k,i − r_k(g_i)‖²`` with ``v`` as the options say."""
        g = batch.student_feature
        dists, head_losses = [], []
        for k, (aligner, h) in enumerate(zip(self.aligners, batch.teacher_features)):
            r = aligner(g)
            dists.append(feature_distance(r, h))
            if not self.uniform and self.feature_weights == "v":
                weight, bias = self.head(k)
                head_losses.append(ce_per_sample(F.linear(pool_feature(r).to(weight.dtype), weight, bias),
                                                 batch.labels))
        dist = torch.stack(dists, dim=0)                                                  # (K, B)
        if self.uniform or self.feature_weights == "w":
            v = w
        else:
            v = confidence_weights(torch.stack(head_losses, dim=0))
        return (v * dist).sum() / (dist.shape[1] * self.n_teachers)
