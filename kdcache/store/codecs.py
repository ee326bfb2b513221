"""How a store's arrays are encoded: compression, checksum and fill values (docs/STORE.md, "Codecs")."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr.codecs

from kdcache.store.int8 import INT8_FILL

# Light compression chosen by benchmarks/codec.py (RESULTS.md): Blosc zstd level 1
# with bit shuffle stores the fewest bytes per row at ~300 MB/s, far above any
# teacher's output rate. CRC32C comes last so it checksums the bytes as stored.
COMPRESSION: dict[str, Any] = {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}
# Spatial maps (post-ReLU, about half exact zeros) compress best without a shuffle:
# zstd then sees the zeros as runs of zero bytes. On a digits resnet8x4 teacher's
# maps 17.7 KB a row against 23.1 KB with bit shuffle (RESULTS.md, "Feature forms").
SPATIAL_COMPRESSION: dict[str, Any] = {"cname": "zstd", "clevel": 1, "shuffle": "noshuffle"}


def compressors(spatial: bool = False, compressed: bool = True) -> tuple[Any, ...]:
    """The bytes-to-bytes codec chain of an array: light compression (the spatial maps' own when
    ``spatial``; none unless ``compressed``), then a checksum."""
    checksum = zarr.codecs.Crc32cCodec()
    if not compressed:
        return (checksum,)
    return (zarr.codecs.BloscCodec(**(SPATIAL_COMPRESSION if spatial else COMPRESSION)), checksum)


def array_config() -> dict[str, Any]:
    """Write every chunk, even one that equals the fill value, so a chunk file exists
    for every written chunk and a missing file always means a missing write."""
    return {"write_empty_chunks": True}


def float_fill() -> float:
    """Fill value of the float arrays: an unwritten chunk reads as NaN, never as plausible zeros."""
    return float(np.nan)


def is_unwritten(block: np.ndarray) -> bool:
    """Whether a chunk read back holds the fill value of an unwritten (or deleted) chunk anywhere: NaN in the
    float arrays, -128 in int8 features, the largest value in a top-K store's class indices."""
    if block.dtype.kind == "f":
        return bool(np.isnan(block).any())
    if block.dtype == np.int8:
        return bool((block == INT8_FILL).any())
    if block.dtype.kind == "u":
        return bool((block == np.iinfo(block.dtype).max).any())
    return False
