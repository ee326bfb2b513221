"""Files a view of a teacher store, and what fewer files cost: larger chunks, Zarr v3 shards, markers kept apart.

Two tables, in one process:

1. ImageNet-1k arithmetic (resnet50: 1,281,167 rows a view, 1,000 classes, pooled 2,048 or
   spatial 2,048x7x7 features; top-10 stores with pooled features and without), from the format's own
   functions (kdcache.store.format: chunk_rows_for, shard_rows_for, files_per_view; shards of at most
   MAX_SHARD_ROWS rows): for each
   layout the files a view and over 100 views, the rows a batch is shuffled within (the
   reader's block: one chunk), the reader's read-ahead (prefetch 2 blocks x 4 teachers x a
   block's bytes), the rows a killed precompute redoes (at most the unit being forwarded and
   the two being written) and the writer's buffers (those three units' bytes).
2. Measured on a small synthetic store (pooled-like rows: 100 float16 logits and 256 float16
   features, 712 B a row; N rows a view) written with kdcache's own TeacherStore in each
   layout, at the real byte targets: the files it holds against what ``files_per_view`` says,
   write rows/s, TeacherStream rows/s for one epoch (one process) and for rank 0 of 2
   (``read_selected``), and the peak of Python-tracked memory (tracemalloc) during that epoch.
   Ratios are to today's layout (2 MiB chunks, one file each, one marker file a chunk).

    python benchmarks/chunk_files.py [--rows 65536] [--repeat 3]

prints both tables in markdown (RESULTS.md, "Files a view").
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.store import Cache, PlanStore, TeacherStore
from kdcache.store import layout as fmt
from kdcache.store.form import StoreForm
from kdcache.stream import TeacherStream
from kdcache.text import human_bytes

MiB = 2**20
N_IMAGENET, C_IMAGENET = 1_281_167, 1000
PREFETCH, TEACHERS, WRITES_IN_FLIGHT = 2, 4, 2  # the reader's default read-ahead; precompute's writer queue


@dataclass(frozen=True)
class Layout:
    name: str
    chunk_bytes: int        # target of the widest array's chunk
    shard_bytes: int = 0    # target of its shard (0: one chunk a file)
    markers_every: int = 0  # markers kept apart: one marker file for this many bytes of rows (0: one a unit)


LAYOUTS = [
    Layout("today: 2 MiB chunks, a file each, a marker file a chunk", 2 * MiB),
    Layout("2 MiB chunks, a marker file a 128 MiB of rows", 2 * MiB, markers_every=128 * MiB),
    Layout("8 MiB chunks", 8 * MiB),
    Layout("32 MiB chunks", 32 * MiB),
    Layout("128 MiB chunks", 128 * MiB),
    Layout("2 MiB chunks in 8 MiB shards", 2 * MiB, 8 * MiB),
    Layout("2 MiB chunks in 32 MiB shards", 2 * MiB, 32 * MiB),
    Layout("2 MiB chunks in 128 MiB shards (chosen)", 2 * MiB, 128 * MiB),
    Layout("2 MiB chunks in 512 MiB shards", 2 * MiB, 512 * MiB),
]


def pow2_rows(target: int, width: int, cap: int) -> int:
    rows = max(1, target // max(1, width))
    return min(1 << (rows.bit_length() - 1), cap)


def rows_of(layout: Layout, n: int, widest: int) -> tuple[int, int, int]:
    """(chunk rows, shard rows, rows a marker file covers) of ``layout`` over ``n`` rows whose widest array
    row is ``widest`` bytes, by the format's rules (powers of two; a shard never covers more than a view)."""
    chunk = pow2_rows(layout.chunk_bytes, widest, n)
    if layout.shard_bytes:
        per = max(1, min(layout.shard_bytes // (chunk * widest), fmt.MAX_SHARD_ROWS // chunk))
        shard = chunk * min(1 << (per.bit_length() - 1), fmt.n_chunks(n, chunk))
    else:
        shard = chunk
    marker = chunk * min(1 << (max(1, layout.markers_every // (chunk * widest)).bit_length() - 1),
                         fmt.n_chunks(n, chunk)) if layout.markers_every else shard
    return chunk, shard, marker


def files(n: int, chunk: int, shard: int, marker: int, data_arrays: int) -> int:
    return data_arrays * fmt.n_chunks(n, shard) + fmt.n_chunks(n, marker)


# -- 1. ImageNet arithmetic -----------------------------------------------------------------------------------


STORES = {  # name -> (logits row bytes, features row bytes, data arrays, widest row bytes)
    "pooled float16": (StoreForm().logits_row_bytes(C_IMAGENET), StoreForm().feature_row_bytes((2048,)), 2),
    "spatial float16": (StoreForm().logits_row_bytes(C_IMAGENET), StoreForm().feature_row_bytes((2048, 7, 7)), 2),
    "topk:10, pooled float16": (StoreForm("topk:10").logits_row_bytes(C_IMAGENET), StoreForm().feature_row_bytes((2048,)),
                                4),
    "topk:10, no features": (StoreForm("topk:10").logits_row_bytes(C_IMAGENET), 0, 3),
}


def imagenet_table() -> list[str]:
    out = ["| store (resnet50, ImageNet-1k) | layout | files a view | 100 views | shuffled within (rows) | "
           "read-ahead (2 x 4 teachers) | rows redone after a kill | writer buffers |",
           "|---|---|---|---|---|---|---|---|"]
    for store, (logits, features, arrays) in STORES.items():
        widest, row = max(logits, features), logits + features
        for layout in LAYOUTS:
            chunk, shard, marker = rows_of(layout, N_IMAGENET, widest)
            n_files = files(N_IMAGENET, chunk, shard, marker, arrays)
            redo = min((1 + WRITES_IN_FLIGHT) * shard, N_IMAGENET)
            out.append(f"| {store} | {layout.name} | {n_files:,} | {100 * n_files:,} | {chunk:,} | "
                       f"{human_bytes(PREFETCH * TEACHERS * chunk * row)} | {redo:,} | "
                       f"{human_bytes((1 + WRITES_IN_FLIGHT) * shard * row)} |")
    return out


def check_against_format() -> None:
    """The chosen layout's arithmetic here is the format's own (shard_rows_for, files_per_view)."""
    for logits, features, arrays in STORES.values():
        widest = max(logits, features)
        chunk, shard, _ = rows_of(LAYOUTS[7], N_IMAGENET, widest)
        assert chunk == fmt.chunk_rows_for(N_IMAGENET, widest)
        assert shard == fmt.shard_rows_for(N_IMAGENET, chunk, widest), (shard, widest)
        assert files(N_IMAGENET, chunk, shard, shard, arrays) == fmt.Layout(chunk, shard).files_per_view(N_IMAGENET, arrays)


# -- 2. measured on a small store ------------------------------------------------------------------------------

C, D = 100, 256  # 712 B a row, the features (512 B) the widest array
MEASURED = [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3], LAYOUTS[5], LAYOUTS[6], LAYOUTS[7]]


def make_plan(cache: Cache, n: int) -> PlanStore:
    rng = np.random.default_rng(0)
    order = rng.permutation(n).astype(np.int32)[None]
    params = np.zeros((1, n, 3), np.int16)
    attrs = {"dataset": {"name": "synthetic", "n_samples": n, "n_classes": C, "fingerprint": "f"},
             "recipe": {"name": "crop-flip"}, "seed": 0}
    pid = "plan000000000000"
    return PlanStore.create(cache.plan_path(pid), cache.lock_path("plan", pid), pid, attrs, 1,
                            (np.arange(n) % C).astype(np.int32), lambda v: (order[v], params[v]))


def write_store(cache: Cache, tid: str, plan: PlanStore, layout: Layout, logits: np.ndarray,
                feats: np.ndarray) -> tuple[TeacherStore, float]:
    n = plan.n_samples
    chunk, shard, _ = rows_of(layout, n, 2 * D)
    attrs = {"plan_id": plan.id, "arch": "resnet8", "checkpoint": {"path": "/x", "sha256": "0"}, "dataset": "x"}
    store = TeacherStore.create(cache.teacher_path(tid), tid, StoreForm(), fmt.StoreShape(1, n, C, D), attrs,
                                torch.zeros(C, D), torch.zeros(C), chunk_rows=chunk, shard_rows=shard)
    t0 = time.perf_counter()
    for s in range(store.shards_per_view):
        r = store.shard_rows_of(s)
        store.write_shard(0, s, logits[r], feats[r], [0] * len(store.shard_chunks(s)))
    took = time.perf_counter() - t0
    store.mark_complete()
    return cache.open_teacher(tid), took


def epoch_rate(plan: PlanStore, store: TeacherStore, repeat: int, world: int = 1) -> tuple[float, int]:
    """Best rows/s of one epoch of TeacherStream (rank 0 of ``world``), and the peak tracked bytes."""
    best, peak = 0.0, 0
    for i in range(repeat):
        stream = TeacherStream(plan, [store], seed=i, prefetch=PREFETCH, rank=0, world=world)
        tracemalloc.start()
        t0 = time.perf_counter()
        rows = sum(len(b.rows) for b in stream.epoch(1, 256))
        took = time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        best = max(best, rows / took)
    return best, peak


def measured_table(n: int, repeat: int) -> list[str]:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((n, C)) * 3).astype(np.float16)
    feats = np.maximum(rng.standard_normal((n, D)), 0).astype(np.float16)
    out = [f"| layout ({n:,} rows of 712 B) | chunk / shard rows | files (counted = formula) | write rows/s | "
           "read rows/s, 1 process | read rows/s, rank 0 of 2 | peak tracked memory, 1 process |",
           "|---|---|---|---|---|---|---|"]
    root = Path(tempfile.mkdtemp(prefix="kdcache-chunk-files-"))
    try:
        cache = Cache.at(root)
        cache.ensure_writable()
        plan = make_plan(cache, n)
        base: tuple[float, float, float, int] | None = None
        for i, layout in enumerate(MEASURED):
            store, took = write_store(cache, f"teacher{i:09d}", plan, layout, logits, feats)
            found = sum(len(store.location.files(f"{a}/c")) for a in (*store.data_arrays, "done"))
            formula = fmt.Layout(store.chunk_rows, store.shard_rows).files_per_view(n, len(store.data_arrays))
            assert found == formula, (layout, found, formula)
            one, peak = epoch_rate(plan, store, repeat)
            two, _ = epoch_rate(plan, store, repeat, world=2)
            write = n / took
            base = base or (write, one, two, peak)
            out.append(f"| {layout.name} | {store.chunk_rows:,} / {store.shard_rows:,} | {found} = {formula} | "
                       f"{write:,.0f} ({write / base[0]:.2f}) | {one:,.0f} ({one / base[1]:.2f}) | "
                       f"{two:,.0f} ({two / base[2]:.2f}) | {human_bytes(peak)} ({peak / base[3]:.2f}) |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=65536, help="rows of the measured store's one view")
    ap.add_argument("--repeat", type=int, default=3, help="epochs read per layout (the best is kept)")
    args = ap.parse_args()
    check_against_format()
    print("\n".join(imagenet_table()))
    print()
    print("\n".join(measured_table(args.rows, args.repeat)))


if __name__ == "__main__":
    main()
