"""Streaming K teacher stores into student training.

A run reads each epoch's view front to back in chunks: the :class:`Schedule`
decides which view an epoch uses, the order of its chunks and the shuffle of rows
within each chunk, all from (seed, epoch), so a run is reproducible and two seeds
see different batches while every read stays a whole, sequential chunk. The
:class:`TeacherStream` reads the chunk blocks of all K teachers on a pool of
background threads (every chunk of every teacher and array one task, several blocks
decoding at once: :mod:`kdcache.store.chunks`) a bounded number of blocks ahead of
the training step, so memory does not grow with the number of views or samples.

Under torchrun each rank streams its own slice of every global batch (see
:class:`TeacherStream`): the global order is the same pure function of (seed, epoch)
on every rank, so the ranks need not talk to each other to split it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from kdcache.distributed import split_batch
from kdcache.errors import StoreError
from kdcache.store import PlanStore, TeacherStore
from kdcache.store.chunks import default_threads
from kdcache.store.teacher import PendingRows


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class Schedule:
    """Which view, chunk order and row shuffle each epoch uses: a pure function of (seed, epoch)."""

    def __init__(self, n_views: int, n_samples: int, chunk_rows: int, seed: int) -> None:
        self.n_views, self.n_samples, self.chunk_rows, self.seed = n_views, n_samples, chunk_rows, seed
        self.n_chunks = -(-n_samples // chunk_rows)
        self._views = _rng(seed, 0).permutation(n_views)

    def view(self, epoch: int) -> int:
        """Epoch ``epoch`` (1-based) reads view σ(epoch) of a per-seed permutation, wrapping after V epochs."""
        return int(self._views[(epoch - 1) % self.n_views])

    def chunk_order(self, epoch: int) -> np.ndarray:
        """The order in which this epoch reads its view's chunks."""
        return _rng(self.seed, 1, epoch).permutation(self.n_chunks)

    def row_shuffle(self, epoch: int, chunk: int) -> np.ndarray:
        """Row positions of ``chunk`` (within the view) in the order this epoch uses them."""
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.n_samples)
        return start + _rng(self.seed, 2, epoch, chunk).permutation(stop - start)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Every row position of the epoch's view, in reading order (chunks permuted, rows shuffled within)."""
        return np.concatenate([self.row_shuffle(epoch, int(c)) for c in self.chunk_order(epoch)])

    def steps(self, batch_size: int) -> int:
        """Training steps per epoch (the incomplete last batch is dropped)."""
        return self.n_samples // batch_size


@dataclass
class StreamBatch:
    """One training batch: where its rows lie in the plan, and the teachers' stored outputs for them."""

    view: int
    rows: np.ndarray                    # (B,) row positions within the view
    indices: np.ndarray                 # (B,) sample ids: order[view, rows]
    params: np.ndarray                  # (B, P) replay parameters of those rows
    labels: np.ndarray                  # (B,)
    teacher_logits: list[torch.Tensor]  # K x (B, C) float16 (empty when teachers run live)
    teacher_features: list[torch.Tensor]  # K x (B, D_k) or (B, C_k, H_k, W_k) float16 (int8 stores: float32,
    # scaled back); empty in the form none


# What the reading thread hands the training thread: a batch, the error that stopped it, or None at the epoch's end.
_Queued = StreamBatch | BaseException | None


@dataclass
class _Block:
    rows: np.ndarray
    logits: list[np.ndarray]
    features: list[np.ndarray]


