"""``kd`` (Hinton et al. 2015): one teacher's softened predictions, ``L_KD = (1/B) Σ_i KL_1,i``."""

from __future__ import annotations

from kdcache.losses.base import Batch, LossTerms, Method, MethodInfo, ce_per_sample, kl_per_sample


class KnowledgeDistillation(Method):
    """Classic single-teacher KD: ``L = γ·L_CE + α·L_KD`` with the ``T²``-scaled KL of docs/LOSSES.md."""

    info = MethodInfo("kd", "Hinton KD from one teacher's logits", "1",
                      uses_features=False, uses_heads=False)

    def forward(self, batch: Batch) -> LossTerms:
        """CE on the labels plus the batch-mean KL to the teacher."""
        self._check_batch(batch)
        ce = ce_per_sample(batch.student_logits, batch.labels).mean()
        kd = kl_per_sample(batch.student_logits, batch.teacher_logits[0], self.temperature).mean()
        return LossTerms(total=self._combine(ce, kd), terms={"ce": ce, "kd": kd},
                         teacher_weights=self._constant_weights(1.0, ce), sample_weights=None)
