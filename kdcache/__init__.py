"""kdcache: run each teacher once, distil many students from its stored outputs.

The library API: :class:`CachedTeachers` (cached teacher outputs for any training loop, see
:mod:`kdcache.cached`). Imported on first use, so ``import kdcache`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["CachedBatch", "CachedTeachers", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("CachedTeachers", "CachedBatch"):
        from kdcache import cached

        return getattr(cached, name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
