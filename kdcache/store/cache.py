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
from kdcache.store.describe import Problem, teacher_problems
from kdcache.store.lock import ReaderLock, WriterLock
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

    def check_readable(self) -> None:
        """Refuse, in one line, a cache that is not there to read (a folder missing, or a file in its place): the
        cache commands would otherwise find nothing and say nothing."""
        local = self.location.local_path
        if local is not None and (local.is_symlink() or local.exists()) and not local.is_dir():
            raise StoreError(f"cache {self.root} is a file, not a folder; pass the --cache folder precompute wrote "
                             "to (or set KDCACHE_HOME to it)")
        if not self.location.exists():
            raise StoreError(f"cache {self.root} does not exist; pass the --cache folder precompute wrote to (or set "
                             "KDCACHE_HOME to it): `kdcache precompute --cache DIR` creates one")

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

    def teacher_lock(self, teacher_id: str, removing: bool = False) -> ContextManager[object]:
        """The writer lock of a teacher store (a second writer, or a reader, refuses it at once; ``removing``: for
        ``cache rm``, whose refusal says so); a no-op without a lock."""
        path = self.lock_path("teacher", teacher_id)
        if path is None:
            return contextlib.nullcontext()
        return WriterLock(path, f"teacher store {teacher_id}", wait=False,
                          removing=f"kdcache cache rm {teacher_id}" if removing else None)

    def reader_lock(self, teacher_id: str) -> ReaderLock | None:
        """The shared lock a reader of a teacher store holds while it reads (None without a lock)."""
        path = self.lock_path("teacher", teacher_id)
        return None if path is None else ReaderLock(path, f"teacher store {teacher_id}")

    # -- ids -------------------------------------------------------------------------------

    def plan_ids(self) -> list[str]:
        return _ids_under(self.location / fmt.PLANS_DIR)

    def teacher_ids(self) -> list[str]:
        return _ids_under(self.location / fmt.TEACHERS_DIR)

    def teacher_entries(self) -> list[str]:
        """Every name under the cache's teachers folder: its stores, and whatever else lies there in a store's
        place (a folder without zarr.json, a file, a broken link), so that the cache commands can name it."""
        return _entries_under(self.location / fmt.TEACHERS_DIR)

    def resolve(self, prefix: str, kind: str = "teacher") -> str:
        """The one id of ``kind`` that starts with ``prefix``; a clear error when none or several do."""
        ids = self.teacher_entries() if kind == "teacher" else self.plan_ids()
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

    def open_for_reading(self, prefix: str) -> TeacherStore:
        """A complete teacher store opened to be read (by distill, by :class:`kdcache.cached.CachedTeachers`): its
        reader lock taken first and held until :meth:`TeacherStore.close` (so that ``cache rm`` refuses to remove it
        meanwhile), then its description checked (:meth:`check_teacher`, the plan's chunk files included). Every
        refusal is a StoreError of one line naming the store, the cause and the remedy."""
        teacher_id = self.resolve(prefix, "teacher")
        lock = self.reader_lock(teacher_id)
        if lock is not None and not lock.acquire():
            # held exclusively: a writer (then the store is unfinished, and opening it says so) or a remover
            TeacherStore.open(self.teacher_location(teacher_id), teacher_id)
            if not lock.acquire(wait_s=READER_WAIT_S):
                raise StoreError(f"teacher store {teacher_id} is held by another process ({lock.holder()}) that is "
                                 "writing or removing it; wait for it to finish, then run again")
        try:
            store = TeacherStore.open(self.teacher_location(teacher_id), teacher_id)
            self.check_teacher(store, deep=True)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            store.hold(lock)
        return store

    def plan_of(self, plan_id: str) -> PlanStore:
        """The plan ``plan_id`` opened (a StoreError when missing, :class:`format.MissingError`, or unreadable)."""
        if not isinstance(plan_id, str) or not plan_id or "/" in plan_id or plan_id.startswith("."):
            raise fmt.MissingError(f"plan {plan_id!r} is not a plan id")
        return PlanStore.open(self.plan_location(plan_id), plan_id)

    def describe_teacher(self, store: TeacherStore, deep: bool = False) -> list[Problem]:
        """The ways ``store`` (and its plan) disagree with their descriptions: :func:`describe.teacher_problems`
        with this cache's plans. ``deep``: also the plan's chunk files."""
        return teacher_problems(store, self.plan_of, deep)

    def problem_line(self, store: TeacherStore, problem: Problem) -> str:
        """``problem`` of ``store`` as one line with the remedy that works for it."""
        plan = store.attrs.get("plan_id")
        return problem.line(store.id, self.plan_location(plan) if isinstance(plan, str) else self.location)

    def check_teacher(self, store: TeacherStore, deep: bool = False) -> None:
        """Refuse ``store`` if it (or its plan) disagrees with its description: a StoreError of one line naming the
        first disagreement and its remedy (remove the store and precompute it again; precompute again for a missing
        plan; remove a damaged plan first)."""
        problems = self.describe_teacher(store, deep)
        if problems:
            raise StoreError(self.problem_line(store, problems[0]))

    def has_plan(self, plan_id: str) -> bool:
        """Whether the cache holds plan ``plan_id`` (its folder with zarr.json; whether it is sound is
        :meth:`check_teacher`'s question)."""
        return self.plan_location(plan_id).exists("zarr.json")

    def remove_teacher(self, prefix: str) -> str:
        """Delete a teacher store, or whatever lies in its place (refused while a writer or a reader holds it); its
        plan stays for other teachers."""
        teacher_id = self.resolve(prefix, "teacher")
        with self.teacher_lock(teacher_id, removing=True):
            where = self.teacher_location(teacher_id)
            with fmt.disk_errors(f"removing teacher store {teacher_id}", where):
                where.remove()
        lock = self.lock_path("teacher", teacher_id)
        if lock is not None:
            lock.unlink(missing_ok=True)
        return teacher_id

    def plan_users(self, plan_id: str) -> list[str]:
        """The teacher stores (complete or not) whose attributes name plan ``plan_id``; a store whose attributes
        cannot be read counts as a user, since it may be one."""
        users = []
        for tid in self.teacher_entries():
            try:
                named = TeacherStore.open(self.teacher_location(tid), tid, require_complete=False).plan_id
            except (StoreError, OSError, ValueError, KeyError):
                named = None
            if named in (plan_id, None):
                users.append(tid)
        return users

    def remove_plan(self, prefix: str) -> str:
        """Delete a plan no teacher store uses (refused, naming them, while one does, and while a precompute
        writes the plan); returns its id. A precompute that opens the plan as it goes finds it missing and says
        so; the same command redraws it bit for bit."""
        plan_id = self.resolve(prefix, "plan")
        lock_path = self.lock_path("plan", plan_id)
        lock = (WriterLock(lock_path, f"plan {plan_id}", wait=False, removing=f"kdcache cache rm {plan_id}")
                if lock_path is not None else contextlib.nullcontext())
        with lock:
            users = self.plan_users(plan_id)
            if users:
                first = users[0]
                raise StoreError(f"cannot remove plan {plan_id}: teacher store{'s' if len(users) > 1 else ''} "
                                 f"{', '.join(users)} {'use' if len(users) > 1 else 'uses'} it; remove "
                                 f"{'them' if len(users) > 1 else 'it'} first (`kdcache cache rm {first}`)")
            where = self.plan_location(plan_id)
            with fmt.disk_errors(f"removing plan {plan_id}", where):
                where.remove()
        if lock_path is not None:
            lock_path.unlink(missing_ok=True)
        return plan_id


def size_on_disk(path: Where) -> int:
    """Bytes of all files below ``path`` (a local directory or a URL)."""
    return Location.of(path).size()


def _ids_under(folder: Location) -> list[str]:
    return [name for name in folder.subfolders() if (folder / name).exists("zarr.json")]


def _entries_under(folder: Location) -> list[str]:
    return [name for name in folder.entries() if not name.startswith(".")]


# Seconds a reader waits for a remover (or a writer finishing a complete store) to let go of a store's lock.
READER_WAIT_S = 10.0
