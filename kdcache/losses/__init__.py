"""The distillation methods (losses) of kdcache and their registry.

Every method is an ``nn.Module`` whose ``forward(Batch)`` returns ``LossTerms``:
``total = γ·L_CE + α·L_KD + β·L_feat`` plus the unweighted terms and the teacher
weights for the log. docs/LOSSES.md is the specification of every formula; each
module's docstring says where it follows the official CA-MKD code on a point the
formulas leave open.
"""

from __future__ import annotations

import math

from torch import Tensor

from kdcache.errors import KdcacheError, UnknownNameError
from kdcache.losses.aekd import AdaptiveEnsembleKD
from kdcache.losses.aver import AverageKD
from kdcache.losses.base import (Aligner, Batch, FeatureShape, LossTerms, MapAligner, Method, MethodInfo,
                                 MethodOptions)
from kdcache.losses.camkd import ConfidenceAwareMKD
from kdcache.losses.ce import CrossEntropy
from kdcache.losses.ebkd import EntropyKD
from kdcache.losses.fitnet import FitNet
from kdcache.losses.fitnet_mkd import FitNetMKD
from kdcache.losses.kd import KnowledgeDistillation

__all__ = ["Aligner", "Batch", "FeatureShape", "LossTerms", "MapAligner", "Method", "MethodInfo", "MethodOptions", "build_method",
           "method_info", "method_names"]

_REGISTRY: dict[str, type[Method]] = {cls.info.name: cls for cls in (
    CrossEntropy, KnowledgeDistillation, FitNet, AverageKD, FitNetMKD, EntropyKD, AdaptiveEnsembleKD,
    ConfidenceAwareMKD)}


def method_names() -> list[str]:
    """All method names, in registration order: ce, kd, fitnet, aver, fitnet-mkd, ebkd, aekd, camkd."""
    return list(_REGISTRY)


def _lookup(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}") from None


def method_info(name: str) -> MethodInfo:
    """Registry facts about ``name``; UnknownNameError listing the known names if absent."""
    return _lookup(name).info


def build_method(name: str, *, num_classes: int, student_dim: FeatureShape, teacher_dims: list[FeatureShape],
                 teacher_heads: list[tuple[Tensor, Tensor]] | None = None,
                 options: MethodOptions = MethodOptions()) -> Method:
    """The method ``name`` for a student feature of shape ``student_dim`` and teacher features of shapes
    ``teacher_dims``: widths D for pooled vectors, ``(C, H, W)`` for last-block maps (all of one kind);
    ``teacher_heads`` (each ``(W (C, D_k), b (C,))``, ``D_k`` the pooled width) are required by camkd only.

    Raises KdcacheError with one line when the teacher count does not fit the method (kd and fitnet
    take exactly one teacher, the others at least one; ce ignores teachers), when camkd has no heads,
    or when an option is out of range or does not apply to the method.
    """
    cls = _lookup(name)
    info = cls.info
    _check_options(info, options)
    dims = [_shape(d) for d in teacher_dims]
    student_dim = _shape(student_dim)
    if info.n_teachers == "0":
        dims = []
    elif info.n_teachers == "1" and len(dims) != 1:
        raise KdcacheError(f"{name} needs exactly 1 teacher, got {len(dims)}; "
                           "use aver, ebkd, aekd, fitnet-mkd or camkd for several")
    elif info.n_teachers == "K" and len(dims) < 1:
        raise KdcacheError(f"{name} needs at least 1 teacher, got none")
    if any(min(_as_tuple(d)) < 1 for d in [*dims, student_dim]) or num_classes < 1:
        raise KdcacheError(f"{name}: feature sizes and class count must be positive "
                           f"(student {student_dim}, teachers {dims}, classes {num_classes})")
    kwargs: dict = dict(num_classes=num_classes, student_dim=student_dim, teacher_dims=dims, options=options)
    if info.uses_heads:
        if teacher_heads is None:
            raise KdcacheError(f"{name} needs the teachers' classifiers (teacher_heads), none were given")
        kwargs["teacher_heads"] = list(teacher_heads)
    return cls(**kwargs)


def _shape(d: FeatureShape) -> FeatureShape:
    """A width as an int, a map shape as a tuple of three ints."""
    if isinstance(d, (tuple, list)):
        if len(d) != 3:
            raise KdcacheError(f"a feature shape is a width D or a map shape (C, H, W), got {tuple(d)}")
        return tuple(int(s) for s in d)
    return int(d)


def _as_tuple(d: FeatureShape) -> tuple[int, ...]:
    return d if isinstance(d, tuple) else (d,)


def check_method_options(name: str, options: MethodOptions) -> None:
    """Refuse options out of range (non-finite included) for method ``name``, before any work."""
    _check_options(method_info(name), options)


def _check_options(info: MethodInfo, options: MethodOptions) -> None:
    """Options out of range, or weights for a term the method does not have, are errors, not silently ignored."""
    if not (math.isfinite(options.temperature) and options.temperature > 0):
        raise KdcacheError(f"the temperature must be a positive number, got {options.temperature}")
    for label, value in (("gamma", options.gamma), ("alpha", options.alpha), ("beta", options.beta)):
        if value is not None and not math.isfinite(value):
            raise KdcacheError(f"{label} must be a finite number, got {value}")
    if not (math.isfinite(options.aekd_cap) and options.aekd_cap > 0):
        raise KdcacheError(f"the AEKD cap C must be a finite positive number, got {options.aekd_cap}")
    if info.n_teachers == "0" and options.alpha not in (None, 0.0):
        raise KdcacheError(f"{info.name} has no KD term: alpha does not apply")
    if not info.uses_features and options.beta not in (None, 0.0):
        raise KdcacheError(f"{info.name} has no feature term: beta does not apply "
                           "(fitnet, fitnet-mkd and camkd have one)")
