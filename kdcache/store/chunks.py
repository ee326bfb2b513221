"""The chunk files of teacher stores: a data array's chunks fetched and decoded, or encoded and written, as tasks
on a thread pool.

zarr-python runs every synchronous read through its one event-loop thread, where a chunk's checksum, the
copy into the result and the bookkeeping of the shard run, so reads of several stores from several threads
come out no faster than one after another (benchmarks/RESULTS.md, "Reading stores"). This module reads the
chunks of the format's arrays itself: a chunk's bytes straight from its file (in a shard, found through the
shard's index, itself checksummed), or through zarr's store for a URL; then its CRC32C checked and its Blosc
compression undone by numcodecs, which releases the GIL, straight into the caller's array. One task a chunk,
so a pool of threads decodes the chunks of several teachers, arrays and blocks at once.

A chunk that cannot be read is a :class:`ChunkMissing` (no file, or no entry in its shard's index) or a
:class:`ChunkDamaged` (a checksum that fails, bytes that do not decompress), each naming its array, view and
chunk. Arrays whose codecs this module does not know (none the format writes) are read through zarr, chunk by
chunk, with the same errors.

Writing is the mirror (:meth:`ArrayChunks.write`): a shard's chunks Blosc-compressed and checksummed as tasks
on a pool, the shard's index appended, the whole file handed to zarr's store in one write, which makes it a
temporary file renamed into place on a local folder. zarr-python's own write path runs each shard's bookkeeping
and checksums on its event loop (125-171 MB/s of maps on the 2-core VM of RESULTS.md, 181-319 uncompressed).
The files are the ones zarr writes, byte for byte (``tests/test_chunks.py``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.sync import sync

from kdcache.store.codecs import is_unwritten
from kdcache.store.layout import n_chunks

# An empty entry of a shard's index: offset and length both 2^64 - 1 (the Zarr v3 sharding specification).
_EMPTY = np.uint64(2**64 - 1)


class ChunkError(Exception):
    """Chunk (view, chunk) of array ``name`` cannot be used; ``reason`` says why."""

    state = "unreadable"

    def __init__(self, name: str, v: int, c: int, reason: str = "") -> None:
        super().__init__(f"{name} chunk (view {v}, chunk {c}) is {self.state}" + (f" ({reason})" if reason else ""))
        self.name, self.v, self.c, self.reason = name, v, c, reason


class ChunkMissing(ChunkError):
    """No bytes for the chunk: its file, or its entry in its shard's index, is not there."""

    state = "missing"


class ChunkDamaged(ChunkError):
    """The chunk's bytes are there but fail their checksum or do not decompress."""

    state = "damaged"


@dataclass(frozen=True)
class ChunkLayout:
    """How one data array of a store lies in its files: what a reader needs to find and decode a chunk.

    Arrays of the format are chunked (1, R, *row) and stored either one chunk a file (codecs bytes, blosc,
    crc32c) or ``per_shard`` chunks a file (sharding_indexed with those codecs inside, the index checksummed).
    """

    dtype: np.dtype
    chunk_shape: tuple[int, ...]   # (1, R, *row)
    per_shard: int                 # chunks in a file along the row axis (1: a file a chunk, no index)
    index_at_end: bool
    blosc: tuple[str, int, int, int] | None  # Blosc between the raw bytes and the checksum: cname, clevel,
    # shuffle (0 none, 1 byte, 2 bit) and blocksize; None: no compression
    checksum: bool                 # CRC32C last

    @property
    def rows(self) -> int:
        return self.chunk_shape[1]

    @property
    def compressed(self) -> bool:
        return self.blosc is not None

    @property
    def index_bytes(self) -> int:
        """Bytes of a shard's index: (offset, length) a chunk as little-endian uint64, then its CRC32C."""
        return 16 * self.per_shard + 4

    @classmethod
    def of(cls, array: zarr.Array[Any]) -> "ChunkLayout | None":
        """The layout of ``array``, or None where its codecs are not the ones this module decodes."""
        meta = array.metadata
        codecs = tuple(getattr(meta, "codecs", ()))
        if array.ndim < 2 or meta.zarr_format != 3 or not codecs or not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        grid = tuple(int(s) for s in meta.chunk_grid.chunk_shape)  # the file's shape: a shard, or one chunk
        per_shard, at_end = 1, True
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            inner = tuple(sharding.codecs)
            chunk_shape = tuple(int(s) for s in sharding.chunk_shape)
            outer = grid
            index = tuple(sharding.index_codecs)
            if (outer[0] != 1 or outer[2:] != chunk_shape[2:] or chunk_shape[0] != 1 or outer[1] % chunk_shape[1]
                    or not _plain(index[:1]) or tuple(type(c) for c in index[1:]) != (Crc32cCodec,)):
                return None
            per_shard = outer[1] // chunk_shape[1]
            at_end = sharding.index_location == ShardingCodecIndexLocation.end
        else:
            inner, chunk_shape = codecs, grid
        if chunk_shape[0] != 1 or not _plain(inner[:1]):
            return None
        rest = list(inner[1:])
        blosc = None
        if rest and isinstance(rest[0], BloscCodec):
            codec = cast(BloscCodec, rest.pop(0))
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}.get(getattr(codec.shuffle, "value", ""))
            if shuffle is None or codec.cname is None:
                return None
            blosc = (str(codec.cname.value), int(codec.clevel), shuffle, int(codec.blocksize))
        checksum = bool(rest) and isinstance(rest[0], Crc32cCodec)
        rest = rest[1:] if checksum else rest
        if rest:
            return None
        return cls(np.dtype(array.dtype), chunk_shape, per_shard, at_end, blosc, checksum)


