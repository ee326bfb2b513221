"""Choosing the store's compression by measurement: ratio and speed of candidate codecs on real teacher outputs.

    python benchmarks/codec.py                      # pooled stores: logits + penultimate vectors
    python benchmarks/codec.py --features spatial   # spatial stores: logits + last-block maps

Without --store it trains a small digits teacher for 15 epochs and runs it
over 16 views, so that logits and (post-ReLU) features look like real ones. Every
candidate is followed by CRC32C, as in the store; the numbers are bytes on disk
per row and compression/decompression speed through zarr itself, with the
store's own chunk rows.

With a spatial store it also weighs keeping the pooled vector beside the map
against deriving it on read: (a) the compressed bytes a pooled array (the mean
of each map over H, W, stored as the store stores it) would add to a row, against
the row itself; (b) the time to derive the pooled vectors of a chunk (float16
map upcast to float32, mean over H, W) against reading and decompressing that
map chunk from the store, and against reading a kept pooled chunk instead. A
freshly trained teacher is also precomputed in the pooled form on the same
plan, so the derived vector can be compared with the one the teacher computes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
import zarr
import zarr.codecs as zc
from zarr.abc.codec import BytesBytesCodec

from common import machine
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher
from kdcache.store import Cache, TeacherStore
from kdcache.store import format as fmt
from kdcache.store.codecs import COMPRESSION, SPATIAL_COMPRESSION
from kdcache.store.form import FeatureForm, StoreForm

CANDIDATES: dict[str, list[BytesBytesCodec]] = {
    "none": [],
    "zstd-1 (plain)": [zc.ZstdCodec(level=1)],
    "zstd-3 (plain)": [zc.ZstdCodec(level=3)],
    "blosc lz4-1 noshuffle": [zc.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")],
    "blosc lz4-1 shuffle": [zc.BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")],
    "blosc lz4-5 shuffle": [zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "blosc lz4-1 bitshuffle": [zc.BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")],
    "blosc zstd-1 noshuffle": [zc.BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")],
    "blosc zstd-1 shuffle": [zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "blosc zstd-3 shuffle": [zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc zstd-1 bitshuffle": [zc.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")],
    "blosc zstd-3 bitshuffle": [zc.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
}
CURRENT = f"blosc {COMPRESSION['cname']}-{COMPRESSION['clevel']} {COMPRESSION['shuffle']}"  # logits, pooled
CURRENT_SPATIAL = (f"blosc {SPATIAL_COMPRESSION['cname']}-{SPATIAL_COMPRESSION['clevel']} "
                   f"{SPATIAL_COMPRESSION['shuffle']}")  # spatial maps


def measure(data: np.ndarray, chunk_rows: int, codecs: list[BytesBytesCodec], where: Path) -> tuple[int, float, float]:
    """(bytes on disk, write seconds, read seconds) of ``data`` (V, N, ...) stored with ``codecs`` + CRC32C,
    in chunks of one view by ``chunk_rows`` rows, whole rows."""
    arr = zarr.create_array(where, shape=data.shape, chunks=(1, chunk_rows, *data.shape[2:]), dtype=data.dtype,
                            compressors=[*codecs, zc.Crc32cCodec()], overwrite=True)
    t0 = time.perf_counter()
    arr[...] = data
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = arr[...]
    t_read = time.perf_counter() - t0
    assert np.array_equal(back, data)
    return disk_bytes(where), t_write, t_read


def disk_bytes(where: Path) -> int:
    """Bytes of the chunk files of the zarr array at ``where`` (its metadata left out)."""
    return sum(p.stat().st_size for p in where.rglob("*") if p.is_file() and p.name != "zarr.json")


def fresh_teacher(args: argparse.Namespace, tmp: Path, cache: Cache) -> tuple[str, str | None]:
    """Train (or take ``--checkpoint``) a digits teacher and precompute it in ``--features``; for a spatial
    store also in the pooled form on the same plan. Returns (teacher id, pooled twin's id or None)."""
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = tmp / "t.pth"
        train_teacher(TrainTeacherRequest(arch=args.arch, dataset="digits", out=ckpt, epochs=args.epochs,
                                          device="cpu"))
    ids = {form: precompute(PrecomputeRequest(teacher=args.arch, checkpoint=ckpt, dataset="digits",
                                              cache=cache.root, views=args.views, device="cpu",
                                              form=StoreForm(features=form))).teacher_id
           for form in dict.fromkeys([args.features, "pooled"] if args.features == "spatial" else [args.features])}
    return ids[args.features], ids.get("pooled") if args.features == "spatial" else None


def compare_codecs(store: TeacherStore, tmp: Path) -> None:
    """Bytes per row, ratio and speeds of every candidate on the store's own logits and features."""
    rows = store.chunk_rows
    arrays = [fmt.read(store.group, name) for name in store.data_arrays]
    n_rows = store.n_views * store.n_samples
    raw_row = sum(a.nbytes for a in arrays) / n_rows
    mb = sum(a.nbytes for a in arrays) / 1e6
    if store.form.has_features:
        feats = arrays[1]
        print(f"features {store.form.features.value} {feats.shape[2:]}: {np.count_nonzero(feats == 0) / feats.size:.1%} "
              f"exact zeros; rows whose features are all zero: {np.mean(~feats.reshape(n_rows, -1).any(1)):.1%}")
    print(f"{'codec':<26} {'B/row':>9} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}")
    for name, codecs in CANDIDATES.items():
        size, t_write, t_read = 0, 0.0, 0.0
        for i, a in enumerate(arrays):
            s, w, r = measure(a, rows, codecs, tmp / f"a{i}")
            size, t_write, t_read = size + s, t_write + w, t_read + r
        per_row = size / n_rows
        current = CURRENT_SPATIAL if store.form.spatial else CURRENT
        mark = "  <- the store's codec for features" if name == current else ""
        print(f"{name:<26} {per_row:9.1f} {raw_row / per_row:6.2f} {mb / t_write:11.0f} {mb / t_read:10.0f}{mark}")
    print(f"raw float16: {raw_row:.0f} B/row; chunks of {rows} rows; as stored (each array its own codec): "
          f"{sum(disk_bytes(Path(store.path) / name) for name in store.data_arrays) / n_rows:.1f} B/row")


def keep_or_derive(store: TeacherStore, tmp: Path, pooled: TeacherStore | None) -> None:
    """Keep the pooled vector in a spatial store, or derive it from the map on read: bytes and time."""
    maps = fmt.array(store.group, "features")
    derived = [torch.from_numpy(cast(np.ndarray, maps[v, store.rows(c)])).float().mean((2, 3)).to(torch.float16).numpy()
               for v in range(store.n_views) for c in range(store.chunks_per_view)]
    kept = np.stack([np.concatenate(derived[v * store.chunks_per_view:(v + 1) * store.chunks_per_view])
                     for v in range(store.n_views)])
    n_rows = store.n_views * store.n_samples
    # (a) bytes: the store's row as written (logits + map, current codec) against a pooled array with the
    # store's codec and chunk rows.
    row = sum(disk_bytes(Path(store.path) / name) for name in store.data_arrays) / n_rows
    pooled_size, _, _ = measure(kept, store.chunk_rows, [zc.BloscCodec(**COMPRESSION)], tmp / "kept")
    extra = pooled_size / n_rows
    print(f"(a) a kept pooled array {kept.shape[2:]} adds {extra:.1f} B a row (compressed, {CURRENT}) to a "
          f"spatial row of {row:.1f} B: {extra / row:.2%} more")
    if pooled is not None:
        true = fmt.read(pooled.group, "features").astype(np.float32)
        diff = np.abs(kept.astype(np.float32) - true)
        ulp = np.abs(np.spacing(true.astype(np.float16))).astype(np.float32)
        print(f"    derived vs the teacher's own pooled vector (float16): max |diff| {diff.max():.3g}, "
              f"{np.mean(diff == 0):.1%} equal, {np.mean(diff <= ulp):.1%} within one float16 ulp")
    # (b) time, chunk by chunk as a reader meets them: read + decompress + CRC32C of a map chunk, deriving its
    # pooled vectors, and reading a kept pooled chunk instead.
    kept_arr = zarr.open_array(tmp / "kept", mode="r")
    t_map, t_derive, t_kept = [], [], []
    for v in range(store.n_views):
        for c in range(store.chunks_per_view):
            rows = store.rows(c)
            t0 = time.perf_counter()
            block = maps[v, rows]
            t1 = time.perf_counter()
            torch.from_numpy(cast(np.ndarray, block)).float().mean((2, 3))
            t2 = time.perf_counter()
            kept_arr[v, rows]
            t3 = time.perf_counter()
            t_map.append(t1 - t0)
            t_derive.append(t2 - t1)
            t_kept.append(t3 - t2)
    m_map, m_derive, m_kept = (statistics.median(t) * 1e3 for t in (t_map, t_derive, t_kept))
    print(f"(b) per chunk of {store.chunk_rows} rows (medians over {len(t_map)} chunks): read map {m_map:.2f} ms, "
          f"derive pooled {m_derive:.2f} ms ({m_derive / m_map:.1%} of the read), "
          f"read a kept pooled chunk {m_kept:.2f} ms ({m_kept / m_map:.1%}); totals {sum(t_map):.2f} s, "
          f"{sum(t_derive):.2f} s, {sum(t_kept):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="An existing teacher id to measure instead of a fresh digits teacher.")
    ap.add_argument("--cache", type=Path, default=None, help="The cache holding --store (default: a temporary one).")
    ap.add_argument("--arch", default="resnet8x4", help="Architecture of the fresh digits teacher.")
    ap.add_argument("--epochs", type=int, default=15, help="Training epochs of the fresh digits teacher.")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="A trained --arch digits checkpoint to precompute instead of training one.")
    ap.add_argument("--views", type=int, default=16, help="Views of the fresh digits teacher's store.")
    ap.add_argument("--features", choices=("pooled", "spatial", "none"), default="pooled",
                    help="Feature form of the fresh teacher's store (an existing --store has its own).")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = Cache.at(args.cache or tmp / "cache")
        tid, pooled_id = (args.store, None) if args.store else fresh_teacher(args, tmp, cache)
        store = cache.open_teacher(tid)
        print(f"machine: {machine()}")
        print(f"store {store.id}: {store.attrs['arch']} on {store.attrs['dataset']}, {store.form.features.value} features "
              f"{store.feature_shape}, {store.n_views}x{store.n_samples} rows, C={store.num_classes}, "
              f"chunk rows {store.chunk_rows}, test accuracy {store.attrs.get('test_accuracy', float('nan')):.1f}%")
        compare_codecs(store, tmp)
        if store.form.features is FeatureForm.SPATIAL:
            keep_or_derive(store, tmp, cache.open_teacher(pooled_id) if pooled_id else None)


if __name__ == "__main__":
    main()
