"""``aekd`` (Du et al. 2020, logits version): teacher weights chosen in gradient space.

Per batch, ``G_k = (1/B) Σ_i T·(q_i − p_k,i)`` is the batch-averaged gradient of
teacher k's KL term with respect to the student logits (the closed form of what
the official code collects with one backward pass per teacher). The weights

    λ = argmin ‖Σ_k λ_k G_k‖²   s.t.  Σ_k λ_k = 1,  0 ≤ λ_k ≤ u,  u = clamp(C, 1/K, 1)

are a constant of the step (no gradient), and ``L_KD = Σ_k λ_k (1/B) Σ_i KL_k,i``.

The official code solves the same problem as the dual of a one-class SVM
(scikit-learn, ``nu = 1/(C·K)`` clamped to ``[1/K, 1]``, so that ``dual_coef/(K·nu)``
lies in ``[0, u]`` and sums to 1); its ``G`` carries an extra ``1/B``, which does
not move the minimiser. Here a small exact solver does it: every face of the
capped simplex (each ``λ_k`` free, at 0 or at ``u``) gives an equality-constrained
QP whose KKT system is solved in one batched least-squares call; the feasible
candidate with the smallest objective is the minimum. It runs on the CPU in
float64 on the ``K×K`` Gram matrix (one small device-to-host copy a step).
Where ``‖Σ λ_k G_k‖²`` has several minimisers (e.g. two teachers with the same
``G``), the value is the same but the ``λ`` returned may differ from the SVM's.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.losses.base import (Batch, LossTerms, Method, MethodInfo, MethodOptions, MethodParam, as_float, ce_per_sample,
                                 kl_per_sample, positive, stack_teachers)

MAX_FACES = 5000       # 9 teachers at the default cap (~35 ms a step on a CPU core); 3 teachers: 13 faces
_FEASIBLE_TOL = 1e-8
_RCOND = 1e-10
_FREE, _LOWER, _UPPER = 0, 1, 2


def aekd_cap(cap: float, n_teachers: int) -> float:
    """``u = clamp(C, 1/K, 1)``: the per-teacher upper bound of the official code."""
    return min(max(float(cap), 1.0 / n_teachers), 1.0)


def simplex_faces(n: int, cap: float) -> Tensor:
    """Codes ``(F, n)`` of the faces of ``{Σλ = 1, 0 ≤ λ ≤ cap}`` that can hold a point:
    0 free, 1 at the lower bound 0, 2 at the upper bound ``cap``."""
    faces = []
    for code in itertools.product((_FREE, _LOWER, _UPPER), repeat=n):
        n_free, n_up = code.count(_FREE), code.count(_UPPER)
        rest = 1.0 - n_up * cap                 # what the free coordinates must sum to
        if rest < -_FEASIBLE_TOL or rest > n_free * cap + _FEASIBLE_TOL:
            continue
        if n_free == 0 and abs(rest) > _FEASIBLE_TOL:
            continue
        faces.append(code)
    return torch.tensor(faces, dtype=torch.int8).reshape(-1, n)


def solve_capped_simplex_qp(gram: Tensor, cap: float, faces: Tensor | None = None) -> Tensor:
    """``argmin_λ λᵀ Q λ`` over ``Σλ = 1, 0 ≤ λ ≤ cap`` for a PSD ``Q`` (``K×K``); exact, float64, CPU.

    Any minimiser of the convex objective lies in the relative interior of some face, and on a
    face where it is unique it solves that face's KKT system; minimum-norm least squares gives a
    minimiser of each face's affine hull even where the system is singular. So the best feasible
    candidate over all faces attains the minimum. The uniform point (always feasible, since
    ``cap ≥ 1/K``) is a candidate too, a guard against round-off.
    """
    q = gram.detach().to("cpu", torch.float64)
    k = q.shape[0]
    cap = float(cap)
    uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = q.abs().max()
    if k == 1 or not torch.isfinite(scale) or scale == 0:
        return uniform
    q = q / scale                               # the minimiser does not depend on the scale
    codes = simplex_faces(k, cap) if faces is None else faces
    free = codes == _FREE                       # (F, K)
    n_faces = codes.shape[0]
    eye = torch.eye(k, dtype=torch.float64)
    a = torch.zeros(n_faces, k + 1, k + 1, dtype=torch.float64)
    # free row j: 2 (Q λ)_j − μ = 0;  fixed row j: λ_j = bound;  last row: Σ λ = 1
    a[:, :k, :k] = torch.where(free.unsqueeze(-1), 2.0 * q, eye)
    a[:, :k, k] = -free.to(torch.float64)
    a[:, k, :k] = 1.0
    b = torch.zeros(n_faces, k + 1, dtype=torch.float64)
    b[:, :k] = (codes == _UPPER).to(torch.float64) * cap   # (a float32 scalar tensor would round cap)
    b[:, k] = 1.0
    sol = torch.linalg.lstsq(a, b.unsqueeze(-1), rcond=_RCOND, driver="gelsd").solution.squeeze(-1)
    lam = torch.cat([sol[:, :k], uniform.unsqueeze(0)], dim=0)
    ok = ((lam >= -_FEASIBLE_TOL).all(1) & (lam <= cap + _FEASIBLE_TOL).all(1)
          & ((lam.sum(1) - 1.0).abs() <= _FEASIBLE_TOL) & torch.isfinite(lam).all(1))
    objective = torch.einsum("fi,ij,fj->f", lam, q, lam)
    objective = torch.where(ok, objective, torch.full_like(objective, float("inf")))
    best = lam[int(torch.argmin(objective))].clamp(0.0, cap)
    return best / best.sum()


def teacher_gradients(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``G_k = (1/B) Σ_i T (q_i − p_k,i)``, ``(K, C)``: the batch-mean gradient of ``KL_k,i`` in ``s_i``."""
    t = float(temperature)
    with torch.no_grad():
        q = torch.softmax(as_float(student_logits) / t, dim=-1).mean(0)           # (C,)
        p = torch.softmax(as_float(teacher_logits) / t, dim=-1).mean(1)           # (K, C)
        return t * (q.unsqueeze(0) - p)


