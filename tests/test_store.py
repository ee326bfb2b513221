"""The store format on real files: ids, codecs, chunking, markers, read-only opening, locking, checking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fakes import flip_byte
from kdcache.errors import StoreError
from kdcache.store import Cache, PlanStore, StoreForm, TeacherStore, WriterLock
from kdcache.store import format as fmt
from kdcache.store import layout
from kdcache.store.ids import plan_id, teacher_id
from kdcache.store.layout import Layout, StoreShape, chunk_rows_for, shard_rows_for

V, N, C, D, R = 3, 10, 4, 6, 4  # 3 chunks per view: rows 0-3, 4-7, 8-9
SHAPE = StoreShape(views=V, samples=N, classes=C, feature_dim=D)
TEACHER = {"plan_id": "p" * 16, "arch": "resnet8", "checkpoint": {"path": "/x.pth", "sha256": "0" * 64},
           "dataset": "digits"}


def make_store(cache: Cache, tid: str = "aaaa1111bbbb2222") -> TeacherStore:
    return TeacherStore.create(cache.teacher_path(tid), tid, StoreForm(), SHAPE, TEACHER,
                               torch.arange(C * D, dtype=torch.float32).reshape(C, D), torch.ones(C), chunk_rows=R)


def fill(store: TeacherStore, skip: set[tuple[int, int]] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((V, N, C)).astype(np.float16)
    feats = rng.standard_normal((V, N, D)).astype(np.float16)
    for v in range(V):
        for c in range(store.chunks_per_view):
            if (v, c) not in skip:
                rows = store.rows(c)
                store.write_chunk(v, c, logits[v, rows], feats[v, rows], n_correct=c)
    return logits, feats


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    c = Cache.at(tmp_path / "cache")
    c.ensure_writable()
    return c


def test_ids_are_content_hashes() -> None:
    base = plan_id("fp", {"name": "crop-flip", "pad": 4}, 10, 0)
    assert base == plan_id("fp", {"pad": 4, "name": "crop-flip"}, 10, 0)  # key order is irrelevant
    others = {plan_id("fp2", {"name": "crop-flip", "pad": 4}, 10, 0),
              plan_id("fp", {"name": "crop-flip", "pad": 2}, 10, 0),
              plan_id("fp", {"name": "crop-flip", "pad": 4}, 11, 0),
              plan_id("fp", {"name": "crop-flip", "pad": 4}, 10, 1)}
    assert base not in others and len(others) == 4
    t = teacher_id(base, "resnet8", "a" * 64)
    assert t == teacher_id(base, "resnet8", "a" * 64)
    assert len({t, teacher_id(base, "resnet14", "a" * 64), teacher_id(base, "resnet8", "b" * 64),
                teacher_id("x" * 16, "resnet8", "a" * 64)}) == 4
    assert len(t) == 16 and all(ch in "0123456789abcdef" for ch in t)


def test_chunk_rows_target_about_two_megabytes() -> None:
    assert chunk_rows_for(50000, 2 * 256) == 4096  # 4096 rows x 256 x 2 B = 2 MiB
    assert chunk_rows_for(50000, 2 * 2048) == 512
    assert chunk_rows_for(1437, 2 * 64) == 1437  # never more rows than samples
    assert chunk_rows_for(10**6, 2 * 100) * 100 * 2 <= layout.TARGET_CHUNK_BYTES


def test_shard_rows_target_about_128_megabytes_at_most_65536_rows_and_a_view() -> None:
    n = 1_281_167  # ImageNet-1k
    assert shard_rows_for(n, 512, 4096) == 32768  # pooled: 32768 rows x 4096 B = 128 MiB
    assert shard_rows_for(n, 8, 200704) == 512  # spatial 2048x7x7: 98 MiB
    assert shard_rows_for(n, 32768, 60) == layout.MAX_SHARD_ROWS == 65536  # top-10 logits alone
    assert shard_rows_for(1437, 128, 2 * 128) == 1536  # never more than a view's chunks: 12 of 128 rows
    assert shard_rows_for(1437, 1437, 2 * 64) == 1437
    assert Layout(512, 32768).files_per_view(n, 2) == 120 and Layout(512, 512).files_per_view(n, 2) == 7509


def test_round_trip_is_exact_and_rows_are_in_plan_order(cache: Cache) -> None:
    store = make_store(cache)
    assert store.pending() == [(v, c) for v in range(V) for c in range(3)]
    logits, feats = fill(store)
    store.mark_complete(test_accuracy=50.0)
    ro = cache.open_teacher("aaaa")  # a unique prefix is enough
    for v in range(V):
        for c in range(3):
            z, h = ro.read_chunk(v, c)
            rows = ro.rows(c)
            assert np.array_equal(z, logits[v, rows]) and np.array_equal(h, feats[v, rows])
            assert z.dtype == np.float16
    w, b = ro.head()
    assert torch.equal(w, torch.arange(C * D, dtype=torch.float32).reshape(C, D)) and torch.equal(b, torch.ones(C))
    assert ro.view_accuracy() == pytest.approx(V * (0 + 1 + 2) / (V * N))
    assert ro.verify() == []


def test_arrays_carry_compression_then_crc32c(cache: Cache) -> None:
    store = make_store(cache)
    for name in ("logits", "features", "done", "head/weight", "head/bias"):
        meta = json.loads((store.path / name / "zarr.json").read_text())
        codecs = [c["name"] for c in meta["codecs"]]
        assert codecs[-1] == "crc32c" and "blosc" in codecs, (name, codecs)
        assert meta["zarr_format"] == 3
    meta = json.loads((store.path / "logits" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, R, C]
    assert meta["data_type"] == "float16"


def test_reader_refuses_incomplete_unknown_format_and_writes(cache: Cache) -> None:
    store = make_store(cache)
    fill(store, skip={(2, 1)})
    with pytest.raises(StoreError, match=r"incomplete \(8 of 9 chunks\)"):
        cache.open_teacher(store.id)
    with pytest.raises(StoreError, match="unwritten"):
        store.mark_complete()
    fill(store)
    store.mark_complete()
    ro = cache.open_teacher(store.id)
    with pytest.raises(ValueError, match="read-only"):
        ro.group["logits"][0, 0:4] = np.zeros((4, C), np.float16)
    zarr.open_group(store.path, mode="r+").attrs["format"] = fmt.FORMAT_VERSION + 1
    with pytest.raises(StoreError, match=f"store format {fmt.FORMAT_VERSION + 1}.*upgrade kdcache"):
        cache.open_teacher(store.id)


def test_resume_keeps_written_chunks_and_refuses_a_different_teacher(cache: Cache) -> None:
    store = make_store(cache)
    logits, _ = fill(store, skip={(0, 2), (1, 0)})
    (store.path / "logits" / "c" / "0" / "0" / "0.abc.partial").write_bytes(b"half")  # a killed write's leftover
    again = make_store(cache)
    assert again.pending() == [(0, 2), (1, 0)]
    assert not list(store.path.rglob("*.partial"))
    assert np.array_equal(again.read_chunk(0, 0)[0], logits[0, 0:4])
    teacher = {"plan_id": "p" * 16, "arch": "resnet14", "checkpoint": {"path": "/x.pth", "sha256": "0" * 64}}
    with pytest.raises(StoreError, match="arch='resnet8'.*expected 'resnet14'"):
        TeacherStore.create(store.path, store.id, StoreForm(), SHAPE, teacher, torch.zeros(C, D), torch.zeros(C),
                            chunk_rows=R)


def test_damaged_missing_chunks_and_markers_are_named(cache: Cache) -> None:
    store = make_store(cache)
    fill(store)
    store.mark_complete()
    flip_byte(store.path / "features" / "c" / "1" / "2" / "0")
    (store.path / "logits" / "c" / "2" / "0" / "0").unlink()
    (store.path / "done" / "c" / "0" / "1").unlink()
    problems = cache.open_teacher(store.id).verify()
    assert any(p.startswith("features: chunk (view 1, chunk 2) is damaged") for p in problems), problems
    assert any(p.startswith("logits: chunk (view 2, chunk 0) is missing") for p in problems), problems
    assert any("completion marker of (view 0, chunk 1) is missing" in p for p in problems), problems
    assert len(problems) == 3
    ro = cache.open_teacher(store.id)
    with pytest.raises(StoreError, match=r"features chunk \(view 1, chunk 2\) is damaged"):
        ro.read_chunk(1, 2)
    with pytest.raises(StoreError, match=r"logits chunk \(view 2, chunk 0\) is missing"):
        ro.read_chunk(2, 0)


def test_reading_a_view_keeps_its_markers_but_reads_every_chunk_afresh(cache: Cache) -> None:
    """The read path reads a complete store's markers once a view: a damaged marker elsewhere in the view
    costs only its own chunk (named, as before); data chunks are still read and checked on every call, so
    damage done after the view's markers were read is still caught."""
    store = make_store(cache)
    logits, feats = fill(store)
    store.mark_complete()
    flip_byte(store.path / "done" / "c" / "1" / "2")          # the marker of (view 1, chunk 2): its checksum fails
    ro = cache.open_teacher(store.id)
    z, h = ro.read_chunk(1, 0)                                  # the view's markers cannot be read whole
    assert np.array_equal(z, logits[1, 0:4]) and np.array_equal(h, feats[1, 0:4])
    with pytest.raises(StoreError, match=r"completion marker of \(view 1, chunk 2\) is damaged"):
        ro.read_chunk(1, 2)
    z, h = ro.read_chunk(0, 1)                                  # view 0's markers, read whole and kept
    assert np.array_equal(z, logits[0, 4:8]) and np.array_equal(h, feats[0, 4:8])
    flip_byte(store.path / "features" / "c" / "0" / "1" / "0")
    with pytest.raises(StoreError, match=r"features chunk \(view 0, chunk 1\) is damaged"):
        ro.read_chunk(0, 1)
    (store.path / "logits" / "c" / "0" / "2" / "0").unlink()
    with pytest.raises(StoreError, match=r"logits chunk \(view 0, chunk 2\) is missing"):
        ro.read_chunk(0, 2)


