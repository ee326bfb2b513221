"""Reliability, each guarantee proven by injecting its fault in a real process or on real files (issue 5).

One section per guarantee: 1 SIGKILL during precompute, 2 damaged data, 3 two writers and a dead
writer's lock, 4 many read-only readers, 5 no space left, 7 interrupted distill (6, the bad-input
table, lives in test_cli.py). README's "What kdcache guarantees" states what these tests prove.

Faults are injected by HOOK: a wrapper that runs the real ``kdcache`` command line in a fresh
process (``python -c HOOK ARGS``) after patching one function, as $KDCACHE_FAULT (JSON) says:

- ``kill`` / ``kill-partial`` / ``enospc`` on the ``nth`` (default 1st) write of the file ``key`` of a
  teacher store (or of a plan, with ``node: plans``): SIGKILL before zarr writes it; SIGKILL with half
  of it written to zarr's temporary file; or half of it written then ``OSError(ENOSPC)`` raised, as a
  full disk does (patches zarr's local-store ``_put``);
- ``pause``: the writer that reaches its first chunk holds there until the file ``go`` appears;
- ``kill-step``: SIGKILL at distill's or train-teacher's ``step``-th training batch (counted over epochs);
- ``kill-in-save``: SIGKILL with half of the ``nth`` ``checkpoint.pth`` written (inside ``torch.save``);
- ``barrier``: a distill run waits at its first batch until ``n`` runs are there.

The library carries no test hook. Data are tiny: a fake CIFAR-10 of 88 images, 2 views in chunks of 16 rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import error_lines, run_cli
from fakes import flip_byte, write_fake_cifar
from kdcache.errors import StoreError
from kdcache.models import build_model
from kdcache.store import Cache, WriterLock
from kdcache.stream import Schedule

N_TRAIN, VIEWS, ROWS = 88, 2, 16
CHUNKS = -(-N_TRAIN // ROWS)  # 6 chunks a view
ALL_CHUNKS = {(v, c) for v in range(VIEWS) for c in range(CHUNKS)}
BATCH = 16  # distill: 5 steps an epoch
EPOCHS = 2
NOBODY = 65534

HOOK = r'''
import errno, io, json, os, re, signal, sys, time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ["KDCACHE_TEST_THREADS"]))  # the test process's: same float sums
fault = json.loads(os.environ.get("KDCACHE_FAULT") or "{}")
action = fault.get("action")
signals = Path(fault["dir"]) if "dir" in fault else None


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for(ready, what):
    deadline = time.monotonic() + 120
    while not ready():
        if time.monotonic() > deadline:
            sys.exit(f"fault hook: gave up waiting for {what}")
        time.sleep(0.02)


if action in ("kill", "kill-partial", "enospc", "pause"):
    import zarr.storage._local as local

    real_put, atomic_write = local._put, local._atomic_write
    paused, hits = [], [0]

    def put(path, value, exclusive=False):
        where = Path(path).as_posix()
        node = re.search(r"/(plans|teachers)/[0-9a-f]{16}/(.+)$", where)
        if "/teachers/" in where and signals:
            (signals / f"wrote-{os.getpid()}").touch()
        if action == "pause" and "/teachers/" in where and "/logits/c/" in where and not paused:
            paused.append(where)
            (signals / f"holding-{os.getpid()}").touch()
            wait_for((signals / "go").exists, "go")
        elif action != "pause" and node and node[1] == fault.get("node", "teachers") and node[2] == fault["key"]:
            hits[0] += 1
            if hits[0] == fault.get("nth", 1):
                if action == "kill":
                    die()
                data = value.to_bytes()
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(Path(path), "wb") as f:  # zarr's own temporary file, half filled
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    if action == "kill-partial":
                        die()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive)

    local._put = put

if action in ("kill-step", "barrier"):
    import kdcache.cached as cached  # where distill's batches are made
    import kdcache.pipelines.train_teacher as teacher  # and train-teacher's

    real_view_batch, calls = cached.view_batch, [0]

    def view_batch(*args, **kwargs):
        calls[0] += 1
        if action == "kill-step" and calls[0] == fault["step"]:
            die()
        if action == "barrier" and calls[0] == 1:
            (signals / f"reading-{os.getpid()}").touch()
            wait_for(lambda: len(list(signals.glob("reading-*"))) >= fault["n"], "the other readers")
            (signals / f"met-{os.getpid()}").touch()
        return real_view_batch(*args, **kwargs)

    cached.view_batch = teacher.view_batch = view_batch

if action == "kill-in-save":
    from kdcache import training

    real_save_atomic, real_save, target, saves = training.save_atomic, torch.save, [None], [0]

    def save_atomic(obj, path):
        target[0] = Path(path).name
        try:
            return real_save_atomic(obj, path)
        finally:
            target[0] = None

    def save(obj, f, *args, **kwargs):
        if target[0] == "checkpoint.pth":
            saves[0] += 1
            if saves[0] == fault["nth"]:
                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
        return real_save(obj, f, *args, **kwargs)

    training.save_atomic, torch.save = save_atomic, save

from kdcache.cli.main import main

main(args=sys.argv[1:], prog_name="kdcache")
'''


# -- helpers ----------------------------------------------------------------------------------

_started: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every process here computes on one thread (HOOK passes the count on): float sums are then equal in
    and out of process, and four processes on two cores do not fight over threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start(*args: object, fault: dict | None = None, **popen) -> subprocess.Popen:
    """``kdcache ARGS`` in a new process, with ``fault`` injected."""
    env = {**os.environ, **popen.pop("env", {}), "KDCACHE_TEST_THREADS": str(torch.get_num_threads()),
           "KDCACHE_FAULT": json.dumps(fault or {})}
    proc = subprocess.Popen([sys.executable, "-c", HOOK, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)
    _started.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_line(stderr: str) -> str:
    """The one line a refused command prints: nothing else on stderr but progress lines, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def chunk_inodes(store: Path) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(view, chunk) -> inodes of its logits, features and marker files, for every chunk with a marker.
    zarr writes each file to a temporary name and renames it into place, so a rewrite changes the inode."""
    out = {}
    for marker in (store / "done" / "c").glob("*/*"):
        if marker.name.isdigit():
            v, c = int(marker.parent.name), int(marker.name)
            out[(v, c)] = (*(_ino(store / name / "c" / str(v) / str(c) / "0") for name in ("logits", "features")),
                           _ino(marker))
    return out


def _ino(path: Path) -> int:
    return path.stat().st_ino


def strays(store: Path) -> list[str]:
    """Folders (relative to the store) holding a temporary ``*.partial`` file."""
    return sorted(p.parent.relative_to(store).as_posix() for p in store.rglob("*.partial"))


def assert_same_arrays(got: Path, expected: Path) -> None:
    a, b = zarr.open_group(expected, mode="r"), zarr.open_group(got, mode="r")
    for name in ("logits", "features", "done", "head/weight", "head/bias"):
        assert np.array_equal(a[name][...], b[name][...]), name


def assert_verifies(cache: Path, tid: str) -> None:
    result = run_cli("cache", "verify", tid, "--cache", cache)
    assert result.exit_code == 0 and f"{tid}: ok" in result.stdout, result.output


def is_complete(store: Path) -> bool:
    return zarr.open_group(store, mode="r").attrs.get("complete") is True


def assert_same_run(got: Path, expected: Path) -> None:
    """The student (and the method's own parameters) of two run directories are equal, bit for bit."""
    a, b = (torch.load(p / "checkpoint.pth", weights_only=False) for p in (expected, got))
    assert a["epoch"] == b["epoch"] == EPOCHS
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    last_a, last_b = (torch.load(p / "last.pth", weights_only=False)["model"] for p in (expected, got))
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    assert [json.loads(line)["epoch"] for line in (got / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder below ``root``: size, mtime and content hash of files, mtime of folders."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[p.relative_to(root).as_posix()] = (stat.S_IFMT(st.st_mode), st.st_size if digest else None,
                                               st.st_mtime_ns, digest)
    return out


@dataclass
class Shared:
    """A fake CIFAR-10, two teacher checkpoints and their complete stores on one plan (never modified)."""

    data: Path
    ckpts: list[Path]
    cache: Path
    ids: list[str]

    @property
    def tid(self) -> str:
        return self.ids[0]

    @property
    def store(self) -> Path:
        """The store of the first teacher, written by one uninterrupted precompute: the reference."""
        return self.cache / "teachers" / self.tid

    def precompute_args(self, cache: Path, ckpt: Path | None = None) -> list:
        return ["precompute", "--teacher", "resnet8", "--checkpoint", ckpt or self.ckpts[0], "--dataset", "cifar10",
                "--data-root", self.data, "--views", VIEWS, "--chunk-rows", ROWS, "--batch-size", ROWS,
                "--device", "cpu", "--cache", cache]

    def distill_args(self, out: Path, cache: Path | None = None, data: Path | None = None) -> list:
        return ["distill", "--student", "resnet8", "--method", "camkd", "--teachers", self.ids[0],
                "--teachers", self.ids[1], "--cache", cache or self.cache, "--data-root", data or self.data,
                "--out", out, "--epochs", EPOCHS, "--batch-size", BATCH, "--device", "cpu", "--seed", 3]


@pytest.fixture(scope="module")
def shared(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    root = tmp_path_factory.mktemp("faults")
    data = write_fake_cifar(root / "data", "cifar10", n_train=N_TRAIN, n_test=32, seed=0)
    torch.manual_seed(1)
    second = root / "second.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict()}, second)
    s = Shared(data, [digits_teacher, second], root / "cache", [])
    for ckpt in s.ckpts:
        result = run_cli(*s.precompute_args(s.cache, ckpt))
        assert result.exit_code == 0, result.output
        s.ids.append(result.stdout.strip().splitlines()[-1])
    return s


@pytest.fixture(scope="module")
def alone(shared: Shared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distill run done alone and uninterrupted: what every faulted run must end equal to."""
    out = tmp_path_factory.mktemp("alone") / "run"
    result = run_cli(*shared.distill_args(out))
    assert result.exit_code == 0, result.output
    return out


# -- 1. SIGKILL during precompute (and 3b: a dead writer's lock does not block) ----------------


def test_precompute_killed_early_mid_chunk_and_near_the_end_resumes_bit_identical(shared: Shared,
                                                                                tmp_path: Path) -> None:
    """Three SIGKILLs on one store, each run resuming the last; then a clean run finishes it.

    Each killed run held the writer lock: its lock file stays behind naming the dead pid, and
    the next run takes the lock all the same (the kernel drops a dead process's flock).
    """
    cache = tmp_path / "c"
    store = cache / "teachers" / shared.tid
    lock = cache / "locks" / f"teacher-{shared.tid}.lock"
    last = (VIEWS - 1, CHUNKS - 1)
    stages = [  # (fault, the chunks marked complete after the kill, where the kill leaves a temporary file)
        ({"action": "kill-partial", "key": "logits/c/0/1/0"}, {(0, 0)}, ["logits/c/0/1"]),  # early
        ({"action": "kill-partial", "key": "features/c/1/2/0"},  # mid-chunk: its logits in place, features half
         {(0, c) for c in range(CHUNKS)} | {(1, 0), (1, 1)}, ["features/c/1/2"]),
        ({"action": "kill", "key": f"done/c/{last[0]}/{last[1]}"}, ALL_CHUNKS - {last}, []),  # the last marker
    ]
    for fault, marked, stray in stages:
        before = chunk_inodes(store) if store.exists() else {}
        proc = start(*shared.precompute_args(cache), fault=fault)
        code, _, err = finish(proc)
        assert code == -signal.SIGKILL, err
        after = chunk_inodes(store)
        assert set(after) == marked, fault
        assert {k: after[k] for k in before} == before, "a chunk finished before the kill was written again"
        assert strays(store) == stray  # the previous run's temporary file was removed on resuming
        assert not is_complete(store)
        assert json.loads(lock.read_text())["pid"] == proc.pid  # the dead writer's lock file is left behind
    assert (store / "logits" / "c" / "1" / "5" / "0").is_file()  # the last chunk's data, without its marker
    unmarked = _ino(store / "logits" / "c" / "1" / "5" / "0")

    before = chunk_inodes(store)
    result = run_cli(*shared.precompute_args(cache))  # and does not block the next writer
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == shared.tid
    after = chunk_inodes(store)
    assert set(after) == ALL_CHUNKS and {k: after[k] for k in before} == before
    assert _ino(store / "logits" / "c" / "1" / "5" / "0") != unmarked  # the unmarked chunk was redone
    assert strays(store) == [] and is_complete(store)
    assert_same_arrays(store, shared.store)
    assert_verifies(cache, shared.tid)


def test_a_store_in_shards_killed_mid_shard_or_before_its_markers_resumes_whole_shards(shared: Shared,
                                                                                       tmp_path: Path) -> None:
    """The same teacher in shards of two 8-row chunks (6 shards, 11 chunks a view): SIGKILLed with a shard file
    half written, then just before the last shard's markers. Each re-run keeps every marked shard's files
    (same inodes), removes the temporary file, redoes the unmarked shard whole, and ends with the rows of the
    reference store (one chunk a file), verified."""
    cache = tmp_path / "c"
    store = cache / "teachers" / shared.tid
    args = [*shared.precompute_args(cache), "--chunk-rows", 8, "--shard-rows", 16]  # the last --chunk-rows wins

    def ident(path: Path) -> tuple[int, int]:  # the writer unlinks a shard's files first: an inode may come back
        st = path.stat()
        return st.st_ino, st.st_mtime_ns

    def shard_inodes() -> dict[tuple[int, int], tuple[tuple[int, int], ...]]:
        out = {}
        for marker in (store / "done" / "c").glob("*/*"):
            if marker.name.isdigit():
                v, s = marker.parent.name, marker.name
                out[(int(v), int(s))] = (*(ident(store / a / "c" / v / s / "0") for a in ("logits", "features")),
                                         ident(marker))
        return out

    stages = [  # (fault, the shards marked after the kill, where the kill leaves a temporary file)
        ({"action": "kill-partial", "key": "features/c/0/2/0"}, {(0, 0), (0, 1)}, ["features/c/0/2"]),
        ({"action": "kill", "key": "done/c/1/5"}, {(v, s) for v in range(VIEWS) for s in range(6)} - {(1, 5)}, []),
    ]
    for fault, marked, stray in stages:
        before = shard_inodes() if store.exists() else {}
        code, _, err = finish(start(*args, fault=fault))
        assert code == -signal.SIGKILL, err
        after = shard_inodes()
        assert set(after) == marked, fault
        assert {k: after[k] for k in before} == before, "a shard finished before the kill was written again"
        assert strays(store) == stray and not is_complete(store)
    unmarked = ident(store / "logits" / "c" / "1" / "5" / "0")  # the last shard's data, without its markers
    before = shard_inodes()
    result = run_cli(*args)
    assert result.exit_code == 0 and result.stdout.strip().splitlines()[-1] == shared.tid, result.output
    after = shard_inodes()
    assert len(after) == VIEWS * 6 and {k: after[k] for k in before} == before
    assert ident(store / "logits" / "c" / "1" / "5" / "0") != unmarked and strays(store) == []
    got, ref = zarr.open_group(store, mode="r"), zarr.open_group(shared.store, mode="r")
    assert (got.attrs["chunk_rows"], got.attrs["shard_rows"]) == (8, 16)
    for name in ("logits", "features"):  # the same forward batches (16 rows): the same rows, bit for bit
        assert np.array_equal(got[name][...], ref[name][...]), name
    assert got["done"][...].sum() == ref["done"][...].sum()  # the same correct predictions, counted by 8-row chunk
    assert_verifies(cache, shared.tid)


# Writes of plan and store creation (zarr rewrites a group's zarr.json as each child is added): the group's
# first write, an array's metadata, the plan's views being written, the head, the end of creation.
CREATION_FAULTS = [
    ("plans", "zarr.json", 1),          # the plan's group, nothing else yet
    ("plans", "params/zarr.json", 1),   # order made, params not
    ("plans", "params/c/0/0/0", 1),     # the views' order written, their replay parameters being written
    ("teachers", "zarr.json", 1),       # the store's group, no array yet
    ("teachers", "done/zarr.json", 1),  # data arrays made, markers not
    ("teachers", "head/bias/c/0", 1),   # every array made, the head's bias being written
    ("teachers", "zarr.json", 8),       # the write that ends creation
]


@pytest.mark.parametrize("action", ["kill", "enospc"])
def test_plan_and_store_creation_cut_short_is_finished_by_the_rerun(shared: Shared, tmp_path: Path,
                                                                    action: str) -> None:
    """SIGKILL, or a full disk, at each stage of creating the plan and the store; each run on a fresh cache.
    A killed run leaves something the listing names as cut short; a full disk is one line saying what to free.
    The same command run again then ends with the store an uninterrupted run writes, bit for bit."""
    for node, key, nth in CREATION_FAULTS:
        cache = tmp_path / f"{node}-{key.replace('/', '_')}-{nth}"
        fault = {"action": action, "node": node, "key": key, "nth": nth}
        code, _, err = finish(start(*shared.precompute_args(cache), fault=fault))
        if action == "kill":
            assert code == -signal.SIGKILL, (fault, err)
            if node == "teachers" and (key, nth) != ("zarr.json", 1):  # killed before its group: nothing to list
                listing = run_cli("cache", "ls", "--cache", cache)
                assert listing.exit_code == 0 and "cut short while being created" in listing.stdout, listing.output
                refused = run_cli("cache", "info", shared.tid, "--cache", cache)
                assert refused.exit_code == 1 and "run the same `kdcache precompute` again" in refused.output
        else:
            line = error_line(err)
            assert code == 1 and "No space left on device" in line and "free space there" in line, (fault, line)
            assert "run the same command again" in line, line
        result = run_cli(*shared.precompute_args(cache))
        assert result.exit_code == 0, (fault, result.output)
        assert result.stdout.strip().splitlines()[-1] == shared.tid
        assert_same_arrays(cache / "teachers" / shared.tid, shared.store)
        plan_id = Cache.at(cache).open_teacher(shared.tid).plan_id
        got, ref = (zarr.open_group(c / "plans" / plan_id, mode="r") for c in (cache, shared.cache))
        assert all(np.array_equal(got[a][...], ref[a][...]) for a in ("order", "params", "labels")), fault
        assert strays(cache / "teachers" / shared.tid) == [] and strays(cache / "plans" / plan_id) == []
        assert_verifies(cache, shared.tid)


# -- 2. Damaged data ---------------------------------------------------------------------------


def test_damaged_or_deleted_chunk_or_marker_is_named_by_verify_and_stops_distill(shared: Shared,
                                                                                 tmp_path: Path) -> None:
    """A byte flipped in a chunk file, a deleted chunk file, a deleted completion marker: in the chunk
    that distill reads first, in three copies of the cache, each read by a real distill process."""
    schedule = Schedule(VIEWS, N_TRAIN, ROWS, seed=3)
    v, c = schedule.view(1), int(schedule.chunk_order(1)[0])
    where = f"(view {v}, chunk {c})"
    cases = {  # damage -> (what verify says, what distill's error says)
        "flip": (lambda s: flip_byte(s / "features" / "c" / str(v) / str(c) / "0"),
                 f"features: chunk {where} is damaged", f"features chunk {where} is damaged"),
        "chunk": (lambda s: (s / "logits" / "c" / str(v) / str(c) / "0").unlink(),
                  f"logits: chunk {where} is missing", f"logits chunk {where} is missing"),
        "marker": (lambda s: (s / "done" / "c" / str(v) / str(c)).unlink(),
                   f"done: completion marker of {where} is missing", f"completion marker of {where} is missing"),
    }
    procs = {}
    for name, (damage, _, _) in cases.items():
        shutil.copytree(shared.cache, tmp_path / name)
        damage(tmp_path / name / "teachers" / shared.tid)
        procs[name] = start(*shared.distill_args(tmp_path / name / "run", cache=tmp_path / name))
    for name, (_, verify_says, distill_says) in cases.items():
        verify = run_cli("cache", "verify", "--cache", tmp_path / name)
        reported = [line.strip() for line in verify.stdout.splitlines()]
        assert verify.exit_code == 1 and any(r.startswith(verify_says) for r in reported), verify.output
        assert f"{shared.ids[1]}: ok" in verify.stdout  # the other teacher is not blamed
        code, _, err = finish(procs[name])
        line = error_line(err)  # no epoch ran: no loss, NaN or otherwise, was ever logged
        assert code == 1 and f"teacher store {shared.tid}: {distill_says}" in line, (name, line)
        run = tmp_path / name / "run"
        assert (run / "metrics.jsonl").read_text() == "" and not (run / "checkpoint.pth").exists()


# -- 3. Two writers ----------------------------------------------------------------------------


def test_two_writers_at_once_one_proceeds_the_other_is_refused(shared: Shared, tmp_path: Path) -> None:
    """Both start together; whichever takes the writer lock holds at its first chunk until the other has
    exited, so they overlap for sure. The refused one wrote nothing into the store."""
    cache, signals = tmp_path / "c", tmp_path / "signals"
    signals.mkdir()
    procs = [start(*shared.precompute_args(cache), fault={"action": "pause", "dir": str(signals)}) for _ in range(2)]
    deadline = time.monotonic() + 240
    while not (list(signals.glob("holding-*")) and any(p.poll() is not None for p in procs)):
        assert len(list(signals.glob("holding-*"))) < 2, "both writers got past the writer lock"
        if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
            pytest.fail(f"the two writers did not overlap: {[finish(p) for p in procs]}")
        time.sleep(0.05)
    (signals / "go").touch()
    winner = next(p for p in procs if (signals / f"holding-{p.pid}").exists())
    loser = next(p for p in procs if p is not winner)
    code, _, err = finish(loser)
    assert code == 1
    assert f"teacher store {shared.tid} is being written by another process (pid {winner.pid} on " in error_line(err)
    assert not (signals / f"wrote-{loser.pid}").exists()  # nothing interleaved: the loser never wrote to the store
    code, out, err = finish(winner)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == shared.tid
    store = cache / "teachers" / shared.tid
    assert strays(store) == [] and is_complete(store)
    assert_same_arrays(store, shared.store)  # equal to a serial run
    assert_verifies(cache, shared.tid)


def test_a_held_lock_refuses_and_a_killed_holder_releases_it(shared: Shared, tmp_path: Path) -> None:
    """Stale-lock detection without the CLI's help: while the holder lives the lock refuses at once;
    SIGKILL it and the same lock file, still naming the dead pid, is taken at once."""
    cache, signals = tmp_path / "c", tmp_path / "signals"
    signals.mkdir()
    holder = start(*shared.precompute_args(cache), fault={"action": "pause", "dir": str(signals)})
    deadline = time.monotonic() + 240
    while not (signals / f"holding-{holder.pid}").exists():
        assert holder.poll() is None and time.monotonic() < deadline, finish(holder)
        time.sleep(0.05)
    lock = cache / "locks" / f"teacher-{shared.tid}.lock"
    with pytest.raises(StoreError, match=rf"being written by another process \(pid {holder.pid} on"):
        WriterLock(lock, f"teacher store {shared.tid}").acquire()
    holder.send_signal(signal.SIGKILL)
    assert finish(holder)[0] == -signal.SIGKILL
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with WriterLock(lock, f"teacher store {shared.tid}"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# -- 4. Many readers ---------------------------------------------------------------------------


def _nobody_can_read(paths: list[Path]) -> bool:
    """Whether uid 65534 can reach and read every path a reader needs (asked as that user)."""
    check = "import os, sys; sys.exit(0 if all(os.access(p, os.R_OK | os.X_OK) for p in sys.argv[1:]) else 1)"
    try:
        return subprocess.run([sys.executable, "-S", "-c", check, *map(str, paths)], user=NOBODY, group=NOBODY,
                              extra_groups=[], timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_four_readers_at_once_on_a_read_only_cache(shared: Shared, alone: Path) -> None:
    """Four distill processes read the same stores at once (a barrier at the first batch makes each wait
    until all four are reading) from a cache made read-only with ``chmod -R a-w``.

    What is enforced: every file and folder of the cache (size, bytes, mtime) is the same afterwards, and
    each run ends with the weights of a run done alone. chmod does not bind root, so when the tests run
    as root the readers run as uid 65534 (nobody), for whom the cache really is read-only; if that user
    cannot reach the Python installation the readers run as root and the snapshot is the check.
    """
    import kdcache

    root = Path(tempfile.mkdtemp(prefix="kdcache-readers-"))  # not under pytest's private tmp: nobody reads it
    try:
        os.chmod(root, 0o755)
        shutil.copytree(shared.cache, root / "cache")
        shutil.copytree(shared.data, root / "data")
        for d in ("runs", "home", "signals"):
            (root / d).mkdir()
            os.chmod(root / d, 0o777)
        subprocess.run(["chmod", "-R", "a-w", str(root / "cache"), str(root / "data")], check=True)
        before = snapshot(root / "cache")
        needs = [root / "cache", root / "data", Path(kdcache.__file__).parent, Path(torch.__file__).parent,
                 Path(zarr.__file__).parent, Path(os.__file__).parent]
        as_nobody = os.geteuid() == 0 and _nobody_can_read(needs)
        user = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if as_nobody else {}
        env = {"HOME": str(root / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
        fault = {"action": "barrier", "n": 4, "dir": str(root / "signals")}
        procs = [start(*shared.distill_args(root / "runs" / f"r{i}", cache=root / "cache", data=root / "data"),
                       fault=fault, env=env, cwd=root, **user) for i in range(4)]
        results = [finish(p) for p in procs]
        assert [r[0] for r in results] == [0] * 4, [r[2][-2000:] for r in results]
        assert len(list((root / "signals").glob("met-*"))) == 4  # all four were reading at the same time
        assert snapshot(root / "cache") == before
        for i in range(4):
            assert_same_run(root / "runs" / f"r{i}", alone)
            if as_nobody:
                assert (root / "runs" / f"r{i}" / "last.pth").stat().st_uid == NOBODY
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


# -- 5. No space left --------------------------------------------------------------------------


def test_a_failed_chunk_write_is_one_clear_error_and_the_rerun_resumes(shared: Shared, tmp_path: Path) -> None:
    """ENOSPC half-way through writing the features of chunk (0, 3), after its logits are in place."""
    cache = tmp_path / "c"
    store = cache / "teachers" / shared.tid
    code, _, err = finish(start(*shared.precompute_args(cache), fault={"action": "enospc", "key": "features/c/0/3/0"}))
    line = error_line(err)
    assert code == 1
    assert f"teacher store {shared.tid}" in line and "features of chunk (view 0, chunk 3)" in line, line
    assert "No space left on device" in line and "again" in line, line
    marked = chunk_inodes(store)
    assert {(0, 0), (0, 1), (0, 2)} <= set(marked) <= {(0, 0), (0, 1), (0, 2), (0, 4)}  # (0, 4) may be queued
    assert (store / "logits" / "c" / "0" / "3" / "0").is_file() and (0, 3) not in marked  # data, but no marker
    assert strays(store) == [] and not is_complete(store)
    verify = run_cli("cache", "verify", "--cache", cache)  # unfinished, not damaged: the advice is the re-run
    assert verify.exit_code == 1 and verify.stdout.splitlines() == [
        f"{shared.tid}: 1 problem(s); unfinished: run the same `kdcache precompute` again to finish it (it keeps "
        "every chunk already written)", f"  unfinished: {len(ALL_CHUNKS) - len(marked)} of {len(ALL_CHUNKS)} chunks "
        "not written yet"], verify.output

    result = run_cli(*shared.precompute_args(cache))  # space is back
    assert result.exit_code == 0, result.output
    after = chunk_inodes(store)
    assert set(after) == ALL_CHUNKS and {k: after[k] for k in marked} == marked
    assert_same_arrays(store, shared.store)
    assert_verifies(cache, shared.tid)


# A checkpoint write that fails with a real file size limit or a full file system, keeping the previous
# checkpoint: tests/test_run_files.py.


# -- 7. Interrupted distill --------------------------------------------------------------------


def test_distill_killed_mid_epoch_or_mid_save_resumes_to_the_same_weights(shared: Shared, alone: Path,
                                                                          tmp_path: Path) -> None:
    """Two runs killed in epoch 2: one at its third batch, one half-way through writing epoch 2's
    checkpoint.pth. Each keeps epoch 1's checkpoint intact, and ``--resume`` ends where a run alone ends."""
    mid_epoch, mid_save = tmp_path / "mid-epoch", tmp_path / "mid-save"
    steps = N_TRAIN // BATCH
    procs = [start(*shared.distill_args(mid_epoch), fault={"action": "kill-step", "step": steps + 3}),
             start(*shared.distill_args(mid_save), fault={"action": "kill-in-save", "nth": 2})]
    for proc in procs:
        code, _, err = finish(proc)
        assert code == -signal.SIGKILL, err
    for run in (mid_epoch, mid_save):
        assert torch.load(run / "checkpoint.pth", weights_only=False)["epoch"] == 1  # whole, and the last good one
    (partial,) = mid_save.glob(".checkpoint.pth.*.tmp")  # the half-written file never replaced checkpoint.pth
    with pytest.raises(Exception):
        torch.load(partial, weights_only=False)
    for run in (mid_epoch, mid_save):
        result = run_cli(*shared.distill_args(run), "--resume")
        assert result.exit_code == 0, result.output
        assert_same_run(run, alone)


def test_train_teacher_killed_mid_epoch_or_mid_save_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Teacher training runs through distill's loop, so it keeps distill's guarantee: two teachers killed in
    epoch 2, one at its third batch, one half-way through writing epoch 2's checkpoint.pth. Each keeps epoch 1's
    checkpoint intact and no weights file, and ``--resume`` ends with the weights of a teacher never interrupted."""
    args = ["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--epochs", 3, "--batch-size", 256,
            "--device", "cpu"]
    alone = tmp_path / "alone.pth"
    assert run_cli(*args, "--out", alone).exit_code == 0
    mid_epoch, mid_save = tmp_path / "mid-epoch.pth", tmp_path / "mid-save.pth"
    procs = [start(*args, "--out", mid_epoch, fault={"action": "kill-step", "step": 1437 // 256 + 3}),
             start(*args, "--out", mid_save, fault={"action": "kill-in-save", "nth": 2})]
    for proc in procs:
        code, _, err = finish(proc)
        assert code == -signal.SIGKILL, err
    for out in (mid_epoch, mid_save):
        assert torch.load(out.with_suffix("") / "checkpoint.pth", weights_only=False)["epoch"] == 1
        assert not out.exists()
    (partial,) = mid_save.with_suffix("").glob(".checkpoint.pth.*.tmp")
    with pytest.raises(Exception):
        torch.load(partial, weights_only=False)
    for out in (mid_epoch, mid_save):
        result = run_cli(*args, "--out", out, "--resume")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == str(out)
        for name in ("checkpoint.pth", "last.pth"):
            a, b = (torch.load(p.with_suffix("") / name, weights_only=False)["model"] for p in (alone, out))
            assert all(torch.equal(a[k], b[k]) for k in a), name
        a, b = (torch.load(p, weights_only=False)["model"] for p in (alone, out))
        assert all(torch.equal(a[k], b[k]) for k in a)
        lines = (out.with_suffix("") / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
