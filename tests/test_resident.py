"""Views held whole in device memory (kdcache.resident; on the CPU, "device" memory is the host's): the batches
are bit-identical to streamed ones in every store form, for a rank's slice too, and a student trained either way
ends with the same weights; the next view is read in the background and at most two are held; damage in a view
read ahead is named when its epoch starts; whether views are resident follows their bytes against the share."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from fakes import flip_byte
from kdcache import CachedTeachers
from kdcache.errors import StoreError
from kdcache.models import build_model
from kdcache.resident import ResidentViews, served_row_bytes, view_bytes, views_fit

DIGITS = 1437  # scikit-learn's digits: training rows


def precompute(root: Path, arch: str, seed: int, *options: object) -> str:
    torch.manual_seed(seed)
    ckpt = root / f"{arch}-{seed}.pth"
    if not ckpt.exists():
        torch.save({"model": build_model(arch, 10).state_dict()}, ckpt)
    result = run_cli("precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", "digits", "--cache",
                     root / "cache", "--chunk-rows", 256, "--device", "cpu", *options)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """Digits teachers on plans of 3 views (pooled, spatial, top-K logits with int8 features) and of 1 view."""
    root = tmp_path_factory.mktemp("resident")
    ids = {"pooled": [precompute(root, "resnet8", 0, "--views", 3), precompute(root, "wrn_16_1", 1, "--views", 3)],
           "spatial": [precompute(root, "resnet8", 0, "--views", 3, "--features", "spatial")],
           "compact": [precompute(root, "resnet8", 0, "--views", 3, "--logits", "topk:3", "--feature-dtype", "int8")],
           "one view": [precompute(root, "resnet8", 0, "--views", 1)]}
    return root / "cache", ids


def same_batches(a: CachedTeachers, b: CachedTeachers, epochs: range) -> int:
    """Assert every batch of ``epochs`` is the same bit for bit from ``a`` and ``b``; the batches compared."""
    n = 0
    for epoch in epochs:
        for x, y in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
            assert (x.epoch, x.step, x.view) == (y.epoch, y.step, y.view)
            assert np.array_equal(x.indices, y.indices)
            assert torch.equal(x.views, y.views) and torch.equal(x.labels, y.labels)
            assert len(x.teacher_logits) == len(y.teacher_logits) == len(a.stores)
            for p, q in zip(x.teacher_logits + x.teacher_features, y.teacher_logits + y.teacher_features, strict=True):
                assert p.dtype == q.dtype and torch.equal(p, q)
            for p, q in zip(x.teacher_topk, y.teacher_topk, strict=True):
                assert (p is None) == (q is None)
                if p is not None:
                    assert all(torch.equal(getattr(p, f), getattr(q, f)) for f in ("values", "indices", "stats"))
            n += 1
    return n


@pytest.mark.parametrize("form", ["pooled", "spatial", "compact", "one view"])
def test_resident_batches_equal_streamed_ones_in_every_form(stores, form: str) -> None:
    cache, ids = stores
    streamed = CachedTeachers(ids[form], cache, batch_size=100, seed=2, device="cpu", resident_share=0)
    resident = CachedTeachers(ids[form], cache, batch_size=100, seed=2, device="cpu", resident_share=1)
    assert not streamed.resident_views and resident.resident_views
    assert same_batches(streamed, resident, range(1, 5)) == 4 * 14  # epoch 4 comes back to a view read before
    if form == "pooled":
        for rank in (0, 1):
            part = [CachedTeachers(ids[form], cache, batch_size=100, seed=2, device="cpu", rank=rank, world=2,
                                   resident_share=share) for share in (0, 1)]
            assert same_batches(*part, range(2, 4)) == 2 * 14


def test_a_plan_of_one_view_is_read_once_and_the_next_view_in_the_background(stores, monkeypatch) -> None:
    cache, ids = stores
    reads: list[tuple[int, str]] = []
    real = ResidentViews.read

    def recording(self: ResidentViews, view: int):
        reads.append((view, threading.current_thread().name))
        return real(self, view)

    monkeypatch.setattr(ResidentViews, "read", recording)
    single = CachedTeachers(ids["one view"], cache, batch_size=100, seed=0, device="cpu")
    for epoch in (1, 2, 3):
        list(single.epoch(epoch))
    assert reads == [(0, "MainThread")]  # one view, read once for every epoch
    reads.clear()
    teachers = CachedTeachers(ids["pooled"], cache, batch_size=100, seed=0, device="cpu")
    schedule = teachers.stream.schedule
    for epoch in (1, 2, 3, 4):
        list(teachers.epoch(epoch))
        assert len(teachers._views._views) <= 2
    for t in [t for t in threading.enumerate() if t.name.startswith("kdcache-view-")]:
        t.join(30)
    views = [schedule.view(e) for e in (1, 2, 3, 4, 5)]
    assert reads[0] == (views[0], "MainThread")  # the first epoch's view: read when asked
    assert reads[1:] == [(v, f"kdcache-view-{v}") for v in views[1:]]  # each next one ahead, in the background


def test_damage_in_a_view_read_ahead_is_named_when_its_epoch_starts(stores, tmp_path: Path) -> None:
    cache, ids = stores
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    teachers = CachedTeachers(ids["pooled"], copy, batch_size=100, seed=5, device="cpu")
    v2 = teachers.stream.schedule.view(2)
    store = teachers.stores[1]
    flip_byte(Path(store.path) / "features" / "c" / str(v2) / "3" / "0")
    assert len(list(teachers.epoch(1))) == 14  # epoch 1 trains while view v2 is read (and found damaged)
    with pytest.raises(StoreError, match=rf"teacher store {store.id}: features chunk \(view {v2}, chunk 3\) is damaged"):
        next(teachers.epoch(2))


def test_views_are_resident_when_the_views_held_fit_in_the_share(stores) -> None:
    cache, ids = stores
    pooled = CachedTeachers(ids["pooled"], cache, batch_size=100, device="cpu", resident_share=0).stores
    spatial = CachedTeachers(ids["spatial"], cache, batch_size=100, device="cpu", resident_share=0).stores
    compact = CachedTeachers(ids["compact"], cache, batch_size=100, device="cpu", resident_share=0).stores
    # by hand: 10 float16 logits + 64 float16 features; a 64x8x8 float16 map; top-3 packed as 2*3+5 float32
    # values, int8 features scaled back to float32
    assert [served_row_bytes(s) for s in pooled + spatial + compact] == [2 * 10 + 2 * 64, 2 * 10 + 2 * 64,
                                                                           2 * 10 + 2 * 64 * 8 * 8,
                                                                           4 * (2 * 3 + 5) + 4 * 64]
    one_view = view_bytes(pooled)
    assert one_view == 2 * 148 * DIGITS
    cpu = torch.device("cpu")
    assert views_fit(pooled, 3, cpu, share=0.5, free=4 * one_view)          # two views held: 2 x one_view
    assert not views_fit(pooled, 3, cpu, share=0.5, free=4 * one_view - 1)
    assert views_fit(pooled, 1, cpu, share=0.5, free=2 * one_view)          # a plan of one view holds one
    assert not views_fit(pooled, 3, cpu, share=0, free=10**15)
    big = CachedTeachers(ids["spatial"], cache, batch_size=100, device="cpu", resident_share=1e-12)
    assert not big.resident_views and big.stream.read_teachers  # streamed, as before


def test_a_student_trained_on_resident_views_ends_with_the_streamed_one_weights(stores, tmp_path: Path) -> None:
    cache, ids = stores
    runs = {}
    for share in ("0", "0.4"):
        out = tmp_path / f"run-{share}"
        result = run_cli("distill", "--student", "resnet8", "--method", "camkd", "--cache", cache, "--out", out,
                         "--epochs", 2, "--batch-size", 128, "--device", "cpu", "--resident-share", share,
                         "--read-threads", 2, *(x for t in ids["pooled"] for x in ("--teachers", t)))
        assert result.exit_code == 0, result.output
        runs[share] = torch.load(out / "last.pth", weights_only=False)["model"]
    assert runs["0"].keys() == runs["0.4"].keys()
    assert all(torch.equal(runs["0"][k], runs["0.4"][k]) for k in runs["0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("form", ["pooled", "spatial"])
def test_on_cuda_resident_batches_equal_streamed_ones(stores, form: str) -> None:
    cache, ids = stores
    streamed = CachedTeachers(ids[form], cache, batch_size=100, seed=4, device="cuda", resident_share=0)
    resident = CachedTeachers(ids[form], cache, batch_size=100, seed=4, device="cuda", resident_share=0.4)
    assert resident.resident_views and all(t.is_cuda for t in resident._views.get(resident.stream.schedule.view(1)).logits)
    assert same_batches(streamed, resident, range(1, 4)) == 3 * 14
