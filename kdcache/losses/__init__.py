"""The distillation methods (losses) of kdcache and their registry.

Every method is an ``nn.Module`` whose ``forward(Batch)`` returns ``LossTerms``:
``total = γ·L_CE + α·L_KD + β·L_feat`` plus the unweighted terms and the teacher
weights for the log. docs/LOSSES.md is the specification of every formula; each
module's docstring says where it follows the official CA-MKD code on a point the
formulas leave open. Plug-ins add methods with :func:`register_method`; each method
declares its own options (``Method.params``), which the command line offers after
``--method`` and ``kdcache methods`` lists.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence, TypeVar

from torch import Tensor

from kdcache.errors import KdcacheError
from kdcache.losses.aekd import AdaptiveEnsembleKD
from kdcache.losses.aver import AverageKD
from kdcache.losses.base import (Aligner, Batch, FeatureShape, LossTerms, MapAligner, Method, MethodInfo,
                                 MethodOptions, MethodParam, resolve_params)
from kdcache.losses.camkd import ConfidenceAwareMKD
from kdcache.losses.ce import CrossEntropy
from kdcache.losses.ebkd import EntropyKD
from kdcache.losses.fitnet import FitNet
from kdcache.losses.fitnet_mkd import FitNetMKD
from kdcache.losses.kd import KnowledgeDistillation
from kdcache.registry import Registry
from kdcache.store.form import temperature_problem

__all__ = ["Aligner", "Batch", "FeatureShape", "LossTerms", "MapAligner", "Method", "MethodInfo", "MethodOptions",
           "MethodParam", "build_method", "method_class", "method_info", "method_names", "register_method",
           "resolve_options"]

_METHODS: Registry[type[Method]] = Registry("method")
M = TypeVar("M", bound=type[Method])
_SHARED = ("temperature", "gamma", "alpha", "beta")


def register_method(cls: M, *, replace: bool = False) -> M:
    """Class decorator: register a :class:`Method` subclass under ``cls.info.name``.

    The class sets ``info`` (:class:`MethodInfo`), its default α and β, and in ``params`` the
    options of its own (:class:`MethodParam`); its ``__init__`` takes the keywords of
    :func:`build_method`. ``kdcache.contract.check_method(name)`` checks the contract.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(getattr(cls, "info", None),
                                                                                  MethodInfo):
        raise KdcacheError(f"register_method takes a kdcache.losses.Method subclass with an `info` "
                           f"(MethodInfo), got {cls!r}")
    if cls.info.n_teachers not in ("0", "1", "K"):
        raise KdcacheError(f"method {cls.info.name}: n_teachers is \"0\", \"1\" or \"K\", got "
                           f"{cls.info.n_teachers!r}")
    names = [p.name for p in cls.params]
    clash = sorted({n for n in names if names.count(n) > 1 or n in _SHARED or not n.isidentifier()})
    if clash:
        raise KdcacheError(f"method {cls.info.name}: options {', '.join(clash)} are repeated, not identifiers, "
                           f"or the shared {', '.join(_SHARED)}")
    for p in cls.params:
        problem = p.problem(p.default)
        if problem is not None:
            raise KdcacheError(f"method {cls.info.name}: the default of {p.flag} is invalid: {problem}")
    _METHODS.add(cls.info.name, cls, replace=replace)
    return cls


for _cls in (CrossEntropy, KnowledgeDistillation, FitNet, AverageKD, FitNetMKD, EntropyKD, AdaptiveEnsembleKD,
             ConfidenceAwareMKD):
    register_method(_cls)


def method_names() -> list[str]:
    """All method names, in registration order: ce, kd, fitnet, aver, fitnet-mkd, ebkd, aekd, camkd, then
    the plug-ins'."""
    return _METHODS.names()


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; UnknownNameError listing the known names if absent."""
    return _METHODS.get(name)


def _lookup(name: str) -> type[Method]:
    return _METHODS.get(name)


def resolve_options(name: str, options: MethodOptions = MethodOptions()) -> MethodOptions:
    """``options`` checked for method ``name`` and with every one of its own options filled in (its default
    where not given): what a run records, so that giving a default explicitly changes nothing."""
    _check_options(method_info(name), options)
    return replace(options, params=resolve_params(_lookup(name), options.params))


def method_info(name: str) -> MethodInfo:
    """Registry facts about ``name``; UnknownNameError listing the known names if absent."""
    return _lookup(name).info


def build_method(name: str, *, num_classes: int, student_dim: int | Sequence[int],
                 teacher_dims: Sequence[int | Sequence[int]],
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
    kwargs: dict[str, Any] = dict(num_classes=num_classes, student_dim=student_dim, teacher_dims=dims, options=options)
    if info.uses_heads:
        if teacher_heads is None:
            raise KdcacheError(f"{name} needs the teachers' classifiers (teacher_heads), none were given")
        kwargs["teacher_heads"] = list(teacher_heads)
    with _METHODS.running(name):  # a plug-in's failure is named as its own
        return cls(**kwargs)


def _shape(d: int | Sequence[int]) -> FeatureShape:
    """A width as an int, a map shape as a tuple of three ints."""
    if isinstance(d, Sequence):
        if len(d) != 3:
            raise KdcacheError(f"a feature shape is a width D or a map shape (C, H, W), got {tuple(d)}")
        c, h, w = (int(s) for s in d)
        return (c, h, w)
    return int(d)


def _as_tuple(d: FeatureShape) -> tuple[int, ...]:
    return d if isinstance(d, tuple) else (d,)


def check_method_options(name: str, options: MethodOptions) -> None:
    """Refuse options out of range (non-finite included) for method ``name``, before any work."""
    resolve_options(name, options)


def _check_options(info: MethodInfo, options: MethodOptions) -> None:
    """Options out of range, or weights for a term the method does not have, are errors, not silently ignored."""
    problem = temperature_problem(float(options.temperature))
    if problem is not None:
        raise KdcacheError(f"--temperature {problem}")
    for label, value in (("gamma", options.gamma), ("alpha", options.alpha), ("beta", options.beta)):
        # A negative weight turns its term into one the run maximises (a negative total loss, falling without end).
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise KdcacheError(f"--{label} must be a finite number of at least 0 (got {value:g})")
    if info.n_teachers == "0" and options.alpha not in (None, 0.0):
        raise KdcacheError(f"{info.name} has no KD term: alpha does not apply")
    if not info.uses_features and options.beta not in (None, 0.0):
        raise KdcacheError(f"{info.name} has no feature term: beta does not apply "
                           "(fitnet, fitnet-mkd and camkd have one)")
