"""The cache admin stage: list, describe, verify and remove stores."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from kdcache.errors import StoreError, UnfinishedCreationError
from kdcache.store import Cache, TeacherStore, size_on_disk
from kdcache.store import format as fmt
from kdcache.store.describe import STORE, plan_problems
from kdcache.store.location import Location
from kdcache.store.format import plan_removal
from kdcache.store.teacher import UNFINISHED


@dataclass
class StoreSummary:
    """One line of `kdcache cache ls`."""

    teacher_id: str
    plan_id: str
    arch: str
    dataset: str
    views: int
    samples: int
    bytes: int
    test_accuracy: float | None
    state: str  # "complete", "partial (k/n chunks)", "cut short while being created" or "damaged: why; remedy"
    features: str = "?"  # the feature form: pooled, spatial or none; ":int8" added for int8 features
    logits: str = "?"    # dense, or topk:K@T (the temperature a top-K store serves)
    forward: str = "?"   # the teacher's forward precision: float32, amp-bfloat16 or amp-float16


def list_stores(cache: Cache) -> list[StoreSummary]:
    """Every teacher store in the cache, complete or not, each checked against its description (metadata only:
    :meth:`Cache.describe_teacher`); a store that is not what it says, or cannot be read, is listed ``damaged``
    with its remedy, and the others are listed all the same. Whatever lies in a store's place (a folder without
    zarr.json, a file, a broken link) is listed too."""
    cache.check_readable()
    out = []
    for tid in cache.teacher_entries():
        path = cache.teacher_location(tid)
        try:
            out.append(_summary(cache, tid))
        except StoreError as exc:
            if isinstance(exc, UnfinishedCreationError) or _cut_short(path):
                state = "cut short while being created (run its precompute again)"
            else:
                state = f"{DAMAGED}{exc}"
            out.append(StoreSummary(tid, "?", "?", "?", 0, 0, _size(path), None, state))
    return out


# The state of a store that is damaged or unreadable: its one line follows (what, why, what to do).
DAMAGED = "damaged: "


def _summary(cache: Cache, tid: str) -> StoreSummary:
    """One store's line, or a StoreError of one line saying why it is damaged and what to do."""
    path = cache.teacher_location(tid)
    store = TeacherStore.open(path, tid, require_complete=False)
    try:
        problems = cache.describe_teacher(store)
        if problems:
            raise StoreError(cache.problem_line(store, problems[0]))
        form = store.form
        a = store.attrs
        state = "complete" if a.get("complete") else f"partial ({store.done_count()}/{store.total_chunks} chunks)"
        accuracy = a.get("test_accuracy")
        return StoreSummary(tid, store.plan_id, str(a.get("arch", "?")), str(a.get("dataset", "?")), store.n_views,
                            store.n_samples, _size(path),
                            float(accuracy) if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool)
                            else None, state, form.label(), form.logits_label(), form.forward.value)
    except (KeyError, ValueError, OSError) as exc:  # its markers unreadable, or files gone while listing
        raise store.vanished() or StoreError(f"teacher store {tid} cannot be read ({fmt.exc_line(exc)}); remove it "
                                             f"with `kdcache cache rm {tid}` and precompute it again") from None


def _cut_short(path: Location) -> bool:
    """Whether a store folder without zarr.json holds nothing (a creation killed before its first write, which the
    next precompute makes afresh) rather than the rest of a store whose zarr.json was lost."""
    local = path.local_path
    if local is None or local.is_symlink() or not local.is_dir():
        return False
    try:
        return not (local / "zarr.json").exists() and all(p.name.endswith(".partial") for p in local.rglob("*")
                                                            if p.is_file())
    except OSError:
        return False


def _size(path: Location) -> int:
    try:
        return size_on_disk(path)
    except OSError:
        return 0


def damaged(rows: list[StoreSummary]) -> list[StoreSummary]:
    """The stores of a listing that are damaged or unreadable (``cache ls`` ends with status 1 when any is)."""
    return [r for r in rows if r.state.startswith(DAMAGED)]


def store_info(cache: Cache, prefix: str) -> dict[str, Any]:
    """The attributes of a teacher store and of its plan, with array shapes and size on disk; ``problems``, the
    ways it disagrees with its description (each line with its remedy; empty when none), so that a damaged store
    can still be looked at."""
    store = cache.open_teacher(prefix, require_complete=False)
    problems = [cache.problem_line(store, p) for p in cache.describe_teacher(store)]
    info: dict[str, Any] = {"teacher_id": store.id, "path": str(store.path), "bytes": size_on_disk(store.location),
                            "problems": problems, **store.attrs}
    if not problems:
        info["chunks_written"] = f"{store.done_count()}/{store.total_chunks}"
    arrays: dict[str, Any] = {}
    for name in (*store.data_arrays, "head/weight", "head/bias"):
        try:
            a = fmt.array(store.group, name)
            arrays[name] = {"shape": list(a.shape), "chunks": list(a.chunks), "dtype": str(a.dtype)}
        except Exception as exc:  # a damaged store's array: its problem is listed above
            arrays[name] = f"unreadable: {fmt.exc_line(exc)}"
    info["arrays"] = arrays
    try:
        plan = cache.plan_of(store.plan_id)
        info["plan"] = {"plan_id": plan.id, **plan.attrs}
    except StoreError as exc:
        info["plan"] = f"unreadable: {exc}"
    return info


