"""`kdcache precompute --workers/--scheduler`: stores bit-identical to a serial run, a killed worker's task
retried, several teachers in one call, the GPU cluster's spec, and the refusals."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import run_cli
from kdcache.models import build_model
from kdcache.pipelines import precompute as pc
from kdcache.pipelines import precompute_cluster as pcc
from kdcache.store import Cache

ROWS = 256  # 1437 digits rows -> 6 chunks a view
VIEWS = 2
ARRAYS = ("logits", "features", "done", "head/weight", "head/bias")


def precompute_args(pairs: list[tuple[str, Path]], cache: Path | str, *extra: str) -> list:
    args = ["precompute", "--dataset", "digits", "--cache", cache, "--views", VIEWS, "--chunk-rows", ROWS,
            "--batch-size", 256, "--device", "cpu", *extra]
    for arch, ckpt in pairs:
        args += ["--teacher", arch, "--checkpoint", ckpt]
    return args


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, Path]], list[str]]:
    """Two digits teachers precomputed serially in one call: the reference cache, the pairs and the ids."""
    root = tmp_path_factory.mktemp("cluster")
    pairs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpt = root / f"resnet8-{seed}.pth"
        torch.save({"model": build_model("resnet8", 10).state_dict()}, ckpt)
        pairs.append(("resnet8", ckpt))
    result = run_cli(*precompute_args(pairs, root / "serial"))
    assert result.exit_code == 0, result.output
    ids = result.stdout.strip().splitlines()[-2:]
    assert len(set(ids)) == 2
    return root / "serial", pairs, ids


def assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ARRAYS:
        assert np.array_equal(ga[name][...], gb[name][...]), name
    for key in ("test_accuracy", "test_top5", "view_accuracy", "complete", "chunk_rows"):
        assert ga.attrs[key] == gb.attrs[key], key


def test_two_local_workers_write_stores_bit_identical_to_a_serial_run(serial, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ref, pairs, ids = serial
    seen: dict[str, set[str]] = {}
    original = pcc.run_tasks

    def recording(client, tasks, resources, tick=None):  # type: ignore[no-untyped-def]
        from distributed import get_task_stream

        seen["workers"] = set(client.scheduler_info()["workers"])
        seen["malloc_trim"] = set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values())
        with get_task_stream(client) as stream:
            original(client, tasks, resources, tick)
        seen["ran_on"] = {t["worker"] for t in stream.data if t["key"].startswith("kdcache-fill-")}
        seen["teachers"] = {t.teacher.teacher_id for t in tasks}

    def not_here(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("the coordinator wrote chunks itself")

    monkeypatch.setattr(pcc, "run_tasks", recording)
    monkeypatch.setattr(pc, "write_chunks", not_here)   # the serial front end's
    monkeypatch.setattr(pcc, "write_chunks", not_here)  # the cluster's, in this process (workers import their own)
    environ = dict(os.environ)
    result = run_cli(*precompute_args(pairs, tmp_path / "c", "--workers", 2))
    assert result.exit_code == 0, result.output
    assert dict(os.environ) == environ  # dask's nannies left no variables behind in this process
    assert seen["malloc_trim"] == {None}  # nor in the workers (it slows torch there by a third)
    assert result.stdout.strip().splitlines()[-2:] == ids  # one id a line, in the order given
    assert len(seen["workers"]) == 2 and seen["ran_on"] == seen["workers"]  # both workers did work
    assert seen["teachers"] == set(ids)
    cache = Cache.at(tmp_path / "c")
    for tid in ids:
        assert_same_store(ref / "teachers" / tid, tmp_path / "c" / "teachers" / tid)
        assert cache.open_teacher(tid).verify() == []
    again = run_cli(*precompute_args(pairs, tmp_path / "c", "--workers", 2))  # complete: no cluster, no work
    assert again.exit_code == 0 and again.output.count("already complete") == 2


def test_a_worker_killed_mid_task_has_its_task_retried(serial, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from cluster_faults import KillOnce

    ref, pairs, ids = serial
    log, marker = tmp_path / "writes.log", tmp_path / "killed"
    with pcc.plain_worker_environment(), LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                      dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        with Client(cluster) as client:
            client.register_plugin(KillOnce(str(log), str(marker)))
            result = run_cli(*precompute_args(pairs[:1], tmp_path / "c", "--scheduler", cluster.scheduler_address))
    assert result.exit_code == 0, result.output
    tid = ids[0]
    assert result.stdout.strip().splitlines()[-1] == tid
    lines = [line.split() for line in log.read_text().splitlines()]
    kills = [entry for entry in lines if entry[0] == "kill"]
    assert marker.exists() and len(kills) == 1, "no worker was killed"
    _, killed_pid, killed_tid, v, c = kills[0]
    writes = [tuple(entry[1:]) for entry in lines if entry[0] == "write"]
    # the killed chunk was written afterwards by another process: the task ran again
    assert any(w[1:] == (killed_tid, v, c) and w[0] != killed_pid for w in writes)
    # the chunk that process wrote and marked before dying was not written again
    before = [w for w in writes if w[0] == killed_pid and w[1:] != (killed_tid, v, c)]
    assert before and all(sum(x[1:] == w[1:] for x in writes) == 1 for w in before)
    store = Cache.at(tmp_path / "c").open_teacher(tid)
    assert store.verify() == []
    assert_same_store(ref / "teachers" / tid, tmp_path / "c" / "teachers" / tid)


def test_gpu_workers_get_one_gpu_each_and_tasks_ask_for_one() -> None:
    from distributed import Nanny

    specs = pcc.gpu_worker_specs(["2", "5"])
    assert list(specs) == ["gpu-2", "gpu-5"]
    for gpu, spec in zip(("2", "5"), specs.values()):
        assert spec["cls"] is Nanny
        assert spec["options"]["env"] == {"CUDA_VISIBLE_DEVICES": gpu}
        assert spec["options"]["resources"] == {"GPU": 1} and spec["options"]["nthreads"] == 1

    class FakeClient:
        submitted: list[dict] = []

        def submit(self, fn, task, **kw):  # type: ignore[no-untyped-def]
            self.submitted.append({"fn": fn, "task": task, **kw})
            return object()  # a stand-in future

        def cancel(self, futures):  # type: ignore[no-untyped-def]
            pass

    spec = pcc.TeacherSpec("/c", "t", "p", "resnet8", "/x.pth", "0" * 64, "digits", None, "f", None, "cuda", None)
    tasks = [pcc.ChunkTask(spec, 0, (0, 1), 512), pcc.ChunkTask(spec, 1, (0, 1), 512)]
    client = FakeClient()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("distributed.as_completed", lambda futures: iter(()))
        pcc.run_tasks(client, tasks, {"GPU": 1})
    assert [s["task"] for s in client.submitted] == tasks
    assert all(s["fn"] is pcc.fill_chunks and s["resources"] == {"GPU": 1} and s["retries"] >= 1
               for s in client.submitted)
    assert len({s["key"] for s in client.submitted}) == 2


def test_local_gpu_ids_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pcc, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert pcc._local_gpu_ids(None) == ["3", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pcc._local_gpu_ids(None) == ["0", "1"]
    monkeypatch.setattr(pcc, "resolve_device", lambda name: torch.device("cpu"))
    assert pcc._local_gpu_ids("cpu") == []
    # more workers than GPUs is refused before any cluster starts
    monkeypatch.setattr(pcc, "_local_gpu_ids", lambda device: ["0", "1"])
    monkeypatch.setattr(pcc, "gpu_cluster", lambda *a: pytest.fail("started a cluster"))
    with pytest.raises(pcc.KdcacheError, match="one worker per GPU"):
        with pcc.dask_client(3, None, None):
            pass


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "resnet8"], "give one --checkpoint per --teacher"),
    (["--workers", 2, "--cache", "memory://kdcache-test"], "lives in this process's memory"),
    (["--workers", 2, "--scheduler", "tcp://127.0.0.1:1"], "not both"),
    (["--workers", 0], "Invalid value for '--workers': 0 is not in the range x>=1"),
    (["--workers", 2, "--device", "cuda:1"], "pass --device cuda"),
])
def test_refusals_are_one_clear_line(digits_teacher: Path, tmp_path: Path, extra: list, message: str) -> None:
    args = ["precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
            "--cache", tmp_path / "c", *extra]
    result = run_cli(*args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_workers_write_different_shards_of_one_view_and_never_the_same_shard(serial, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """In shards of two 128-row chunks and one shard a task, two workers fill the shards of one view side by
    side: every task holds whole shards, no shard is in two tasks, and the store has the serial run's rows."""
    ref, pairs, ids = serial
    seen: dict[str, list] = {}
    original = pcc.run_tasks

    def recording(client, tasks, resources, tick=None):  # type: ignore[no-untyped-def]
        seen["tasks"] = list(tasks)
        original(client, tasks, resources, tick)

    monkeypatch.setattr(pcc, "TASK_ROWS", 256)
    monkeypatch.setattr(pcc, "run_tasks", recording)
    result = run_cli(*precompute_args(pairs[:1], tmp_path / "c", "--chunk-rows", "128", "--shard-rows", "256",
                                      "--workers", 2))  # the last --chunk-rows wins
    assert result.exit_code == 0, result.output
    tid = ids[0]
    store = Cache.at(tmp_path / "c").open_teacher(tid)
    assert (store.chunk_rows, store.shard_rows, store.shards_per_view) == (128, 256, 6)
    shards = [(t.view, store.shard_of(c)) for t in seen["tasks"] for c in t.chunks]
    assert all(list(t.chunks) == list(store.shard_chunks(store.shard_of(t.chunks[0]))) for t in seen["tasks"])
    assert sorted(set(shards)) == [(v, s) for v in range(VIEWS) for s in range(6)]
    assert len({(t.view, store.shard_of(t.chunks[0])) for t in seen["tasks"]}) == len(seen["tasks"]) == VIEWS * 6
    assert store.verify() == []
    got, want = zarr.open_group(tmp_path / "c" / "teachers" / tid, mode="r"), zarr.open_group(ref / "teachers" / tid,
                                                                                              mode="r")
    for name in ("logits", "features"):  # the same 256-row forward batches: the same rows, bit for bit
        assert np.array_equal(got[name][...], want[name][...]), name
    assert got["done"][...].sum() == want["done"][...].sum()
