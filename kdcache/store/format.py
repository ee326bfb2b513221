"""The on-disk format of plans and teacher stores, in one place.

Everything two pieces of code must agree on to read each other's stores lives
here: the format version, the directory names, the codecs, the content ids and
the chunk size. docs/STORE.md is the human-readable twin of this file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, cast

import numpy as np
import zarr.codecs

from kdcache.errors import StoreError, UnfinishedCreationError

FORMAT_VERSION = 1
PLANS_DIR = "plans"
TEACHERS_DIR = "teachers"
LOCKS_DIR = "locks"

# Chunks of teacher arrays hold about this many uncompressed bytes of the wider
# of logits and features (docs/STORE.md: about 1-4 MB a chunk).
TARGET_CHUNK_BYTES = 2 * 2**20
# A shard (Zarr v3 sharding) packs consecutive chunks of one view of an array into one file of about this many
# uncompressed bytes of the widest array: the file, and the unit a writer writes whole (never partially: one
# writer a shard, as zarr's partial shard writes race) and a re-run redoes. Chunks stay the unit of compression,
# checksum and reading, so readers keep their memory and shuffle; only the count of files falls, from thousands
# a view (hundreds of thousands for spatial maps) to tens (thousands). benchmarks/chunk_files.py measured the
# options (RESULTS.md, "Files a view").
TARGET_SHARD_BYTES = 128 * 2**20
# ... and at most this many rows (unless a chunk is larger), so that a killed precompute redoes at most a few
# seconds of a GPU's work and a cluster still splits a view of narrow rows (a top-K store without features)
# into tasks.
MAX_SHARD_ROWS = 2**16
# A chunk of a plan array holds at most this many rows: one view cut into chunks of this many rows
# when the training set is larger, else as many whole views as fit (a 100,000-view plan of a small
# data set is then a few dozen files, not 200,000).
MAX_PLAN_CHUNK_ROWS = 2**20


def plan_views_per_chunk(n_views: int, n_samples: int) -> int:
    """How many whole views one chunk of a plan array holds."""
    return max(1, min(n_views, MAX_PLAN_CHUNK_ROWS // max(1, n_samples)))

# Light compression chosen by benchmarks/codec.py (RESULTS.md): Blosc zstd level 1
# with bit shuffle stores the fewest bytes per row at ~300 MB/s, far above any
# teacher's output rate. CRC32C comes last so it checksums the bytes as stored.
COMPRESSION: dict[str, Any] = {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}
# Spatial maps (post-ReLU, about half exact zeros) compress best without a shuffle:
# zstd then sees the zeros as runs of zero bytes. On a digits resnet8x4 teacher's
# maps 17.7 KB a row against 23.1 KB with bit shuffle (RESULTS.md, "Feature forms").
SPATIAL_COMPRESSION: dict[str, Any] = {"cname": "zstd", "clevel": 1, "shuffle": "noshuffle"}

STORED_DTYPE = "float16"

# What a teacher store keeps besides its logits (docs/STORE.md, "A teacher store"):
# "pooled" the penultimate vector (V, N, D); "spatial" the last-block map its global
# pool receives (V, N, C', H, W), as the official CA-MKD code matches it; "none" nothing.
from kdcache.defaults import (AMP_DTYPES, DEFAULT_FEATURE_COMPRESSION, DEFAULT_FEATURE_DTYPE,  # noqa: E402,F401
                              DEFAULT_FEATURE_FORM, DEFAULT_LOGITS, FEATURE_COMPRESSIONS, FEATURE_DTYPES,
                              FEATURE_FORMS)

# How the teacher's forward pass ran (attribute ``forward``; docs/STORE.md): in float32 (the default, and every store
# written before the option existed), or under autocast in bfloat16 or float16 (``precompute --amp``). Part of the
# teacher id when not float32, so a store never mixes chunks of two precisions.
DEFAULT_FORWARD = "float32"
AMP_PREFIX = "amp-"
FORWARD_PRECISIONS = (DEFAULT_FORWARD, *(AMP_PREFIX + d for d in AMP_DTYPES))

# Top-K logits (docs/STORE.md, "Top-K logits"): per row the K largest logits (float16, largest first), their
# classes (the smallest unsigned type that holds 0..C, its largest value marking an unwritten chunk), and
# these float32 scalars, computed in float64 from the row's float16 logits: log-sum-exp at T = 1 and the
# label's logit (so CE = lse - label logit exactly), the entropy at T = 1, the log-sum-exp at the store's
# temperature T and the probability mass at T outside the K (stored, not 1 - sum, so a tiny mass keeps
# its digits).
TOPK_PREFIX = "topk:"
LOGIT_STATS = ("lse", "label_logit", "entropy", "lse_t", "rest_t")
TOPK_ARRAYS = ("topk_values", "topk_indices", "logit_stats")
SUMMARY_BLOCK_ROWS = 4096

# Fill value of int8 feature arrays: symmetric quantisation writes only -127..127, so an unwritten chunk
# reads as -128 everywhere and is told from a written one, as NaN tells the float arrays'.
INT8_FILL = -128


def feature_shape(form: str, dim: int, map_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """The per-row shape of a store's ``features`` array in ``form``: (D,), (C', H, W) or () for none."""
    if form == "pooled":
        return (int(dim),)
    if form == "spatial":
        return tuple(int(s) for s in map_shape)
    if form == "none":
        return ()
    raise StoreError(f"unknown feature form {form!r}; known: {', '.join(FEATURE_FORMS)}")


def parse_logits(form: str) -> int | None:
    """K of a ``topk:K`` logits form, None for ``dense``; ValueError saying what is wrong otherwise."""
    if form == DEFAULT_LOGITS:
        return None
    if form.startswith(TOPK_PREFIX):
        k = form[len(TOPK_PREFIX):]
        if k.isdigit() and int(k) >= 1:
            return int(k)
        raise ValueError(f"K of {form!r} must be a whole number of at least 1")
    raise ValueError(f"the logits form must be dense or topk:K (e.g. topk:5), got {form!r}")


def logits_form(k: int | None) -> str:
    """The name of a logits form: ``dense``, or ``topk:K``."""
    return DEFAULT_LOGITS if k is None else f"{TOPK_PREFIX}{int(k)}"


def index_dtype(num_classes: int) -> np.dtype:
    """The class-index dtype of a top-K store: the smallest unsigned type holding 0..C, so that its largest
    value (never a class) can mark an unwritten chunk."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if int(num_classes) <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise StoreError(f"{num_classes} classes are too many for a top-K store")