def verify_stores(cache: Cache, prefix: str | None = None,
                  on_store: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Problems per teacher store (its description, then every chunk read and every marker checked, then its
    plan's); an empty list means sound. A store whose description does not hold is not read further (its arrays
    are not what its attributes say). Each store is read under its reader lock where it can be taken, so that it
    is not removed meanwhile."""
    cache.check_readable()
    ids = [cache.resolve(prefix, "teacher")] if prefix is not None else cache.teacher_entries()
    report: dict[str, list[str]] = {}
    for tid in ids:
        if on_store:
            on_store(tid)
        lock = cache.reader_lock(tid)
        locked = lock is not None and lock.acquire()  # a writer holds it: an unfinished store, which says so
        try:
            report[tid] = _verify_one(cache, tid)
        finally:
            if locked and lock is not None:
                lock.release()
    return report


def _verify_one(cache: Cache, tid: str) -> list[str]:
    path = cache.teacher_location(tid)
    try:
        store = TeacherStore.open(path, tid, require_complete=False)
    except StoreError as exc:
        unfinished = isinstance(exc, UnfinishedCreationError) or _cut_short(path)
        return [f"{UNFINISHED}{exc}" if unfinished else str(exc)]
    problems = cache.describe_teacher(store)
    if any(p.about == STORE for p in problems):
        return [p.text for p in problems]
    lines = [p.text for p in problems]
    try:
        lines = store.verify() + lines
    except StoreError as exc:
        return [str(exc)]
    except (KeyError, ValueError, OSError) as exc:
        gone = store.vanished()
        return [str(gone) if gone else f"teacher store {tid} cannot be read ({fmt.exc_line(exc)})"]
    if not problems:
        plan = cache.plan_of(store.plan_id)
        lines += plan_problems(plan, deep=True) or plan.verify()
    return lines


def remedy(teacher_id: str, problems: list[str], cache: Cache | None = None) -> str:
    """What to do about a store's problems: finish an unfinished store by re-running its precompute (which
    keeps every chunk already written); remove and precompute again a damaged one; redraw a missing plan by
    re-running the precompute, a damaged one after removing it."""
    if all(p.startswith(UNFINISHED) for p in problems):
        return ("unfinished: run the same `kdcache precompute` again to finish it (it keeps every chunk already "
                "written)")
    own = [p for p in problems if not p.startswith(("plan ", f"teacher store {teacher_id}: its plan"))]
    plans = [p for p in problems if p not in own]
    says = []
    if own:
        says.append(f"damaged: remove it with `kdcache cache rm {teacher_id}` and run its `kdcache precompute` again")
    if plans:
        if "is missing from the cache" in plans[0]:
            says.append("its plan is missing: run the same `kdcache precompute` again to redraw it")
        else:
            found = re.search(r"plan (\S+?)[: ]", plans[0])
            plan_id = found[1] if found else "?"
            where = cache.plan_location(plan_id) if cache is not None else f"plans/{plan_id}"
            says.append(f"its plan is damaged: {plan_removal(where)}")
    return "; ".join(says)


def verdict(teacher_id: str, problems: list[str], cache: Cache | None = None) -> str:
    """A store's problems as the one line a command ends with: the first, and what to do."""
    first = problems[0][len(UNFINISHED):] if problems[0].startswith(UNFINISHED) else problems[0]
    if not first.startswith(("teacher store", "plan ")):
        first = f"teacher store {teacher_id}: {first}"
    more = f" (and {len(problems) - 1} more problem(s), listed above)" if len(problems) > 1 else ""
    if "`kdcache " in first or "`rm -r " in first:  # it says its remedy already
        return f"{first}{more}"
    return f"{first}{more}; {remedy(teacher_id, problems, cache)}"


def remove(cache: Cache, prefix: str) -> tuple[str, str]:
    """Delete the teacher store, or the plan no store uses, whose id starts with ``prefix``; returns ("teacher" or
    "plan", its id). A prefix of both a store and a plan is refused as ambiguous."""
    cache.check_readable()
    teachers = [t for t in cache.teacher_entries() if prefix and t.startswith(prefix)]
    plans = [p for p in cache.plan_ids() if prefix and p.startswith(prefix)]
    if teachers and plans:
        raise StoreError(f"id prefix {prefix!r} is ambiguous: teacher store {', '.join(teachers)} and plan "
                         f"{', '.join(plans)}; give more of the id")
    if plans:
        return "plan", cache.remove_plan(prefix)
    return "teacher", cache.remove_teacher(prefix)


def unused_plans(cache: Cache, stores: list[StoreSummary]) -> list[str]:
    """The plans of the cache that none of its teacher stores ``stores`` (:func:`list_stores`) uses, which
    ``kdcache cache rm`` removes; none while a store's plan cannot be read (it may be any of them)."""
    if any(r.plan_id == "?" for r in stores):
        return []
    used = {r.plan_id for r in stores}
    return [p for p in cache.plan_ids() if p not in used]
