"""Choosing the store's compression by measurement: ratio and speed of candidate codecs on real teacher outputs.

    python benchmarks/codec.py [--store TEACHER_ID --cache DIR]

Without --store it trains a small digits teacher for 15 epochs and runs it
over 16 views, so that logits and (post-ReLU) features look like real ones. Every
candidate is followed by CRC32C, as in the store; the numbers are bytes on disk
per row and compression/decompression speed through zarr itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs as zc

from common import machine
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher
from kdcache.store import Cache

CANDIDATES = {
    "none": [],
    "zstd-1 (plain)": [zc.ZstdCodec(level=1)],
    "blosc lz4-1 noshuffle": [zc.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")],
    "blosc lz4-1 shuffle": [zc.BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")],
    "blosc lz4-5 shuffle": [zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "blosc zstd-1 shuffle": [zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "blosc zstd-3 shuffle": [zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc zstd-1 bitshuffle": [zc.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")],
}


def measure(data: np.ndarray, chunk_rows: int, codecs: list, where: Path) -> tuple[int, float, float]:
    """(bytes on disk, write seconds, read seconds) of ``data`` (V, N, W) stored with ``codecs`` + CRC32C."""
    arr = zarr.create_array(where, shape=data.shape, chunks=(1, chunk_rows, data.shape[2]), dtype=data.dtype,
                            compressors=[*codecs, zc.Crc32cCodec()], overwrite=True)
    t0 = time.perf_counter()
    arr[...] = data
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = arr[...]
    t_read = time.perf_counter() - t0
    assert np.array_equal(back, data)
    size = sum(p.stat().st_size for p in where.rglob("*") if p.is_file() and p.name != "zarr.json")
    return size, t_write, t_read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="An existing teacher id to measure instead of a fresh digits teacher.")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--arch", default="resnet8x4")
    ap.add_argument("--epochs", type=int, default=15, help="Training epochs of the fresh digits teacher.")
    ap.add_argument("--views", type=int, default=16, help="Views of the fresh digits teacher's store.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Cache.at(args.cache or tmp / "cache")
        tid = args.store
        if tid is None:
            ckpt = tmp / "t.pth"
            train_teacher(TrainTeacherRequest(arch=args.arch, dataset="digits", out=ckpt, epochs=args.epochs,
                                              device="cpu"))
            tid = precompute(PrecomputeRequest(teacher=args.arch, checkpoint=ckpt, dataset="digits",
                                               cache=cache.root, views=args.views, device="cpu")).teacher_id
        store = cache.open_teacher(tid)
        rows = store.chunk_rows
        print(f"machine: {machine()}")
        print(f"store {store.id}: {store.attrs['arch']} on {store.attrs['dataset']}, "
              f"{store.n_views}x{store.n_samples} rows, C={store.num_classes}, D={store.feature_dim}, chunk rows {rows}")
        logits = store.group["logits"][...]
        feats = store.group["features"][...]
        raw_row = (logits.shape[2] + feats.shape[2]) * 2
        print(f"{'codec':<26} {'B/row':>8} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}")
        for name, codecs in CANDIDATES.items():
            sz_l, w_l, r_l = measure(logits, rows, codecs, tmp / "l")
            sz_f, w_f, r_f = measure(feats, rows, codecs, tmp / "f")
            n_rows = logits.shape[0] * logits.shape[1]
            per_row = (sz_l + sz_f) / n_rows
            mb = (logits.nbytes + feats.nbytes) / 1e6
            print(f"{name:<26} {per_row:8.1f} {raw_row / per_row:6.2f} {mb / (w_l + w_f):11.0f} {mb / (r_l + r_f):10.0f}")
        print(f"raw float16: {raw_row} B/row")


if __name__ == "__main__":
    main()
