"""``ce``: plain supervised training, ``L = γ·L_CE``; the baseline every distillation is measured against."""

from __future__ import annotations

from kdcache.losses.base import Batch, LossTerms, Method, MethodInfo, ce_per_sample


class CrossEntropy(Method):
    """``L_CE = (1/B) Σ_i CE(s_i, y_i)``; teachers, if any are passed, are ignored."""

    info = MethodInfo("ce", "plain cross-entropy training, no teacher", "0",
                      uses_features=False, uses_heads=False)
    default_alpha = 0.0

    def forward(self, batch: Batch) -> LossTerms:
        """The cross-entropy of the student on the labels."""
        ce = ce_per_sample(batch.student_logits, batch.labels).mean()
        return LossTerms(total=self._combine(ce), terms={"ce": ce}, teacher_weights=None, sample_weights=None)
