"""Views held whole in device memory: a view's teacher rows read once, each batch gathered on the device.

Streaming reads a view's chunks while its epoch trains and hands every batch's teacher rows from the host to
the device. When every teacher's rows of a view fit in a share of the device's free memory (two views: the one
training and the next being read; one when the plan has a single view), :class:`ResidentViews` instead reads
the next view whole on a background thread while the current one trains and keeps it on the device, so that a
step gathers its rows there: on a GPU no teacher byte crosses from the host during a step, and a plan of one
view is read once for the whole run. :class:`kdcache.cached.CachedTeachers` chooses between the two
(:func:`views_fit`); the batches are bit-identical either way (the same rows, the same arrays as the stream
hands them: float16, or the float32 of a top-K store's packed rows and of int8 features scaled back).

On CUDA the background thread copies each block of a view through two reused pinned host buffers on a side
stream (waiting on a buffer's copy before refilling it) into device tensors allocated on the current stream,
and waits for the last copy before handing the view over; a view is only ever read by the training stream
after that, so no event crosses streams.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from kdcache.defaults import VIEW_SHARE
from kdcache.store import TeacherStore
from kdcache.store.form import LOGIT_STATS
from kdcache.store.chunks import default_threads


def served_row_bytes(store: TeacherStore) -> int:
    """Bytes one row of ``store`` takes as the stream serves it: float16 logits (a top-K store's packed float32
    row of 2K + 5 values) and float16 features (int8 ones scaled back to float32)."""
    form = store.form
    logits = 2 * store.num_classes if form.topk is None else 4 * (2 * form.topk + len(LOGIT_STATS))
    per_value = 4 if form.int8 else 2
    return logits + (per_value * math.prod(store.feature_shape) if form.has_features else 0)


def view_bytes(stores: Sequence[TeacherStore]) -> int:
    """Bytes one view of every store takes on the device."""
    return sum(served_row_bytes(s) * s.n_samples for s in stores)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host memory available to this process."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def views_fit(stores: Sequence[TeacherStore], n_views: int, device: torch.device, share: float = VIEW_SHARE,
              free: int | None = None) -> bool:
    """Whether the views a run holds at once (two, or one for a plan of one view) fit in ``share`` of the free
    memory of ``device`` (``free`` bytes, default :func:`free_memory`); never with a share of 0."""
    if share <= 0 or not stores:
        return False
    held = min(2, n_views) * view_bytes(stores)
    return held <= share * (free_memory(device) if free is None else free)


@dataclass
class ResidentView:
    """Every teacher's rows of one view on the device, in view order: K logits and K features tensors (none in
    the feature form none)."""

    view: int
    logits: list[torch.Tensor]
    features: list[torch.Tensor]


class ResidentViews:
    """Views of ``stores`` read whole onto ``device``, the next one in the background: :meth:`get` returns a
    view (reading it now if nobody has started to) and starts reading the one to come."""

    def __init__(self, stores: Sequence[TeacherStore], device: torch.device, read_threads: int | None = None,
                 block_rows: int | None = None) -> None:
        self.stores = list(stores)
        self.device = device
        self.read_threads = max(1, read_threads or default_threads())
        # A read unit: a shard of the widest store, at most 2^16 rows: large enough to keep every reader thread
        # busy, small enough to bound the host memory of a view in transit.
        self.block_rows = block_rows or max(s.shard_rows for s in self.stores)
        self._views: dict[int, Future[ResidentView]] = {}
        self._lock = threading.Lock()

    def get(self, view: int, coming: int | None = None) -> ResidentView:
        """View ``view`` on the device (read now if no background read of it was started); then ``coming``, the
        view read next, is started on a background thread and every other view dropped, so that at most two are
        held and one is read at a time. A damaged chunk is the StoreError it is when streamed, raised here."""
        with self._lock:
            current = self._views.get(view)
            if current is None:
                current = self._views[view] = self._start(view, background=False)
        result = current.result()
        with self._lock:
            for v in [v for v in self._views if v not in (view, coming)]:
                del self._views[v]
            if coming is not None and coming not in self._views:
                self._views[coming] = self._start(coming, background=True)
        return result

    def _start(self, view: int, background: bool) -> Future[ResidentView]:
        future: Future[ResidentView] = Future()

        def read() -> None:
            try:
                future.set_result(self.read(view))
            except BaseException as exc:  # raised in the training thread when it asks for the view
                future.set_exception(exc)

        if background:
            threading.Thread(target=read, daemon=True, name=f"kdcache-view-{view}").start()
        else:
            read()
        return future

    def read(self, view: int) -> ResidentView:
        """Every store's rows of ``view``, read block by block on a pool of reader threads onto the device."""
        logits: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="kdcache-read") as pool:
            for store in self.stores:
                z, h = self._read_store(store, view, pool)
                logits.append(z)
                if h is not None:
                    features.append(h)
        return ResidentView(view, logits, features)

    def _read_store(self, store: TeacherStore, view: int, pool: ThreadPoolExecutor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = store.n_samples
        spans = [(a, min(a + self.block_rows, n)) for a in range(0, n, self.block_rows)]
        out: list[torch.Tensor | None] = [None, None]
        copier = _Copier(self.device)
        pending = store.submit_rows(view, *spans[0], pool)
        for i, (a, b) in enumerate(spans):
            following = store.submit_rows(view, *spans[i + 1], pool) if i + 1 < len(spans) else None
            for j, part in enumerate(pending.result()):
                if part is None:
                    continue
                host = torch.from_numpy(part)
                if out[j] is None:
                    out[j] = torch.empty((n, *host.shape[1:]), dtype=host.dtype, device=self.device)
                copier.copy(host, out[j][a:b])  # type: ignore[index]
            if following is not None:
                pending = following
        copier.finish()
        assert out[0] is not None
        return out[0], out[1]


class _Copier:
    """Host blocks into slices of device tensors: on the CPU a plain copy; on CUDA through two pinned buffers
    on a side stream, a buffer refilled only once its last copy has completed."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event] | None] = [None, None]
        self._next = 0

    def copy(self, host: torch.Tensor, into: torch.Tensor) -> None:
        if not self.cuda:
            into.copy_(host)
            return
        slot = self._buffers[self._next]
        if slot is not None:
            slot[1].synchronize()
        if slot is None or slot[0].numel() < host.numel() or slot[0].dtype != host.dtype:
            slot = (torch.empty(host.numel(), dtype=host.dtype, pin_memory=True), torch.cuda.Event())
            self._buffers[self._next] = slot
        self._next = 1 - self._next
        staged = slot[0][:host.numel()].view(host.shape)
        staged.copy_(host)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            into.copy_(staged, non_blocking=True)
            slot[1].record(self.stream)

    def finish(self) -> None:
        """Wait until every copy has landed on the device."""
        if self.stream is not None:
            self.stream.synchronize()

