"""The precompute engine: the pieces both front ends compose, in this process
(:mod:`kdcache.pipelines.precompute`) or on a dask cluster
(:mod:`kdcache.pipelines.precompute_cluster`, and the grids of
:mod:`kdcache.pipelines.grid_cluster`).

Resolve a request's inputs, ids and store shape (:func:`prepare` → :class:`TeacherJob`),
find or draw the plan (:func:`ensure_plan`), write chunks that are not written yet
(:func:`write_chunks`: the next batch's views are decoded while the teacher runs this
one, and on a GPU a chunk's write overlaps the next forward pass), then record the
accuracies and mark the store complete (:func:`finish`). It imports neither front end.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from kdcache.batches import read_ahead, view_batch
from kdcache.defaults import DEFAULT_VIEWS
from kdcache.data import DataSet, load_dataset, with_views
from kdcache.device import default_batch_size, resolve_device
from kdcache.errors import CheckpointError, KdcacheError, StoreError
from kdcache.evaluate import evaluate
from kdcache.inline import INLINE
from kdcache.store.chunks import default_threads
from kdcache.models import (build_model, feature_dim, forward_with_map, head_of, load_checkpoint, map_shape,
                            model_info)
from kdcache.store import Cache, PlanStore, TeacherStore
from kdcache.store.form import FeatureCompression, FeatureForm, Forward, StoreForm
from kdcache.store.ids import plan_id, sha256_file, teacher_id
from kdcache.store.layout import MAX_CHUNK_BYTES, Layout, LayoutError, StoreShape, max_chunk_rows, n_chunks
from kdcache.store.sizes import StoreSize, store_size
from kdcache.text import human_bytes
from kdcache.training import MAX_SEED
from kdcache.views import Recipe, get_recipe, view_drawer
MAX_WRITES_IN_FLIGHT = 2
# The most a shard of the widest array may hold (rows times its row bytes, features at float16), given --shard-rows:
# the writer holds a shard whole in memory (its rows' outputs, then the encoded chunks), MAX_WRITES_IN_FLIGHT of them
# and the one being forwarded; 32 times the default 128 MiB shard keeps those within a few tens of GB. (A shard
# larger than a view is a view: Layout.choose cuts it there.)
MAX_SHARD_BYTES = 4 * 2**30
# The most a forward batch's views may take (float32, 3 x S x S each), given --batch-size: the batch and the one
# decoded ahead are held at once, on the device with the teacher's activations (several times the views' bytes).
# 8 GiB: 14,266 views at 224 px (the default GPU batch is 2,048), 699,050 at 32 px.
MAX_BATCH_BYTES = 8 * 2**30
READ_AHEAD_BATCHES = 1  # forward batches decoded and replayed while the teacher runs the one before

Progress = Callable[[int], None]
# progress(total, done) -> the callback told each amount done; rows by default, or
# progress(total, done, unit="view", what="drawing plan P") for the views of a plan.
ProgressFactory = Callable[..., Progress]
Warn = Callable[[str], None]


@dataclass
class PrecomputeRequest:
    """Everything ``kdcache precompute`` takes for one teacher."""

    teacher: str
    checkpoint: Path
    dataset: str
    data_root: Path | None = None
    cache: Path | str | None = None  # a directory or an fsspec URL
    views: int = DEFAULT_VIEWS
    plan_seed: int = 0
    recipe: str | None = None        # view recipe (name or name:size); default: the data set's
    image_size: int | None = None    # side of the views (imagefolder); default: the recipe's
    batch_size: int | None = None
    device: str | None = None
    chunk_rows: int | None = None    # rows a chunk (unit of reading); alone: also a file, as before shards
    shard_rows: int | None = None    # rows a shard (a file, the unit of writing), a multiple of the chunk rows
    dry_run: bool = False
    # What the store holds and how the teacher runs (logits, features, their dtype, the forward's precision: part
    # of the teacher id); Forward.AMP is resolved on the device.
    form: StoreForm = StoreForm()
    feature_compression: FeatureCompression = FeatureCompression.ZSTD  # the features before their CRC32C
    force: bool = False              # write even where the cache's free space is less than what will be written


@dataclass
class PrecomputeResult:
    """What precompute did: the ids, the store's path and a short account for the user."""

    teacher_id: str
    plan_id: str
    path: Path | str  # a Path in a local cache, a URL otherwise
    status: str  # "dry-run", "complete" (found finished), "written"
    lines: list[str] = field(default_factory=list)


