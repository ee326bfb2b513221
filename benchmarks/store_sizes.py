"""Sizes of a teacher store at ImageNet-1k scale, before any work: bytes a row, a view and a store, and chunk files.

For a resnet50 teacher (1,000 classes; pooled features 2,048 values, its last-block map
2,048×7×7 at 224 px) over ImageNet-1k's 1,281,167 training images, for every store option
kdcache has: the feature form (none, pooled, spatial) and the feature dtype (float16, int8
with a float32 scale a row). Arithmetic from the store format itself (kdcache.store.format:
row_bytes, chunk_rows_for, n_chunks), so the table follows the format; no store is written.

    python benchmarks/store_sizes.py [--views 100]

prints the markdown table of docs/STORE.md, "Sizes at ImageNet scale".
"""

from __future__ import annotations

import argparse
import math

from kdcache.store.format import chunk_rows_for, n_chunks, row_bytes
from kdcache.text import human_bytes

N, C = 1_281_167, 1000
FEATURES = {"none": (), "pooled": (2048,), "spatial": (2048, 7, 7)}


def rows(views: int) -> list[str]:
    out = [f"| store option (resnet50, {N:,} rows a view) | bytes a row | a view | {views} views | rows a chunk | "
           "chunk files a view |", "|---|---|---|---|---|---|"]
    for form, fshape in FEATURES.items():
        for dtype in (("float16",) if form == "none" else ("float16", "int8")):
            b = row_bytes(C, fshape, feature_dtype=dtype)
            chunk = chunk_rows_for(N, max(C, math.prod(fshape) if fshape else 0))
            arrays = 1 + (1 if fshape else 0) + (1 if dtype == "int8" else 0) + 1   # + the completion markers
            out.append(f"| logits float16, features {form}{'' if form == 'none' else ' ' + dtype} | {b:,} B | "
                       f"{human_bytes(N * b)} | {human_bytes(views * N * b)} | {chunk} | "
                       f"{arrays * n_chunks(N, chunk):,} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=100)
    print("\n".join(rows(ap.parse_args().views)))


if __name__ == "__main__":
    main()
