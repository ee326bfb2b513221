"""How a store's rows are cut into chunks (the unit of compression, checksum and reading) and shards (the file, and
the unit of writing), chosen from its form and shapes; and how a plan's views are cut into chunks.

:meth:`Layout.choose` is the one place a layout is chosen: by :meth:`kdcache.store.TeacherStore.create`, by
precompute's dry run and by the size calculator (:mod:`kdcache.store.sizes`) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.store.form import StoreForm

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
# The most a chunk of the widest array may hold (rows times its row bytes, features counted at float16): a chunk is
# compressed as one Blosc buffer (at most 2^31 - 33 bytes) and decoded whole by readers, which hold several blocks
# of chunks at once; half of Blosc's limit, 512 times the default chunk, still leaves memory for those.
MAX_CHUNK_BYTES = 2**30


@dataclass(frozen=True)
class StoreShape:
    """The shapes a teacher store is made for: ``views`` views of ``samples`` rows, ``classes`` logits a row, the
    teacher's pooled feature of ``feature_dim`` values and, for spatial features, its last-block map's shape."""

    views: int
    samples: int
    classes: int
    feature_dim: int
    map_shape: tuple[int, ...] | None = None

    def feature_shape(self, form: StoreForm) -> tuple[int, ...]:
        """The per-row shape of the features array in ``form``."""
        if form.spatial and self.map_shape is None:
            raise ValueError("a store of spatial features needs the teacher's map shape")
        return form.feature_shape(self.feature_dim, self.map_shape or ())


class LayoutError(ValueError):
    """Shards that do not hold whole chunks; ``chunk_rows`` are the chunk rows they were to hold."""

    def __init__(self, message: str, chunk_rows: int) -> None:
        super().__init__(message)
        self.chunk_rows = chunk_rows


@dataclass(frozen=True)
class Layout:
    """Rows a chunk and rows a shard (a multiple of the chunk rows; equal: one chunk a file)."""

    chunk_rows: int
    shard_rows: int

    def __post_init__(self) -> None:
        if self.chunk_rows < 1 or self.shard_rows < self.chunk_rows or self.shard_rows % self.chunk_rows:
            raise ValueError(f"shards of {self.shard_rows} rows do not hold whole chunks of {self.chunk_rows} rows")

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @classmethod
    def choose(cls, form: StoreForm, shape: StoreShape, chunk_rows: int | None = None,
               shard_rows: int | None = None) -> "Layout":
        """The layout of a store of ``form`` and ``shape``: about 2 MB in the widest array's chunk and 128 MB in its
        shard (features counted at float16 whatever their dtype), unless the rows are given. ``chunk_rows`` alone
        gives one chunk a file (the layout before shards); ``shard_rows`` alone takes the default chunk rows (or
        fewer, if the shard is smaller). LayoutError, one line, for a shard that does not hold whole chunks."""
        n = shape.samples
        widest = form.widest_row_bytes(shape.classes, shape.feature_shape(form))
        rows = chunk_rows or chunk_rows_for(n, widest)
        if shard_rows is None:
            return cls(rows, rows if chunk_rows else shard_rows_for(n, rows, widest))
        if chunk_rows is None:
            rows = min(rows, shard_rows)
        if shard_rows % rows:
            raise LayoutError(f"shards of {shard_rows} rows must hold whole chunks of {rows} rows", rows)
        return cls(rows, min(shard_rows, rows * n_chunks(n, rows)))  # never more than a view's chunks

    def files_per_view(self, n_samples: int, n_data_arrays: int) -> int:
        """Files one view comes to: a shard file of each data array and one file of completion markers a shard."""
        return (n_data_arrays + 1) * n_chunks(n_samples, self.shard_rows)


def max_chunk_rows(form: StoreForm, shape: StoreShape) -> int:
    """The most rows a chunk of a store of ``form`` and ``shape`` may hold: MAX_CHUNK_BYTES of its widest array
    (at least one row, whatever its width)."""
    return max(1, MAX_CHUNK_BYTES // max(1, form.widest_row_bytes(shape.classes, shape.feature_shape(form))))


def chunk_rows_for(n_samples: int, row_bytes: int) -> int:
    """Rows per chunk so that the widest array's chunk, of ``row_bytes`` a row, holds about TARGET_CHUNK_BYTES."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, row_bytes))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps chunk edges aligned across teachers
    return int(min(rows, n_samples))


def shard_rows_for(n_samples: int, chunk_rows: int, row_bytes: int) -> int:
    """Rows per shard: ``chunk_rows`` times a power of two so that the widest array's shard holds about
    TARGET_SHARD_BYTES and at most MAX_SHARD_ROWS rows, but never more chunks than a view has (a small view
    is one shard)."""
    per = max(1, min(TARGET_SHARD_BYTES // max(1, chunk_rows * row_bytes), MAX_SHARD_ROWS // chunk_rows))
    per = 1 << (per.bit_length() - 1)
    return int(chunk_rows * min(per, n_chunks(n_samples, chunk_rows)))


def plan_views_per_chunk(n_views: int, n_samples: int) -> int:
    """How many whole views one chunk of a plan array holds."""
    return max(1, min(n_views, MAX_PLAN_CHUNK_ROWS // max(1, n_samples)))


def n_chunks(n_samples: int, chunk_rows: int) -> int:
    """How many chunks of ``chunk_rows`` rows cover one view."""
    return -(-n_samples // chunk_rows)


def chunk_slice(c: int, chunk_rows: int, n_samples: int) -> slice:
    """The rows of chunk ``c`` of a view."""
    return slice(c * chunk_rows, min((c + 1) * chunk_rows, n_samples))