@dataclass
class TeacherJob:
    """One teacher resolved: its data set, ids, model (on the device, eval mode), and its store's form (the forward
    resolved on the device), shape and layout."""

    req: PrecomputeRequest
    dataset: DataSet
    recipe: Recipe
    cache: Cache
    plan_id: str
    teacher_id: str
    checkpoint_sha256: str
    device: torch.device
    model: torch.nn.Module
    form: StoreForm
    shape: StoreShape
    layout: Layout
    prepared: float = field(default_factory=time.monotonic)  # when this run took the teacher up

    @property
    def path(self) -> Path | str:
        return self.cache.teacher_path(self.teacher_id)

    @property
    def batch_size(self) -> int:
        return forward_batch_size(self.device, self.req.batch_size)

    @property
    def size(self) -> StoreSize:
        """The store's bytes and files (the size calculator's figures, as the dry run states them)."""
        return store_size(self.form, self.shape, self.layout)

    def teacher_attrs(self) -> dict[str, Any]:
        """What a new store records about its teacher (its form and shape it records itself)."""
        return {"plan_id": self.plan_id, "arch": self.req.teacher,
                "checkpoint": {"path": str(Path(self.req.checkpoint).resolve()), "sha256": self.checkpoint_sha256},
                "dataset": self.req.dataset}

    def open_store(self) -> TeacherStore:
        """Create the store or reopen it to resume (the caller holds the writer lock)."""
        return TeacherStore.create(self.cache.teacher_location(self.teacher_id), self.teacher_id, self.form,
                                   self.shape, self.teacher_attrs(), *_head(self.model),
                                   compression=self.req.feature_compression, chunk_rows=self.layout.chunk_rows,
                                   shard_rows=self.layout.shard_rows)

    def is_complete(self) -> bool:
        return _is_complete(self.cache, self.teacher_id)

    def result(self, status: str, lines: list[str]) -> PrecomputeResult:
        return PrecomputeResult(self.teacher_id, self.plan_id, self.path, status, lines)

    def complete_result(self) -> PrecomputeResult:
        lines = [f"teacher store {self.teacher_id} is already complete at {self.path}"]
        held = TeacherStore.open(self.cache.teacher_location(self.teacher_id), self.teacher_id).feature_compression
        if self.form.has_features and held != self.req.feature_compression:
            lines.append(f"its features are kept with compression {held.value} (--feature-compression "
                         f"{self.req.feature_compression.value} applies to a new store: the values are the same; "
                         f"`kdcache cache rm {self.teacher_id}` and precompute again to change it)")
        return self.result("complete", lines)


