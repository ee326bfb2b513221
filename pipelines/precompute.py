"""The precompute stage: run one teacher over a stored view plan and write its store.

Read top to bottom: resolve the inputs and ids, say what would be written
(``dry_run``), find or make the plan, take the writer lock, write the chunks that
are not written yet (the forward pass of one chunk overlaps the write of the
previous one), then record accuracies and mark the store complete.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdcache.batches import view_batch
from kdcache.data import DataSet, ImageSource, load_dataset
from kdcache.device import default_batch_size, resolve_device
from kdcache.errors import CheckpointError, KdcacheError, StoreError
from kdcache.evaluate import evaluate
from kdcache.models import build_model, feature_dim, load_checkpoint, model_info
from kdcache.store import Cache, PlanStore, TeacherStore, chunk_rows_for, plan_id, sha256_file, teacher_id
from kdcache.store.format import STORED_DTYPE
from kdcache.text import human_bytes
from kdcache.views import draw_plan, get_recipe

DEFAULT_VIEWS = 240  # one fresh view per epoch of the official 240-epoch schedule
MAX_WRITES_IN_FLIGHT = 2

Progress = Callable[[int], None]


@dataclass
class PrecomputeRequest:
    """Everything ``kdcache precompute`` takes."""

    teacher: str
    checkpoint: Path
    dataset: str
    data_root: Path | None = None
    cache: Path | None = None
    views: int = DEFAULT_VIEWS
    plan_seed: int = 0
    recipe: str | None = None
    batch_size: int | None = None
    device: str | None = None
    chunk_rows: int | None = None
    dry_run: bool = False


@dataclass
class PrecomputeResult:
    """What precompute did: the ids, the store's path and a short account for the user."""

    teacher_id: str
    plan_id: str
    path: Path
    status: str  # "dry-run", "complete" (found finished), "written"
    lines: list[str] = field(default_factory=list)


