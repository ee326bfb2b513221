"""Which reader delivers stored teacher rows fastest, against the decode bound, at 1, 2, ... threads.

    python benchmarks/readers.py                                  # 50,000 rows, spatial and pooled, 1 and 2 threads
    python benchmarks/readers.py --threads 1 2 4 8 16 --json readers.json   # on a machine with more cores
    python benchmarks/readers.py --samples 4096 --rounds 1        # a quick look

Three teacher stores of resnet32x4's shapes (100 float16 logits a row; features a 256x8x8 map, ``spatial``,
or its pooled 256-vector, ``pooled``) over one view of ``--samples`` rows, laid out as precompute lays them
out (2 MB chunks in ~128 MB shards, Blosc and CRC32C; random values, half of a map's exact zeros as after a
ReLU, which compress about as real maps do; ``spatial-raw``: the same maps stored with ``--feature-compression
none``). Each candidate reads the whole view, the three teachers' logits
and features, in blocks of ``--block-rows`` rows, every teacher and array of a block at once, so that the
library can read them in parallel:

- ``zarr-chunks``: zarr-python's default pipeline, chunk by chunk, the teachers on a dask thread pool (the
  read path before this benchmark);
- ``zarr``: zarr-python's default pipeline, a block's arrays gathered into one call on its event loop;
- ``zarrs``: the same calls through the zarrs codec pipeline (Rust; ``codec_pipeline.path``);
- ``tensorstore``: tensorstore's zarr3 driver, a block's reads issued together;
- ``kdcache``: kdcache's read path (``kdcache.store.chunks``): a chunk's bytes read from its shard, its CRC32C
  checked and Blosc undone by numcodecs, one task a chunk on a pool of the given threads;
- ``bound``: the decode bound: the same chunks' compressed bytes already in memory, checked and decoded by
  numcodecs on the given threads, each into a buffer of its own (no file reads, no allocation, no library
  between).

Every (candidate, threads) runs in a fresh process (zarr's thread pool is sized once a process), after the
stores' files were read once (so every candidate reads from the page cache); ``--rounds`` rounds run every
measurement once each, and the report gives the median rows/s (rows of all three teachers a second) and the
range. ``threads`` sets the candidate's own thread count: zarr's ``threading.max_workers`` (zarr, zarrs),
tensorstore's ``data_copy_concurrency``, the pool's size (kdcache, bound, and the dask pool of zarr-chunks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from kdcache.store import TeacherStore  # noqa: E402
from kdcache.store.form import FeatureCompression, StoreForm  # noqa: E402
from kdcache.store.layout import StoreShape  # noqa: E402
from kdcache.store.chunks import intact  # noqa: E402

CANDIDATES = ("zarr-chunks", "zarr", "zarrs", "tensorstore", "kdcache", "bound")
ARRAYS = ("logits", "features")
CLASSES, CHANNELS, SIDE = 100, 256, 8  # resnet32x4 on CIFAR-100


FORMS = ("spatial", "spatial-raw", "pooled")  # spatial-raw: the maps with --feature-compression none


def feature_row(form: str) -> tuple[int, ...]:
    return (CHANNELS, SIDE, SIDE) if form.startswith("spatial") else (CHANNELS,)


def build_stores(root: Path, form: str, teachers: int, samples: int) -> list[Path]:
    """``teachers`` complete stores of random rows in precompute's layout (one view), made once under ``root``."""
    row = feature_row(form)
    store_form = StoreForm(features=form.split("-")[0])
    shape = StoreShape(1, samples, CLASSES, CHANNELS, row)
    rng = np.random.default_rng(0)
    paths = []
    for t in range(teachers):
        path = root / f"{form}-{samples}-{t}"
        paths.append(path)
        if (path / "zarr.json").exists() and json.loads((path / "zarr.json").read_text())["attributes"].get("complete"):
            continue
        attrs = {"plan_id": "b" * 16, "arch": "resnet32x4", "checkpoint": {"path": "-", "sha256": f"{t:064x}"}}
        store = TeacherStore.create(path, f"t{t}", store_form, shape, attrs, torch.randn(CLASSES, CHANNELS),
                                    torch.zeros(CLASSES), compression=FeatureCompression.NONE if form.endswith("-raw")
                                    else FeatureCompression.ZSTD)
        for v, s in store.pending_shards():
            rows = store.shard_rows_of(s)
            n = rows.stop - rows.start
            logits = (3 * rng.standard_normal((n, CLASSES), dtype=np.float32)).astype(np.float16)
            features = np.maximum(rng.standard_normal((n, *row), dtype=np.float32), 0).astype(np.float16)
            store.write_shard(v, s, logits, features, [0] * len(store.shard_chunks(s)))
        store.mark_complete()
    return paths


def blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(a, min(a + block, n)) for a in range(0, n, block)]


# -- the candidates: each reads every block of view 0 of every store, returns nothing ----------------------


def read_zarr_chunks(paths: list[Path], threads: int, block: int) -> Callable[[], None]:
    import dask
    import zarr

    zarr.config.set({"threading.max_workers": threads})
    arrays = [[zarr.open_array(p / a, mode="r") for a in ARRAYS] for p in paths]
    r = int(arrays[0][0].chunks[1])
    n = int(arrays[0][0].shape[1])

    def one(teacher: list[Any], a: int, b: int) -> None:
        for c in range(a // r, -(-b // r)):
            for array in teacher:
                array[0, c * r:min((c + 1) * r, n)]

    def run() -> None:
        for a, b in blocks(n, block):
            dask.compute(*[dask.delayed(one)(t, a, b) for t in arrays], scheduler="threads", num_workers=threads)
    return run


def read_zarr(paths: list[Path], threads: int, block: int, pipeline: str | None = None) -> Callable[[], None]:
    import zarr
    from zarr.core.sync import sync

    zarr.config.set({"threading.max_workers": threads,
                     **({"codec_pipeline.path": pipeline} if pipeline else {})})
    arrays = [zarr.open_array(p / a, mode="r") for p in paths for a in ARRAYS]
    if pipeline:
        kind = type(arrays[0]._async_array.codec_pipeline).__name__
        assert kind == pipeline.rsplit(".", 1)[1], f"zarr reads through {kind}, not {pipeline}"
    n = int(arrays[0].shape[1])

    async def gather(a: int, b: int) -> None:
        await asyncio.gather(*(x._async_array.getitem((0, slice(a, b))) for x in arrays))

    def run() -> None:
        for a, b in blocks(n, block):
            sync(gather(a, b))
    return run


def read_tensorstore(paths: list[Path], threads: int, block: int) -> Callable[[], None]:
    import tensorstore as ts

    context = ts.Context({"data_copy_concurrency": {"limit": threads}, "file_io_concurrency": {"limit": max(4, threads)}})
    arrays = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(p / a)}}, context=context,
                      read=True).result() for p in paths for a in ARRAYS]
    n = int(arrays[0].shape[1])

    def run() -> None:
        for a, b in blocks(n, block):
            for future in [x[0, a:b].read() for x in arrays]:
                future.result()
    return run


def read_kdcache(paths: list[Path], threads: int, block: int) -> Callable[[], None]:
    stores = [TeacherStore.open(p, f"t{i}") for i, p in enumerate(paths)]
    pool = ThreadPoolExecutor(threads)
    n = stores[0].n_samples

    def run() -> None:
        pending = []
        for a, b in blocks(n, block):  # two blocks decoding at once, as the stream keeps them
            pending.append([s.submit_rows(0, a, b, pool) for s in stores])
            if len(pending) > 1:
                [r.result() for r in pending.pop(0)]
        for reads in pending:
            [r.result() for r in reads]
    return run


def compressed_chunks(paths: list[Path]) -> list[tuple[Any, int, bytes]]:
    """Every chunk of view 0 of every store's logits and features: (its reader, chunk, compressed bytes)."""
    stores = [TeacherStore.open(p, f"t{i}") for i, p in enumerate(paths)]
    held: list[tuple[Any, int, bytes]] = []
    for s in stores:
        for reader in s.chunk_readers().values():
            for c in range(s.chunks_per_view):
                key, offset, length = reader.locate(0, c)
                data = reader.fetch(key, offset, length)
                if data is None:
                    raise ValueError(f"{s.path}: no file for chunk {c} of view 0 of {reader.name}")
                held.append((reader, c, data))
    return held


def decode_bound(held: list[tuple[Any, int, bytes]], threads: int) -> float:
    """Seconds to check and decode ``held`` (:func:`compressed_chunks`) on ``threads`` threads, the bytes in
    memory, each thread decoding into one output buffer of its own (no allocation, no page faults)."""
    import threading

    import numcodecs.blosc

    local = threading.local()

    def decode(item: tuple[Any, int, bytes]) -> None:
        reader, _, data = item
        layout = reader.layout
        out = getattr(local, "out", {}).get(reader.name)
        if out is None:
            out = np.empty(layout.chunk_shape[1:], layout.dtype)
            local.out = {**getattr(local, "out", {}), reader.name: out}
        raw = np.frombuffer(data, np.uint8)
        if not intact(raw):
            raise ValueError("checksum")
        if layout.compressed:
            numcodecs.blosc.decompress(raw[:-4], out)
        else:
            out.reshape(-1).view(np.uint8)[:] = raw[:-4]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, held[:4 * threads]))  # threads started, their buffers made
        t0 = time.perf_counter()
        list(pool.map(decode, held))
        return time.perf_counter() - t0


