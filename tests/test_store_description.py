"""Stores and plans checked against their own description, and the cache commands never calling a damaged store
fine (issue 27): each damage ends in one ``Error:`` line naming the store (or plan), the cause and a remedy that
works, with status 1, and nothing else lost; a store read by a distill is not removed under it.

The cache is built once per module by a real precompute of digits (one view), then copied for each case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import zarr

from conftest import error_lines, run_cli
from fakes import flip_byte
from kdcache.errors import StoreError
from kdcache.store import Cache
from kdcache.store.ids import plan_id as make_plan_id
from kdcache.store.ids import teacher_id as make_teacher_id
from kdcache.store.form import StoreForm
from kdcache.store.lock import ReaderLock

ROOT = Path(__file__).resolve().parents[1]


def precompute_args(ckpt: Path, cache: Path) -> list:
    return ["precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits", "--cache", cache,
            "--views", 1, "--chunk-rows", 512, "--device", "cpu"]


class Built:
    """A cache of two complete stores on one plan (the first precomputed, the second its copy under another
    checkpoint's id), and a second plan of the same shape (the first's copy under seed 1's id)."""

    def __init__(self, cache: Path, tid: str, other: str, pid: str, other_plan: str) -> None:
        self.cache, self.tid, self.other, self.pid, self.other_plan = cache, tid, other, pid, other_plan


@pytest.fixture(scope="module")
def built(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    cache = tmp_path_factory.mktemp("described") / "c"
    result = run_cli(*precompute_args(digits_teacher, cache))
    assert result.exit_code == 0, result.output
    tid = result.stdout.strip().splitlines()[-1]
    attrs = dict(zarr.open_group(cache / "teachers" / tid, mode="r").attrs)
    pid = attrs["plan_id"]
    other = make_teacher_id(pid, "resnet8", "0" * 64, StoreForm())
    shutil.copytree(cache / "teachers" / tid, cache / "teachers" / other)
    zarr.open_group(cache / "teachers" / other, mode="r+").attrs["checkpoint"] = {"path": "/x.pth", "sha256": "0" * 64}
    plan = dict(zarr.open_group(cache / "plans" / pid, mode="r").attrs)
    other_plan = make_plan_id(plan["dataset"]["fingerprint"], plan["recipe"], plan["n_views"], 1)
    shutil.copytree(cache / "plans" / pid, cache / "plans" / other_plan)
    zarr.open_group(cache / "plans" / other_plan, mode="r+").attrs["seed"] = 1
    listing = run_cli("cache", "verify", "--cache", cache)
    assert listing.exit_code == 0, listing.output
    return Built(cache, tid, other, pid, other_plan)


@pytest.fixture
def copy(built: Built, tmp_path: Path) -> Built:
    """A fresh copy of the built cache, to damage."""
    shutil.copytree(built.cache, tmp_path / "c", symlinks=True)
    return Built(tmp_path / "c", built.tid, built.other, built.pid, built.other_plan)


def the_error(result) -> str:
    """The one line a refused command prints on stderr: no traceback, nothing unexpected."""
    assert "unexpectedly" not in result.output and "Traceback" not in result.output, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def store(b: Built) -> Path:
    return b.cache / "teachers" / b.tid


def set_attr(path: Path, key: str, value: object) -> None:
    zarr.open_group(path, mode="r+").attrs[key] = value


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def loop(path: Path) -> None:
    shutil.rmtree(path)
    path.symlink_to(path.name)


def as_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("not a store")


def distill(b: Built, method: str = "kd") -> list:
    return ["distill", "--student", "resnet8", "--method", method, "--teachers", b.tid, "--cache", b.cache, "--out",
            b.cache.parent / "run", "--epochs", 1, "--batch-size", 256, "--device", "cpu"]


def verify(b: Built) -> list:
    return ["cache", "verify", "--cache", b.cache]


def ls(b: Built) -> list:
    return ["cache", "ls", "--cache", b.cache]


# (name, damage, command, what the one line says (a function of the cache), status)
CASES: list[tuple[str, Callable[[Built], object], Callable[[Built], list], Callable[[Built], str], int]] = [
    ("verify of a missing cache", lambda b: shutil.rmtree(b.cache), verify, lambda b: "does not exist; pass the --cache", 1),
    ("ls of a missing cache", lambda b: shutil.rmtree(b.cache), ls, lambda b: "does not exist; pass the --cache", 1),
    ("verify of a file as cache", lambda b: as_file(b.cache), verify, lambda b: "is a file, not a folder; pass the --cache", 1),
    ("ls of a file as cache", lambda b: as_file(b.cache), ls, lambda b: "is a file, not a folder; pass the --cache", 1),
    ("features/zarr.json deleted", lambda b: (store(b) / "features" / "zarr.json").unlink(), ls,
     lambda b: f"teacher store {b.tid} has no features array (features/zarr.json is missing); remove it with "
               f"`kdcache cache rm {b.tid}` and precompute it again", 1),
    ("done/zarr.json deleted", lambda b: (store(b) / "done" / "zarr.json").unlink(), ls,
     lambda b: f"teacher store {b.tid} has no done array", 1),
    ("head deleted", lambda b: shutil.rmtree(store(b) / "head"), ls,
     lambda b: f"teacher store {b.tid} has no head group (head/zarr.json is missing); remove it with "
               f"`kdcache cache rm {b.tid}`", 1),
    ("head/weight/zarr.json deleted", lambda b: (store(b) / "head" / "weight" / "zarr.json").unlink(), ls,
     lambda b: f"teacher store {b.tid} has no head/weight array", 1),
    ("chunk_rows edited", lambda b: set_attr(store(b), "chunk_rows", 256), verify,
     lambda b: "logits has chunks [1, 512, 10], its attributes say [1, 256, 10]", 1),
    ("chunk_rows edited, distill", lambda b: set_attr(store(b), "chunk_rows", 256), distill,
     lambda b: f"teacher store {b.tid}: logits has chunks [1, 512, 10], its attributes say [1, 256, 10]; remove it "
               f"with `kdcache cache rm {b.tid}`", 1),
    ("feature_dim edited", lambda b: set_attr(store(b), "feature_dim", 32), verify,
     lambda b: "has feature_shape=[64], which pooled features of feature_dim 32 cannot have", 1),
    ("plan_id of another plan", lambda b: set_attr(store(b), "plan_id", b.other_plan), distill,
     lambda b: f"teacher store {b.tid}: its attributes (plan_id, arch, checkpoint, dtype, form) hash to", 1),
    ("plan_id of another plan, verify", lambda b: set_attr(store(b), "plan_id", b.other_plan), verify,
     lambda b: "not to its id (they were changed)", 1),
    ("store zarr.json truncated", lambda b: truncate(store(b) / "zarr.json"), ls,
     lambda b: f"teacher store {b.tid} at {store(b)}: its zarr.json is unreadable (JSONDecodeError", 1),
    ("plan zarr.json truncated", lambda b: truncate(b.cache / "plans" / b.pid / "zarr.json"), ls,
     lambda b: "2 of 2 teacher stores are damaged", 1),
    ("plan zarr.json truncated, distill", lambda b: truncate(b.cache / "plans" / b.pid / "zarr.json"), distill,
     lambda b: f"its plan {b.pid} is unreadable: plan {b.pid} at", 1),
    ("plan chunk flipped", lambda b: flip_byte(b.cache / "plans" / b.pid / "order" / "c" / "0" / "0"),
     lambda b: ["cache", "verify", b.tid, "--cache", b.cache],
     lambda b: f"plan {b.pid}: order of view 0 is damaged (ValueError: Stored and computed checksum do not match", 1),
    ("plan chunk flipped, every store", lambda b: flip_byte(b.cache / "plans" / b.pid / "order" / "c" / "0" / "0"),
     verify, lambda b: f"2 of 2 stores are unfinished or damaged ({b.other}, {b.tid})", 1),
    ("plan chunk flipped, distill", lambda b: flip_byte(b.cache / "plans" / b.pid / "order" / "c" / "0" / "0"), distill,
     lambda b: f"plan {b.pid}: view 0 is damaged (ValueError: Stored and computed checksum do not match", 1),
    ("head checksum damaged", lambda b: flip_byte(store(b) / "head" / "weight" / "c" / "0" / "0"), verify,
     lambda b: "head/weight: damaged", 1),
    ("head checksum damaged, distill", lambda b: flip_byte(store(b) / "head" / "weight" / "c" / "0" / "0"),
     lambda b: distill(b, "camkd"), lambda b: f"teacher store {b.tid}: its head (final classifier) is damaged", 1),
    ("plan deleted", lambda b: shutil.rmtree(b.cache / "plans" / b.pid), distill,
     lambda b: f"teacher store {b.tid}: its plan {b.pid} is missing from the cache; run the same `kdcache precompute` "
               "again to redraw it", 1),
    ("store replaced by a file", lambda b: as_file(store(b)), ls,
     lambda b: f"teacher store {b.tid} at {store(b)} is a file, not a folder; remove it with "
               f"`kdcache cache rm {b.tid}`", 1),
    ("store replaced by a symlink loop", lambda b: loop(store(b)), verify,
     lambda b: f"is a symbolic link that leads nowhere (or loops); remove it with `kdcache cache rm {b.tid}`", 1),
    ("store replaced by a symlink loop, distill", lambda b: loop(store(b)), distill,
     lambda b: f"is a symbolic link that leads nowhere (or loops); remove it with `kdcache cache rm {b.tid}`", 1),
]


@pytest.mark.parametrize("name, damage, command, says, status", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_store_or_plan_is_one_named_line(copy: Built, name: str, damage: Callable[[Built], object],
                                                   command: Callable[[Built], list], says: Callable[[Built], str],
                                                   status: int) -> None:
    damage(copy)
    result = run_cli(*command(copy))
    assert result.exit_code == status, result.output
    line = the_error(result)
    assert says(copy) in line, line
    if command is ls and copy.cache.is_dir() and "2 of 2" not in line:  # one bad store does not hide the other
        rows = {r.split()[0]: r for r in result.stdout.splitlines()[1:]}
        assert rows[copy.other].endswith("complete") and "damaged: " in rows[copy.tid], result.stdout


@pytest.mark.parametrize("damage", [as_file, loop, lambda p: (p / "zarr.json").unlink()],
                         ids=["file", "symlink loop", "zarr.json deleted"])
def test_cache_rm_removes_whatever_lies_in_a_stores_place(copy: Built, damage: Callable[[Path], object]) -> None:
    """The remedy the damaged store's line gives works: `cache rm` removes it, and the cache then lists clean."""
    damage(store(copy))
    assert run_cli(*ls(copy)).exit_code == 1
    rm = run_cli("cache", "rm", copy.tid, "--cache", copy.cache)
    assert rm.exit_code == 0, rm.output
    assert not os.path.lexists(store(copy))
    listing = run_cli(*ls(copy))
    assert listing.exit_code == 0 and copy.other in listing.stdout and copy.tid not in listing.stdout, listing.output


def test_a_deleted_plan_is_redrawn_by_precompute_bit_for_bit(copy: Built, built: Built, digits_teacher: Path) -> None:
    """Distill names the missing plan and says to run precompute again; that precompute (of a store it finds
    complete) redraws the plan, equal to the one removed, and the store then verifies."""
    shutil.rmtree(copy.cache / "plans" / copy.pid)
    assert "run the same `kdcache precompute` again to redraw it" in the_error(run_cli(*distill(copy)))
    result = run_cli(*precompute_args(digits_teacher, copy.cache))
    assert result.exit_code == 0 and result.stdout.strip().splitlines()[-1] == copy.tid, result.output
    got, was = (zarr.open_group(c / "plans" / copy.pid, mode="r") for c in (copy.cache, built.cache))
    assert all((got[a][...] == was[a][...]).all() for a in ("order", "params", "labels"))
    assert run_cli("cache", "verify", copy.tid, "--cache", copy.cache).exit_code == 0


def test_precompute_of_a_damaged_complete_store_says_so(copy: Built, digits_teacher: Path) -> None:
    """Precompute, in one process or on dask workers, does not call a damaged store complete: it names the damage
    and the remedy, which works."""
    (store(copy) / "features" / "zarr.json").unlink()
    for workers in ((), ("--workers", "1")):
        line = the_error(run_cli(*precompute_args(digits_teacher, copy.cache), *workers))
        assert f"teacher store {copy.tid} has no features array" in line and f"`kdcache cache rm {copy.tid}`" in line
    assert run_cli("cache", "rm", copy.tid, "--cache", copy.cache).exit_code == 0
    result = run_cli(*precompute_args(digits_teacher, copy.cache))
    assert result.exit_code == 0, result.output
    assert run_cli("cache", "verify", copy.tid, "--cache", copy.cache).exit_code == 0


HOLD = textwrap.dedent("""
    import sys, time
    from kdcache.store import Cache
    store = Cache.at(sys.argv[1]).open_for_reading(sys.argv[2])
    print("reading", flush=True)
    time.sleep(120)
""")


def test_cache_rm_refuses_a_store_being_read_and_removes_it_once_the_reader_ends(copy: Built) -> None:
    """A real reader process holds the store open (the lock distill holds while it reads); `cache rm` is refused
    with one line naming the reader's pid, the store stays whole; once the reader ends, rm works."""
    before = sorted((p.relative_to(store(copy)).as_posix(), p.stat().st_size) for p in store(copy).rglob("*"))
    reader = subprocess.Popen([sys.executable, "-c", HOLD, str(copy.cache), copy.tid], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        refused = run_cli("cache", "rm", copy.tid, "--cache", copy.cache)
        assert refused.exit_code == 1
        assert the_error(refused) == (f"Error: cannot remove teacher store {copy.tid}: it is in use, being read by another "
                                      f"process (pid {reader.pid}); run `kdcache cache rm {copy.tid}` again when that "
                                      "run ends")
        assert sorted((p.relative_to(store(copy)).as_posix(), p.stat().st_size)
                      for p in store(copy).rglob("*")) == before
        assert run_cli("cache", "verify", copy.tid, "--cache", copy.cache).exit_code == 0  # readers share the store
    finally:
        reader.send_signal(signal.SIGTERM)
        reader.wait(timeout=60)
    removed = run_cli("cache", "rm", copy.tid, "--cache", copy.cache)
    assert removed.exit_code == 0 and not store(copy).exists(), removed.output


def test_a_reader_whose_store_vanishes_says_so(copy: Built) -> None:
    """Removed under a reader anyway (by hand, or on a cache without locks): the read names what happened."""
    reading = Cache.at(copy.cache).open_for_reading(copy.tid)
    try:
        shutil.rmtree(store(copy))
        with pytest.raises(StoreError, match=rf"teacher store {copy.tid} was removed from .* while being read; "
                                             "precompute it again"):
            reading.read_rows(0, 0, 100)
    finally:
        reading.close()


def test_a_reader_goes_on_without_a_lock_it_cannot_create(tmp_path: Path) -> None:
    """Where the lock file cannot be made (a read-only cache; here its folder is a file), a reader reads unlocked;
    where it can, readers share the lock and an exclusive taker is refused until they let go."""
    (tmp_path / "locks").write_text("a file where the locks folder should be")
    unlocked = ReaderLock(tmp_path / "locks" / "teacher-x.lock", "teacher store x")
    assert unlocked.acquire() and not unlocked.held
    a, b = (ReaderLock(tmp_path / "ok" / "teacher-x.lock", "teacher store x") for _ in range(2))
    assert a.acquire() and b.acquire() and a.held and b.held
    from kdcache.store import WriterLock

    with pytest.raises(StoreError, match=rf"in use, being read by another process \(pid {os.getpid()}\)"):
        WriterLock(tmp_path / "ok" / "teacher-x.lock", "teacher store x", removing="kdcache cache rm x").acquire()
    a.release()
    b.release()
    with WriterLock(tmp_path / "ok" / "teacher-x.lock", "teacher store x"):
        assert json.loads((tmp_path / "ok" / "teacher-x.lock").read_text())["pid"] == os.getpid()


def _damage_fuzz():
    spec = importlib.util.spec_from_file_location("damage_fuzz", ROOT / "benchmarks" / "damage_fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["damage_fuzz"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_damage_small(tmp_path: Path) -> None:
    """benchmarks/damage_fuzz.py's generator, 30 damaged caches: no check fails unexpectedly, and none calls a
    harmful damage fine (its docstring says how that is judged)."""
    fuzz = _damage_fuzz()
    cases = fuzz.run_cases(30, seed=0, work=tmp_path)
    assert len(cases) >= 20
    failures = [f"{c.kind} {c.target} ({c.detail}): {c.failures}" for c in cases if c.failures]
    assert failures == [], fuzz.summary(cases, 0)
