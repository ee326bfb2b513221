"""The cache admin stage: list, describe, verify and remove stores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kdcache.errors import StoreError, UnfinishedCreationError
from kdcache.store import Cache, PlanStore, TeacherStore, size_on_disk
from kdcache.store import format as fmt
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
    state: str  # "complete", "partial (k/n chunks)", "cut short while being created" or "unreadable: why"
    features: str = "?"  # the feature form: pooled, spatial or none; ":int8" added for int8 features
    logits: str = "?"    # dense, or topk:K@T (the temperature a top-K store serves)
    forward: str = "?"   # the teacher's forward precision: float32, amp-bfloat16 or amp-float16


def list_stores(cache: Cache) -> list[StoreSummary]:
    """Every teacher store in the cache, complete or not."""
    out = []
    for tid in cache.teacher_ids():
        path = cache.teacher_location(tid)
        try:
            store = TeacherStore.open(path, tid, require_complete=False)
            form = store.form
        except StoreError as exc:
            state = ("cut short while being created (run its precompute again)"
                     if isinstance(exc, UnfinishedCreationError) else f"unreadable: {exc}")
            out.append(StoreSummary(tid, "?", "?", "?", 0, 0, size_on_disk(path), None, state))
            continue
        a = store.attrs
        state = "complete" if a.get("complete") else f"partial ({store.done_count()}/{store.total_chunks} chunks)"
        out.append(StoreSummary(tid, store.plan_id, a.get("arch", "?"), a.get("dataset", "?"), store.n_views,
                                store.n_samples, size_on_disk(path), a.get("test_accuracy"), state,
                                form.label(), form.logits_label(), form.forward.value))
    return out


def store_info(cache: Cache, prefix: str) -> dict[str, Any]:
    """The attributes of a teacher store and of its plan, with array shapes and size on disk."""
    store = cache.open_teacher(prefix, require_complete=False)
    info: dict[str, Any] = {"teacher_id": store.id, "path": str(store.path), "bytes": size_on_disk(store.location),
                            "chunks_written": f"{store.done_count()}/{store.total_chunks}", **store.attrs}
    arrays = {name: fmt.array(store.group, name) for name in (*store.data_arrays, "head/weight", "head/bias")}
    info["arrays"] = {name: {"shape": list(a.shape), "chunks": list(a.chunks), "dtype": str(a.dtype)}
                      for name, a in arrays.items()}
    try:
        plan = PlanStore.open(cache.plan_location(store.plan_id), store.plan_id)
        info["plan"] = {"plan_id": plan.id, **plan.attrs}
    except StoreError as exc:
        info["plan"] = f"unreadable: {exc}"
    return info


def verify_stores(cache: Cache, prefix: str | None = None,
                  on_store: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Problems per teacher store (every chunk read, every marker checked); an empty list means sound."""
    ids = [cache.resolve(prefix, "teacher")] if prefix is not None else cache.teacher_ids()
    report: dict[str, list[str]] = {}
    for tid in ids:
        if on_store:
            on_store(tid)
        try:
            store = TeacherStore.open(cache.teacher_location(tid), tid, require_complete=False)
        except StoreError as exc:
            report[tid] = [f"{UNFINISHED if isinstance(exc, UnfinishedCreationError) else ''}{exc}"]
            continue
        problems = store.verify()
        try:
            plan = PlanStore.open(cache.plan_location(store.plan_id), store.plan_id)
            problems += plan.verify()
            if (plan.n_views, plan.n_samples) != (store.n_views, store.n_samples):
                problems.append(f"plan {plan.id} has {plan.n_views}x{plan.n_samples} rows, "
                                f"store has {store.n_views}x{store.n_samples}")
        except StoreError as exc:
            problems.append(f"plan: {exc}")
        report[tid] = problems
    return report


def remedy(teacher_id: str, problems: list[str]) -> str:
    """What to do about a store's problems: finish an unfinished store by re-running its precompute (which
    keeps every chunk already written); remove and precompute again a damaged one."""
    if all(p.startswith(UNFINISHED) for p in problems):
        return ("unfinished: run the same `kdcache precompute` again to finish it (it keeps every chunk already "
                "written)")
    return (f"damaged: remove it with `kdcache cache rm {teacher_id}` and run its `kdcache precompute` again")


def remove_store(cache: Cache, prefix: str) -> str:
    """Delete a teacher store; returns its id."""
    return cache.remove_teacher(prefix)