def measure_one(paths: list[Path], candidate: str, threads: int, block: int) -> float:
    """Rows a second (of every store) of ``candidate`` at ``threads``, in this process."""
    n = TeacherStore.open(paths[0], "t0").n_samples
    if candidate == "bound":
        return n / decode_bound(compressed_chunks(paths), threads)
    make = {"zarr-chunks": read_zarr_chunks, "zarr": read_zarr, "tensorstore": read_tensorstore,
            "kdcache": read_kdcache,
            "zarrs": lambda p, t, b: read_zarr(p, t, b, "zarrs.ZarrsCodecPipeline")}[candidate]
    run = make(paths, threads, block)
    t0 = time.perf_counter()
    run()
    return n / (time.perf_counter() - t0)


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                              "setting": {k: getattr(args, k) for k in ("samples", "teachers", "rounds", "threads")},
                              "forms": {}}
    for form in args.forms:
        t0 = time.perf_counter()
        paths = build_stores(root, form, args.teachers, args.samples)
        for p in paths:  # into the page cache
            for f in p.rglob("*"):
                if f.is_file():
                    f.read_bytes()
        block = args.block_rows or max(TeacherStore.open(paths[0], "t0").chunk_rows, 1024)
        on_disk = sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file())
        print(f"{form}: {args.teachers} stores of {args.samples:,} rows ({on_disk / 2**20:,.0f} MiB on disk) ready in "
              f"{time.perf_counter() - t0:.0f} s; blocks of {block} rows", flush=True)
        rates: dict[str, dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for threads in args.threads:
                for cand in args.candidates:
                    rate = in_fresh_process(paths, cand, threads, block)
                    rates.setdefault(cand, {}).setdefault(str(threads), []).append(rate)
                    print(f"  round {r + 1} {cand:<12} {threads:>2} threads: {rate:>10,.0f} rows/s", flush=True)
        result["forms"][form] = {"block_rows": block, "bytes_on_disk": on_disk, "rows_s": rates}
    return result


def in_fresh_process(paths: list[Path], candidate: str, threads: int, block: int) -> float:
    done = subprocess.run([sys.executable, __file__, "--measure", candidate, "--threads", str(threads),
                           "--block-rows", str(block), "--paths", *map(str, paths)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {candidate} at {threads} threads failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return float("nan")
    return float(done.stdout.strip().splitlines()[-1])


def print_table(result: dict[str, Any]) -> None:
    for form, at in result["forms"].items():
        s = result["setting"]
        print(f"\n{form}: {s['teachers']} x resnet32x4-shaped stores of {s['samples']:,} rows, blocks of "
              f"{at['block_rows']} rows; rows/s of all {s['teachers']} teachers, median of {s['rounds']} rounds "
              f"(min-max), and against the decode bound at the same threads")
        threads = [str(t) for t in s["threads"]]
        print("| reader | " + " | ".join(f"{t} thread{'s' * (t != '1')}" for t in threads) + " | "
              + " | ".join(f"/ bound at {t}" for t in threads) + f" | {threads[-1]} / {threads[0]} threads |")
        print("|---|" + "---|" * (2 * len(threads) + 1))
        med = {c: {t: statistics.median(v) for t, v in per.items()} for c, per in at["rows_s"].items()}
        for cand, per in at["rows_s"].items():
            cells = [f"{med[cand][t]:,.0f} ({min(per[t]):,.0f}-{max(per[t]):,.0f})" for t in threads]
            ratios = [f"{med[cand][t] / med['bound'][t]:.2f}" if "bound" in med else "-" for t in threads]
            scale = med[cand][threads[-1]] / med[cand][threads[0]]
            print(f"| {cand} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {scale:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50_000, help="Rows of the view.")
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--forms", nargs="+", default=["spatial", "pooled"], choices=FORMS,
                    help="Stores: spatial maps, the same uncompressed (spatial-raw), pooled vectors.")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="Thread counts to measure.")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block-rows", type=int, default=None,
                    help="Rows a read unit (default: a chunk of the widest array, at least 1,024 rows).")
    ap.add_argument("--stores", type=Path, help="Keep the stores here (default: a temporary folder).")
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    ap.add_argument("--measure", choices=CANDIDATES, help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = sorted(set(args.threads))
    if args.measure:
        print(measure_one(args.paths, args.measure, args.threads[0], args.block_rows))
        return
    print(f"machine: {machine()}, {os.cpu_count()} cores", flush=True)
    if args.stores:
        args.stores.mkdir(parents=True, exist_ok=True)
        result = measure(args, args.stores)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(args, Path(tmp))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
