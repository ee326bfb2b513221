"""``fitnet-mkd``: ``aver`` plus a hint to every teacher,
``L_feat = (1/K) Σ_k (1/B) Σ_i (1/D_k) ‖h_k,i − r_k(g_i)‖²``, ``β = 100``.

Deliberate fix: the official script averages the per-teacher hint losses through
``torch.tensor(list)``, which detaches them, so its hint never trains anything;
here the term carries gradients into the regressors ``r_k`` and the student.
Like ``fitnet``, the hint is on the stored feature form (pooled vectors or
last-block maps) and joins the loss from epoch 2, as in the official loop.
"""

from __future__ import annotations

from torch import nn

from kdcache.losses.aver import average_kd
from kdcache.losses.base import Batch, FeatureShape, LossTerms, Method, MethodInfo, MethodOptions, make_aligner
from kdcache.losses.fitnet import hint_distances


class FitNetMKD(Method):
    """Equal-weight multi-teacher KD plus equal-weight hints with one trained regressor per teacher."""

    info = MethodInfo("fitnet-mkd", "AVER-MKD plus a FitNet hint to every teacher", "K",
                      uses_features=True, uses_heads=False)
    default_beta = 100.0

    def __init__(self, *, num_classes: int, student_dim: FeatureShape, teacher_dims: list[FeatureShape],
                 options: MethodOptions) -> None:
        super().__init__(num_classes=num_classes, student_dim=student_dim, teacher_dims=teacher_dims,
                         options=options)
        self.aligners = nn.ModuleList([make_aligner(self.student_dim, d) for d in self.teacher_dims])

    def forward(self, batch: Batch) -> LossTerms:
        """CE, the averaged KD and the averaged (trainable) hint."""
        self._check_batch(batch, features=True)
        ce, kd = average_kd(self, batch)
        active = self._feature_active(batch)
        with self._feature_grad(active):
            feat = hint_distances(self.aligners, batch).mean()  # (K, B) -> mean: (1/K) Σ_k (1/B) Σ_i
        return LossTerms(total=self._combine(ce, kd, feat, active), terms={"ce": ce, "kd": kd, "feat": feat},
                         teacher_weights=self._constant_weights(1.0 / self.n_teachers, ce), sample_weights=None)
