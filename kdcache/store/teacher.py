"""Teacher stores on disk: logits, features and the final classifier of one teacher on one plan.

Arrays (Zarr format 3, every chunk CRC32C-checked):

- ``logits`` (V, N, C), float16, chunks (1, R, C), rows in plan order; or, in a top-K store
  (attribute ``logits`` = ``topk:K``, with ``logits_temperature`` T), ``topk_values`` (V, N, K)
  float16, ``topk_indices`` (V, N, K) the smallest unsigned type holding 0..C (fill: its largest
  value), and ``logit_stats`` (V, N, 5) float32, the scalars of ``format.LOGIT_STATS``;
- ``features`` in the store's feature form (attribute ``features``): ``pooled`` (V, N, D), the
  penultimate vector; ``spatial`` (V, N, C', H, W), the last-block map the teacher's global
  pool receives (the official CA-MKD ``feat[-2]``); ``none``: no features array. float16,
  chunks (1, R, ·) with R chosen from the wider of a logits row and a features row. With the
  attribute ``feature_dtype`` int8 the features are int8 (fill -128) and ``feature_scale``
  (V, N) float32, chunks (1, R), holds each row's scale: a row is ``features · scale``;
- attribute ``forward``: how the teacher ran, ``float32`` (the default; stores without the attribute), or
  ``amp-bfloat16`` / ``amp-float16`` under autocast (``precompute --amp``); every chunk of a store ran alike;
- ``head/weight`` (C, D) and ``head/bias`` (C,), float32;
- ``done`` (V, n_chunks) int32, one chunk a shard: the completion markers of the chunks
  (v, c), written after the shard's data are in place. Each holds the number of rows
  the teacher classified correctly there (-1: not written), which gives the
  accuracy over the views without reading the logits back.

Shards (attribute ``shard_rows``, a multiple of ``chunk_rows``): every data array is
sharded (1, S, ·), so a file holds S/R chunks of one view, and ``done`` is chunked
(1, S/R). A shard is the unit of writing: one writer writes all of it, its files
made afresh (:meth:`TeacherStore.write_shard`), then its markers in one file, so a
shard is whole or unmarked and a re-run redoes whole shards. Stores without the
attribute (written before shards) have one chunk a file: S = R.
"""

from __future__ import annotations

import datetime as _dt
import weakref
from concurrent.futures import Executor, Future
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from kdcache import __version__
from kdcache.errors import StoreError
from kdcache.inline import INLINE
from kdcache.store import codecs
from kdcache.store import format as fmt
from kdcache.store.chunks import ArrayChunks, ChunkError, failed
from kdcache.store.form import LOGIT_STATS, TOPK_ARRAYS, FeatureCompression, Forward, StoreForm
from kdcache.store.int8 import INT8_FILL, dequantize_rows, quantize_rows
from kdcache.store.layout import Layout, StoreShape, chunk_slice, n_chunks
from kdcache.store.location import Location, Where
from kdcache.store.lock import ReaderLock
from kdcache.store.sizes import store_size
from kdcache.text import human_bytes
from kdcache.topk import index_dtype, pack_topk, summarise_logits



# The problem :meth:`TeacherStore.verify` reports for chunks an unfinished store has not written yet.
UNFINISHED = "unfinished: "