class AdaptiveEnsembleKD(Method):
    """Multi-teacher KD whose teacher weights minimise the norm of the combined gradient (capped)."""

    info = MethodInfo("aekd", "AE-KD: teacher weights from a min-norm problem in gradient space", "K",
                      uses_features=False, uses_heads=False)
    params = (MethodParam("aekd_cap", 0.6, "AE-KD's cap C on a teacher's weight (the official 0.6): each weight "
                          "is at most clamp(C, 1/K, 1).", check=positive),)

    def __init__(self, *, num_classes: int, student_dim: int, teacher_dims: list[int],
                 options: MethodOptions) -> None:
        super().__init__(num_classes=num_classes, student_dim=student_dim, teacher_dims=teacher_dims,
                         options=options)
        self.cap = aekd_cap(self.param("aekd_cap"), self.n_teachers)
        if self.n_teachers > 12:   # 3^K faces to enumerate before pruning
            raise KdcacheError(f"aekd: {self.n_teachers} teachers are too many for its exact weight solver "
                               f"(at most 9 at the default cap)")
        self._faces = simplex_faces(self.n_teachers, self.cap)
        if self._faces.shape[0] > MAX_FACES:
            raise KdcacheError(f"aekd: {self.n_teachers} teachers with cap {self.cap:g} give "
                               f"{self._faces.shape[0]} faces to solve each step (at most {MAX_FACES}): "
                               "use fewer teachers or a larger --aekd-cap")

    def forward(self, batch: Batch) -> LossTerms:
        """CE plus the λ-weighted sum of the teachers' batch-mean KL terms."""
        self._check_batch(batch)
        z = stack_teachers(batch.teacher_logits)
        ce = ce_per_sample(batch.student_logits, batch.labels).mean()
        kl = kl_per_sample(batch.student_logits, z, self.temperature).mean(1)      # (K,)
        g = teacher_gradients(batch.student_logits, z, self.temperature).to("cpu", torch.float64)
        lam = solve_capped_simplex_qp(g @ g.t(), self.cap, self._faces)
        lam = lam.to(device=kl.device, dtype=kl.dtype)
        kd = (lam * kl).sum()
        return LossTerms(total=self._combine(ce, kd), terms={"ce": ce, "kd": kd},
                         teacher_weights=lam, sample_weights=None)
