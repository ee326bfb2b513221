"""A cache: where plans and teacher stores live, and how ids (or prefixes) find them.

The cache may be a local directory or an fsspec URL (see :mod:`kdcache.store.location`).
What each kind guarantees:

- a **local directory** (a plain path): chunks are renamed into place, completion
  markers are written after their data, one writer per store (kernel ``flock``);
- a **``file://`` URL** (e.g. a shared file system, through zarr's FsspecStore):
  markers are written after their data, and the writer lock is the same ``flock``
  on that directory (sound where the file system honours ``flock`` across hosts);
- **any other URL** (``s3://``, ``gs://``, ``memory://``...): markers are written after
  their data and an object PUT is atomic, so a chunk still counts only once its
  marker exists; but there is **no writer lock**: run one precompute per teacher at a time.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

from kdcache.errors import StoreError
from kdcache.store import format as fmt
from kdcache.store.location import Location, Where
from kdcache.store.lock import WriterLock
from kdcache.store.plan import PlanStore
from kdcache.store.teacher import TeacherStore


@dataclass(frozen=True)
class Cache:
    """The ``plans`` and ``teachers`` trees under one root (a local directory or a URL)."""

    location: Location

    @classmethod
    def at(cls, root: Where | None) -> "Cache":
        """The cache at ``root`` (a path or an fsspec URL), or the default:
        ``$KDCACHE_HOME`` (a path or a URL), else ``~/.cache/kdcache``."""
        if root is None:
            root = os.environ.get("KDCACHE_HOME") or fmt.default_cache_dir()
        return cls(Location.of(root))

    @property
    def root(self) -> Path | str:
        """The cache as the user named it: a Path for a local directory, the URL otherwise."""
        return self.location.given

    def ensure_writable(self) -> None:
        """Create the cache tree or fail with one line saying why."""
        try:
            for sub in (fmt.PLANS_DIR, fmt.TEACHERS_DIR):
                (self.location / sub).makedirs()
            if self.location.local_path is not None:
                (self.location.local_path / fmt.LOCKS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create cache directory {self.root}: {exc.strerror or exc}; "
                             "pass a writable --cache or set KDCACHE_HOME") from None
        local = self.location.local_path
        if local is not None and not os.access(local / fmt.TEACHERS_DIR, os.W_OK):
            raise StoreError(f"cache directory {self.root} is not writable; pass a writable --cache or set KDCACHE_HOME")

    # -- where things are ------------------------------------------------------------------

    def plan_path(self, plan_id: str) -> Path | str:
        """The plan's folder: a Path in a local cache, a URL otherwise."""
        return self.plan_location(plan_id).given

    def teacher_path(self, teacher_id: str) -> Path | str:
        """The teacher store's folder: a Path in a local cache, a URL otherwise."""
        return self.teacher_location(teacher_id).given

    def plan_location(self, plan_id: str) -> Location:
        return self.location / fmt.PLANS_DIR / plan_id

    def teacher_location(self, teacher_id: str) -> Location:
        return self.location / fmt.TEACHERS_DIR / teacher_id

    # -- writers ---------------------------------------------------------------------------

    @property
    def has_writer_lock(self) -> bool:
        """Whether stores here get a writer lock: a local directory or a ``file://`` URL (``flock``)."""
        return self.location.local_path is not None

    def lacking_guarantee(self) -> str | None:
        """None when this cache keeps every guarantee; else one line saying which one its backend lacks."""
        if self.has_writer_lock:
            return None
        return (f"cache {self.root} ({self.location.protocol}://) has no writer lock: a second precompute of the "
                "same teacher would not be refused, so run one precompute per teacher at a time (completion "
                "markers still guard every chunk)")

    def lock_path(self, kind: str, node_id: str) -> Path | None:
        """The lock file of a plan or store; None where the backend has no lock (see :meth:`lacking_guarantee`)."""
        local = self.location.local_path
        return local / fmt.LOCKS_DIR / f"{kind}-{node_id}.lock" if local is not None else None

    def teacher_lock(self, teacher_id: str) -> ContextManager[object]:
        """The writer lock of a teacher store (a second writer is refused at once); a no-op without a lock."""
        path = self.lock_path("teacher", teacher_id)
        if path is None:
            return contextlib.nullcontext()
        return WriterLock(path, f"teacher store {teacher_id}", wait=False)

    # -- ids -------------------------------------------------------------------------------

    def plan_ids(self) -> list[str]:
        return _ids_under(self.location / fmt.PLANS_DIR)

    def teacher_ids(self) -> list[str]:
        return _ids_under(self.location / fmt.TEACHERS_DIR)

    def resolve(self, prefix: str, kind: str = "teacher") -> str:
        """The one id of ``kind`` that starts with ``prefix``; a clear error when none or several do."""
        ids = self.teacher_ids() if kind == "teacher" else self.plan_ids()
        matches = [i for i in ids if i.startswith(prefix)]
        if not prefix or not matches:
            raise StoreError(f"no {kind} store matches {prefix!r} in {self.root}; `kdcache cache ls` lists them")
        if len(matches) > 1:
            raise StoreError(f"{kind} id prefix {prefix!r} is ambiguous: {', '.join(matches)}")
        return matches[0]

    # -- opening and removing --------------------------------------------------------------

    def open_plan(self, prefix: str) -> PlanStore:
        plan_id = self.resolve(prefix, "plan")
        return PlanStore.open(self.plan_location(plan_id), plan_id)

    def open_teacher(self, prefix: str, require_complete: bool = True) -> TeacherStore:
        teacher_id = self.resolve(prefix, "teacher")
        return TeacherStore.open(self.teacher_location(teacher_id), teacher_id, require_complete)

    def remove_teacher(self, prefix: str) -> str:
        """Delete a teacher store (refused while a writer holds it); its plan stays for other teachers."""
        teacher_id = self.resolve(prefix, "teacher")
        with self.teacher_lock(teacher_id):
            self.teacher_location(teacher_id).remove()
        lock = self.lock_path("teacher", teacher_id)
        if lock is not None:
            lock.unlink(missing_ok=True)
        return teacher_id


def size_on_disk(path: Where) -> int:
    """Bytes of all files below ``path`` (a local directory or a URL)."""
    return Location.of(path).size()


def _ids_under(folder: Location) -> list[str]:
    return [name for name in folder.subfolders() if (folder / name).exists("zarr.json")]
