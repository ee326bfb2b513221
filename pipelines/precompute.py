"""The precompute stage in this process, and the front door for several teachers.

Read top to bottom: :func:`precompute` resolves the inputs and ids (the engine's
:func:`~kdcache.pipelines.precompute_engine.prepare`), says what would be written
(``dry_run``), finds or draws the plan, takes the writer lock, writes the chunks that
are not written yet and marks the store complete. :func:`precompute_many` runs several
teachers on one plan, one after another here or as tasks on a dask cluster
(:mod:`kdcache.pipelines.precompute_cluster`). Both front ends sit on
:mod:`kdcache.pipelines.precompute_engine`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kdcache.data import DataSet, load_dataset
from kdcache.errors import KdcacheError
from kdcache.pipelines.precompute_engine import (
    PrecomputeRequest, PrecomputeResult, ProgressFactory, TeacherJob, Warn, bytes_to_write, ensure_plan, finish,
    free_bytes, prepare, python_warning, rows_done, warn_lacking_guarantee, write_chunks,
)
from kdcache.store.form import LOGIT_STATS, FeatureCompression, Forward
from kdcache.store.layout import n_chunks
from kdcache.store.sizes import StoreSize
from kdcache.text import human_bytes
from kdcache.topk import index_dtype

__all__ = ["PrecomputeRequest", "PrecomputeResult", "precompute", "precompute_many"]


def precompute(req: PrecomputeRequest, progress: ProgressFactory | None = None,
               warn: Warn | None = None, dataset: DataSet | None = None) -> PrecomputeResult:
    """Run the teacher over the plan in this process and write its store; return at once if it is already complete.

    ``progress(total_rows, rows_done)``, if given, returns a callback told the row count of each chunk written
    (and ``progress(V, 0, unit="view", what=...)`` one told each view of a plan being drawn).
    ``warn`` is told a guarantee the cache's backend lacks, before any work (default: Python's warnings).
    ``dataset``: the request's data set if already loaded.
    """
    job = prepare(req, dataset)
    if req.dry_run:
        return job.result("dry-run", _dry_run_lines(job))
    if job.is_complete() and job.cache.has_plan(job.plan_id):  # a plan removed since is redrawn below
        job.cache.check_teacher(job.cache.open_teacher(job.teacher_id))  # complete, and what it says it is
        return job.complete_result()
    warn_lacking_guarantee(job.cache, warn)
    job.cache.ensure_writable()
    plan = ensure_plan(job.cache, job.dataset, job.recipe, req.views, req.plan_seed, job.plan_id, progress)
    with job.cache.teacher_lock(job.teacher_id):
        store = job.open_store()
        job.cache.check_teacher(store)  # what it says it is, before it is resumed or called complete
        if store.attrs.get("complete"):
            return job.complete_result()
        pending = store.pending()
        tick = progress(job.shape.views * job.shape.samples, rows_done(store, pending)) if progress else None
        write_chunks(job.model, job.dataset, plan, store, pending, job.device, job.batch_size, tick)
        lines = finish(job, store)
    return job.result("written", lines)


def precompute_many(reqs: Sequence[PrecomputeRequest], workers: int | None = None, scheduler: str | None = None,
                    progress: ProgressFactory | None = None, warn: Warn | None = None) -> list[PrecomputeResult]:
    """Several teachers on one plan (requests that differ only in teacher and checkpoint), results in order.

    Without ``workers`` or ``scheduler``: one teacher after another in this process, as
    :func:`precompute`. With ``workers=N`` a local dask cluster of N workers runs the
    chunks; with ``scheduler=ADDRESS`` an existing one does (see
    :mod:`kdcache.pipelines.precompute_cluster`).
    """
    if not reqs:
        raise KdcacheError("no teacher given: pass --teacher ARCH --checkpoint CKPT")
    _check_one_plan(reqs)
    if (workers is None and scheduler is None) or reqs[0].dry_run:
        dataset = load_dataset(reqs[0].dataset, reqs[0].data_root) if len(reqs) > 1 else None
        said: set[str] = set()

        def once(msg: str) -> None:  # the teachers share one cache: say what it lacks once
            if msg not in said:
                said.add(msg)
                (warn or python_warning)(msg)

        return [precompute(r, progress, once, dataset) for r in reqs]
    from kdcache.pipelines.precompute_cluster import precompute_on_cluster

    return precompute_on_cluster(reqs, workers=workers, scheduler=scheduler, progress=progress, warn=warn)


def _check_one_plan(reqs: Sequence[PrecomputeRequest]) -> None:
    """Teachers of one call share the plan and every option but their architecture and checkpoint."""
    first = {k: v for k, v in vars(reqs[0]).items() if k not in ("teacher", "checkpoint")}
    for r in reqs[1:]:
        if {k: v for k, v in vars(r).items() if k not in ("teacher", "checkpoint")} != first:
            raise KdcacheError("teachers precomputed together must share the data set, plan and options")


def _dry_run_lines(job: TeacherJob) -> list[str]:
    """What precompute would write: the ids, the arrays and their bytes, the files (the size calculator's figures,
    :func:`kdcache.store.sizes.store_size`, as ``kdcache sizes`` states them)."""
    req, dataset, cache, pid, tid, form = job.req, job.dataset, job.cache, job.plan_id, job.teacher_id, job.form
    size, shape, layout = job.size, job.shape, job.layout
    v, n, c = shape.views, shape.samples, shape.classes
    rows, shard, fshape = layout.chunk_rows, layout.shard_rows, shape.feature_shape(form)
    sharded = f" in shards of {shard} rows" if shard != rows else ""
    total_rows = v * n
    logits_b, features_b = total_rows * size.logits_row_bytes, total_rows * size.feature_row_bytes
    logits_line = (f"logits     ({v}, {n}, {c}) float16, chunks (1, {rows}, {c}){sharded}: {human_bytes(logits_b)}"
                   if form.topk is None
                   else f"logits     top-{form.topk} of {c} at T={form.temperature:g}: values ({v}, {n}, {form.topk}) "
                        f"float16, classes {index_dtype(c).name}, {len(LOGIT_STATS)} float32 scalars a row, chunks "
                        f"(1, {rows}, ·){sharded}: {human_bytes(logits_b)}")
    kind = ("int8 (+ a float32 scale a row)" if form.int8 else "float16") + (
        ", uncompressed (CRC32C only)" if req.feature_compression is FeatureCompression.NONE else "")
    features_line = ("features   none (logits only: ce, kd, aver, ebkd, aekd)" if not form.has_features else
                     f"features   {form.features.value} {_shape((v, n, *fshape))} {kind}, chunks "
                     f"{_shape((1, rows, *fshape))}{sharded}: {human_bytes(features_b)}")
    plan_state = "exists" if cache.plan_location(pid).exists("zarr.json") else "to be drawn"
    store_state = "complete" if job.is_complete() else (
        "partial, would resume" if cache.teacher_location(tid).exists("zarr.json") else "new")
    return [
        f"teacher    {req.teacher} from {req.checkpoint}",
        f"forward    {_forward_text(form.forward, job.device)}",
        f"data set   {dataset.name}: {n} training samples, {dataset.num_classes} classes, recipe {job.recipe.name}",
        f"plan       {pid} ({plan_state}): {v} views x {n} samples = {total_rows} rows (seed {req.plan_seed})",
        f"store      {tid} ({store_state}) under {cache.root}",
        logits_line,
        features_line,
        f"per view   {human_bytes(size.view_bytes)} ({size.row_bytes} B a row: logits {size.logits_row_bytes} B + "
        f"features {size.feature_row_bytes} B)",
        _files_line(size),
        f"total      {human_bytes(size.store_bytes)} before compression, "
        f"{total_rows} teacher forward passes",
        *_space_lines(job),
    ]


def _space_lines(job: TeacherJob) -> list[str]:
    """What a run would write now (the plan if not drawn, the store's rows not written) against the cache's free
    space, which precompute checks before any work (--force goes on anyway); nothing for a URL cache."""
    local = job.cache.location.local_path
    if local is None:
        return []
    plan, store = bytes_to_write(job)
    folder, free = free_bytes(local)
    verdict = "" if plan + store <= free else ": too little, precompute would refuse without --force"
    return [f"space      writes {human_bytes(plan + store)} before compression (plan {human_bytes(plan)}, store "
            f"{human_bytes(store)}); {human_bytes(free)} free at {folder}{verdict}"]


def _files_line(size: StoreSize) -> str:
    """How many files the store's data arrays and completion markers come to: one a shard of each (one a chunk
    in a store without shards)."""
    views, n, layout = size.shape.views, size.shape.samples, size.layout
    arrays = [*size.form.data_arrays(), "done"]
    per_view = size.files_per_view
    files = n_chunks(n, layout.shard_rows)
    if layout.chunks_per_shard == 1:
        return (f"files      {views * per_view:,} chunk files: {per_view:,} a view ({files:,} chunks of each of "
                f"{', '.join(arrays)})")
    return (f"files      {views * per_view:,} files: {per_view:,} a view ({files:,} shards of each of "
            f"{', '.join(arrays)}; {n_chunks(n, layout.chunk_rows):,} chunks a view, {layout.chunks_per_shard:,} "
            "a shard)")


def _forward_text(forward: Forward, device: torch.device) -> str:
    amp = forward.autocast_dtype
    return (f"float32 on {device.type}" if amp is None else
            f"autocast {amp} on {device.type} (--amp; {forward.value} is part of the teacher id)")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"