def logits_row_bytes(num_classes: int, topk: int | None = None, itemsize: int = 2) -> int:
    """Uncompressed bytes of one row's logits: C values, or K values, K indices and the float32 scalars."""
    if topk is None:
        return itemsize * int(num_classes)
    return topk * (itemsize + index_dtype(num_classes).itemsize) + 4 * len(LOGIT_STATS)


def feature_row_bytes(features: tuple[int, ...], feature_dtype: str = DEFAULT_FEATURE_DTYPE,
                      itemsize: int = 2) -> int:
    """Uncompressed bytes of one row's features: ``itemsize`` a value, or one byte a value and a float32 scale."""
    n_features = int(np.prod(features)) if features else 0
    if feature_dtype == "int8" and n_features:
        return n_features + 4
    return itemsize * n_features


def row_bytes(num_classes: int, features: tuple[int, ...], itemsize: int = 2,
              feature_dtype: str = DEFAULT_FEATURE_DTYPE, topk: int | None = None) -> int:
    """Uncompressed bytes of one stored row: its logits (dense, or top-K with its scalars) plus its features
    (none when ``features`` is ())."""
    return logits_row_bytes(num_classes, topk, itemsize) + feature_row_bytes(features, feature_dtype, itemsize)


def summarise_logits(logits: np.ndarray, labels: np.ndarray, k: int,
                     temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A top-K store's rows of float16 logits ``(R, C)``: the K largest (float16, largest first; ties by class),
    their classes, and the float32 scalars of :data:`LOGIT_STATS`, computed in float64 from the float16 values
    (what a dense store holds), so that a weight from them equals the dense store's. Done in blocks of
    SUMMARY_BLOCK_ROWS rows, so a shard of 2^16 rows of 1,000 classes needs tens of MB of float64, not GBs."""
    if len(logits) > SUMMARY_BLOCK_ROWS:
        parts = [summarise_logits(logits[i:i + SUMMARY_BLOCK_ROWS], labels[i:i + SUMMARY_BLOCK_ROWS], k, temperature)
                 for i in range(0, len(logits), SUMMARY_BLOCK_ROWS)]
        values, indices, stats = (np.concatenate(p) for p in zip(*parts))
        return values, indices, stats
    z16 = np.asarray(logits, dtype=np.float16)
    z = z16.astype(np.float64)
    order, chosen = _top_k(z, k)
    values = np.take_along_axis(z16, order, axis=1)
    top = z.max(1, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(1)
    lse = top[:, 0] + np.log(total)
    entropy = lse - (e * z).sum(1) / total
    label_logit = np.take_along_axis(z, np.asarray(labels, dtype=np.int64)[:, None], axis=1)[:, 0]
    e_t = np.exp((z - top) / float(temperature))
    total_t = e_t.sum(1)
    lse_t = top[:, 0] / float(temperature) + np.log(total_t)
    rest_t = np.where(chosen, 0.0, e_t).sum(1) / total_t    # summed outside the K, not 1 - (inside)
    stats = np.stack([lse, label_logit, entropy, lse_t, rest_t], axis=1).astype(np.float32)
    return values, order.astype(index_dtype(z.shape[1])), stats


def _top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The classes of each row's K largest values, largest first and equal values by class (what a stable
    descending sort gives, at a partition's cost), and the (R, C) mask of them."""
    kth = -np.partition(-z, k - 1, axis=1)[:, k - 1:k]       # each row's K-th largest value
    greater, equal = z > kth, z == kth
    need = k - greater.sum(1, keepdims=True)                  # how many of the values equal to it are in
    chosen = greater | (equal & (np.cumsum(equal, axis=1) <= need))
    classes = np.nonzero(chosen)[1].reshape(len(z), k)        # ascending class
    by_value = np.argsort(-np.take_along_axis(z, classes, axis=1), axis=1, kind="stable")
    return np.take_along_axis(classes, by_value, axis=1), chosen


def pack_topk(values: np.ndarray, indices: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """A top-K store's rows as one float32 array ``(R, 2K + 5)`` for the way to the device: values, classes
    (exact in float32 below 2^24), scalars. :class:`kdcache.topk.TopKLogits` unpacks it."""
    return np.concatenate([values.astype(np.float32), indices.astype(np.float32), stats.astype(np.float32)], axis=1)


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


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation with one scale a row: ``q = round(x / s)`` in -127..127, ``s = max|x| / 127``
    over the row (1 for a row of zeros), so that ``q·s`` is within ``s/2`` of every value of ``x``."""
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    absmax = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(len(flat), np.float32)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(np.shape(x)), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values of int8 rows ``q`` (R, ...) with their scales ``scale`` (R,)."""
    return (q.astype(np.float32).reshape(len(q), -1) * scale[:, None]).reshape(q.shape)


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


def content_id(payload: dict[str, Any]) -> str:
    """A short content hash of a JSON-able description: equal inputs, equal id."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan_id(fingerprint: str, recipe: dict[str, Any], n_views: int, seed: int) -> str:
    """Id of a view plan: the data set's content, the recipe, the number of views and the seed."""
    return content_id(
        {"format": FORMAT_VERSION, "kind": "plan", "dataset": fingerprint,
         "recipe": recipe, "n_views": n_views, "seed": seed}
    )


def teacher_id(plan: str, arch: str, checkpoint_sha256: str, dtype: str = STORED_DTYPE,
               features: str = "pooled", feature_dtype: str = DEFAULT_FEATURE_DTYPE,
               logits: str = DEFAULT_LOGITS, logits_temperature: float | None = None,
               forward: str = DEFAULT_FORWARD) -> str:
    """Id of a teacher store: the same teacher on the same plan in the same feature form, feature dtype,
    logits form (a top-K store's with its temperature) and forward precision is the same store.

    The pooled float16 form of a float32 forward hashes exactly what ids hashed before the forms existed, so
    stores written by earlier versions keep their ids.
    """
    payload = {"format": FORMAT_VERSION, "kind": "teacher", "plan_id": plan, "arch": arch,
               "checkpoint_sha256": checkpoint_sha256, "dtype": dtype}
    if features != "pooled":
        payload["features"] = features
    if feature_dtype != DEFAULT_FEATURE_DTYPE:
        payload["feature_dtype"] = feature_dtype
    if logits != DEFAULT_LOGITS:
        payload["logits"] = logits
        payload["logits_temperature"] = float(logits_temperature) if logits_temperature is not None else None
    if forward != DEFAULT_FORWARD:
        payload["forward"] = forward
    return content_id(payload)


def forward_precision(amp_dtype: str | None) -> str:
    """The ``forward`` attribute of a store whose teacher ran under autocast in ``amp_dtype`` (None: float32)."""
    return DEFAULT_FORWARD if amp_dtype is None else AMP_PREFIX + amp_dtype


def autocast_dtype(forward: str) -> str | None:
    """The autocast dtype (``bfloat16``, ``float16``) of a ``forward`` attribute; None for a float32 forward."""
    if forward == DEFAULT_FORWARD:
        return None
    if forward not in FORWARD_PRECISIONS:
        raise StoreError(f"unknown forward precision {forward!r}; known: {', '.join(FORWARD_PRECISIONS)}")
    return forward[len(AMP_PREFIX):]


def default_cache_dir() -> Path:
    """``$KDCACHE_HOME``, else ``~/.cache/kdcache``."""
    env = os.environ.get("KDCACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdcache"


def chunk_rows_for(n_samples: int, row_width: int, itemsize: int = 2) -> int:
    """Rows per chunk so that the widest teacher array's chunk holds about TARGET_CHUNK_BYTES."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, row_width * itemsize))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps chunk edges aligned across teachers
    return int(min(rows, n_samples))


def shard_rows_for(n_samples: int, chunk_rows: int, row_width: int, itemsize: int = 2) -> int:
    """Rows per shard: ``chunk_rows`` times a power of two so that the widest array's shard holds about
    TARGET_SHARD_BYTES and at most MAX_SHARD_ROWS rows, but never more chunks than a view has (a small view
    is one shard)."""
    per = max(1, min(TARGET_SHARD_BYTES // max(1, chunk_rows * row_width * itemsize), MAX_SHARD_ROWS // chunk_rows))
    per = 1 << (per.bit_length() - 1)
    return int(chunk_rows * min(per, n_chunks(n_samples, chunk_rows)))


def widest_row_bytes(num_classes: int, topk: int | None, features: tuple[int, ...]) -> int:
    """The bytes of a row of a store's widest array, which sizes its chunks: its logits' (dense or top-K) or its
    features' at float16 (whatever their dtype, so an int8 store keeps its float16 twin's layout)."""
    return max(logits_row_bytes(num_classes, topk), feature_row_bytes(features))


def default_layout(n_samples: int, widest: int) -> tuple[int, int]:
    """(rows a chunk, rows a shard) of a store whose widest array's row takes ``widest`` bytes: about 2 MB a
    chunk and 128 MB a shard (:func:`chunk_rows_for`, :func:`shard_rows_for`)."""
    rows = chunk_rows_for(n_samples, widest, itemsize=1)
    return rows, shard_rows_for(n_samples, rows, widest, itemsize=1)


def data_array_names(topk: int | None, features: bool, int8: bool) -> tuple[str, ...]:
    """The data arrays of a store: its logits' (``logits``, or a top-K store's three), then its features' (with
    their scales when int8)."""
    return ((TOPK_ARRAYS if topk is not None else ("logits",)) + (("features",) if features else ())
            + (("feature_scale",) if features and int8 else ()))


def files_per_view(n_samples: int, shard_rows: int, n_data_arrays: int) -> int:
    """Files one view of a teacher store comes to: a shard file of each data array and one file of
    completion markers a shard (one chunk a shard in stores without shards)."""
    return (n_data_arrays + 1) * n_chunks(n_samples, shard_rows)


def n_chunks(n_samples: int, chunk_rows: int) -> int:
    """How many chunks cover one view."""
    return -(-n_samples // chunk_rows)


def chunk_slice(c: int, chunk_rows: int, n_samples: int) -> slice:
    """The rows of chunk ``c`` of a view."""
    return slice(c * chunk_rows, min((c + 1) * chunk_rows, n_samples))


def create_group(where: Any, attrs: dict[str, Any]) -> zarr.Group:
    """Make the group of a new plan or store at ``where`` (a Location), replacing whatever is there, with
    ``attrs`` and the mark of a creation under way (see :func:`creation_unfinished`) in its first write."""
    return zarr.open_group(where.zarr_store(read_only=False), mode="w", zarr_format=3,
                           attributes={**attrs, "complete": False, "creating": True})


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a plan or store group. zarr types a group's member as ``Array | Group``;
    every name this package looks up in its groups is an array of the format."""
    return cast(zarr.Array, group[name])


