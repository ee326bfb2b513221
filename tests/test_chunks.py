"""kdcache's own read path (kdcache.store.chunks): every array kind decoded bit for bit as zarr reads it, in one
file a chunk and in shards, from a local folder and a memory:// URL, inline and on a thread pool; damage to a
shard's index, a chunk left out of its shard, a cut-short shard file, each named by (view, chunk)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import zarr

from kdcache.errors import StoreError
from kdcache.store import Cache, TeacherStore
from kdcache.store import format as fmt
from kdcache.store.chunks import ArrayChunks, ChunkDamaged, ChunkLayout
from kdcache.store.form import TOPK_ARRAYS, FeatureCompression, FeatureDtype, FeatureForm, StoreForm
from kdcache.store.int8 import dequantize_rows
from kdcache.store.layout import StoreShape
from kdcache.topk import pack_topk

V, N, C, D = 2, 11, 5, 3   # 11 rows: chunks of 4 rows are 0-3, 4-7, 8-10 (the last one short)
R, S = 4, 8                # a shard of two chunks: shard 0 holds chunks 0, 1; shard 1 chunk 2


def make(where: Path | str, tid: str, shards: bool, **form: object) -> tuple[TeacherStore, dict[str, np.ndarray]]:
    """A complete store of random rows in ``form`` (features, feature_dtype, logits; and feature_compression): its
    arrays as written."""
    form = dict(form)
    compression = FeatureCompression(form.pop("feature_compression", "zstd"))
    store_form = StoreForm(**form)  # a top-K form serves T = 4
    shape = StoreShape(V, N, C, D, map_shape=(D, 2, 2))
    fshape = shape.feature_shape(store_form)
    teacher = {"plan_id": "p" * 16, "arch": "resnet8", "checkpoint": {"path": "-", "sha256": "0" * 64}}
    store = TeacherStore.create(where, tid, store_form, shape, teacher, torch.zeros(C, D), torch.zeros(C),
                                compression=compression, chunk_rows=R, shard_rows=S if shards else None)
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((V, N, C))).astype(np.float16)
    feats = np.maximum(rng.standard_normal((V, N, *fshape)), 0).astype(np.float16) if fshape else None
    labels = rng.integers(0, C, N)
    for v, s in store.pending_shards():
        rows = store.shard_rows_of(s)
        store.write_shard(v, s, logits[v, rows], None if feats is None else feats[v, rows],
                          [0] * len(store.shard_chunks(s)), labels[rows])
    store.mark_complete()
    ro = TeacherStore.open(where, tid)
    return ro, {name: np.asarray(fmt.read(ro.group, name)) for name in ro.data_arrays}


FORMS = [dict(), dict(features="spatial"), dict(features="none"), dict(feature_dtype="int8"),
         dict(logits="topk:2"), dict(logits="topk:2", features="spatial", feature_dtype="int8"),
         dict(features="spatial", feature_compression="none")]


@pytest.mark.parametrize("shards", [False, True], ids=["a-file-a-chunk", "shards"])
@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(map(str, f.values())) or "pooled")
def test_every_chunk_of_every_array_decodes_as_zarr_reads_it(tmp_path: Path, shards: bool, form: dict) -> None:
    store, arrays = make(tmp_path / "s", "t" * 16, shards, **form)
    readers = store.chunk_readers()
    assert all(r.layout is not None for r in readers.values())  # nothing falls back to zarr
    assert readers["logits" if store.form.topk is None else "logit_stats"].layout.compressed
    if "features" in readers:
        assert readers["features"].layout.compressed == (form.get("feature_compression") != "none")
    assert {r.layout.per_shard for r in readers.values()} == {2 if shards else 1}
    for name, reader in readers.items():
        for v in range(V):
            for c in range(3):
                rows = store.rows(c)
                out = np.empty((rows.stop - rows.start, *arrays[name].shape[2:]), arrays[name].dtype)
                reader.read(v, c, out, where=reader.locate(v, c))
                assert np.array_equal(out, arrays[name][v, c * R:(c + 1) * R])
                assert out.dtype == arrays[name].dtype
    # whole reads, inline and on a pool, equal the rows zarr holds (after packing or scaling back)
    inline = [store.read_rows(v, 0, N) for v in range(V)]
    with ThreadPoolExecutor(3) as pool:
        pooled = [store.submit_rows(v, 1, N, pool).result() for v in range(V)]
        picked = store.submit_selected(1, np.array([10, 0, 5, 9]), pool).result()
        perm = np.random.default_rng(3).permutation(N)
        shuffled = store.submit_selected(0, perm, pool).result()  # rows of three chunks, each put in its place
    for v in range(V):
        z, h = inline[v]
        if store.form.topk is None:
            assert np.array_equal(z, arrays["logits"][v])
        else:
            assert np.array_equal(z, pack_topk(*(arrays[n][v] for n in TOPK_ARRAYS)))
        if store.form.features is FeatureForm.NONE:
            assert h is None and pooled[v][1] is None
        elif store.form.feature_dtype is FeatureDtype.INT8:
            assert np.array_equal(h, dequantize_rows(arrays["features"][v], arrays["feature_scale"][v]))
        else:
            assert np.array_equal(h, arrays["features"][v])
        assert np.array_equal(pooled[v][0], z[1:])
        assert h is None or np.array_equal(pooled[v][1], h[1:])
    assert np.array_equal(picked[0], inline[1][0][[10, 0, 5, 9]])
    assert np.array_equal(shuffled[0], inline[0][0][perm])
    assert shuffled[1] is None or np.array_equal(shuffled[1], inline[0][1][perm])


def test_a_store_behind_a_url_is_read_through_zarrs_store(tmp_path: Path) -> None:
    url = f"memory://kdcache-chunks-{uuid.uuid4().hex}/t"
    store, arrays = make(url, "u" * 16, shards=True, features="spatial")
    assert all(r.local is None for r in store.chunk_readers().values())
    with ThreadPoolExecutor(2) as pool:
        z, h = store.submit_rows(1, 0, N, pool).result()
    assert np.array_equal(z, arrays["logits"][1]) and np.array_equal(h, arrays["features"][1])


def test_a_damaged_shard_index_a_chunk_left_out_and_a_cut_short_file_are_named(tmp_path: Path) -> None:
    cache = Cache.at(tmp_path / "cache")
    store, _ = make(cache.teacher_path("d" * 16), "d" * 16, shards=True)
    root = Path(store.path)
    index_bytes = 16 * 2 + 4
    # shard (0, 0) of the features: its index's last byte (the index's CRC32C) flipped
    f = root / "features" / "c" / "0" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    # shard (1, 0) of the logits: chunk 1 taken out of the index (an empty entry, the index's checksum valid)
    g = root / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(g.read_bytes())
    index = np.frombuffer(bytes(data[-index_bytes:-4]), "<u8").copy().reshape(2, 2)
    index[1] = 2**64 - 1
    data[-index_bytes:] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    g.write_bytes(bytes(data))
    # shard (1, 1) of the features: the file cut in half
    h = root / "features" / "c" / "1" / "1" / "0"
    h.write_bytes(h.read_bytes()[: len(h.read_bytes()) // 2])
    ro = cache.open_teacher("d" * 16)
    for v, c in ((0, 0), (0, 1)):
        with pytest.raises(StoreError, match=rf"features chunk \(view {v}, chunk {c}\) is damaged \(its shard's index"):
            ro.read_chunk(v, c)
    with pytest.raises(StoreError, match=r"logits chunk \(view 1, chunk 1\) is missing \(not in its shard\)"):
        ro.read_chunk(1, 1)
    assert np.array_equal(ro.read_chunk(1, 0)[0], fmt.read(ro.group, "logits", (1, slice(0, R))))
    with pytest.raises(StoreError, match=r"features chunk \(view 1, chunk 2\) is damaged"):
        ro.read_chunk(1, 2)
    (root / "features" / "c" / "0" / "1" / "0").unlink()  # shard (0, 1): chunk 2
    with pytest.raises(StoreError, match=r"features chunk \(view 0, chunk 2\) is missing \(no shard file\)"):
        ro.read_chunk(0, 2)
    # every problem was found by zarr's own reading too (cache verify)
    problems = ro.verify()
    for expected in ("features: chunk (view 0, chunk 0) is damaged", "logits: chunk (view 1, chunk 1)",
                     "features: chunk (view 1, chunk 2) is damaged", "features: chunk (view 0, chunk 2) is missing"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)


def test_a_flipped_byte_inside_a_chunk_fails_its_checksum_and_only_that_chunk(tmp_path: Path) -> None:
    store, arrays = make(tmp_path / "s", "f" * 16, shards=True)
    reader = store.chunk_readers()["features"]
    key, offset, length = reader.locate(0, 1)
    path = Path(store.path) / "features" / key
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkDamaged, match=r"features chunk \(view 0, chunk 1\) is damaged \(CRC32C"):
        reader.read(0, 1, np.empty((R, D), np.float16))
    out = np.empty((R, D), np.float16)
    reader.read(0, 0, out)
    assert np.array_equal(out, arrays["features"][0, :R])


def test_an_array_of_other_codecs_is_read_through_zarr(tmp_path: Path) -> None:
    array = zarr.create_array(tmp_path / "a", shape=(1, 10, 3), chunks=(1, 4, 3), dtype="float16",
                              compressors=zarr.codecs.ZstdCodec(level=1), fill_value=np.nan)
    values = np.arange(30, dtype=np.float16).reshape(1, 10, 3)
    array[...] = values
    assert ChunkLayout.of(array) is None
    reader = ArrayChunks(array, "features", tmp_path / "a")
    assert np.array_equal(reader.read_with_zarr(0, 2), values[0, 8:10])


@pytest.mark.parametrize("shards", [False, True], ids=["a-file-a-chunk", "shards"])
@pytest.mark.parametrize("form", FORMS, ids=lambda f: "-".join(map(str, f.values())) or "pooled")
def test_files_written_here_are_zarrs_byte_for_byte(tmp_path: Path, shards: bool, form: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The shards (or chunk files) kdcache's writer makes are the files zarr-python makes of the same rows,
    byte for byte (a short last chunk padded with the fill value, the index and its checksum), on a pool or not;
    zarr reads them back and `verify` (which reads through zarr) passes."""
    ours, arrays = make(tmp_path / "ours", "o" * 16, shards, **form)
    assert all(r.writable() for r in ours.chunk_readers().values())
    monkeypatch.setattr(ArrayChunks, "writable", lambda self: False)  # every array through zarr's write path
    theirs, _ = make(tmp_path / "zarr", "z" * 16, shards, **form)
    files = {p.relative_to(tmp_path / "ours") for name in ours.data_arrays
             for p in (tmp_path / "ours" / name / "c").rglob("*") if p.is_file()}
    assert files == {p.relative_to(tmp_path / "zarr") for name in theirs.data_arrays
                     for p in (tmp_path / "zarr" / name / "c").rglob("*") if p.is_file()}
    assert len(files) == len(ours.data_arrays) * V * (2 if shards else 3)
    for f in sorted(files):
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "zarr" / f).read_bytes(), f
    assert ours.verify() == []


def test_a_shard_encoded_on_a_pool_is_the_one_encoded_in_turn(tmp_path: Path) -> None:
    store, arrays = make(tmp_path / "s", "p" * 16, shards=True, features="spatial")
    writable = TeacherStore.open(tmp_path / "s", "p" * 16, writable=True)
    name = "features"
    key = Path(store.path) / name / "c" / "1" / "0" / "0" / "0" / "0"
    before = key.read_bytes()
    with ThreadPoolExecutor(3) as pool:
        writable.chunk_readers()[name].write(1, 0, arrays[name][1, :S], pool)
    assert key.read_bytes() == before