def precompute(req: PrecomputeRequest, progress: Callable[[int, int], Progress] | None = None) -> PrecomputeResult:
    """Run the teacher over the plan and write its store; return at once if it is already complete.

    ``progress(total_rows, rows_done)``, if given, returns a callback told the row count of each chunk written.
    """
    _check_options(req)
    dataset = load_dataset(req.dataset, req.data_root)
    recipe = get_recipe(req.recipe or dataset.recipe)
    model_info(req.teacher)  # unknown architecture: fail before hashing anything
    if not Path(req.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {req.checkpoint} not found")
    cache = Cache.at(req.cache)

    recipe_desc = {"name": recipe.name, **recipe.config}
    pid = plan_id(dataset.fingerprint, recipe_desc, req.views, req.plan_seed)
    ckpt_sha = sha256_file(req.checkpoint)
    tid = teacher_id(pid, req.teacher, ckpt_sha, STORED_DTYPE)
    path = cache.teacher_path(tid)

    device = resolve_device(req.device)
    model = build_model(req.teacher, dataset.num_classes)
    load_checkpoint(model, req.checkpoint)
    model.eval().to(device)
    n, c, d = len(dataset.train), dataset.num_classes, feature_dim(model)
    rows = req.chunk_rows or chunk_rows_for(n, max(c, d))

    if req.dry_run:
        return PrecomputeResult(tid, pid, path, "dry-run", _dry_run_lines(req, dataset, recipe.name, c, d, rows, cache, pid, tid))
    if _is_complete(path, tid):
        return PrecomputeResult(tid, pid, path, "complete", [f"teacher store {tid} is already complete at {path}"])

    cache.ensure_writable()
    plan = ensure_plan(cache, dataset, recipe.name, recipe_desc, req.views, req.plan_seed, pid)
    attrs = {
        "plan_id": pid, "arch": req.teacher, "num_classes": c, "feature_dim": d,
        "checkpoint": {"path": str(Path(req.checkpoint).resolve()), "sha256": ckpt_sha},
        "dataset": req.dataset,
    }
    with cache.teacher_lock(tid):
        store = TeacherStore.open_for_writing(path, tid, attrs, (req.views, n, c, d), rows, *_head(model))
        if store.attrs.get("complete"):
            return PrecomputeResult(tid, pid, path, "complete", [f"teacher store {tid} is already complete at {path}"])
        pending = store.pending()
        batch = req.batch_size or default_batch_size(device, cpu=256, gpu=2048)
        tick = progress(req.views * n, _rows_done(store)) if progress else None
        write_chunks(model, dataset, plan, store, pending, device, batch, tick)
        test_top1, test_top5 = evaluate(model, dataset, recipe.name, device, batch)
        store.mark_complete(test_accuracy=test_top1, test_top5=test_top5, view_accuracy=100.0 * store.view_accuracy())
    lines = [f"wrote teacher store {tid} at {path}",
             f"test accuracy {test_top1:.2f}% (top-5 {test_top5:.2f}%), accuracy over the views "
             f"{100.0 * store.view_accuracy():.2f}%"]
    return PrecomputeResult(tid, pid, path, "written", lines)


def ensure_plan(cache: Cache, dataset: DataSet, recipe: str, recipe_desc: dict, n_views: int, seed: int,
                pid: str) -> PlanStore:
    """The plan with id ``pid``, drawn and written now if the cache does not hold it yet."""
    path = cache.plan_path(pid)
    try:
        return PlanStore.open(path, pid)
    except StoreError:
        pass
    sizes = dataset.train.sizes if get_recipe(recipe).needs_sizes else None
    order, params = draw_plan(recipe, n_views, len(dataset.train), seed, sizes)
    attrs = {
        "dataset": {"name": dataset.name, "n_samples": len(dataset.train), "n_classes": dataset.num_classes,
                    "fingerprint": dataset.fingerprint},
        "recipe": recipe_desc, "seed": seed,
    }
    labels = np.asarray(dataset.train.labels, dtype=np.int32)
    return PlanStore.create(path, cache.lock_path("plan", pid), pid, attrs, order, params, labels)


def write_chunks(model: torch.nn.Module, dataset: DataSet, plan: PlanStore, store: TeacherStore,
                 chunks: list[tuple[int, int]], device: torch.device, batch_size: int,
                 tick: Progress | None = None) -> None:
    """Forward the teacher over each (view, chunk) and write it; one writer thread overlaps I/O with compute."""
    labels = torch.as_tensor(plan.labels)
    source = dataset.train.to(device) if dataset.train.resident else dataset.train
    view_cache: tuple[int, np.ndarray, np.ndarray] | None = None
    in_flight: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer") as writer:
        for v, c in chunks:
            if view_cache is None or view_cache[0] != v:
                view_cache = (v, *plan.view(v))
            rows = store.rows(c)
            indices, params = view_cache[1][rows], view_cache[2][rows]
            logits, features = forward_rows(model, dataset, source, plan.recipe, indices, params, device, batch_size)
            _refuse_non_finite(logits, features, store.id, v, rows)
            n_correct = int((logits.float().argmax(1) == labels[indices]).sum())
            while len(in_flight) >= MAX_WRITES_IN_FLIGHT:
                in_flight.popleft().result()
            in_flight.append(writer.submit(store.write_chunk, v, c, logits.numpy(), features.numpy(), n_correct))
            if tick:
                in_flight[-1].add_done_callback(lambda _f, n=len(indices): tick(n))
        while in_flight:
            in_flight.popleft().result()


@torch.inference_mode()
def forward_rows(model: torch.nn.Module, dataset: DataSet, source: ImageSource, recipe: str, indices: np.ndarray,
                 params: np.ndarray, device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's float16 logits and features, on the CPU, for these rows of a view."""
    out_z, out_h = [], []
    for start in range(0, len(indices), batch_size):
        sl = slice(start, start + batch_size)
        h, z = model(view_batch(dataset, source, recipe, indices[sl], params[sl], device))
        out_z.append(z.to(torch.float16).cpu())
        out_h.append(h.to(torch.float16).cpu())
    return torch.cat(out_z), torch.cat(out_h)


def _refuse_non_finite(logits: torch.Tensor, features: torch.Tensor, tid: str, v: int, rows: slice) -> None:
    bad = ~(torch.isfinite(logits).all(1) & torch.isfinite(features).all(1))
    if bad.any():
        where = (torch.nonzero(bad).flatten()[:5] + rows.start).tolist()
        raise KdcacheError(
            f"teacher {tid} produced NaN or inf (after float16 conversion) at view {v}, rows {where}"
            f"{' ...' if int(bad.sum()) > 5 else ''}; nothing was written for that chunk: check the checkpoint"
        )


def _head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return model.head.weight.detach(), model.head.bias.detach()


def _rows_done(store: TeacherStore) -> int:
    markers = store.markers()
    return sum(store.rows(c).stop - store.rows(c).start for _, c in zip(*np.nonzero(markers >= 0)))


def _is_complete(path: Path, tid: str) -> bool:
    try:
        TeacherStore.open(path, tid)
        return True
    except StoreError:
        return False


def _check_options(req: PrecomputeRequest) -> None:
    if req.views < 1:
        raise KdcacheError(f"--views must be at least 1 (got {req.views})")
    if req.batch_size is not None and req.batch_size < 1:
        raise KdcacheError(f"--batch-size must be at least 1 (got {req.batch_size})")
    if req.chunk_rows is not None and req.chunk_rows < 1:
        raise KdcacheError(f"--chunk-rows must be at least 1 (got {req.chunk_rows})")


def _dry_run_lines(req: PrecomputeRequest, dataset: DataSet, recipe: str, c: int, d: int, rows: int,
                   cache: Cache, pid: str, tid: str) -> list[str]:
    n, v = len(dataset.train), req.views
    total_rows = v * n
    logits_b, features_b = total_rows * c * 2, total_rows * d * 2
    plan_state = "exists" if (cache.plan_path(pid) / "zarr.json").exists() else "to be drawn"
    store_state = "complete" if _is_complete(cache.teacher_path(tid), tid) else (
        "partial, would resume" if (cache.teacher_path(tid) / "zarr.json").exists() else "new")
    return [
        f"teacher    {req.teacher} from {req.checkpoint}",
        f"data set   {dataset.name}: {n} training samples, {dataset.num_classes} classes, recipe {recipe}",
        f"plan       {pid} ({plan_state}): {v} views x {n} samples = {total_rows} rows (seed {req.plan_seed})",
        f"store      {tid} ({store_state}) under {cache.root}",
        f"logits     ({v}, {n}, {c}) float16, chunks (1, {rows}, {c}): {human_bytes(logits_b)}",
        f"features   ({v}, {n}, {d}) float16, chunks (1, {rows}, {d}): {human_bytes(features_b)}",
        f"total      {human_bytes(logits_b + features_b)} before compression, "
        f"{total_rows} teacher forward passes",
    ]

