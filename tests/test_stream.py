"""The stream reader: schedule, exact rows for every teacher, bounded read-ahead, refusals."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import flip_byte
from kdcache.errors import KdcacheError, StoreError
from kdcache.store import Cache, PlanStore, StoreForm, TeacherStore
from kdcache.store.layout import StoreShape
from kdcache.stream import Schedule, TeacherStream, check_compatible

V, N, C = 4, 40, 3


def make_plan(cache: Cache, pid: str = "plan000000000000", dataset: str = "x", fingerprint: str = "f",
              seed: int = 0) -> PlanStore:
    rng = np.random.default_rng(7)
    order = np.stack([rng.permutation(N) for _ in range(V)]).astype(np.int32)
    params = rng.integers(0, 9, (V, N, 3)).astype(np.int16)
    labels = (np.arange(N) % C).astype(np.int32)
    attrs = {"dataset": {"name": dataset, "n_samples": N, "n_classes": C, "fingerprint": fingerprint},
             "recipe": {"name": "crop-flip"}, "seed": seed}
    return PlanStore.create(cache.plan_path(pid), cache.lock_path("plan", pid), pid, attrs, len(order), labels,
                            lambda v: (order[v], params[v]))


def make_teacher(cache: Cache, tid: str, plan: PlanStore, dim: int, rows: int,
                 seed: int) -> tuple[TeacherStore, np.ndarray, np.ndarray]:
    teacher = {"plan_id": plan.id, "arch": "resnet8", "checkpoint": {"path": "/x", "sha256": "0"}, "dataset": "x"}
    store = TeacherStore.create(cache.teacher_path(tid), tid, StoreForm(), StoreShape(plan.n_views, plan.n_samples, C, dim),
                                teacher, torch.zeros(C, dim), torch.zeros(C), chunk_rows=rows)
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((plan.n_views, plan.n_samples, C)).astype(np.float16)
    feats = rng.standard_normal((plan.n_views, plan.n_samples, dim)).astype(np.float16)
    for v in range(plan.n_views):
        for c in range(store.chunks_per_view):
            r = store.rows(c)
            store.write_chunk(v, c, logits[v, r], feats[v, r], 0)
    store.mark_complete()
    return cache.open_teacher(tid), logits, feats


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    c = Cache.at(tmp_path / "cache")
    c.ensure_writable()
    return c


def test_schedule_is_a_pure_function_of_seed_and_epoch() -> None:
    s = Schedule(n_views=5, n_samples=50, chunk_rows=8, seed=3)
    assert sorted(s.view(e) for e in range(1, 6)) == list(range(5))  # each view once per V epochs
    assert [s.view(e) for e in range(6, 11)] == [s.view(e) for e in range(1, 6)]  # then it wraps
    assert sorted(s.chunk_order(2).tolist()) == list(range(7))
    rows = s.epoch_rows(2)
    assert sorted(rows.tolist()) == list(range(50))
    # reads stay sequential: consecutive runs of rows each come from one whole chunk
    pos = 0
    for c in s.chunk_order(2):
        size = min(8, 50 - 8 * c)
        assert set(rows[pos:pos + size] // 8) == {c}
        pos += size
    again = Schedule(5, 50, 8, 3)
    assert np.array_equal(again.epoch_rows(2), rows) and again.view(4) == s.view(4)
    other = Schedule(5, 50, 8, 4)
    assert not np.array_equal(other.epoch_rows(2), rows)
    assert not np.array_equal(s.epoch_rows(3), rows)
    assert s.steps(16) == 3


def test_batches_carry_each_teachers_exact_rows(cache: Cache) -> None:
    plan = make_plan(cache)
    a, za, ha = make_teacher(cache, "a" * 16, plan, dim=5, rows=8, seed=1)
    b, zb, hb = make_teacher(cache, "b" * 16, plan, dim=7, rows=16, seed=2)  # a wider teacher, larger chunks
    stream = TeacherStream(plan, [a, b], seed=11, prefetch=1)
    epoch = 3
    batches = list(stream.epoch(epoch, batch_size=6))
    assert len(batches) == N // 6
    v = stream.schedule.view(epoch)
    seen = np.concatenate([bt.rows for bt in batches])
    assert np.array_equal(seen, stream.schedule.epoch_rows(epoch)[: len(seen)])
    order, params = plan.view(v)
    for bt in batches:
        assert bt.view == v
        assert np.array_equal(bt.indices, order[bt.rows]) and np.array_equal(bt.params, params[bt.rows])
        assert np.array_equal(bt.labels, plan.labels[order[bt.rows]])
        assert torch.equal(bt.teacher_logits[0], torch.from_numpy(za[v, bt.rows]))
        assert torch.equal(bt.teacher_features[0], torch.from_numpy(ha[v, bt.rows]))
        assert torch.equal(bt.teacher_logits[1], torch.from_numpy(zb[v, bt.rows]))
        assert torch.equal(bt.teacher_features[1], torch.from_numpy(hb[v, bt.rows]))
        assert bt.teacher_logits[0].dtype == torch.float16


def test_read_ahead_is_bounded_and_stops_with_the_consumer(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(cache)
    a, _, _ = make_teacher(cache, "a" * 16, plan, dim=5, rows=4, seed=1)  # 10 chunks a view
    reads: list[int] = []
    original = TeacherStore.submit_selected

    def counting(self, v, rows, pool):
        reads.append(int(rows.min()))
        return original(self, v, rows, pool)

    monkeypatch.setattr(TeacherStore, "submit_selected", counting)
    stream = TeacherStream(plan, [a], seed=0, prefetch=2, read_threads=2)
    assert stream.ahead == 4  # blocks decoding at once: two a reader thread for one teacher
    it = stream.epoch(1, batch_size=4)
    next(it)
    threading.Event().wait(0.3)  # give the reader every chance to run ahead
    # one block consumed, at most `prefetch` queued, `ahead` decoding, one more held by the blocked reader
    assert 1 <= len(reads) <= 1 + 2 + 4 + 1 < 10
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(("kdcache-stream", "kdcache-read"))]


def test_a_damaged_chunk_stops_the_run_naming_store_and_chunk(cache: Cache) -> None:
    plan = make_plan(cache)
    a, _, _ = make_teacher(cache, "a" * 16, plan, dim=5, rows=8, seed=1)
    flip_byte(a.path / "logits" / "c" / "2" / "3" / "0")
    stream = TeacherStream(plan, [a], seed=0)
    epoch = next(e for e in range(1, V + 1) if stream.schedule.view(e) == 2)
    with pytest.raises(StoreError, match=rf"teacher store {a.id}: logits chunk \(view 2, chunk 3\) is damaged"):
        list(stream.epoch(epoch, batch_size=4))


def test_each_rank_streams_and_reads_only_its_slice_of_every_global_batch(cache: Cache,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(cache)
    a, za, ha = make_teacher(cache, "a" * 16, plan, dim=5, rows=8, seed=1)
    b, zb, hb = make_teacher(cache, "b" * 16, plan, dim=7, rows=16, seed=2)
    epoch, batch = 3, 6
    single = list(TeacherStream(plan, [a, b], seed=11).epoch(epoch, batch))
    v = single[0].view
    reads: list[tuple[str, list[int]]] = []
    original = TeacherStore.submit_selected

    def recording(self, v, rows, pool):
        reads.append((self.id, np.asarray(rows).tolist()))
        return original(self, v, rows, pool)

    monkeypatch.setattr(TeacherStore, "submit_selected", recording)
    for world in (2, 3):
        ranks = []
        for rank in range(world):
            reads.clear()
            batches = list(TeacherStream(plan, [a, b], seed=11, rank=rank, world=world).epoch(epoch, batch))
            assert len(batches) == len(single) and {len(bt.rows) for bt in batches} == {batch // world}
            for bt in batches:
                assert torch.equal(bt.teacher_logits[0], torch.from_numpy(za[v, bt.rows]))
                assert torch.equal(bt.teacher_features[0], torch.from_numpy(ha[v, bt.rows]))
                assert torch.equal(bt.teacher_logits[1], torch.from_numpy(zb[v, bt.rows]))
                assert torch.equal(bt.teacher_features[1], torch.from_numpy(hb[v, bt.rows]))
            # of each teacher it took its own rows, each once, and nothing else
            mine = np.concatenate([bt.rows for bt in batches]).tolist()
            for teacher in (a, b):
                got = sum((rows for t, rows in reads if t == teacher.id), [])
                assert sorted(got) == sorted(mine)
            ranks.append(batches)
        for step, whole in enumerate(single):
            parts = [ranks[r][step] for r in range(world)]
            assert np.array_equal(np.concatenate([p.rows for p in parts]), whole.rows)
            assert np.array_equal(np.concatenate([p.indices for p in parts]), whole.indices)
            assert np.array_equal(np.concatenate([p.params for p in parts]), whole.params)
            assert torch.equal(torch.cat([p.teacher_logits[1] for p in parts]), whole.teacher_logits[1])
    whole = list(TeacherStream(plan, [a, b], seed=11, read_teachers=False).epoch(epoch, batch))
    live = list(TeacherStream(plan, [a, b], seed=11, read_teachers=False, rank=1, world=2).epoch(epoch, batch))
    assert [bt.rows.tolist() for bt in live] == [bt.rows[3:].tolist() for bt in whole]
    assert live[0].teacher_logits == [] and [bt.rows.tolist() for bt in whole] == [bt.rows.tolist() for bt in single]
    with pytest.raises(KdcacheError, match="--batch-size 6 does not split evenly over 4 ranks"):
        next(TeacherStream(plan, [a], seed=11, rank=0, world=4).epoch(epoch, batch))


def test_a_damaged_chunk_stops_a_rank_naming_store_and_chunk(cache: Cache) -> None:
    plan = make_plan(cache)
    a, _, _ = make_teacher(cache, "a" * 16, plan, dim=5, rows=8, seed=1)
    flip_byte(a.path / "features" / "c" / "2" / "3" / "0")
    stream = TeacherStream(plan, [a], seed=0, rank=1, world=2)
    epoch = next(e for e in range(1, V + 1) if stream.schedule.view(e) == 2)
    with pytest.raises(StoreError, match=rf"teacher store {a.id}: features chunk \(view 2, chunk 3\) is damaged"):
        list(stream.epoch(epoch, batch_size=4))


def test_a_deleted_marker_stops_a_rank_naming_store_and_chunk(cache: Cache) -> None:
    plan = make_plan(cache)
    a, _, _ = make_teacher(cache, "a" * 16, plan, dim=5, rows=8, seed=1)
    (a.path / "done" / "c" / "1" / "2").unlink()
    stream = TeacherStream(plan, [a], seed=0, rank=0, world=2)
    epoch = next(e for e in range(1, V + 1) if stream.schedule.view(e) == 1)
    with pytest.raises(StoreError, match=rf"teacher store {a.id}: completion marker of \(view 1, chunk 2\) is missing"):
        list(stream.epoch(epoch, batch_size=4))


def test_teachers_on_different_plans_are_refused(cache: Cache) -> None:
    p1, p2 = make_plan(cache, "plan100000000000"), make_plan(cache, "plan200000000000")
    a, _, _ = make_teacher(cache, "a" * 16, p1, dim=5, rows=8, seed=1)
    b, _, _ = make_teacher(cache, "b" * 16, p2, dim=5, rows=8, seed=1)
    with pytest.raises(StoreError, match="different view plans"):
        TeacherStream(p1, [a, b], seed=0)


def test_teachers_on_different_plans_are_told_what_differs(cache: Cache) -> None:
    """The refusal names the real cause and its remedy: another data set, another copy of it, another seed."""
    base = make_plan(cache, "plan100000000000")
    a, _, _ = make_teacher(cache, "a" * 16, base, dim=5, rows=8, seed=1)
    for pid, kw, says in (
            ("plan200000000000", {"dataset": "mnist"}, f"on different data sets ({a.id} x, {'b' * 16} mnist); "
                                                         "distil from teachers of one data set"),
            ("plan300000000000", {"fingerprint": "g"}, "on different copies of x (the files differ); precompute them "
                                                        "from the same --data-root"),
            ("plan400000000000", {"seed": 3}, f"with different --plan-seed ({a.id} 0, {'b' * 16} 3); precompute "
                                               "them with the same --plan-seed")):
        other = make_plan(cache, pid, **kw)
        b, _, _ = make_teacher(cache, "b" * 16, other, dim=5, rows=8, seed=1)
        plans = {base.id: base, other.id: other}
        with pytest.raises(StoreError) as refused:
            check_compatible(base, [a, b], plans)
        assert str(refused.value) == f"the teachers were precomputed {says}"
        cache.remove_teacher("b" * 16)
