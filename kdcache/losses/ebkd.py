"""``ebkd`` (Kwon et al. 2020): teachers weighted per sample by how sure they are.

``H_k,i`` is the entropy of teacher k's prediction at ``T = 1``;
``w_k,i = 1 − H_k,i / Σ_j H_j,i`` (not renormalised: a sample's weights sum to K − 1);
``L_KD = (1/(B·K)) Σ_i Σ_k w_k,i · KL_k,i`` — exactly the official ``EBKD`` branch.

Two cases the formula leaves open, decided here:
- ``K = 1``: the formula gives ``w = 0``; the official script runs one teacher as plain KD
  (it forces ``AVERAGE_LOSS``), so ``w = 1``, which makes ``ebkd`` with one teacher equal ``kd``
  up to the ``1/K`` (= 1).
- every teacher one-hot sure of a sample (``Σ_j H_j,i = 0``, 0/0): ``H/ΣH`` is taken as ``1/K``,
  the limit when all entropies are equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.losses.base import (Batch, LossTerms, Method, MethodInfo, ce_per_sample, entropy_per_sample,
                                 kl_per_sample, stack_teachers, teachers_entropy)


def entropy_weights(teacher_logits: Tensor) -> Tensor:
    """``w_k,i = 1 − H_k,i / Σ_j H_j,i`` from stacked teacher logits ``(K, B, C)``; returns ``(K, B)``, no grad."""
    with torch.no_grad():
        return weights_from_entropies(entropy_per_sample(teacher_logits))


def weights_from_entropies(h: Tensor) -> Tensor:
    """``w_k,i = 1 − H_k,i / Σ_j H_j,i`` from the entropies ``(K, B)``; returns ``(K, B)``, no grad."""
    k = h.shape[0]
    if k == 1:
        return torch.ones_like(h)
    with torch.no_grad():
        total = h.sum(0, keepdim=True)
        share = torch.where(total > 0, h / total.clamp_min(torch.finfo(h.dtype).tiny), torch.full_like(h, 1.0 / k))
        return 1.0 - share


class EntropyKD(Method):
    """Multi-teacher KD weighted per sample by each teacher's (inverse) prediction entropy."""

    info = MethodInfo("ebkd", "EBKD: teachers weighted per sample by prediction entropy", "K",
                      uses_features=False, uses_heads=False)

    def forward(self, batch: Batch) -> LossTerms:
        """CE plus the entropy-weighted KD with the official ``1/(B·K)`` normalisation."""
        self._check_batch(batch)
        z = stack_teachers(batch.teacher_logits)
        ce = ce_per_sample(batch.student_logits, batch.labels).mean()
        w = weights_from_entropies(teachers_entropy(batch, z))  # (K, B)
        kl = kl_per_sample(batch.student_logits, z, self.temperature)
        kd = (w * kl).sum() / (kl.shape[1] * self.n_teachers)
        return LossTerms(total=self._combine(ce, kd), terms={"ce": ce, "kd": kd},
                         teacher_weights=w.mean(1), sample_weights=w.t().contiguous())