def prepare(req: PrecomputeRequest, dataset: DataSet | None = None) -> TeacherJob:
    """Check the request, load the data set (unless given) and the teacher, and work out the ids, form, shape and
    layout of its store."""
    _check_options(req)
    dataset = with_views(load_dataset(req.dataset, req.data_root) if dataset is None else dataset,
                         req.recipe, req.image_size)
    recipe = get_recipe(dataset.recipe)
    view_bytes = 3 * recipe.size * recipe.size * 4  # a view as the teacher takes it: float32 (3, S, S)
    if req.batch_size is not None and req.batch_size * view_bytes > MAX_BATCH_BYTES:
        raise KdcacheError(f"--batch-size {req.batch_size:,} makes batches of {human_bytes(req.batch_size * view_bytes)}"
                           f" of views ({view_bytes:,} B each at {recipe.size} px): give 1 to "
                           f"{MAX_BATCH_BYTES // view_bytes:,} (at most {human_bytes(MAX_BATCH_BYTES)} a batch)")
    model_info(req.teacher)  # unknown architecture: fail before hashing anything
    if not Path(req.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {req.checkpoint} not found")
    cache = Cache.at(req.cache)

    pid = plan_id(dataset.fingerprint, recipe.description, req.views, req.plan_seed)
    ckpt_sha = sha256_file(req.checkpoint)
    k = req.form.topk
    if k is not None and k > dataset.num_classes:
        raise KdcacheError(f"--logits {req.form.logits}: K exceeds the {dataset.num_classes} classes of {dataset.name}; "
                           f"give K from 1 to {dataset.num_classes} (topk:{dataset.num_classes} keeps every logit)")
    device = resolve_device(req.device)
    form = req.form.on(device.type)
    check_autocast(device, form.forward)
    tid = teacher_id(pid, req.teacher, ckpt_sha, form)
    model = build_model(req.teacher, dataset.num_classes)
    load_checkpoint(model, req.checkpoint)
    # A model that cannot take the views' size fails here, before any plan or store exists.
    spatial = map_shape(model, recipe.size)
    model.eval().to(device)
    shape = StoreShape(req.views, len(dataset.train), dataset.num_classes, feature_dim(model), spatial)
    most = max_chunk_rows(form, shape)
    if req.chunk_rows is not None and req.chunk_rows > most:
        widest = form.widest_row_bytes(shape.classes, shape.feature_shape(form))
        raise KdcacheError(f"--chunk-rows {req.chunk_rows:,} makes chunks of {human_bytes(req.chunk_rows * widest)} "
                           f"({widest:,} B a row): give 1 to {most:,} (at most {human_bytes(MAX_CHUNK_BYTES)} a chunk, "
                           "which is read and compressed whole)")
    try:
        layout = Layout.choose(form, shape, req.chunk_rows, req.shard_rows)
    except LayoutError as exc:
        raise KdcacheError(f"--shard-rows {req.shard_rows} must be a multiple of the chunk rows ({exc.chunk_rows}): a "
                           "shard holds whole chunks" + ("" if req.chunk_rows else "; give --chunk-rows too")) from None
    widest = form.widest_row_bytes(shape.classes, shape.feature_shape(form))
    if req.shard_rows is not None and layout.shard_rows * widest > MAX_SHARD_BYTES:
        raise KdcacheError(f"--shard-rows {req.shard_rows:,} makes shards of {human_bytes(layout.shard_rows * widest)} "
                           f"({widest:,} B a row): give at most {MAX_SHARD_BYTES // widest:,} (at most "
                           f"{human_bytes(MAX_SHARD_BYTES)} a shard, which the writer holds whole, "
                           f"{MAX_WRITES_IN_FLIGHT + 1} at a time)")
    job = TeacherJob(req, dataset, recipe, cache, pid, tid, ckpt_sha, device, model, form, shape, layout)
    if not req.dry_run and not req.force:
        check_free_space(job)
    return job


def bytes_to_write(job: TeacherJob) -> tuple[int, int]:
    """The bytes precompute will write for ``job``, before compression (what compression saves is not known
    before the data are): the plan's, where the cache does not hold it yet (order int32 and P int16 replay
    parameters a row, the labels), and the store's rows not written yet (all of them for a new store)."""
    views, n = job.shape.views, job.shape.samples
    plan = 0 if job.cache.plan_location(job.plan_id).exists("zarr.json") else (
        views * n * (4 + 2 * job.recipe.n_params) + 4 * n)
    size = job.size
    rows = views * n
    if job.cache.teacher_location(job.teacher_id).exists("zarr.json"):
        try:
            store = TeacherStore.open(job.cache.teacher_location(job.teacher_id), job.teacher_id,
                                      require_complete=False)
            rows = store.rows_in(c for _, c in store.pending())
        except StoreError:
            pass  # unreadable: counted whole, as a new store (opening it to write will say what is wrong)
    return plan, rows * size.row_bytes + 4 * views * n_chunks(n, job.layout.chunk_rows)  # + the markers


def free_bytes(where: Path) -> tuple[Path, int]:
    """The free bytes of the file system ``where`` would be on: that of its nearest existing folder (the cache
    directory may not exist yet)."""
    folder = Path(where).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def check_free_space(job: TeacherJob) -> None:
    """Refuse, in one line and before any work, to start writing more than the cache's file system has free
    (a local cache; an fsspec URL's free space is not known). ``--force`` goes on anyway. A complete store
    writes nothing."""
    local = job.cache.location.local_path
    if local is None or job.is_complete():
        return
    plan, store = bytes_to_write(job)
    needed = plan + store
    folder, free = free_bytes(local)
    if needed > free:
        parts = f"plan {human_bytes(plan)} + store {human_bytes(store)}" if plan else f"store {human_bytes(store)}"
        raise KdcacheError(f"precompute would write {human_bytes(needed)} ({needed:,} B: {parts}, before "
                           f"compression) but {folder} has {human_bytes(free)} ({free:,} B) free: free space, give "
                           "fewer --views or a --cache with room, or pass --force to write anyway")


def check_autocast(device: torch.device, forward: Forward) -> None:
    """Refuse, in one line, a forward precision ``device`` cannot run: autocast where torch has none for the
    device type, bfloat16 on a GPU without bfloat16 arithmetic."""
    if forward is Forward.FLOAT32:
        return
    if not torch.amp.is_autocast_available(device.type):
        raise KdcacheError(f"--amp: torch has no autocast on {device.type} devices; drop --amp")
    if forward is Forward.AMP_BFLOAT16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise KdcacheError(f"--amp-dtype bfloat16: GPU {torch.cuda.get_device_name(device)} has no bfloat16 "
                           "arithmetic; use --amp-dtype float16 (or drop --amp)")


def finish(job: TeacherJob, store: TeacherStore) -> list[str]:
    """Evaluate the teacher on the test split (in the store's forward precision), record the accuracies and mark
    the store complete."""
    with _autocast(job.device, store.form.forward.autocast_dtype):
        test_top1, test_top5 = evaluate(job.model, job.dataset, job.recipe.name, job.device, job.batch_size)
    view_acc = 100.0 * store.view_accuracy()
    store.mark_complete(test_accuracy=test_top1, test_top5=test_top5, view_accuracy=view_acc,
                        precompute_seconds=round(time.monotonic() - job.prepared, 2))
    return [f"wrote teacher store {job.teacher_id} at {job.path}",
            f"test accuracy {test_top1:.2f}% (top-5 {test_top5:.2f}%), accuracy over the views {view_acc:.2f}%"]


def warn_lacking_guarantee(cache: Cache, warn: Warn | None) -> None:
    """Say, once and before any work, which guarantee the cache's backend lacks (if any)."""
    note = cache.lacking_guarantee()
    if note:
        (warn or python_warning)(note)


def python_warning(msg: str) -> None:
    """Say ``msg`` as a Python warning (where no ``warn`` callback is given)."""
    warnings.warn(msg, stacklevel=4)


def ensure_plan(cache: Cache, dataset: DataSet, recipe: Recipe, n_views: int, seed: int, pid: str,
                progress: ProgressFactory | None = None) -> PlanStore:
    """The plan with id ``pid``, drawn and written now, view by view, if the cache does not hold it yet."""
    path = cache.plan_location(pid)
    try:
        return PlanStore.open(path, pid)
    except StoreError:
        pass
    sizes = dataset.train.sizes if recipe.needs_sizes else None
    n = len(dataset.train)
    attrs = {
        "dataset": {"name": dataset.name, "n_samples": n, "n_classes": dataset.num_classes,
                    "fingerprint": dataset.fingerprint},
        "recipe": recipe.description, "seed": seed,
    }
    labels = np.asarray(dataset.train.labels, dtype=np.int32)
    views = (lambda total, done: progress(total, done, unit="view", what=f"drawing plan {pid}")) if progress else None
    return PlanStore.create(path, cache.lock_path("plan", pid), pid, attrs, n_views, labels,
                            view_drawer(recipe.spec, n, seed, sizes), views)


class _Group(NamedTuple):
    """Consecutive shards of one view (chunks, in a store without shards), forwarded together."""

    view: int
    chunks: list[int]    # the shards
    rows: slice          # the group's rows of the view
    indices: np.ndarray  # their sample ids


class _Batch(NamedTuple):
    """One forward batch: its rows' sample ids and view parameters, and the group it completes (if it does)."""

    indices: np.ndarray
    params: np.ndarray
    ends: _Group | None


def write_chunks(model: torch.nn.Module, dataset: DataSet, plan: PlanStore, store: TeacherStore,
                 chunks: list[tuple[int, int]], device: torch.device, batch_size: int,
                 tick: Progress | None = None) -> None:
    """Forward the teacher over the shards holding the (view, chunk) pairs and write each shard whole.

    A shard is the unit of writing (one chunk in a store without shards): every chunk of it is
    written, by this writer, then its markers. Consecutive shards of a view are forwarded
    together, up to ``batch_size`` rows, so that a store of wide rows (a spatial store holds
    about 60 resnet32x4 rows a chunk) still feeds the teacher whole batches. On a GPU the next batch's images are
    decoded and replayed on a background thread while the teacher runs the current one (``READ_AHEAD_BATCHES``
    ahead, so memory stays bounded), and one writer thread writes beside the forward pass; on the CPU both run in
    turn with it (:func:`overlaps_forward`). Either way a shard's chunks are compressed on a pool of every core. The
    teacher runs in the store's forward precision (attribute ``forward``: float32, or autocast in bfloat16 or float16),
    whoever writes it.
    """
    plan_labels = plan.labels
    labels = torch.as_tensor(plan_labels)
    form = store.form
    amp = form.forward.autocast_dtype
    source = dataset.train.to(device) if dataset.train.resident else dataset.train

    def views(batch: _Batch) -> tuple[_Batch, torch.Tensor]:
        return batch, view_batch(dataset, source, plan.recipe, batch.indices, batch.params, device)

    in_flight: deque[Future[None]] = deque()
    outputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    batches = forward_batches(plan, store, chunks, batch_size)
    overlap = overlaps_forward(device)
    with (ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer") if overlap
          else contextlib.nullcontext(INLINE)) as writer, \
            ThreadPoolExecutor(default_threads(), thread_name_prefix="kdcache-encode") as encoder:
        for batch, x in read_ahead(views, batches, READ_AHEAD_BATCHES) if overlap else map(views, batches):
            outputs.append(forward_batch(model, x, form.features, amp))
            if batch.ends is None:
                continue
            group, rows = batch.ends, batch.ends.rows
            logits = torch.cat([z for z, _ in outputs])
            features = torch.cat([h for _, h in outputs if h is not None]) if form.has_features else None
            outputs = []
            _refuse_non_finite(logits, features, store.id, group.view, rows, form.forward)
            correct = logits.float().argmax(1) == labels[group.indices]
            for s in group.chunks:
                part = slice(store.shard_rows_of(s).start - rows.start, store.shard_rows_of(s).stop - rows.start)
                counts = [int(correct[store.rows(c).start - rows.start:store.rows(c).stop - rows.start].sum())
                          for c in store.shard_chunks(s)]
                while len(in_flight) >= MAX_WRITES_IN_FLIGHT:
                    in_flight.popleft().result()
                in_flight.append(writer.submit(store.write_shard, group.view, s, logits[part].numpy(),
                                               None if features is None else features[part].numpy(),
                                               counts, plan_labels[group.indices[part]], encoder))
                if tick:
                    in_flight[-1].add_done_callback(functools.partial(_tick_rows, tick, part.stop - part.start))
        while in_flight:
            in_flight.popleft().result()


def overlaps_forward(device: torch.device) -> bool:
    """Whether the next batch's views and the last shard's writes run on threads beside the teacher's forward
    pass: on a GPU, whose forward leaves the host's cores free; not on the CPU, where the forward already uses
    every core and work beside it only stalls its threads (3 digits teachers over 10 views: 25.7 s overlapped,
    20.7 s in turn, the forward itself 20.5 s against 14.6 s; benchmarks/RESULTS.md), so there they run in turn."""
    return device.type != "cpu"


def forward_batches(plan: PlanStore, store: TeacherStore, chunks: Sequence[tuple[int, int]],
                    batch_size: int) -> Iterator[_Batch]:
    """The teacher's forward batches over the shards holding the (view, chunk) pairs, in order: each group of
    consecutive shards (:func:`chunk_groups`) split into batches of at most ``batch_size`` rows; a group's last
    batch names it (its ``chunks`` are shards; in a store without shards, one chunk each)."""
    view_cache: tuple[int, np.ndarray, np.ndarray] | None = None
    shards = sorted({(v, store.shard_of(c)) for v, c in chunks})
    for v, shard_ids in chunk_groups(shards, max(1, batch_size // store.shard_rows)):
        if view_cache is None or view_cache[0] != v:
            view_cache = (v, *plan.view(v))
        rows = slice(store.shard_rows_of(shard_ids[0]).start, store.shard_rows_of(shard_ids[-1]).stop)
        indices, params = view_cache[1][rows], view_cache[2][rows]
        for start in range(0, len(indices), batch_size):
            stop = start + batch_size
            yield _Batch(indices[start:stop], params[start:stop],
                         _Group(v, shard_ids, rows, indices) if stop >= len(indices) else None)


def chunk_groups(chunks: Sequence[tuple[int, int]], size: int) -> Iterator[tuple[int, list[int]]]:
    """``(view, [chunk, ...])``: runs of at most ``size`` consecutive chunks of one view, in the given order."""
    group: list[int] = []
    view = -1
    for v, c in chunks:
        if group and (v != view or c != group[-1] + 1 or len(group) >= size):
            yield view, group
            group = []
        view = v
        group.append(c)
    if group:
        yield view, group


@torch.inference_mode()
def forward_batch(model: torch.nn.Module, x: torch.Tensor, features: FeatureForm = FeatureForm.POOLED,
                  amp: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's float16 logits and features in the form ``features`` (None for none), on the CPU,
    for one batch of views; run under autocast in ``amp`` (``bfloat16``, ``float16``) when given."""
    with _autocast(x.device, amp):
        m, h, z = forward_with_map(model, x)
    kept = {FeatureForm.POOLED: h, FeatureForm.SPATIAL: m, FeatureForm.NONE: None}[features]
    return z.to(torch.float16).cpu(), None if kept is None else kept.to(torch.float16).cpu()


def _autocast(device: torch.device, amp: str | None) -> torch.autocast:
    """Autocast on ``device`` in ``amp`` (``bfloat16``, ``float16``); a context that changes nothing for None."""
    return torch.autocast(device.type, dtype=getattr(torch, amp or "bfloat16"), enabled=amp is not None)


def forward_batch_size(device: torch.device, requested: int | None) -> int:
    """The teacher's forward batch: ``--batch-size`` if given, else 2048 on a GPU and 64 on a CPU (where larger
    batches run slower a row: resnet32x4 at 89 img/s at 64 against 49 at 256, benchmarks/RESULTS.md)."""
    return requested or default_batch_size(device, cpu=64, gpu=2048)


def _refuse_non_finite(logits: torch.Tensor, features: torch.Tensor | None, tid: str, v: int, rows: slice,
                       forward: Forward = Forward.FLOAT32) -> None:
    # A sum is finite exactly when every value is (float16 values summed in float32 cannot overflow): one pass
    # and no mask in the common case; the rows are found only when something is not finite.
    if all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in (logits, features) if t is not None):
        return
    bad = ~torch.isfinite(logits).all(1)
    if features is not None:
        bad |= ~torch.isfinite(features).flatten(1).all(1)
    if bad.any():
        where = (torch.nonzero(bad).flatten()[:5] + rows.start).tolist()
        raise KdcacheError(
            f"teacher {tid} produced NaN or inf (after float16 conversion) at view {v}, rows {where}"
            f"{' ...' if int(bad.sum()) > 5 else ''}; nothing was written for that chunk: check the checkpoint"
            + {Forward.FLOAT32: "", Forward.AMP_FLOAT16: " (it ran under --amp in float16: try --amp-dtype bfloat16, "
                                                         "whose range is float32's, or drop --amp)",
               }.get(forward, f" (it ran under --amp in {forward.autocast_dtype}: try without --amp)")
        )


def _tick_rows(tick: Callable[[int], None], rows: int, done: Future[None]) -> None:
    """Count a shard's rows once its write has succeeded: a failed write is not progress (its error is raised
    from the future), so the progress never reaches 100 % before the last shard is on disk."""
    if not done.cancelled() and done.exception() is None:
        tick(rows)


def _head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    head = head_of(model)
    return head.weight.detach(), head.bias.detach()


def rows_done(store: TeacherStore, pending: list[tuple[int, int]]) -> int:
    """The rows of ``store`` already written when ``pending`` (view, chunk) pairs are left."""
    return store.n_views * store.n_samples - store.rows_in(c for _, c in pending)


def _is_complete(cache: Cache, tid: str) -> bool:
    try:
        TeacherStore.open(cache.teacher_location(tid), tid)
        return True
    except StoreError:
        return False


# The most views a plan may have: its params array (V, N, P) int16 must be indexable by an int64 (numpy's and
# zarr's index type): with N < 2^31 samples (order holds int32 sample ids) and P ≤ 5 < 2^3 replay parameters,
# V < 2^29 keeps V·N·P below 2^63. (A plan that large also takes terabytes: the free-space check refuses it first
# unless --force.)
MAX_VIEWS = 2**29 - 1


def _check_options(req: PrecomputeRequest) -> None:
    if not 1 <= req.views <= MAX_VIEWS:
        raise KdcacheError(f"--views must lie in [1, {MAX_VIEWS:,}] (got {req.views:,}): a plan of more views "
                           "could not be indexed")
    if not 0 <= req.plan_seed <= MAX_SEED:
        raise KdcacheError(f"--plan-seed must lie in [0, 2**63 - 1] (got {req.plan_seed})")
    if req.batch_size is not None and req.batch_size < 1:
        raise KdcacheError(f"--batch-size must be at least 1 (got {req.batch_size})")
    if req.chunk_rows is not None and req.chunk_rows < 1:
        raise KdcacheError(f"--chunk-rows must be at least 1 (got {req.chunk_rows})")
    if req.shard_rows is not None and req.shard_rows < 1:
        raise KdcacheError(f"--shard-rows must be at least 1 (got {req.shard_rows})")
