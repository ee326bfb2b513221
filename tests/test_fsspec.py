"""Caches behind fsspec URLs: `file://` through zarr's FsspecStore (bit-identical stores and students,
the same writer lock, cache admin), `memory://` (no writer lock, and precompute says so), torn markers,
and the errors for an unknown or uninstalled file system."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import FsspecStore

from conftest import run_cli
from kdcache.pipelines.cache_admin import list_stores, remove, verify_stores
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.store import Cache, Location, StoreForm, TeacherStore
from kdcache.store.layout import StoreShape

ROWS = 256
VIEWS = 2
ARRAYS = ("logits", "features", "done", "head/weight", "head/bias")


def precompute_args(ckpt: Path, cache: Path | str, views: int = VIEWS) -> list:
    return ["precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits", "--cache", cache,
            "--views", views, "--chunk-rows", ROWS, "--batch-size", 256, "--device", "cpu"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, digits_teacher: Path) -> tuple[Path, str]:
    """A store precomputed into a plain local directory: the reference."""
    cache = tmp_path_factory.mktemp("plain") / "cache"
    result = run_cli(*precompute_args(digits_teacher, cache))
    assert result.exit_code == 0, result.output
    return cache, result.stdout.strip().splitlines()[-1]


def arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    return {name: group[name][...] for name in ARRAYS}


def assert_same_arrays(a: zarr.Group, b: zarr.Group) -> None:
    got, want = arrays(a), arrays(b)
    for name in ARRAYS:
        assert np.array_equal(got[name], want[name]), name


def test_file_url_cache_goes_through_fsspec_and_matches_a_plain_directory(
        plain, digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain_cache, tid = plain
    folder = tmp_path / "url-cache"
    url = folder.as_uri()  # file:///...
    written: list[object] = []
    original = TeacherStore.create.__func__

    def recording(cls, *a, **kw):  # type: ignore[no-untyped-def]
        store = original(cls, *a, **kw)
        written.append(store.group.store)
        return store

    monkeypatch.setattr(TeacherStore, "create", classmethod(recording))
    result = run_cli(*precompute_args(digits_teacher, url))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == tid
    assert "Warning" not in result.output  # file:// keeps the writer lock
    assert len(written) == 1 and isinstance(written[0], FsspecStore)

    store = Cache.at(url).open_teacher(tid)
    assert isinstance(store.group.store, FsspecStore) and store.path == f"{url}/teachers/{tid}"
    assert_same_arrays(store.group, zarr.open_group(plain_cache / "teachers" / tid, mode="r"))
    assert store.attrs["test_accuracy"] == Cache.at(plain_cache).open_teacher(tid).attrs["test_accuracy"]

    # a student distilled from the URL cache is the student distilled from the plain one
    students = []
    for name, cache in (("plain", plain_cache), ("url", url)):
        distill(DistillRequest(student="resnet8", teachers=[tid[:8]], method="kd", out=tmp_path / name, cache=cache,
                               epochs=1, batch_size=256, milestones=[1], device="cpu", seed=0))
        students.append(torch.load(tmp_path / name / "last.pth", map_location="cpu")["model"])
    assert students[0].keys() == students[1].keys()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])

    # cache admin through the URL
    ls = run_cli("cache", "ls", "--cache", url)
    assert ls.exit_code == 0 and tid in ls.output and "complete" in ls.output
    info = json.loads(run_cli("cache", "info", tid[:6], "--cache", url).output)
    assert info["path"] == f"{url}/teachers/{tid}" and info["bytes"] > 0 and info["plan"]["plan_id"]
    assert run_cli("cache", "verify", "--cache", url).exit_code == 0
    chunk = folder / "teachers" / tid / "logits" / "c" / "1" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 0xFF]))
    bad = run_cli("cache", "verify", tid, "--cache", url)
    assert bad.exit_code == 1 and "logits: chunk (view 1, chunk 2) is damaged" in bad.output

    # file:// maps to the directory's flock: a second writer is refused, as in a plain directory
    other = run_cli(*precompute_args(digits_teacher, url, views=1), "--dry-run").stdout.strip().splitlines()[-1]
    with Cache.at(folder).teacher_lock(other):
        locked = run_cli(*precompute_args(digits_teacher, url, views=1))
    assert locked.exit_code != 0 and "being written by another process" in locked.output

    rm = run_cli("cache", "rm", tid, "--cache", url)
    assert rm.exit_code == 0 and not (folder / "teachers" / tid).exists()
    assert Cache.at(url).plan_ids()  # the plan stays


def test_memory_url_cache_works_and_says_it_has_no_writer_lock(plain, digits_teacher: Path) -> None:
    plain_cache, tid = plain
    url = f"memory://kdcache-test-{uuid.uuid4().hex}"
    warnings: list[str] = []
    req = PrecomputeRequest(teacher="resnet8", checkpoint=digits_teacher, dataset="digits", cache=url, views=VIEWS,
                            chunk_rows=ROWS, batch_size=256, device="cpu")
    try:
        result = precompute(req, warn=warnings.append)
        assert result.status == "written" and result.teacher_id == tid
        assert len(warnings) == 1 and "no writer lock" in warnings[0] and "one precompute per teacher" in warnings[0]
        cache = Cache.at(url)
        assert cache.lock_path("teacher", tid) is None and not cache.has_writer_lock
        store = cache.open_teacher(tid)
        assert isinstance(store.group.store, FsspecStore)
        assert_same_arrays(store.group, zarr.open_group(plain_cache / "teachers" / tid, mode="r"))
        assert verify_stores(cache) == {tid: []}
        [summary] = list_stores(cache)
        assert summary.state == "complete" and summary.bytes > 0
        assert precompute(req, warn=warnings.append).status == "complete" and len(warnings) == 1
        assert remove(cache, tid[:6]) == ("teacher", tid) and cache.teacher_ids() == [] and cache.plan_ids()
    finally:
        Location(url)._fs()[0].rm(Location(url)._fs()[1], recursive=True)


def test_a_torn_marker_counts_as_not_written(tmp_path: Path) -> None:
    """fsspec's local writes are not renamed into place: a marker torn by a crash must not count."""
    url = (tmp_path / "c").as_uri() + "/teachers/t1"
    teacher = {"plan_id": "p", "arch": "resnet8", "checkpoint": {}}
    store = TeacherStore.create(url, "t1", StoreForm(), StoreShape(2, 8, 3, 4), teacher, torch.zeros(3, 4),
                                torch.zeros(3), chunk_rows=4)
    for v, c in [(0, 0), (0, 1), (1, 0)]:
        store.write_chunk(v, c, np.ones((4, 3), np.float16), np.ones((4, 4), np.float16), 1)
    assert store.pending() == [(1, 1)]
    marker = tmp_path / "c" / "teachers" / "t1" / "done" / "c" / "0" / "1"
    marker.write_bytes(marker.read_bytes()[:5])  # torn mid-write
    reopened = TeacherStore.open(url, "t1", require_complete=False, writable=True)
    assert reopened.pending() == [(0, 1), (1, 1)] and reopened.pending(view=1) == [(1, 1)]


@pytest.mark.parametrize("url, message", [
    ("foo://bucket/cache", "Protocol not known: foo"),
    pytest.param("s3://bucket/cache", "needs a file system package that is not installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")),
])
def test_an_unusable_url_is_one_clear_line(url: str, message: str) -> None:
    result = run_cli("cache", "ls", "--cache", url)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
