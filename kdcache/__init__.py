"""kdcache: run each teacher once, distil many students from its stored outputs.

The library API, imported on first use so that ``import kdcache`` stays light:

- :class:`CachedTeachers` (:mod:`kdcache.cached`): cached teacher outputs for any training loop;
- :func:`register_model`, :func:`register_method`, :func:`register_dataset`: add architectures,
  distillation methods (:class:`Method` subclasses with their own :class:`MethodParam` options)
  and data sets, from your code or from an installed plug-in's ``kdcache.plugins`` entry point
  (:mod:`kdcache.registry`); :mod:`kdcache.contract` checks an entry against what kdcache expects;
- :func:`precompute` (:class:`PrecomputeRequest`) and :func:`distill` (:class:`DistillRequest`): a teacher's
  store and a student run, as ``kdcache precompute`` and ``kdcache distill`` make them.
- :func:`register_experiment`: a grid of runs for ``kdcache experiment`` beside the paper's settings.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "CachedTeachers": "kdcache.cached", "CachedBatch": "kdcache.cached", "CachedTeacherDataset": "kdcache.cached",
    "register_model": "kdcache.models", "register_dataset": "kdcache.data", "register_method": "kdcache.losses",
    "Method": "kdcache.losses", "MethodInfo": "kdcache.losses", "MethodOptions": "kdcache.losses",
    "MethodParam": "kdcache.losses", "Batch": "kdcache.losses", "LossTerms": "kdcache.losses",
    "DataSet": "kdcache.data",
    # the stages that studies and benchmarks call: a teacher's store, a student run (kdcache.pipelines)
    "precompute": "kdcache.pipelines.precompute", "PrecomputeRequest": "kdcache.pipelines.precompute",
    "PrecomputeResult": "kdcache.pipelines.precompute",
    "distill": "kdcache.pipelines.distill", "DistillRequest": "kdcache.pipelines.distill",
    "register_experiment": "kdcache.pipelines.experiments",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