class TeacherStore:
    """One teacher's outputs over one plan. Open with :meth:`open` to read, :meth:`open_for_writing` to fill."""

    def __init__(self, group: zarr.Group, location: Where, teacher_id: str) -> None:
        self.group = group
        self.location = Location.of(location)
        self.id = teacher_id
        # The read path's memo (:meth:`read_chunk`): opening an array re-reads and parses its metadata, and a
        # complete store's markers no longer change, so each array is opened once and a view's markers read once.
        self._arrays: dict[str, zarr.Array[Any]] = {}
        self._view_markers: tuple[int, np.ndarray] | None = None
        self._chunk_readers: dict[str, ArrayChunks] | None = None
        self._reading_view: int | None = None
        self._release: weakref.finalize[Any, Any] | None = None  # the reader lock held (Cache.open_for_reading)

    def hold(self, lock: ReaderLock) -> None:
        """Keep ``lock`` (shared, on this store) until :meth:`close`, or until the store is garbage collected:
        while it is held the store cannot be removed."""
        self.close()
        self._release = weakref.finalize(self, lock.release)

    def close(self) -> None:
        """Let go of the reader lock, if held: the store may be removed from now on."""
        if self._release is not None:
            self._release()
            self._release = None

    def vanished(self) -> StoreError | None:
        """The error of a store removed while it was being read (its zarr.json gone); None while it is there."""
        try:
            if self.location.exists("zarr.json"):
                return None
        except OSError:
            pass
        return StoreError(f"teacher store {self.id} was removed from {self.path} while being read; precompute it "
                          "again (the same `kdcache precompute`) and run this again")

    @property
    def path(self) -> Path | str:
        """The store's folder: a Path when local, its URL otherwise."""
        return self.location.given

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Where, teacher_id: str, require_complete: bool = True,
             writable: bool = False) -> "TeacherStore":
        """Open read-only (``writable``: to fill chunks of an existing store); refuse a store that is
        missing, of another format or (by default) unfinished."""
        where = Location.of(path)
        group = _open_group(where, teacher_id, writable)
        store = cls(group, where, teacher_id)
        fmt.check_format(store.attrs, "teacher", f"teacher store {teacher_id}", removal(teacher_id))
        if require_complete and not store.attrs.get("complete"):
            raise StoreError(f"teacher store {teacher_id} is incomplete ({store._progress()}); "
                             "run the same `kdcache precompute` again to finish it")
        return store

    def _progress(self) -> str:
        """'k of n chunks', or 'being created' while a writer has made the group but not yet all its arrays."""
        try:
            return f"{self.done_count()} of {self.total_chunks} chunks"
        except (KeyError, FileNotFoundError, ValueError):
            return "being created"

    @classmethod
    def create(cls, path: Where, teacher_id: str, form: StoreForm, shape: StoreShape, teacher: dict[str, Any],
               head_weight: torch.Tensor, head_bias: torch.Tensor,
               compression: FeatureCompression = FeatureCompression.ZSTD, chunk_rows: int | None = None,
               shard_rows: int | None = None) -> "TeacherStore":
        """Create the store of ``form`` and ``shape`` in the layout it chooses (:meth:`Layout.choose`, with the
        rows given, if any), or reopen an unfinished one to resume it. The caller holds the writer lock.

        ``teacher`` describes the teacher (``plan_id``, ``arch``, ``checkpoint`` {path, sha256}, ``dataset``, and
        whatever else it records). A store being resumed keeps its own chunks and shards. An existing store whose
        teacher, shape or form disagree with these is not this teacher's and is refused rather than overwritten.
        """
        where = Location.of(path)
        local = where.local_path
        if local is not None and (local.is_symlink() or local.exists()) and not local.is_dir():
            kind = "a symbolic link that leads nowhere (or loops)" if local.is_symlink() else "a file, not a folder"
            raise StoreError(f"teacher store {teacher_id} at {where} is {kind}; {removal(teacher_id)}")
        _remove_partial_files(where)
        if form.forward is Forward.AMP:
            raise ValueError("a store records a resolved forward precision: StoreForm.on(device type) first")
        wanted = {**teacher, "num_classes": shape.classes, "feature_dim": shape.feature_dim}
        if where.exists("zarr.json") and not fmt.creation_unfinished(dict(_open_group(where, teacher_id).attrs)):
            store = cls.open(where, teacher_id, require_complete=False)
            have, want = ({**{k: _identity(a, k) for k in _IDENTITY}, **f.to_attrs()}
                          for a, f in ((store.attrs, store.form), (wanted, form)))
            for key in [*have, *(k for k in want if k not in have)]:
                if have.get(key) != want.get(key):
                    store._refuse_other(key, have.get(key), want.get(key))
            return cls.open(where, teacher_id, require_complete=False, writable=True)
        # A new store, or one whose creation was interrupted (no chunk of it was written yet): made afresh.
        if form.topk is not None and form.topk > shape.classes:
            raise StoreError(f"teacher store {teacher_id}: {form.logits} of {shape.classes} classes is not a valid store")
        fshape = shape.feature_shape(form)
        try:
            layout = Layout.choose(form, shape, chunk_rows, shard_rows)
        except ValueError as exc:
            raise StoreError(f"teacher store {teacher_id}: {exc}") from None
        n_views, n_samples, n_classes, dim = shape.views, shape.samples, shape.classes, shape.feature_dim
        size = store_size(form, shape, layout).store_bytes
        with fmt.disk_errors(f"creating teacher store {teacher_id}", where,
                             f"the store needs about {human_bytes(size)} before compression"):
            group = fmt.create_group(where, {
                **wanted, "format": fmt.FORMAT_VERSION, "kind": "teacher", "dtype": fmt.STORED_DTYPE,
                **form.to_attrs(), "feature_shape": list(fshape), "feature_compression": compression.value,
                "chunk_rows": layout.chunk_rows, "shard_rows": layout.shard_rows,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "kdcache_version": __version__, "torch_version": torch.__version__,
            })
            common: dict[str, Any] = {"compressors": codecs.compressors(), "config": codecs.array_config()}

            def chunked(*row: int) -> dict[str, Any]:  # chunks of one view's rows, in shards when they are larger
                sharded = layout.chunks_per_shard > 1
                return {"chunks": (1, layout.chunk_rows, *row),
                        **({"shards": (1, layout.shard_rows, *row)} if sharded else {})}

            if form.topk is not None:
                index = index_dtype(n_classes)
                for name, width, dtype, fill in (("topk_values", form.topk, fmt.STORED_DTYPE, codecs.float_fill()),
                                                 ("topk_indices", form.topk, index, np.iinfo(index).max),
                                                 ("logit_stats", len(LOGIT_STATS), "float32", codecs.float_fill())):
                    group.create_array(name, shape=(n_views, n_samples, width), **chunked(width),
                                       dtype=dtype, fill_value=fill, **common)
            else:
                group.create_array("logits", shape=(n_views, n_samples, n_classes), **chunked(n_classes),
                                   dtype=fmt.STORED_DTYPE, fill_value=codecs.float_fill(), **common)
            if form.has_features:
                compressors = codecs.compressors(spatial=len(fshape) > 1,
                                                 compressed=compression is FeatureCompression.ZSTD)
                group.create_array("features", shape=(n_views, n_samples, *fshape), **chunked(*fshape),
                                   dtype="int8" if form.int8 else fmt.STORED_DTYPE,
                                   fill_value=INT8_FILL if form.int8 else codecs.float_fill(),
                                   **{**common, "compressors": compressors})
            if form.int8:
                group.create_array("feature_scale", shape=(n_views, n_samples), **chunked(),
                                   dtype="float32", fill_value=codecs.float_fill(), **common)
            group.create_array("done", shape=(n_views, n_chunks(n_samples, layout.chunk_rows)),
                               chunks=(1, layout.chunks_per_shard), dtype="int32", fill_value=-1, **common)
            head = group.create_group("head")
            head.create_array("weight", shape=(n_classes, dim), chunks=(n_classes, dim), dtype="float32",
                              fill_value=codecs.float_fill(), **common)[...] = head_weight.detach().cpu().float().numpy()
            head.create_array("bias", shape=(n_classes,), chunks=(n_classes,), dtype="float32",
                              fill_value=codecs.float_fill(), **common)[...] = head_bias.detach().cpu().float().numpy()
            fmt.finish_creation(group)
        return cls(group, where, teacher_id)

    def _refuse_other(self, what: str, have: Any, want: Any) -> None:
        raise StoreError(
            f"teacher store {self.id} at {self.location} holds {what}={have!r}, expected {want!r}, though "
            f"its id says otherwise (its attributes were changed); remove it with "
            f"`kdcache cache rm {self.id}` and precompute it again"
        )

    # -- shape ------------------------------------------------------------------------------

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """The store's attributes as of opening."""
        return dict(self.group.attrs)

    @property
    def plan_id(self) -> str:
        return str(self.attrs["plan_id"])

    @cached_property
    def n_views(self) -> int:
        return int(self._array(self.data_arrays[0]).shape[0])

    @cached_property
    def n_samples(self) -> int:
        return int(self._array(self.data_arrays[0]).shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @cached_property
    def form(self) -> StoreForm:
        """What the store's rows hold and how its teacher ran (:meth:`StoreForm.from_attrs`: stores written before an
        option existed hold its default). An attribute no form can have is a StoreError naming the store."""
        try:
            return StoreForm.from_attrs(self.attrs)
        except ValueError as exc:
            raise StoreError(f"teacher store {self.id}: {exc}; its attributes were changed: remove it with "
                             f"`kdcache cache rm {self.id}` and precompute it again") from None

    @property
    def feature_compression(self) -> FeatureCompression:
        """How the features array is compressed before its checksum (zstd in stores written before the option)."""
        return FeatureCompression(self.attrs.get("feature_compression", FeatureCompression.ZSTD.value))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Per-row shape of the features: (D,) pooled, (C', H, W) spatial, () none."""
        return tuple(int(s) for s in self.attrs.get("feature_shape", [self.feature_dim]))

    @property
    def data_arrays(self) -> tuple[str, ...]:
        """Every array of one stored row: its logits' and its features'."""
        return self.form.data_arrays()

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def chunks_per_view(self) -> int:
        return n_chunks(self.n_samples, self.chunk_rows)

    @property
    def total_chunks(self) -> int:
        return self.n_views * self.chunks_per_view

    @property
    def shard_rows(self) -> int:
        """Rows of a shard, the file and the unit of writing (``chunk_rows`` in stores written before shards)."""
        return int(self.attrs.get("shard_rows", self.chunk_rows))

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def shards_per_view(self) -> int:
        return n_chunks(self.n_samples, self.shard_rows)

    def shard_of(self, c: int) -> int:
        """The shard holding chunk ``c`` of a view."""
        return c // self.chunks_per_shard

    def shard_chunks(self, s: int) -> range:
        """The chunks of shard ``s`` of a view."""
        return range(s * self.chunks_per_shard, min((s + 1) * self.chunks_per_shard, self.chunks_per_view))

    def shard_rows_of(self, s: int) -> slice:
        """The rows of shard ``s`` within a view."""
        return chunk_slice(s, self.shard_rows, self.n_samples)

    def rows(self, c: int) -> slice:
        """The rows of chunk ``c`` within a view."""
        return chunk_slice(c, self.chunk_rows, self.n_samples)

    def rows_in(self, chunks: Iterable[int]) -> int:
        """How many rows the chunks ``chunks`` (of one view each) hold together."""
        return sum(self.rows(c).stop - self.rows(c).start for c in chunks)

    # -- completion markers -----------------------------------------------------------------

    def markers(self) -> np.ndarray:
        """(V, n_chunks) int32: correct-prediction count of each written chunk, -1 where not written."""
        return fmt.read(self.group, "done")

    def done_count(self) -> int:
        return int((self.markers() >= 0).sum())

    def pending(self, view: int | None = None) -> list[tuple[int, int]]:
        """Chunks (view, chunk) still to write, in plan order (of one ``view`` if given).

        A marker that fails its checksum (a write torn by a crash, possible where the
        backend does not rename files into place) counts as not written: its chunk is written again.
        """
        views = range(self.n_views) if view is None else [view]
        out = []
        for v in views:
            try:
                row = fmt.read(self.group, "done", v)
            except ValueError:  # the CRC32C codec's checksum mismatch: read marker by marker
                row = np.array([self._marker_or_missing(v, c) for c in range(self.chunks_per_view)])
            out += [(v, int(c)) for c in np.nonzero(row < 0)[0]]
        return out

    def pending_shards(self, view: int | None = None) -> list[tuple[int, int]]:
        """Shards (view, shard) holding a chunk still to write, in plan order: the units a writer writes."""
        return sorted({(v, self.shard_of(c)) for v, c in self.pending(view)})

    def _marker_or_missing(self, v: int, c: int) -> int:
        try:
            return int(fmt.read(self.group, "done", (v, c)))
        except ValueError:
            return -1

    def view_accuracy(self) -> float:
        """Top-1 accuracy of the teacher over every stored row, from the markers."""
        markers = self.markers()
        if (markers < 0).any():
            raise StoreError(f"teacher store {self.id} is incomplete")
        return float(markers.sum()) / (self.n_views * self.n_samples)

    # -- writing ----------------------------------------------------------------------------

    def write_chunk(self, v: int, c: int, logits: np.ndarray, features: np.ndarray | None, n_correct: int,
                    labels: np.ndarray | None = None) -> None:
        """Write chunk (v, c) and its marker (:meth:`write_shard`) in a store of one chunk a file; a store with
        shards is written a whole shard at a time, so there this is a ValueError."""
        if self.chunks_per_shard != 1:
            raise ValueError(f"teacher store {self.id} holds {self.chunks_per_shard} chunks a shard and is written "
                             "whole shards at a time: use write_shard")
        self.write_shard(v, c, logits, features, [n_correct], labels)

    def write_shard(self, v: int, s: int, logits: np.ndarray, features: np.ndarray | None,
                    n_correct: Sequence[int], labels: np.ndarray | None = None, pool: Executor = INLINE) -> None:
        """Write shard (v, s) of the data arrays, all its rows (``features`` None in the form none), then the
        completion markers of its chunks (``n_correct``: the rows classified correctly in each), in one file.

        ``logits`` are the rows' float16 logits, all C of them; a top-K store keeps their summary
        (:func:`kdcache.topk.summarise_logits`), for which it needs the rows' ``labels``. In a store with shards
        the shard's files are first removed (unmarked, so nothing in them counts), so that zarr makes each
        afresh instead of reading one back a killed or failed write may have left. A write the file system
        refuses (disk full, I/O error) is a StoreError naming the chunks; the markers are then not written,
        so re-running the same precompute redoes the shard. The chunks are compressed as tasks on ``pool``
        (:meth:`kdcache.store.chunks.ArrayChunks.write`; default: in turn, on this thread).
        """
        chunks = self.shard_chunks(s)
        if len(n_correct) != len(chunks):
            raise ValueError(f"shard {s} holds {len(chunks)} chunks, got {len(n_correct)} counts")
        name = "logits"
        form = self.form
        k = form.topk
        if k is not None and labels is None:
            raise ValueError(f"teacher store {self.id} keeps top-{k} logits: write_shard needs the rows' labels")
        try:
            if self.chunks_per_shard > 1:
                name = "files"
                self._remove_shard_files(v, s)
                name = "logits"
            if k is None:
                self._write(v, s, "logits", logits, pool)
            else:
                summary = summarise_logits(logits, np.asarray(labels), k, float(form.temperature or 0.0))
                for name, block in zip(TOPK_ARRAYS, summary):
                    self._write(v, s, name, block, pool)
            if features is not None:
                name = "features"
                if form.int8:
                    features, scale = quantize_rows(features)
                    self._write(v, s, "features", features, pool)
                    name = "feature scales"
                    self._write(v, s, "feature_scale", scale, pool)
                else:
                    self._write(v, s, "features", features, pool)
            name = "completion marker" if len(chunks) == 1 else "completion markers"
            fmt.array(self.group, "done")[v, chunks.start:chunks.stop] = np.asarray(n_correct, dtype=np.int32)
        except OSError as exc:
            raise StoreError(
                f"teacher store {self.id} at {self.path}: writing the {name} of {self._unit(v, s)} failed: "
                f"{exc.strerror or exc}; make room (or fix the disk) and run the same `kdcache precompute` again "
                f"to resume from that {'chunk' if len(chunks) == 1 else 'shard'}"
            ) from None

    def _write(self, v: int, s: int, name: str, block: np.ndarray, pool: Executor) -> None:
        """Shard (v, s) of data array ``name`` from its rows ``block``: by this package's writer where it knows the
        array's layout, else through zarr."""
        chunks = self.chunk_readers()[name]
        if chunks.writable():
            chunks.write(v, s, block, pool)
        else:
            fmt.array(self.group, name)[v, self.shard_rows_of(s)] = block

    def _unit(self, v: int, s: int) -> str:
        """How errors name shard (v, s): as its chunk in a store of one chunk a file."""
        chunks = self.shard_chunks(s)
        if len(chunks) == 1:
            return f"chunk (view {v}, chunk {chunks.start})"
        return f"shard {s} of view {v} (chunks {chunks.start}-{chunks.stop - 1})"

    def shard_key(self, name: str, v: int, c: int) -> str:
        """The key (path below the store) of the file holding chunk (v, c) of array ``name``."""
        return f"{name}/{self.chunk_readers()[name].file_key(v, self.shard_of(c))}"

    def _remove_shard_files(self, v: int, s: int) -> None:
        """Delete shard (v, s)'s data files and its markers' file, whatever a cut-short write left there."""
        c = self.shard_chunks(s).start
        keys = [self.shard_key(name, v, c) for name in self.data_arrays] + [f"done/c/{v}/{s}"]
        for key in keys:
            sync((self.group.store_path / key).delete())

    def mark_complete(self, **extra: Any) -> None:
        """Record final attributes and declare the store complete (the last write)."""
        if self.done_count() != self.total_chunks:
            raise StoreError(f"teacher store {self.id} still has unwritten chunks")
        with fmt.disk_errors(f"completing teacher store {self.id}", self.location):
            self.group.attrs.update(extra)
            self.group.attrs["complete"] = True

    # -- reading ----------------------------------------------------------------------------

    def read_chunk(self, v: int, c: int, within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (R, C) and features (R, *feature_shape), float16 (int8 features: float32, scaled back), of
        chunk (v, c) (features None in the form none); a damaged chunk is a StoreError. A top-K store's
        logits come packed, float32 (R, 2K + 5) (:func:`format.pack_topk`; :class:`kdcache.topk.TopKLogits`).

        ``within``, if given, keeps only those row positions inside the chunk (in that
        order): the chunk is still decompressed and checked whole, but nothing else is kept.
        """
        rows = self.rows(c)
        if within is None:
            return self.read_rows(v, rows.start, rows.stop)
        return self.read_selected(v, rows.start + np.asarray(within))

    def read_selected(self, v: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and features of the rows ``rows`` of view ``v``, in the order given.

        For a rank that needs only its slice of each batch: chunks holding none of
        ``rows`` are not read, and of the others only the wanted rows are kept.
        """
        return self.submit_selected(v, rows).result()

    def read_rows(self, v: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and features of rows [start, stop) of view ``v``, read chunk by chunk (so errors name the chunk).

        Teachers of different widths have different chunk sizes; a reader walks
        all of them in blocks of the largest and reads whatever chunks each block covers.
        """
        return self.submit_rows(v, start, stop).result()

    def submit_rows(self, v: int, start: int, stop: int, pool: Executor = INLINE) -> "PendingRows":
        """Start reading rows [start, stop) of view ``v``: every chunk of every data array they cover is one task
        on ``pool`` (default: done now, on this thread); :meth:`PendingRows.result` gives what
        :meth:`read_rows` does."""
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        offset = first * self.chunk_rows
        return self._submit(v, list(range(first, last + 1)), None, slice(start - offset, stop - offset), pool)

    def submit_selected(self, v: int, rows: np.ndarray, pool: Executor = INLINE) -> "PendingRows":
        """Start reading the rows ``rows`` of view ``v``, in that order, as :meth:`submit_rows` does: only the
        chunks holding one of them are read, and each chunk's task puts its rows in their places."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._submit(v, [int(c) for c in np.unique(rows // self.chunk_rows)], rows, None, pool)

    def _submit(self, v: int, chunks: list[int], want: np.ndarray | None, keep: slice | None,
                pool: Executor) -> "PendingRows":
        """Chunks ``chunks`` of view ``v`` of every data array, a task each on ``pool``, into one array per data
        array: the chunks' rows one after another (``want`` None; ``keep`` then slices them), or the rows
        ``want`` in that order."""
        if self._reading_view != v:  # the kept shard indexes are a view's; a reader moves on view by view
            for reader in self.chunk_readers().values():
                reader.forget()
            self._reading_view = v
        r = self.chunk_rows
        sizes = [min(r, self.n_samples - c * r) for c in chunks]
        rows = sum(sizes) if want is None else len(want)
        blocks = {name: np.empty((rows, *self._row_shape(name)), dtype=self._array(name).dtype)
                  for name in self.data_arrays}
        picks: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(chunks)
        if want is not None:  # each chunk's rows of ``want``: where they go, and where they are in the chunk
            order = np.argsort(want // r, kind="stable")
            bounds = np.searchsorted(want[order] // r, np.asarray(chunks + [chunks[-1] + 1]) if chunks else [0])
            picks = [(order[a:b], want[order[a:b]] - c * r) for c, a, b in zip(chunks, bounds[:-1], bounds[1:])]
        tasks: list[Future[None]] = []  # in chunk order, so the first failure named is the first chunk's
        start = 0
        for c, size, pick in zip(chunks, sizes, picks):
            if not self._marked(v, c):  # deleted after the store was completed: the chunk cannot be trusted
                tasks.append(failed(self.vanished() or StoreError(
                    f"teacher store {self.id}: completion marker of (view {v}, chunk {c}) is missing; run "
                    f"`kdcache cache verify {self.id}`")))
            else:
                for name, reader in self.chunk_readers().items():
                    out = blocks[name] if pick is not None else blocks[name][start:start + size]
                    tasks.append(self._read_task(reader, v, c, out, pick, pool))
            start += size
        return PendingRows(self, blocks, tasks, keep)

    @staticmethod
    def _read_task(reader: ArrayChunks, v: int, c: int, out: np.ndarray, pick: tuple[np.ndarray, np.ndarray] | None,
                   pool: Executor) -> Future[None]:
        """Chunk (v, c) of ``reader``'s array into ``out``, a task on ``pool``; its shard's index is read here."""
        try:
            where = None if reader.layout is None else reader.locate(v, c)
        except ChunkError as exc:
            return failed(exc)
        return pool.submit(reader.read, v, c, out, pick, where)

    def chunk_readers(self) -> dict[str, ArrayChunks]:
        """The data arrays' chunk readers, made once."""
        if self._chunk_readers is None:
            local = self.location.local_path
            self._chunk_readers = {name: ArrayChunks(self._array(name), name, None if local is None else local / name)
                                   for name in self.data_arrays}
        return self._chunk_readers

    def _array(self, name: str) -> zarr.Array[Any]:
        """The data array ``name``, opened once."""
        if name not in self._arrays:
            try:
                self._arrays[name] = fmt.array(self.group, name)
            except (KeyError, FileNotFoundError, NotADirectoryError):
                raise self.vanished() or StoreError(
                    f"teacher store {self.id} has no {name} array; run `kdcache cache verify {self.id}`") from None
        return self._arrays[name]

    def _marked(self, v: int, c: int) -> bool:
        """Whether chunk (v, c) has its completion marker. A complete store's markers of view ``v`` are read in
        one go and kept while it reads that view; a damaged marker (its checksum) is a StoreError naming it."""
        if self._view_markers is not None and self._view_markers[0] == v:
            return int(self._view_markers[1][c]) >= 0
        if self.group.attrs.get("complete"):
            try:
                row = np.asarray(fmt.read(self.group, "done", v))
            except ValueError:  # a damaged marker somewhere in the view: read this chunk's alone, which names it
                pass
            except (KeyError, OSError):  # its markers' array gone: the store removed under the reader?
                raise self.vanished() or StoreError(f"teacher store {self.id} has no completion markers (done); "
                                                    f"{removal(self.id)}") from None
            else:
                self._view_markers = (v, row)
                return int(row[c]) >= 0
        try:
            return int(fmt.read(self.group, "done", (v, c))) >= 0
        except (KeyError, OSError):
            raise self.vanished() or StoreError(f"teacher store {self.id} has no completion markers (done); "
                                                f"{removal(self.id)}") from None
        except ValueError as exc:  # the marker's own checksum
            raise StoreError(f"teacher store {self.id}: completion marker of (view {v}, chunk {c}) is damaged ({exc}); "
                             f"run `kdcache cache verify {self.id}`") from None

    def _row_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._array(name).shape[2:])

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's final linear layer: weight (C, D) and bias (C,), float32."""
        try:
            weight, bias = fmt.read(self.group, "head/weight"), fmt.read(self.group, "head/bias")
        except (KeyError, ValueError, OSError) as exc:  # the head's checksum, or its files gone
            raise self.vanished() or StoreError(
                f"teacher store {self.id}: its head (final classifier) is damaged ({fmt.exc_line(exc)}); "
                f"{removal(self.id)}") from None
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):  # the fill value: a chunk file is missing
            raise self.vanished() or StoreError(
                f"teacher store {self.id}: its head (final classifier) is missing or not finite; {removal(self.id)}")
        return torch.from_numpy(weight), torch.from_numpy(bias)

    # -- checking ---------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Read every written chunk of every array and check every marker; return the problems found (empty:
        sound). An unfinished store's chunks not yet written are one problem starting with ``UNFINISHED``
        (a re-run finishes them); everything else found is damage."""
        problems: list[str] = []
        try:
            markers = fmt.read(self.group, "done")
        except ValueError as exc:
            return [f"done: completion markers are damaged ({exc})"]
        unwritten: set[tuple[int, int]] = set()
        if not self.attrs.get("complete"):
            unwritten = {(int(v), int(c)) for v, c in zip(*np.nonzero(markers < 0))}
            problems.append(f"{UNFINISHED}{len(unwritten)} of {self.total_chunks} chunks not written yet")
        else:
            for v, c in zip(*np.nonzero(markers < 0)):
                problems.append(f"done: completion marker of (view {v}, chunk {c}) is missing")
        for name in self.data_arrays:
            written = self.location.files(f"{name}/c")  # one listing, also on object stores
            for v, c in self._chunks():
                if (v, c) in unwritten:
                    continue
                rows = self.rows(c)
                if self.shard_key(name, v, c) not in written:
                    problems.append(f"{name}: chunk (view {v}, chunk {c}) is missing")
                    continue
                try:
                    block = fmt.read(self.group, name, (v, rows))
                except ValueError as exc:
                    problems.append(f"{name}: chunk (view {v}, chunk {c}) is damaged ({exc})")
                    continue
                if not np.isfinite(block).all() or codecs.is_unwritten(block):
                    problems.append(f"{name}: chunk (view {v}, chunk {c}) holds non-finite or unwritten values")
        for name in ("head/weight", "head/bias"):
            try:
                if not np.isfinite(fmt.read(self.group, name)).all():
                    problems.append(f"{name}: missing or non-finite")
            except ValueError as exc:
                problems.append(f"{name}: damaged ({exc})")
        return problems

    def _chunks(self) -> Iterator[tuple[int, int]]:
        for v in range(self.n_views):
            for c in range(self.chunks_per_view):
                yield v, c


class PendingRows:
    """Rows of one view of a store being read (:meth:`TeacherStore.submit_rows`): :meth:`result` waits for its
    chunks and returns the logits and features, or raises the first failure in chunk order as a StoreError
    naming the chunk."""

    def __init__(self, store: TeacherStore, blocks: dict[str, np.ndarray], tasks: list[Future[None]],
                 keep: slice | None) -> None:
        self.store, self.blocks, self.tasks, self.keep = store, blocks, tasks, keep

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        store = self.store
        for task in self.tasks:
            try:
                task.result()
            except ChunkError as exc:
                raise store.vanished() or StoreError(
                    f"teacher store {store.id}: {exc}; run `kdcache cache verify {store.id}`") from None
        out = {name: block if self.keep is None else block[self.keep] for name, block in self.blocks.items()}
        logits = out["logits"] if store.form.topk is None else pack_topk(*(out[n] for n in TOPK_ARRAYS))
        if "feature_scale" in out:
            return logits, dequantize_rows(out["features"], out["feature_scale"])
        return logits, out.get("features")


# The attributes of a store's teacher that its id hashes (the checkpoint by content); its form's are the others.
_IDENTITY = ("plan_id", "arch", "checkpoint", "num_classes", "feature_dim")


def _identity(attrs: dict[str, Any], key: str) -> Any:
    """What attribute ``key`` contributes to a store's identity: the checkpoint's content (not where the file
    lies, which may move), else the attribute."""
    value = attrs.get(key)
    return value.get("sha256") if key == "checkpoint" and isinstance(value, dict) else value


def removal(teacher_id: str) -> str:
    """The remedy of a store that is damaged or unreadable: it cannot be repaired, only made again."""
    return f"remove it with `kdcache cache rm {teacher_id}` and precompute it again"


def _open_group(where: Location, teacher_id: str, writable: bool = False) -> zarr.Group:
    """The store's group (:func:`format.open_node`): missing, it says to precompute it; not a folder, or its
    zarr.json unreadable, it says to remove it and precompute it again."""
    what = f"teacher store {teacher_id}"
    try:
        return fmt.open_node(where, what, writable)
    except fmt.MissingError:
        raise fmt.MissingError(f"{what} not found at {where}; run `kdcache precompute` first") from None
    except StoreError as exc:
        raise StoreError(f"{exc}; {removal(teacher_id)}") from None


def _remove_partial_files(where: Location) -> None:
    """Delete the temporary files a killed writer may leave in a local directory (zarr's local
    store writes ``*.partial`` then renames them into place)."""
    path = where.local_path
    if path is not None and path.exists():
        for stray in path.rglob("*.partial"):
            stray.unlink(missing_ok=True)
