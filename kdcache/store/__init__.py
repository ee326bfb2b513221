"""Plans and teacher stores (Zarr format 3) on disk or behind fsspec URLs, a module a job:

- :mod:`~kdcache.store.form`: a store's form (logits, features, their dtype, the forward's precision), one typed value;
- :mod:`~kdcache.store.layout`: chunks, shards and files, chosen from a form and its shapes; :mod:`~kdcache.store.sizes`
  the bytes and files a store takes, for precompute's dry run, ``kdcache sizes`` and the experiments alike;
- :mod:`~kdcache.store.ids`: content ids of plans and stores, and file hashes;
- :mod:`~kdcache.store.codecs`: compression, checksums and fill values; :mod:`~kdcache.store.int8`: int8 features;
  the top-K summary of logits lives with its reader in :mod:`kdcache.topk`;
- :mod:`~kdcache.store.format`: the format's version, directories, and creating, checking and naming disk errors
  of a plan's or a store's group;
- :mod:`~kdcache.store.plan`, :mod:`~kdcache.store.teacher`: the two kinds of node; :mod:`~kdcache.store.chunks`
  kdcache's own chunk reader and writer; :mod:`~kdcache.store.cache` the folder or URL holding them,
  :mod:`~kdcache.store.location` one node's place in it and :mod:`~kdcache.store.lock` the writer lock.

The names below are imported on first use, so that the command line can read a form (``kdcache.store.form``, plain
Python) without loading zarr or torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the type checker sees; at run time each name is imported by __getattr__ below
    from kdcache.store.cache import Cache, size_on_disk
    from kdcache.store.form import StoreForm
    from kdcache.store.format import FORMAT_VERSION
    from kdcache.store.ids import plan_id, sha256_file, teacher_id
    from kdcache.store.layout import Layout
    from kdcache.store.location import Location
    from kdcache.store.lock import WriterLock
    from kdcache.store.plan import PlanStore
    from kdcache.store.teacher import TeacherStore

_LAZY = {
    "Cache": "kdcache.store.cache", "size_on_disk": "kdcache.store.cache", "FORMAT_VERSION": "kdcache.store.format",
    "Location": "kdcache.store.location", "WriterLock": "kdcache.store.lock", "PlanStore": "kdcache.store.plan",
    "TeacherStore": "kdcache.store.teacher", "StoreForm": "kdcache.store.form", "Layout": "kdcache.store.layout",
    "plan_id": "kdcache.store.ids", "teacher_id": "kdcache.store.ids", "sha256_file": "kdcache.store.ids",
}
__all__ = ["Cache", "FORMAT_VERSION", "Layout", "Location", "PlanStore", "StoreForm", "TeacherStore", "WriterLock",
           "plan_id", "sha256_file", "size_on_disk", "teacher_id"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdcache.store' has no attribute {name!r}")