def read(group: zarr.Group, name: str, selection: Any = ...) -> np.ndarray:
    """``group[name][selection]``: zarr types a read as an array-like or a scalar, but with its default
    (NumPy) buffers every read is a NumPy array, a 0-d one for a single element."""
    return cast(np.ndarray, array(group, name)[selection])


def finish_creation(group: zarr.Group) -> None:
    """Declare every array of a new plan or store created: from here on it is resumed, never made afresh."""
    group.attrs["creating"] = False


def creation_unfinished(attrs: dict[str, Any]) -> bool:
    """Whether a node's creation was cut short (a kill or a full disk between its group and its last
    array): its group says so, or has no attributes at all (how earlier versions began a creation)."""
    return not attrs or attrs.get("creating") is True


@contextlib.contextmanager
def disk_errors(what: str, where: Any, needs: str = "") -> Iterator[None]:
    """Turn a file-system failure inside the block into one StoreError line: what failed, where, why, and
    what to do (free space and run the same command again, which resumes or recreates what was cut short)."""
    try:
        yield
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno == errno.ENOSPC:
            remedy = f"free space there{f' ({needs})' if needs else ''} or pass another --cache"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            remedy = "make it writable or pass another --cache"
        else:
            remedy = "fix the disk"
        raise StoreError(f"{what} at {where} failed: {why}; {remedy}, then run the same command again "
                         "to finish it") from None


def check_format(attrs: dict[str, Any], kind: str, where: str) -> None:
    """Refuse a node that is not a kdcache ``kind`` of a format this version reads."""
    if creation_unfinished(attrs):
        raise UnfinishedCreationError(f"{where} was cut short while being created (nothing in it is usable yet); "
                         "run the same `kdcache precompute` again to create it")
    if attrs.get("kind") != kind:
        raise StoreError(f"{where} is not a kdcache {kind} store (kind={attrs.get('kind')!r})")
    version = attrs.get("format")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{where} has store format {version!r}; this kdcache ({_version()}) reads format "
            f"{FORMAT_VERSION}: upgrade kdcache or precompute the store again"
        )


def sha256_file(path: str | os.PathLike[str], block: int = 2**22) -> str:
    """The sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def float_fill() -> float:
    """Fill value of the float arrays: an unwritten chunk reads as NaN, never as plausible zeros."""
    return float(np.nan)


def _version() -> str:
    from kdcache import __version__

    return __version__
