"""``aver`` (You et al. 2017): the K teachers' KD losses averaged with equal weights,
``L_KD = (1/K) Σ_k (1/B) Σ_i KL_k,i`` (the official ``AVERAGE_LOSS``)."""

from __future__ import annotations

from torch import Tensor

from kdcache.losses.base import (Batch, LossTerms, Method, MethodInfo, ce_per_sample, kl_per_sample,
                                 stack_teachers)


def average_kd(method: Method, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(L_CE, L_KD)`` of ``aver``; shared with ``fitnet-mkd``, whose logits path is the same."""
    ce = ce_per_sample(batch.student_logits, batch.labels).mean()
    kl = kl_per_sample(batch.student_logits, stack_teachers(batch.teacher_logits), method.temperature)  # (K, B)
    return ce, kl.mean()


class AverageKD(Method):
    """Multi-teacher KD with uniform teacher weights ``1/K``."""

    info = MethodInfo("aver", "AVER-MKD: KD losses of K teachers averaged equally", "K",
                      uses_features=False, uses_heads=False)

    def forward(self, batch: Batch) -> LossTerms:
        """CE plus the mean over teachers and samples of ``KL_k,i``."""
        self._check_batch(batch)
        ce, kd = average_kd(self, batch)
        return LossTerms(total=self._combine(ce, kd), terms={"ce": ce, "kd": kd},
                         teacher_weights=self._constant_weights(1.0 / self.n_teachers, ce), sample_weights=None)
