"""Shared types and building blocks of the distillation methods.

The per-sample quantities of docs/LOSSES.md live here so that every method computes
them the same way: ``CE(z, y)``, ``KL_k,i`` at temperature ``T`` (with its ``T²``),
the per-sample feature distance ``(1/D) ‖h − r(g)‖²`` (a mean over every feature
value: over D for vectors, over C·H·W for maps), and the aligners: ``r(g) =
ReLU(BN(A g + c))`` for pooled vectors, and for last-block maps the official
``Embed`` (1x1 conv + BN + ReLU) after resizing the student's map to the teacher's
H×W. Everything is vectorised over teachers where their shapes agree and created
on the inputs' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.defaults import TEMPERATURE
from kdcache.errors import KdcacheError
from kdcache.models.pool import global_avg_pool

if TYPE_CHECKING:
    from kdcache.topk import TopKLogits

# A feature's per-sample shape: D for a pooled vector, (C, H, W) for a last-block map.
FeatureShape = int | tuple[int, int, int]



@dataclass(frozen=True)
class MethodOptions:
    """The knobs every method shares, and ``params``: the options of the one method (its :class:`MethodParam`
    names, e.g. camkd's ``camkd_weights``) that differ from their defaults, or all of them once resolved.
    ``None`` weights mean the method's own default (docs/LOSSES.md)."""

    temperature: float = TEMPERATURE  # T
    gamma: float = 1.0             # weight of L_CE
    alpha: float | None = None     # weight of L_KD; None -> method default (1, or 0 for fitnet, 0 for ce)
    beta: float | None = None      # weight of L_feat; None -> fitnet 100, fitnet-mkd 100, camkd 50, others 0
    params: Mapping[str, Any] = field(default_factory=dict)   # the method's own options, by name

    @classmethod
    def from_flat(cls, options: Mapping[str, Any]) -> "MethodOptions":
        """Options given as one mapping (``{"beta": 0, "camkd_weights": "uniform"}``, as a row of an experiment
        or a study lists them): the shared knobs as fields, every other name as the method's own."""
        shared = {"temperature", "gamma", "alpha", "beta"}
        return cls(**{k: v for k, v in options.items() if k in shared},
                   params={k: v for k, v in options.items() if k not in shared})


@dataclass(frozen=True)
class MethodParam:
    """One option a method declares for itself: on the command line ``--name-with-dashes VALUE`` after
    ``--method``, in the library ``MethodOptions(params={name: value})``.

    Its type is the default's (float, int, str or bool); ``choices`` limits a str; ``check`` returns what is
    wrong with a value (one line), or None when it is fine.
    """

    name: str                      # a Python identifier, unique among the method's options
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> type:
        return type(self.default)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid value of this option, or None."""
        kind = self.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{self.flag} takes a {kind.__name__}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{self.flag} must be a finite number, got {value}"
        if self.choices is not None and value not in self.choices:
            return f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}"
        return self.check(value) if self.check is not None else None


def positive(value: float) -> str | None:
    """A :class:`MethodParam` check: the value must be above 0."""
    return None if value > 0 else f"must be positive, got {value}"


@dataclass
class Batch:
    """What a method sees of one training step: the student's outputs and the K teachers' cached outputs."""

    student_logits: Tensor        # (B, C)
    student_feature: Tensor       # (B, D_s) pooled, or (B, C_s, H_s, W_s) the last-block map
    labels: Tensor                # (B,) int64
    teacher_logits: list[Tensor]  # K x (B, C), float32, no grad
    teacher_features: list[Tensor]  # K x (B, D_k) or (B, C_k, H_k, W_k), float32, no grad
    epoch: int                    # 1-based
    # K entries, one per teacher: its top-K rows where its store is top-K (teacher_logits then holds their
    # spread reconstruction, kdcache.topk), None where dense; None altogether when every store is dense.
    # The exact CE and entropy come from here: use teachers_ce / teachers_entropy.
    teacher_topk: "list[TopKLogits | None] | None" = None


@dataclass
class LossTerms:
    """A method's result: the total to backpropagate, its unweighted terms, and the teacher weights for logs."""

    total: Tensor                 # scalar: gamma*ce + alpha*kd + beta*feat
    terms: dict[str, Tensor]      # unweighted scalar terms: "ce", "kd", "feat"
    teacher_weights: Tensor | None  # (K,) detached batch-mean weight of each teacher; None for ce
    sample_weights: Tensor | None   # (B, K) detached per-sample KD weights (camkd, ebkd), else None


@dataclass(frozen=True)
class MethodInfo:
    """Registry facts about a method, for the command line and the training loop."""

    name: str
    description: str
    n_teachers: str               # "0", "1" or "K"
    uses_features: bool           # needs teacher features
    uses_heads: bool              # needs teacher classifiers
    dense_logits: bool = False    # needs every class's logit: refused on top-K stores
    float_features: bool = False  # needs the features in float16: refused on int8 stores


# -- per-sample quantities ----------------------------------------------------------------


def as_float(t: Tensor) -> Tensor:
    """``t`` in at least float32: half and bfloat16 (mixed precision) are upcast, float64 is kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def ce_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """``CE(z, y) = −log σ(z)[y]`` for logits ``(..., B, C)`` and labels ``(B,)``; returns ``(..., B)``."""
    log_p = F.log_softmax(as_float(logits), dim=-1)
    index = labels.expand(log_p.shape[:-1]).unsqueeze(-1)
    return -log_p.gather(-1, index).squeeze(-1)


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL_k,i = T² Σ_c p(c) (log p(c) − log q(c))``, ``p = σ(z/T)``, ``q = σ(s/T)``.

    ``student_logits`` is ``(B, C)``; ``teacher_logits`` is ``(B, C)`` or stacked ``(K, B, C)``;
    the result is ``(B,)`` or ``(K, B)``. Same as the official ``DistillKL(is_ca=True)``.
    """
    t = float(temperature)
    log_q = F.log_softmax(as_float(student_logits) / t, dim=-1)
    log_p = F.log_softmax(as_float(teacher_logits) / t, dim=-1)
    return (t * t) * (log_p.exp() * (log_p - log_q)).sum(-1)


def entropy_per_sample(logits: Tensor) -> Tensor:
    """The entropy of ``σ(z)`` (T = 1) for logits ``(..., C)``; returns ``(...)``."""
    log_p = F.log_softmax(as_float(logits), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def teachers_ce(batch: Batch, stacked: Tensor) -> Tensor:
    """``CE(z_k,i, y_i)``, ``(K, B)``: from a top-K store's exact scalars, else from the teacher's logits
    ``stacked`` ``(K, B, C)`` (the batch's, as :func:`stack_teachers` gives them)."""
    if not batch.teacher_topk or all(t is None for t in batch.teacher_topk):
        return ce_per_sample(stacked, batch.labels)
    return torch.stack([ce_per_sample(stacked[k], batch.labels) if t is None else t.ce().to(stacked.dtype)
                        for k, t in enumerate(batch.teacher_topk)])


def teachers_entropy(batch: Batch, stacked: Tensor) -> Tensor:
    """The entropy of each teacher's ``σ(z)`` at T = 1, ``(K, B)``: a top-K store's exact scalar, else from
    the logits ``stacked`` ``(K, B, C)``."""
    if not batch.teacher_topk or all(t is None for t in batch.teacher_topk):
        return entropy_per_sample(stacked)
    return torch.stack([entropy_per_sample(stacked[k]) if t is None else t.entropy().to(stacked.dtype)
                        for k, t in enumerate(batch.teacher_topk)])


def feature_distance(aligned: Tensor, target: Tensor) -> Tensor:
    """``(1/D) ‖h_i − r(g_i)‖²`` per sample: ``(B, D)`` or ``(B, C, H, W)`` inputs to ``(B,)``, the mean over
    every value of a sample (the official ``MSELoss(reduction='none')(...).reshape(B, -1).mean(-1)``)."""
    return (as_float(aligned) - as_float(target)).pow(2).flatten(1).mean(-1)


def stack_teachers(tensors: list[Tensor]) -> Tensor:
    """Teacher logits as one ``(K, B, C)`` tensor (all teachers share C)."""
    return torch.stack([as_float(t) for t in tensors], dim=0)


class Aligner(nn.Module):
    """``r(g) = ReLU(BN(A g + c))``: maps the student feature (D_s) onto a teacher's feature space (D_k).

    The vector form of the official 1x1 conv + BatchNorm + ReLU ``Embed``; trained
    with the student by the same optimizer. In train mode BN uses batch statistics.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim)
        self.bn = nn.BatchNorm1d(teacher_dim)

    def forward(self, g: Tensor) -> Tensor:
        """Aligned student feature, ``(B, D_s)`` to ``(B, D_k)``."""
        return F.relu(self.bn(self.linear(g)))


class MapAligner(nn.Module):
    """The official CA-MKD aligner of last-block maps: the student's map resized to the teacher's H×W, then
    ``ReLU(BN(Conv1x1(·)))`` to the teacher's channels.

    As the official ``CalWeight``: average-pooled (``adaptive_avg_pool2d``) when the
    student's map is at least as tall as the teacher's, bilinearly interpolated when it
    is smaller; the 1x1 convolution has a bias (the official ``Embed``). Trained with
    the student; in train mode BN uses batch statistics.
    """

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]) -> None:
        super().__init__()
        (c_s, h_s, _), (c_t, h_t, w_t) = student_shape, teacher_shape
        self.size = (int(h_t), int(w_t))
        self.shrink = h_s >= h_t
        self.conv = nn.Conv2d(c_s, c_t, kernel_size=1)
        self.bn = nn.BatchNorm2d(c_t)

    def forward(self, m: Tensor) -> Tensor:
        """Aligned student map, ``(B, C_s, H_s, W_s)`` to ``(B, C_k, H_k, W_k)``."""
        if self.shrink:
            m = F.adaptive_avg_pool2d(m, self.size)
        else:
            m = F.interpolate(m, size=self.size, mode="bilinear")
        return F.relu(self.bn(self.conv(m)))


def make_aligner(student: FeatureShape, teacher: FeatureShape) -> nn.Module:
    """The aligner from the student's feature to a teacher's: vectors to vectors, maps to maps."""
    if isinstance(student, int) and isinstance(teacher, int):
        return Aligner(student, teacher)
    if isinstance(student, tuple) and isinstance(teacher, tuple) and len(student) == len(teacher) == 3:
        return MapAligner(student, teacher)
    raise KdcacheError(f"cannot align a student feature of shape {student} to a teacher feature of shape {teacher}: "
                       "both must be pooled vectors or both last-block maps")


def pooled_width(shape: FeatureShape) -> int:
    """The width of the pooled vector a feature gives: D, or C for a (C, H, W) map."""
    return shape if isinstance(shape, int) else int(shape[0])


def pool_feature(r: Tensor) -> Tensor:
    """A feature as the teacher's classifier takes it: vectors as they are, maps through the global pool."""
    return global_avg_pool(r) if r.dim() == 4 else r


# -- the method base class ----------------------------------------------------------------


def resolve_params(cls: type["Method"], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option ``cls`` declares, with its default where ``given`` has none; KdcacheError with one line
    for a name the method does not declare or a value out of its range."""
    declared = {p.name: p for p in cls.params}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        takes = ", ".join(p.flag for p in cls.params) or "no options of its own"
        raise KdcacheError(f"{cls.info.name} has no option {', '.join('--' + u.replace('_', '-') for u in unknown)}"
                           f" (it takes {takes})")
    values = {}
    for name, p in declared.items():
        value = given.get(name, p.default)
        problem = p.problem(value)
        if problem is not None:
            raise KdcacheError(f"{cls.info.name}: {problem if problem.startswith('--') else p.flag + ' ' + problem}")
        values[name] = float(value) if p.kind is float else value
    return values


class Method(nn.Module):
    """A distillation loss: ``forward(batch)`` gives ``L = γ·L_CE + α·L_KD + β·L_feat`` and its terms.

    Subclasses set ``info``, their default α, β and the options of their own (``params``,
    read in the method as ``self.param(name)``); trainable parts (aligners) are
    submodules, so ``method.parameters()`` joins the student's optimizer.
    ``kdcache.register_method`` adds one to the registry; ``kdcache.contract.check_method``
    tests one.
    """

    info: ClassVar[MethodInfo]
    default_alpha: ClassVar[float] = 1.0
    default_beta: ClassVar[float] = 0.0
    params: ClassVar[tuple[MethodParam, ...]] = ()

    def __init__(self, *, num_classes: int, student_dim: FeatureShape, teacher_dims: Sequence[FeatureShape],
                 options: MethodOptions) -> None:
        super().__init__()
        self.options = options
        self.num_classes = int(num_classes)
        self.student_dim = student_dim
        self.teacher_dims = list(teacher_dims)
        self.n_teachers = len(self.teacher_dims)
        self.temperature = float(options.temperature)
        self.gamma = float(options.gamma)
        self.alpha = float(self.default_alpha if options.alpha is None else options.alpha)
        self.beta = float(self.default_beta if options.beta is None else options.beta)
        self._params = resolve_params(type(self), options.params)

    def param(self, name: str) -> Any:
        """The value of this method's own option ``name`` (its default unless given)."""
        return self._params[name]

    def forward(self, batch: Batch) -> LossTerms:  # pragma: no cover - every subclass overrides it
        """The loss of one batch."""
        raise NotImplementedError

    if TYPE_CHECKING:
        # nn.Module types its call as Callable[..., Any]; a method's call runs its hooks and forward(batch)
        def __call__(self, batch: Batch) -> LossTerms: ...

    def extra_repr(self) -> str:
        return (f"K={self.n_teachers}, T={self.temperature:g}, gamma={self.gamma:g}, "
                f"alpha={self.alpha:g}, beta={self.beta:g}")

    # helpers for subclasses

    def _check_batch(self, batch: Batch, features: bool = False) -> None:
        """One clear line when the batch does not carry the K teachers this method was built for."""
        if len(batch.teacher_logits) != self.n_teachers:
            raise KdcacheError(f"{self.info.name}: the batch carries {len(batch.teacher_logits)} teachers' logits, "
                               f"the method was built for {self.n_teachers}")
        if features and len(batch.teacher_features) != self.n_teachers:
            raise KdcacheError(f"{self.info.name}: the batch carries {len(batch.teacher_features)} teachers' "
                               f"features, the method was built for {self.n_teachers}")

    def _feature_active(self, batch: Batch) -> bool:
        """Whether the feature term joins the total: as in the official training loop, epoch 1 trains on CE
        and KD only, for every method with a feature term; ``β`` acts from epoch 2 on."""
        return batch.epoch > 1

    def _feature_grad(self, active: bool) -> torch.autograd.grad_mode.set_grad_enabled:
        """Build the feature term's graph only where it joins the total (it is still computed for the log)."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and active and self.beta != 0.0)

    def _combine(self, ce: Tensor, kd: Tensor | None = None, feat: Tensor | None = None,
                 feat_active: bool = True) -> Tensor:
        """``γ·ce + α·kd + β·feat``; a term whose weight is 0 (or, for feat, inactive) is left out, not multiplied
        by 0, so that it adds no gradient and a non-finite value in it cannot poison the total."""
        total = self.gamma * ce
        if kd is not None and self.alpha != 0.0:
            total = total + self.alpha * kd
        if feat is not None and feat_active and self.beta != 0.0:
            total = total + self.beta * feat
        return total

    def _constant_weights(self, value: float, like: Tensor) -> Tensor:
        """A ``(K,)`` vector of one constant weight, on ``like``'s device."""
        return torch.full((self.n_teachers,), value, dtype=torch.float32, device=like.device)