class TeacherStream:
    """Batches of an epoch with the K teachers' rows, read ``prefetch`` chunk blocks ahead on background threads.

    Reading: a thread walks the epoch's blocks and hands every chunk of every teacher and array as a task to
    a pool of ``read_threads`` (default: the cores this process may use), keeping ``ahead`` blocks decoding
    at once; finished blocks are cut into batches on that thread, which wait in a queue of ``prefetch`` blocks'
    worth. Memory holds at most ``prefetch + ahead + 1`` blocks of the K teachers.

    With ``world`` > 1 the stream is rank ``rank``'s share of a data-parallel run: the
    global batches are the ones a single process would use, and this rank gets the
    contiguous slice ``[rank·b, (rank+1)·b)`` of each, ``b = batch_size / world``
    (the batch size must divide evenly). The rank reads only its rows of the teacher
    arrays: for each chunk block it selects the rows that land in its slices and
    keeps, queues and hands to the device nothing else. The trade-off: a chunk is
    the unit of compression and of the CRC32C checksum, so every chunk holding one
    of its rows is still fetched and decompressed whole by each rank (with chunks far
    larger than a batch, that is every chunk of the view); only chunks without any
    of its rows, e.g. past the dropped last batch, are skipped. Splitting by chunk
    instead would save the reads but change which samples share a batch.

    The teacher tensors of a batch are CPU tensors over fresh numpy arrays; ``pin_memory``
    pins each batch's anew. :class:`kdcache.cached.CachedTeachers` leaves it off and copies
    them into reused pinned buffers instead (:mod:`kdcache.staging`).
    """

    def __init__(self, plan: PlanStore, stores: list[TeacherStore], seed: int, prefetch: int = 2,
                 read_teachers: bool = True, pin_memory: bool = False, rank: int = 0, world: int = 1,
                 read_threads: int | None = None) -> None:
        check_compatible(plan, stores)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.plan = plan
        self.stores = stores
        self.read_teachers = read_teachers
        self.prefetch = max(1, prefetch)
        self.read_threads = max(1, read_threads or default_threads())
        # Blocks whose chunks are decoding at once: enough tasks to keep every reader thread busy (a block is
        # a task per teacher and array), at least two, so that reading a block overlaps waiting for the last.
        self.ahead = max(2, math.ceil(2 * self.read_threads / max(1, len(stores))))
        self.pin_memory = pin_memory
        self.rank, self.world = rank, world
        # Read in blocks of the largest chunk: every teacher's chunks are powers of two (or the whole view).
        block_rows = max((s.chunk_rows for s in stores), default=plan.n_samples)
        self.schedule = Schedule(plan.n_views, plan.n_samples, block_rows, seed)
        self.labels = plan.labels

    def epoch(self, epoch: int, batch_size: int) -> Iterator[StreamBatch]:
        """The batches of ``epoch`` (1-based) in order; the incomplete last batch is dropped.

        ``batch_size`` is the global batch; with ``world`` > 1 each batch holds this
        rank's ``batch_size / world`` rows of it.
        """
        local = split_batch(batch_size, self.world)
        v = self.schedule.view(epoch)
        order, params = self.plan.view(v)
        # Batches are cut and made on the reading thread; as many wait here as ``prefetch`` blocks hold.
        per_block = max(1, self.schedule.chunk_rows // local)
        batches: queue.Queue[_Queued] = queue.Queue(maxsize=self.prefetch * per_block)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(epoch, v, batch_size, order, params, batches, stop),
                                  daemon=True, name="kdcache-stream")
        reader.start()
        try:
            while True:
                item = batches.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    batches.get_nowait()
                except queue.Empty:
                    reader.join(0.01)

    def _read(self, epoch: int, v: int, batch_size: int, order: np.ndarray, params: np.ndarray, out: queue.Queue[_Queued],
              stop: threading.Event) -> None:
        """The epoch's batches, in order, onto ``out``: every chunk of every teacher and array one task on a pool
        of ``read_threads``, ``ahead`` blocks submitted before the oldest is waited for, so the pool decodes
        several teachers, arrays and blocks at once; each block, once read, cut into batches here."""
        local = split_batch(batch_size, self.world)
        carry: _Block | None = None
        pending: deque[tuple[np.ndarray, list[PendingRows]]] = deque()
        pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="kdcache-read")
        try:
            position = 0  # of the block's first row in the epoch's reading order
            for c in self.schedule.chunk_order(epoch):
                if stop.is_set():
                    return
                rows = self.schedule.row_shuffle(epoch, int(c))
                # The block's rows in this epoch's order (this rank's of them): each chunk's task puts its rows
                # in their places, so no thread but the pool's touches the rows' bytes.
                mine = rows if self.world == 1 else rows[self._mine(position + np.arange(len(rows)), batch_size)]
                if len(mine):
                    reads = [s.submit_selected(v, mine, pool) for s in self.stores] if self.read_teachers else []
                    pending.append((mine, reads))
                position += len(rows)
                while len(pending) > self.ahead:
                    carry = self._cut(carry, _block(*pending.popleft()), local, v, order, params, out)
            while pending:
                carry = self._cut(carry, _block(*pending.popleft()), local, v, order, params, out)
            out.put(None)
        except BaseException as exc:  # handed to the training thread, which raises it
            out.put(exc)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # chunks started finish; none queued starts

    def _cut(self, carry: _Block | None, block: _Block, n: int, v: int, order: np.ndarray, params: np.ndarray,
             out: queue.Queue[_Queued]) -> _Block:
        """``block``, after the rows ``carry`` left of the last one, cut into batches of ``n`` rows onto ``out``;
        what is left over. Only a batch that straddles two blocks is copied; the others are views of a block."""
        if carry is not None and len(carry.rows):
            need = n - len(carry.rows)
            if len(block.rows) < need:
                return _concat(carry, block)
            head, block = _split(block, need)
            out.put(self._batch(v, _concat(carry, head), order, params))
        while len(block.rows) >= n:
            head, block = _split(block, n)
            out.put(self._batch(v, head, order, params))
        return block

    def _mine(self, positions: np.ndarray, batch_size: int) -> np.ndarray:
        """Which epoch positions fall in this rank's slice of a complete global batch."""
        share = batch_size // self.world
        complete = positions < self.schedule.steps(batch_size) * batch_size
        mine: np.ndarray = complete & (positions % batch_size // share == self.rank)
        return mine

    def _batch(self, v: int, block: _Block, order: np.ndarray, params: np.ndarray) -> StreamBatch:
        indices = order[block.rows]
        return StreamBatch(v, block.rows, indices, params[block.rows], self.labels[indices],
                           [self._tensor(z) for z in block.logits], [self._tensor(h) for h in block.features])

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.pin_memory() if self.pin_memory else t


def _block(rows: np.ndarray, reads: list[PendingRows]) -> _Block:
    """A block of ``rows`` from its teachers' reads (their rows in that order)."""
    parts = [r.result() for r in reads]
    return _Block(rows, [z for z, _ in parts], [h for _, h in parts if h is not None])


def _concat(a: _Block, b: _Block) -> _Block:
    return _Block(np.concatenate([a.rows, b.rows]), [np.concatenate(p) for p in zip(a.logits, b.logits)],
                  [np.concatenate(p) for p in zip(a.features, b.features)])


def _split(block: _Block, n: int) -> tuple[_Block, _Block]:
    return (_Block(block.rows[:n], [z[:n] for z in block.logits], [h[:n] for h in block.features]),
            _Block(block.rows[n:], [z[n:] for z in block.logits], [h[n:] for h in block.features]))


def check_compatible(plan: PlanStore, stores: list[TeacherStore], plans: dict[str, PlanStore] | None = None) -> None:
    """Refuse teachers on different plans (``plans``, by id, lets the refusal say how the plans differ), or
    stores whose shape disagrees with the plan."""
    if len({s.plan_id for s in stores}) > 1:
        raise StoreError(plan_mismatch(stores, plans or {}))
    for s in stores:
        if s.plan_id != plan.id:
            raise StoreError(f"teacher store {s.id} is on plan {s.plan_id}, not {plan.id}")
        if (s.n_views, s.n_samples) != (plan.n_views, plan.n_samples):
            raise StoreError(f"teacher store {s.id} holds {s.n_views}x{s.n_samples} rows but its plan "
                             f"{plan.id} has {plan.n_views}x{plan.n_samples}")


def plan_mismatch(stores: list[TeacherStore], plans: dict[str, PlanStore]) -> str:
    """Why teachers on different plans cannot be distilled together, naming what differs and its remedy:
    the data set, its copy, the number of views, the plan seed or the recipe."""
    def each(what: Callable[[PlanStore], object]) -> str:
        return ", ".join(f"{s.id} {what(plans[s.plan_id])}" for s in stores)

    if all(s.plan_id in plans for s in stores):
        if len({plans[s.plan_id].attrs["dataset"]["name"] for s in stores}) > 1:
            return (f"the teachers were precomputed on different data sets ({each(lambda p: p.attrs['dataset']['name'])}); "
                    "distil from teachers of one data set")
        if len({plans[s.plan_id].attrs["dataset"]["fingerprint"] for s in stores}) > 1:
            return ("the teachers were precomputed on different copies of "
                    f"{plans[stores[0].plan_id].attrs['dataset']['name']} (the files differ); precompute them "
                    "from the same --data-root")
        for option, value in (("--views", lambda p: p.n_views), ("--plan-seed", lambda p: p.attrs.get("seed")),
                              ("--recipe and --image-size", lambda p: p.recipe)):
            if len({str(value(plans[s.plan_id])) for s in stores}) > 1:
                return (f"the teachers were precomputed with different {option} ({each(value)}); precompute them "
                        f"with the same {option}")
    listing = ", ".join(f"{s.id} on plan {s.plan_id}" for s in stores)
    return (f"the teachers were precomputed on different view plans ({listing}); precompute them with the same "
            "data set, --views, --plan-seed and --recipe")