def test_id_prefixes(cache: Cache) -> None:
    make_store(cache, "abc1000000000000")
    make_store(cache, "abc2000000000000")
    assert cache.resolve("abc1") == "abc1000000000000"
    with pytest.raises(StoreError, match="ambiguous"):
        cache.resolve("abc")
    with pytest.raises(StoreError, match="no teacher store matches 'zz'"):
        cache.resolve("zz")
    assert cache.remove_teacher("abc2") == "abc2000000000000"
    assert cache.teacher_ids() == ["abc1000000000000"]


def test_plan_round_trip_and_concurrent_creation_is_single(cache: Cache) -> None:
    order = np.stack([np.random.default_rng(v).permutation(N) for v in range(V)]).astype(np.int32)
    params = np.random.default_rng(1).integers(0, 9, (V, N, 3)).astype(np.int16)
    labels = np.arange(N, dtype=np.int32) % 3
    attrs = {"dataset": {"name": "x", "n_samples": N, "n_classes": 3, "fingerprint": "f"},
             "recipe": {"name": "crop-flip"}, "seed": 0}
    plan = PlanStore.create(cache.plan_path("p1"), cache.lock_path("plan", "p1"), "p1", attrs, len(order), labels,
                           lambda v: (order[v], params[v]))
    o, p = plan.view(1)
    assert np.array_equal(o, order[1]) and np.array_equal(p, params[1])
    assert np.array_equal(plan.labels, labels) and plan.n_views == V and plan.recipe == "crop-flip"
    mtime = (plan.path / "zarr.json").stat().st_mtime_ns
    again = PlanStore.create(cache.plan_path("p1"), cache.lock_path("plan", "p1"), "p1", attrs, len(order), labels,
                            lambda v: (order[v] * 0, params[v]))
    assert (again.path / "zarr.json").stat().st_mtime_ns == mtime  # found, not rewritten
    assert np.array_equal(again.view(1)[0], order[1])
    assert plan.verify() == []


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from kdcache.store import WriterLock
    lock = WriterLock(sys.argv[1], "teacher store T").acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def test_second_writer_is_refused_and_a_killed_holder_releases(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "teacher-T.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=rf"teacher store T is being written by another process \(pid {holder.pid} on"):
            WriterLock(path, "teacher store T").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WriterLock(path, "teacher store T"):  # no stale lock: the kernel released it with the process
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_unwritable_cache_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create cache directory .*pass a writable --cache"):
        Cache.at(blocker / "cache").ensure_writable()


def test_a_store_caught_half_created_is_refused_with_one_line_and_made_afresh(cache: Cache) -> None:
    """A reader (or a re-run) may meet a store whose creation is under way or was killed: its group exists
    with no attributes (how earlier versions began) or marked ``creating``, and only some arrays."""
    path = cache.teacher_path("t")
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="teacher store t was cut short while being created .*run the same "
                                         "`kdcache precompute` again"):
        TeacherStore.open(path, "t")
    group = zarr.open_group(str(path), mode="w", zarr_format=3,
                            attributes={"kind": "teacher", "format": fmt.FORMAT_VERSION, "creating": True})
    group.create_array("logits", shape=(V, N, C), chunks=(1, R, C), dtype="float16")
    with pytest.raises(StoreError, match="teacher store t was cut short while being created"):
        TeacherStore.open(path, "t", require_complete=False)
    store = make_store(cache, "t")  # the re-run makes it afresh and then fills it
    assert store.attrs["creating"] is False and store.pending() == [(v, c) for v in range(V) for c in range(3)]
    fill(store)
    store.mark_complete()
    assert cache.open_teacher("t").verify() == []


def test_a_plan_of_many_views_is_written_chunk_by_chunk_in_bounded_memory(cache: Cache,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan creation holds one chunk of views, never the whole plan: with chunks of 16,384 rows (32 views of
    500 samples), 3,000 views (15 MB in memory at once) are drawn with a peak far below that, every view is
    reported to the progress callback once its chunk is written, and the plan equals the one draw_plan draws whole."""
    import tracemalloc

    from kdcache.views import draw_plan, draw_view

    monkeypatch.setattr(layout, "MAX_PLAN_CHUNK_ROWS", 2**14)
    n_views, n = 3000, 500
    attrs = {"dataset": {"name": "x", "n_samples": n, "n_classes": 3, "fingerprint": "f"},
             "recipe": {"name": "crop-flip"}, "seed": 5}
    ticks: list[int] = []
    tracemalloc.start()
    try:
        plan = PlanStore.create(cache.plan_path("big"), cache.lock_path("plan", "big"), "big", attrs, n_views,
                                np.zeros(n, np.int32), lambda v: draw_view("crop-flip", v, n, 5),
                                lambda total, done: ticks.append)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = n_views * n * (4 + 2 * 3)
    assert peak < whole / 5, (peak, whole)
    # every view is counted once written, a chunk of 32 views at a time (the last chunk holds 3,000 mod 32 = 24)
    assert sum(ticks) == n_views and ticks == [32] * (n_views // 32) + [n_views % 32]
    assert len(list((plan.path / "order" / "c").glob("*/0"))) == -(-n_views // 32)  # a file per 32 views
    order, params = draw_plan("crop-flip", n_views, n, 5)
    assert np.array_equal(plan.group["order"][...], order) and np.array_equal(plan.group["params"][...], params)
    assert plan.verify() == []


# ---------------------------------------------------------------- shards: one file a shard, written whole

S = 8  # rows a shard: 2 chunks of R = 4; a view's 10 rows are shard 0 (chunks 0, 1) and shard 1 (chunk 2)


def make_sharded(cache: Cache, tid: str = "cccc3333dddd4444") -> TeacherStore:
    return TeacherStore.create(cache.teacher_path(tid), tid, StoreForm(), SHAPE, TEACHER, torch.zeros(C, D),
                               torch.ones(C), chunk_rows=R, shard_rows=S)


def fill_shards(store: TeacherStore, skip: set[tuple[int, int]] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((V, N, C)).astype(np.float16)
    feats = rng.standard_normal((V, N, D)).astype(np.float16)
    for v in range(V):
        for s in range(store.shards_per_view):
            if (v, s) not in skip:
                rows = store.shard_rows_of(s)
                store.write_shard(v, s, logits[v, rows], feats[v, rows], list(store.shard_chunks(s)))
    return logits, feats


def test_a_store_in_shards_holds_one_file_a_shard_and_reads_chunk_by_chunk(cache: Cache) -> None:
    store = make_sharded(cache)
    assert (store.chunk_rows, store.shard_rows, store.chunks_per_shard, store.shards_per_view) == (R, S, 2, 2)
    assert store.pending_shards() == [(v, s) for v in range(V) for s in range(2)]
    logits, feats = fill_shards(store)
    written = {f for a in ("logits", "features", "done") for f in store.location.files(f"{a}/c")}
    assert written == {f"{a}/c/{v}/{s}{inner}" for a, inner in (("logits", "/0"), ("features", "/0"), ("done", ""))
                       for v in range(V) for s in range(2)}
    assert len(written) == V * Layout(R, S).files_per_view(N, 2) == 18  # against 27 in one file a chunk
    meta = json.loads((store.path / "logits" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, S, C]
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed" and sharding["configuration"]["chunk_shape"] == [1, R, C]
    assert [c["name"] for c in sharding["configuration"]["codecs"]][-1] == "crc32c"
    assert [c["name"] for c in sharding["configuration"]["index_codecs"]][-1] == "crc32c"
    done = json.loads((store.path / "done" / "zarr.json").read_text())
    assert done["chunk_grid"]["configuration"]["chunk_shape"] == [1, 2]  # the markers of a shard: one file
    with pytest.raises(ValueError, match="whole shards"):
        store.write_chunk(0, 0, logits[0, :R], feats[0, :R], 0)
    store.mark_complete()
    ro = cache.open_teacher(store.id)
    for v in range(V):
        for c in range(3):
            z, h = ro.read_chunk(v, c)
            assert np.array_equal(z, logits[v, ro.rows(c)]) and np.array_equal(h, feats[v, ro.rows(c)])
        z, h = ro.read_selected(v, np.array([9, 1, 6]))
        assert np.array_equal(z, logits[v, [9, 1, 6]]) and np.array_equal(h, feats[v, [9, 1, 6]])
    assert np.array_equal(ro.markers(), np.tile([0, 1, 2], (V, 1)))
    assert ro.verify() == []


def test_a_shard_is_redone_whole_even_over_what_a_cut_short_write_left(cache: Cache) -> None:
    store = make_sharded(cache)
    fill_shards(store, skip={(1, 0)})
    assert store.pending() == [(1, 0), (1, 1)] and store.pending_shards() == [(1, 0)]
    # a killed or failed write left shard (1, 0)'s logits file, and it is damaged: zarr would read it back
    # before a write and fail on its checksum, so the writer removes it first
    fmt.array(store.group, "logits")[1, 0:S] = np.ones((S, C), np.float16)
    flip_byte(store.path / "logits" / "c" / "1" / "0" / "0")
    with pytest.raises(ValueError):
        fmt.read(store.group, "logits", (1, slice(0, S)))
    logits, feats = fill_shards(store, skip={(v, s) for v in range(V) for s in range(2)} - {(1, 0)})
    assert store.pending() == []
    store.mark_complete()
    ro = cache.open_teacher(store.id)
    assert np.array_equal(ro.read_rows(1, 0, N)[0], logits[1]) and ro.verify() == []


def test_damage_in_a_shard_is_named_by_chunk(cache: Cache) -> None:
    store = make_sharded(cache)
    fill_shards(store)
    store.mark_complete()
    flip_byte(store.path / "features" / "c" / "0" / "0" / "0")        # inside one of shard (0, 0)'s chunks
    (store.path / "logits" / "c" / "1" / "1" / "0").unlink()           # shard (1, 1): chunk 2
    (store.path / "done" / "c" / "2" / "0").unlink()                   # the markers of chunks (2, 0), (2, 1)
    ro = cache.open_teacher(store.id)
    problems = ro.verify()
    damaged = [p for p in problems if "is damaged" in p]
    assert damaged and all(p.startswith("features: chunk (view 0, chunk ") for p in damaged), problems
    assert "logits: chunk (view 1, chunk 2) is missing" in problems
    assert {"done: completion marker of (view 2, chunk 0) is missing",
            "done: completion marker of (view 2, chunk 1) is missing"} <= set(problems)
    with pytest.raises(StoreError, match=r"logits chunk \(view 1, chunk 2\) is missing"):
        ro.read_chunk(1, 2)
    with pytest.raises(StoreError, match=r"completion marker of \(view 2, chunk 1\) is missing"):
        ro.read_chunk(2, 1)
    bad = [c for c in (0, 1) if any(f"chunk (view 0, chunk {c})" in p for p in damaged)]
    with pytest.raises(StoreError, match=rf"features chunk \(view 0, chunk {bad[0]}\) is damaged"):
        ro.read_chunk(0, bad[0])


def test_a_store_written_before_shards_still_reads(cache: Cache) -> None:
    store = make_store(cache)  # one chunk a file; stores of earlier versions also lack the attribute
    logits, feats = fill(store)
    store.mark_complete()
    del store.group.attrs["shard_rows"]
    ro = cache.open_teacher(store.id)
    assert "shard_rows" not in ro.attrs and (ro.shard_rows, ro.chunks_per_shard, ro.shards_per_view) == (R, 1, 3)
    assert ro.pending_shards() == [] and ro.verify() == []
    assert np.array_equal(ro.read_rows(2, 0, N)[1], feats[2])