def _plain(codecs: tuple[Any, ...]) -> bool:
    """Whether ``codecs`` is the one array-to-bytes codec the format uses: raw little-endian bytes."""
    return len(codecs) == 1 and isinstance(codecs[0], BytesCodec) and (
        codecs[0].endian is None or codecs[0].endian.value == "little")


class ArrayChunks:
    """Chunk (v, c) of one data array of a store, read on whatever thread calls :meth:`read`.

    ``local``: the array's folder on this machine (files are read directly), else None (bytes come through
    zarr's store, for a URL). A shard's index is read once and kept (``index``); a complete store does not
    change while it is read, and its chunks are still checksummed on every read.
    """

    def __init__(self, array: zarr.Array[Any], name: str, local: Path | None) -> None:
        self.array, self.name = array, name
        self.layout = ChunkLayout.of(array)
        codecs: tuple[Any, ...] = tuple(getattr(array.metadata, "codecs", ()))
        self.sharded = self.layout is not None and isinstance(codecs[0], ShardingCodec)
        self.local = local
        self.n_samples = int(array.shape[1])
        self._indexes: dict[tuple[int, int], np.ndarray | ChunkError] = {}

    def file_key(self, v: int, s: int) -> str:
        """The key (below the array) of file ``s`` of view ``v``: a shard, or chunk ``s`` in a store without."""
        return self.array.metadata.encode_chunk_key((v, s, *([0] * (self.array.ndim - 2))))

    def locate(self, v: int, c: int) -> tuple[str, int | None, int | None]:
        """The file key of chunk (v, c) and its byte range there (None, None: the whole file). Reads and keeps
        the shard's index; a missing or damaged index is the chunk's ChunkMissing or ChunkDamaged."""
        layout = self._layout()
        s, i = divmod(c, layout.per_shard)
        key = self.file_key(v, s)
        if not self.sharded:
            return key, None, None
        index = self._indexes.get((v, s))
        if index is None:
            index = self._indexes[(v, s)] = self._read_index(key, v, c)
        if isinstance(index, ChunkError):
            raise type(index)(self.name, v, c, index.reason)
        offset, length = index[i]
        if offset == _EMPTY and length == _EMPTY:
            raise ChunkMissing(self.name, v, c, "not in its shard")
        return key, int(offset), int(length)

    def forget(self) -> None:
        """Drop the kept shard indexes (a reader moving to another view)."""
        self._indexes.clear()

    def read(self, v: int, c: int, out: np.ndarray, pick: tuple[np.ndarray, np.ndarray] | None = None,
             where: tuple[str, int | None, int | None] | None = None) -> None:
        """Chunk (v, c) into ``out``: every row of it (``pick`` None; ``out`` holds exactly its rows), or its rows
        ``src`` into ``out[dest]`` for ``pick = (dest, src)``. Decoded here where the array's layout is known
        (from ``where``, :meth:`locate`), else read through zarr. A chunk whose first row is the fill value (an
        unwritten chunk read through zarr) is a ChunkMissing."""
        if self.layout is None:
            chunk = self.read_with_zarr(v, c)
        else:
            direct = pick is None and out.shape[0] == self.layout.rows and out.flags.c_contiguous
            chunk = self.decode(v, c, self.locate(v, c) if where is None else where, out if direct else None)
        # A chunk is written whole, in one write: its first row tells an unwritten one, at 1/R of a scan's cost.
        if is_unwritten(chunk[:1]):
            raise ChunkMissing(self.name, v, c, "it reads as the fill value")
        if pick is not None:
            dest, src = pick
            out[dest] = chunk[src]
        elif chunk is not out:
            out[...] = chunk[:out.shape[0]]

    def decode(self, v: int, c: int, where: tuple[str, int | None, int | None],
               into: np.ndarray | None = None) -> np.ndarray:
        """Chunk (v, c) fetched from ``where`` (:meth:`locate`), checked and decoded, as an array of the chunk's full
        shape (R rows as stored, the last chunk of a view too): decompressed into ``into`` if given, else into
        this thread's buffer; an uncompressed chunk is then a view of the bytes read, copied nowhere."""
        layout = self._layout()
        key, offset, length = where
        data = self.fetch(key, offset, length)
        if data is None:
            raise ChunkMissing(self.name, v, c, "no file")
        view = np.frombuffer(data, dtype=np.uint8)
        if layout.checksum:
            if not intact(view):
                raise ChunkDamaged(self.name, v, c, "CRC32C checksum mismatch")
            view = view[:-4]
        shape = layout.chunk_shape[1:]
        size = int(np.prod(shape)) * layout.dtype.itemsize
        try:
            if not layout.compressed:
                if len(view) != size:
                    raise ValueError(f"{len(view)} bytes for a chunk of {size}")
                chunk = view.view(layout.dtype).reshape(shape)
                if into is not None:
                    into[...] = chunk
                    return into
                return chunk
            # the Blosc header (16 bytes) holds the uncompressed size at bytes 4-8, little-endian
            stated = int.from_bytes(view[4:8].tobytes(), "little") if len(view) >= 16 else -1
            if stated != size:
                raise ValueError(f"{stated} bytes decompressed for a chunk of {size}")
            target = _scratch(layout) if into is None else into
            numcodecs.blosc.decompress(view, target)
            return target
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ChunkDamaged(self.name, v, c, f"does not decode: {exc}") from None

    def write(self, v: int, s: int, rows: np.ndarray, pool: Executor) -> None:
        """Write file ``s`` of view ``v`` (a shard; in a store of one chunk a file, chunk ``s``) whole, from ``rows``,
        its rows of the view: every chunk encoded as a task on ``pool`` (its last rows padded with the fill
        value where the view ends, as zarr stores them), the shard's index and its checksum after them, then the
        file handed to zarr's store in one write (a temporary file renamed into place, on a local folder)."""
        layout = self._layout()
        first = s * layout.per_shard
        chunks = range(first, min(first + layout.per_shard, n_chunks(self.n_samples, layout.rows)))
        fill = np.asarray(self.array.metadata.fill_value, dtype=layout.dtype)
        encoded = [pool.submit(self.encode, rows[(c - first) * layout.rows:(c - first + 1) * layout.rows], fill)
                   for c in chunks]
        parts = [e.result() for e in encoded]
        if self.sharded:
            index = np.full((layout.per_shard, 2), _EMPTY, dtype="<u8")
            offset = 0
            for i, part in enumerate(parts):
                index[i] = (offset, len(part))
                offset += len(part)
            raw = index.tobytes()
            parts.append(raw + google_crc32c.value(raw).to_bytes(4, "little"))
        data = b"".join(parts)
        sync((self.array.store_path / self.file_key(v, s)).set(default_buffer_prototype().buffer.from_bytes(data)))

    def encode(self, rows: np.ndarray, fill: np.ndarray) -> bytes:
        """One chunk's bytes as stored: its rows (padded with ``fill`` to the chunk's R), Blosc-compressed as the
        array's codec says, then their CRC32C."""
        layout = self._layout()
        chunk = np.ascontiguousarray(rows, dtype=layout.dtype)
        if len(chunk) < layout.rows:
            padded = np.empty(layout.chunk_shape[1:], dtype=layout.dtype)
            padded[:len(chunk)] = chunk
            padded[len(chunk):] = fill
            chunk = padded
        if layout.blosc is not None:
            cname, clevel, shuffle, blocksize = layout.blosc
            body = numcodecs.blosc.compress(chunk, cname.encode(), clevel, shuffle, blocksize,
                                            typesize=layout.dtype.itemsize)
        else:
            body = chunk.tobytes()
        return bytes(body) + (google_crc32c.value(body).to_bytes(4, "little") if layout.checksum else b"")

    def writable(self) -> bool:
        """Whether :meth:`write` writes this array: its layout is known and a shard's index goes at its end."""
        return self.layout is not None and self.layout.index_at_end

    def read_with_zarr(self, v: int, c: int) -> np.ndarray:
        """Chunk (v, c) read through zarr, for an array this module does not decode: a checksum that fails is
        ChunkDamaged; an unwritten chunk reads as the fill value, which the caller tells."""
        r = int(self.array.chunks[1])  # zarr's chunks: the chunks inside a shard
        try:
            return cast(np.ndarray, self.array[v, c * r:min((c + 1) * r, self.n_samples)])
        except ValueError as exc:  # the CRC32C codec's checksum mismatch
            raise ChunkDamaged(self.name, v, c, str(exc)) from None

    def _layout(self) -> ChunkLayout:
        if self.layout is None:
            raise TypeError(f"array {self.name} is read through zarr")
        return self.layout

    def _read_index(self, key: str, v: int, c: int) -> np.ndarray | ChunkError:
        layout = self._layout()
        n = layout.index_bytes
        data = self.fetch(key, -n if layout.index_at_end else 0, n)
        if data is None:
            return ChunkMissing(self.name, v, c, "no shard file")
        view = np.frombuffer(data, dtype=np.uint8)
        if len(view) != n or not intact(view):
            return ChunkDamaged(self.name, v, c, "its shard's index fails its checksum")
        return view[:-4].view("<u8").reshape(layout.per_shard, 2)

    def fetch(self, key: str, offset: int | None, length: int | None) -> bytes | None:
        """The bytes of file ``key`` (below the array) in [offset, offset + length), the whole file for None, the
        last ``length`` bytes for a negative offset; None when there is no such file."""
        if self.local is not None:
            try:
                fd = os.open(self.local / key, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError):
                return None
            try:
                if offset is None:
                    size = os.fstat(fd).st_size
                    offset, length = 0, size
                elif offset < 0:
                    size = os.fstat(fd).st_size
                    offset = max(0, size + offset)
                return os.pread(fd, cast(int, length), offset)
            finally:
                os.close(fd)
        byte_range = (None if offset is None else SuffixByteRequest(-offset) if offset < 0
                      else RangeByteRequest(offset, offset + cast(int, length)))
        got = sync((self.array.store_path / key).get(prototype=default_buffer_prototype(), byte_range=byte_range))
        return None if got is None else got.to_bytes()


def intact(data: np.ndarray) -> bool:
    """Whether ``data`` (uint8) ends in the CRC32C of the bytes before it, little-endian, as the crc32c codec
    writes it."""
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:].tobytes(), "little")


_local = threading.local()


def _scratch(layout: ChunkLayout) -> np.ndarray:
    """This thread's buffer of one chunk of ``layout``'s shape and dtype, made once and reused (no allocation,
    no page faults on a chunk decoded only to have some of its rows picked)."""
    buffers: dict[tuple[tuple[int, ...], str], np.ndarray] = _local.__dict__.setdefault("buffers", {})
    key = (layout.chunk_shape[1:], layout.dtype.str)
    if key not in buffers:
        buffers[key] = np.empty(layout.chunk_shape[1:], dtype=layout.dtype)
    return buffers[key]


def failed(exc: BaseException) -> Future[Any]:
    """A future that holds ``exc``: an error found while planning a read, raised where its result is asked."""
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


def default_threads() -> int:
    """Reader threads by default: the cores this process may use (decoding releases the GIL)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
