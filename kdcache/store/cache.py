"""A cache directory: where plans and teacher stores live, and how ids (or prefixes) find them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import StoreError
from kdcache.store import format as fmt
from kdcache.store.lock import WriterLock
from kdcache.store.plan import PlanStore
from kdcache.store.teacher import TeacherStore


@dataclass(frozen=True)
class Cache:
    """The ``<cache>/plans`` and ``<cache>/teachers`` trees under one root."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None) -> "Cache":
        """The cache at ``root``, or the default (``$KDCACHE_HOME``, else ``~/.cache/kdcache``)."""
        return cls(Path(root).expanduser() if root is not None else fmt.default_cache_dir())

    def ensure_writable(self) -> None:
        """Create the cache tree or fail with one line saying why."""
        try:
            for sub in (fmt.PLANS_DIR, fmt.TEACHERS_DIR, fmt.LOCKS_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create cache directory {self.root}: {exc.strerror}; "
                             "pass a writable --cache or set KDCACHE_HOME") from None
        if not os.access(self.root / fmt.TEACHERS_DIR, os.W_OK):
            raise StoreError(f"cache directory {self.root} is not writable; pass a writable --cache or set KDCACHE_HOME")

    def plan_path(self, plan_id: str) -> Path:
        return self.root / fmt.PLANS_DIR / plan_id

    def teacher_path(self, teacher_id: str) -> Path:
        return self.root / fmt.TEACHERS_DIR / teacher_id

    def lock_path(self, kind: str, node_id: str) -> Path:
        return self.root / fmt.LOCKS_DIR / f"{kind}-{node_id}.lock"

    def teacher_lock(self, teacher_id: str) -> WriterLock:
        """The writer lock of a teacher store; a second writer is refused at once."""
        return WriterLock(self.lock_path("teacher", teacher_id), f"teacher store {teacher_id}", wait=False)

    def plan_ids(self) -> list[str]:
        return _ids_under(self.root / fmt.PLANS_DIR)

    def teacher_ids(self) -> list[str]:
        return _ids_under(self.root / fmt.TEACHERS_DIR)

    def resolve(self, prefix: str, kind: str = "teacher") -> str:
        """The one id of ``kind`` that starts with ``prefix``; a clear error when none or several do."""
        ids = self.teacher_ids() if kind == "teacher" else self.plan_ids()
        matches = [i for i in ids if i.startswith(prefix)]
        if not prefix or not matches:
            raise StoreError(f"no {kind} store matches {prefix!r} in {self.root}; `kdcache cache ls` lists them")
        if len(matches) > 1:
            raise StoreError(f"{kind} id prefix {prefix!r} is ambiguous: {', '.join(matches)}")
        return matches[0]

    def open_plan(self, prefix: str) -> PlanStore:
        plan_id = self.resolve(prefix, "plan")
        return PlanStore.open(self.plan_path(plan_id), plan_id)

    def open_teacher(self, prefix: str, require_complete: bool = True) -> TeacherStore:
        teacher_id = self.resolve(prefix, "teacher")
        return TeacherStore.open(self.teacher_path(teacher_id), teacher_id, require_complete)

    def remove_teacher(self, prefix: str) -> str:
        """Delete a teacher store (refused while a writer holds it); its plan stays for other teachers."""
        teacher_id = self.resolve(prefix, "teacher")
        with self.teacher_lock(teacher_id):
            shutil.rmtree(self.teacher_path(teacher_id))
        self.lock_path("teacher", teacher_id).unlink(missing_ok=True)
        return teacher_id


def size_on_disk(path: Path) -> int:
    """Bytes of all files below ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _ids_under(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").exists())
