"""The files of a training run (kdcache.runs.RunDir) under real write failures and kills (issue 27: nothing
overwritten, every failure named).

A file size limit is set on a real ``kdcache`` process (RLIMIT_FSIZE, as ``ulimit -f`` does; Python ignores
SIGXFSZ, so the write fails with EFBIG), a small tmpfs fills up (ENOSPC), or a process is killed half-way through a
metrics line. Each run must stop with one ``Error:`` line naming the file, the cause and what to do, keep its last
good checkpoint, and ``--resume`` must end with the weights of a run never interrupted. And ``distill --out`` must
not replace another run's files unless told to (``--resume`` or ``--force``).

Child processes run the real command line through CHILD, which may patch one RunDir method as $KDCACHE_RUN_FAULT
(JSON) says: ``limit`` lowers the file size limit once the ``nth`` call of ``method`` returned (to ``bytes``, or to
metrics.jsonl's size plus ``plus``); ``cut`` writes half of the ``nth`` metrics line and SIGKILLs the process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

from conftest import error_lines, run_cli
from fakes import write_fake_cifar
from kdcache import training
from kdcache.atomic import WriteError
from kdcache.text import human_bytes
from kdcache.models import build_model
from kdcache.runs import RunDir

EPOCHS = 2
N_TRAIN, BATCH = 88, 16  # a fake CIFAR-10 of 88 training images: 5 steps an epoch

CHILD = r'''
import json, os, resource, signal, sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # as the test process: the same float sums
fault = json.loads(os.environ.get("KDCACHE_RUN_FAULT") or "{}")
if fault:
    from kdcache.runs import RunDir

    real, calls = getattr(RunDir, fault["method"]), [0]

    def patched(self, *args, **kwargs):
        calls[0] += 1
        if fault["action"] == "cut" and calls[0] == fault["nth"]:
            line = (json.dumps(args[0]) + "\n").encode()
            with open(self.file(self.METRICS), "ab") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(self, *args, **kwargs)
        if fault["action"] == "limit" and calls[0] == fault["nth"]:
            n = fault.get("bytes") or os.path.getsize(self.file(self.METRICS)) + fault["plus"]
            resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))
        return out

    setattr(RunDir, fault["method"], patched)

from kdcache.cli.main import main

main(args=sys.argv[1:], prog_name="kdcache")
'''


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One compute thread here and in every child: float sums are then equal in and out of process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child(*args: object, fsize: int | None = None, fault: dict[str, Any] | None = None,
          timeout: float = 300) -> tuple[int, str]:
    """``kdcache ARGS`` in a new process (under a file size limit of ``fsize`` bytes from its start, or with
    ``fault``); its exit status and stderr."""
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "KDCACHE_RUN_FAULT": json.dumps(fault or {})}
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, env=env,
                          preexec_fn=limit, timeout=timeout)
    return proc.returncode, proc.stderr


def the_error(stderr: str) -> str:
    """The one line a failed command prints (epoch lines aside), which must not call itself unexpected."""
    assert "Traceback" not in stderr and "unexpectedly" not in stderr, stderr
    lines = [line for line in error_lines(stderr) if not line.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def same_weights(got: Path, want: Path, names: tuple[str, ...] = ("checkpoint.pth", "last.pth")) -> None:
    """The run directories ``got`` and ``want`` end with the same weights, bit for bit (and the same epoch)."""
    for name in names:
        a, b = (torch.load(p / name, weights_only=False) for p in (want, got))
        assert a["epoch"] == b["epoch"], name
        for part in ("model", "method"):
            if part in a:
                assert a[part].keys() == b[part].keys()
                assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (name, part)


def metric_epochs(run: Path) -> list[int]:
    """The epochs of a well-formed metrics.jsonl: every line whole, valid JSON and ended by a newline."""
    text = (run / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n"), text[-80:]
    return [json.loads(line)["epoch"] for line in text.splitlines()]


def no_temporary_files(run: Path) -> None:
    assert [p.name for p in run.iterdir() if p.name.startswith(".") or "tmp" in p.name] == []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Stores:
    data: Path
    cache: Path
    ids: list[str]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake CIFAR-10 small enough that an epoch takes a moment."""
    return write_fake_cifar(tmp_path_factory.mktemp("data"), "cifar10", n_train=N_TRAIN, n_test=32, seed=0)


@pytest.fixture(scope="module")
def stores(digits_teacher: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Stores:
    """Two teacher stores of the fake CIFAR-10 on one plan (2 views), in a cache of their own."""
    root = tmp_path_factory.mktemp("run-files")
    torch.manual_seed(1)
    second = root / "second.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict()}, second)
    cache, ids = root / "cache", []
    for ckpt in (digits_teacher, second):
        result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "cifar10",
                         "--data-root", data, "--views", 2, "--chunk-rows", 32, "--batch-size", 32, "--device", "cpu",
                         "--cache", cache)
        assert result.exit_code == 0, result.output
        ids.append(result.stdout.strip().splitlines()[-1])
    return Stores(data, cache, ids)


def distill_args(stores: Stores, out: Path) -> list[object]:
    """camkd from both teachers, whose aligners (the feature term) start in epoch 2."""
    return ["distill", "--student", "resnet8", "--method", "camkd", "--teachers", stores.ids[0], "--teachers",
            stores.ids[1], "--cache", stores.cache, "--data-root", stores.data, "--out", out, "--epochs", EPOCHS,
            "--batch-size", BATCH, "--device", "cpu", "--seed", 3]


@pytest.fixture(scope="module")
def alone(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A camkd distill run done alone and uninterrupted: what every faulted run must end equal to."""
    out = tmp_path_factory.mktemp("alone") / "run"
    result = run_cli(*distill_args(stores, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def teacher(data: Path) -> list[object]:
    """train-teacher's arguments but --out."""
    return ["train-teacher", "--arch", "resnet8", "--dataset", "cifar10", "--data-root", data, "--epochs", EPOCHS,
            "--batch-size", BATCH, "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher_alone(teacher: list[object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher trained alone and uninterrupted (its run directory)."""
    out = tmp_path_factory.mktemp("teacher-alone") / "t"
    result = run_cli(*teacher, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# -- a real file size limit ---------------------------------------------------------------------


def test_python_ignores_sigxfsz_so_a_write_past_the_limit_fails_with_efbig(tmp_path: Path) -> None:
    """What every test below relies on: a process under ``ulimit -f`` is not killed by SIGXFSZ, its write fails."""
    code = ("import os, resource, signal; resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100));"
            "assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN\n"
            "f = open(os.environ['F'], 'wb', buffering=0)\n"
            "assert f.write(b'x' * 200) == 100\n"  # up to the limit, then the next byte fails
            "try: f.write(b'x')\n"
            "except OSError as e: print(e.errno)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "F": str(tmp_path / "f")}, check=True)
    assert out.stdout.strip() == str(errno.EFBIG)


def _in_process_limit(n: int) -> Any:
    """Lower this process's file size limit to ``n`` bytes for the block (the soft limit: it is raised again)."""
    import contextlib

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return block()


def test_every_run_file_writer_keeps_the_old_file_under_a_file_size_limit(tmp_path: Path) -> None:
    """checkpoint.pth (torch.save), config.json, sample_weights.npz and metrics.jsonl, each written under a real
    file size limit smaller than the new file: one WriteError naming the file and "File too large", the old file
    byte for byte, no temporary file. torch.save's own error ("[enforce fail at inline_container.cc]") is not it."""
    run = RunDir(tmp_path / "run")
    run.start({"args": {"seed": 0}})
    run.append_metrics({"epoch": 1, "test_top1": 10.0})
    training.save_atomic({"epoch": 1, "w": torch.zeros(10)}, run.file(run.CHECKPOINT))
    run.save_sample_weights(1, np.arange(4), np.arange(4), np.ones((4, 2), np.float32))
    before = {name: run.file(name).read_bytes() for name in (run.CONFIG, run.METRICS, run.CHECKPOINT,
                                                            run.SAMPLE_WEIGHTS)}
    big = np.ones((4000, 2), np.float32)
    writes: list[tuple[str, Callable[[], None]]] = [
        (run.CHECKPOINT, lambda: training.save_atomic({"epoch": 2, "w": torch.zeros(20000)}, run.file(run.CHECKPOINT))),
        (run.CONFIG, lambda: run.write_config({"args": {"seed": 0}, "pad": "x" * 20000})),
        (run.SAMPLE_WEIGHTS, lambda: run.save_sample_weights(2, np.arange(4000), np.arange(4000), big)),
        (run.METRICS, lambda: run.append_metrics({"epoch": 2, "test_top1": 11.0, "pad": "x" * 20000})),
    ]
    limit = 16 * 1024
    for name, write in writes:
        with _in_process_limit(limit), pytest.raises(WriteError) as caught:
            write()
        assert caught.value.errno == errno.EFBIG
        assert str(caught.value).startswith(f"cannot write {run.file(name)}: File too large (the file size limit, "
                                            f"`ulimit -f`, is 16.0 KiB); "), str(caught.value)
        assert "raise the file size limit (`ulimit -f unlimited`), then run the same command again" in str(
            caught.value)
        assert run.file(name).read_bytes() == before[name], name
    no_temporary_files(run.path)
    assert run.read_metrics() == [{"epoch": 1, "test_top1": 10.0}]


def test_a_tensorboard_log_under_a_file_size_limit_is_one_line(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """tensorboard writes from a thread of its own: its failure is raised at the next flush as one WriteError naming
    the events file, and the thread prints no traceback."""
    pytest.importorskip("tensorboard")
    import time

    from kdcache.tblog import TensorBoardLog

    board = TensorBoardLog(tmp_path / "tb")
    board.epoch(1, {"ce": 1.0}, 10.0, 50.0, 0.1)
    (events,) = (tmp_path / "tb").iterdir()
    limit = events.stat().st_size + 10
    with _in_process_limit(limit), pytest.raises(WriteError) as caught:
        board.epoch(2, {"ce": 1.0}, 10.0, 50.0, 0.1)
    assert str(caught.value) == (f"cannot write {events}: File too large (the file size limit, `ulimit -f`, is "
                                 f"{human_bytes(limit)}); raise the file size limit (`ulimit -f unlimited`), then "
                                 "run the same command again")
    time.sleep(0.2)  # the writer thread has ended
    assert "Traceback" not in capfd.readouterr().err


def test_distill_stopped_by_a_file_size_limit_keeps_its_last_checkpoint_and_resumes(
        stores: Stores, alone: Path, tmp_path: Path) -> None:
    """camkd's aligners get their momentum in epoch 2 (their term is off in epoch 1), so epoch 2's checkpoint.pth
    is larger than epoch 1's: under a limit of one byte less than it, epoch 1 is saved and epoch 2's checkpoint
    fails. One line names the file, the cause and the limit, what is kept and what to do; checkpoint.pth still
    loads as epoch 1; --resume without the limit ends with the weights of a run never interrupted."""
    run = tmp_path / "run"
    limit = (alone / "checkpoint.pth").stat().st_size - 1
    code, err = child(*distill_args(stores, run), fsize=limit)
    assert code == 1
    assert the_error(err) == (
        f"Error: cannot write {run / 'checkpoint.pth'}: File too large (the file size limit, `ulimit -f`, is "
        f"{human_bytes(limit)}); checkpoint.pth keeps epoch 1, the last one saved; raise the file size limit "
        "(`ulimit -f unlimited`), then run the same command with --resume to continue after epoch 1")
    assert torch.load(run / "checkpoint.pth", weights_only=False)["epoch"] == 1
    assert not (run / "last.pth").exists()
    no_temporary_files(run)
    assert metric_epochs(run) == [1, 2]  # epoch 2's line was written before its checkpoint failed: dropped on resume

    result = run_cli(*distill_args(stores, run), "--resume")
    assert result.exit_code == 0, result.output
    same_weights(run, alone)
    assert metric_epochs(run) == [1, 2]


def test_train_teacher_stopped_by_a_file_size_limit_in_epoch_1_or_2_goes_on(teacher: list[object],
                                                                            teacher_alone: Path,
                                                                            tmp_path: Path) -> None:
    """A teacher under a limit one byte below its checkpoint.pth from the start: epoch 1's checkpoint fails, so no
    epoch was saved; its metrics line and best.pth are removed and the same command, run again, starts it (no
    refusal, no --force). Another teacher whose limit drops after epoch 1 to just above its metrics.jsonl: epoch 2's
    metrics line fails half-way and is taken back; --resume continues after epoch 1. Both end with the weights of
    a teacher never interrupted."""
    first = tmp_path / "first"
    limit = (teacher_alone / "checkpoint.pth").stat().st_size - 1
    code, err = child(*teacher, "--out", first, fsize=limit)
    assert code == 1
    assert the_error(err) == (
        f"Error: cannot write {first / 'checkpoint.pth'}: File too large (the file size limit, `ulimit -f`, is "
        f"{human_bytes(limit)}); no epoch was saved; raise the file size limit (`ulimit -f unlimited`), then run "
        "the same command again")
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "metrics.jsonl"]
    assert metric_epochs(first) == []
    result = run_cli(*teacher, "--out", first)
    assert result.exit_code == 0, result.output
    same_weights(first, teacher_alone)

    second = tmp_path / "second"
    code, err = child(*teacher, "--out", second,
                      fault={"action": "limit", "method": "save_checkpoint", "nth": 1, "plus": 40})
    assert code == 1
    metrics = second / "metrics.jsonl"
    assert the_error(err) == (
        f"Error: cannot write {metrics}: File too large (the file size limit, `ulimit -f`, is "
        f"{human_bytes(metrics.stat().st_size + 40)}); checkpoint.pth keeps epoch 1, the last one saved; raise the "
        "file size limit (`ulimit -f unlimited`), then run the same command with --resume to continue after "
        "epoch 1")
    assert metric_epochs(second) == [1]  # the part of line 2 that fitted was cut off again
    assert torch.load(second / "checkpoint.pth", weights_only=False)["epoch"] == 1
    result = run_cli(*teacher, "--out", second, "--resume")
    assert result.exit_code == 0, result.output
    same_weights(second, teacher_alone)
    assert metric_epochs(second) == [1, 2]


# -- a full file system -------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mounts a tmpfs of a given size (bytes) under tmp_path; skips where mounting is not allowed (not root)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_distill_on_a_file_system_that_fills_up_keeps_its_last_checkpoint_and_resumes(
        stores: Stores, alone: Path, tmp_path: Path, small_tmpfs: Callable[[int], Path]) -> None:
    """A tmpfs with room for epoch 1's files and half a checkpoint more: epoch 2's files do not fit (each is
    written beside the one it replaces). One line names the file, "No space left on device" and what to free;
    checkpoint.pth keeps epoch 1; the run, copied where there is room, resumes to the weights of a run alone."""
    page = 4096
    files = sum((alone / n).stat().st_size // page * page + page
                for n in ("config.json", "metrics.jsonl", "sample_weights.npz", "best.pth", "checkpoint.pth"))
    room = small_tmpfs(files + (alone / "checkpoint.pth").stat().st_size // 2)
    run = room / "run"
    code, err = child(*distill_args(stores, run))
    assert code == 1
    line = the_error(err)
    failed = line.removeprefix(f"Error: cannot write {run}/").split(":")[0]
    assert failed in ("sample_weights.npz", "metrics.jsonl", "best.pth", "checkpoint.pth"), line
    assert f": No space left on device; checkpoint.pth keeps epoch 1, the last one saved; free space on the file " \
           f"system of {run}" in line, line
    assert line.endswith(", then run the same command with --resume to continue after epoch 1"), line
    assert torch.load(run / "checkpoint.pth", weights_only=False)["epoch"] == 1
    no_temporary_files(run)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    result = run_cli(*distill_args(stores, moved), "--resume")
    assert result.exit_code == 0, result.output
    same_weights(moved, alone)
    assert metric_epochs(moved) == [1, 2]


# -- a kill half-way through a metrics line ---------------------------------------------------------


def test_a_metrics_line_cut_by_a_kill_is_dropped_and_the_run_resumes(stores: Stores, alone: Path,
                                                                     tmp_path: Path) -> None:
    """A distill killed half-way through writing epoch 2's metrics line (epoch 2's checkpoint not written): the
    run still reads (the cut line is not a record), --resume drops it and trains epoch 2 again, and the resumed
    metrics.jsonl is whole: every line valid JSON, one per epoch, with the weights of a run never interrupted."""
    run = tmp_path / "run"
    code, err = child(*distill_args(stores, run), fault={"action": "cut", "method": "append_metrics", "nth": 2})
    assert code == -signal.SIGKILL, err
    text = (run / "metrics.jsonl").read_text()
    assert text.count("\n") == 1 and not text.endswith("\n")  # line 1, then half of line 2
    assert [r["epoch"] for r in RunDir(run).load().metrics] == [1]
    assert torch.load(run / "checkpoint.pth", weights_only=False)["epoch"] == 1
    result = run_cli(*distill_args(stores, run), "--resume")
    assert result.exit_code == 0, result.output
    assert metric_epochs(run) == [1, 2]
    first = (run / "metrics.jsonl").read_text().splitlines()[0]
    assert text.startswith(first + "\n")  # the kept line keeps its bytes
    same_weights(run, alone)


# -- distill --out holding another run --------------------------------------------------------------


def test_distill_refuses_an_out_holding_another_run_unless_resume_or_force(stores: Stores,
                                                                        alone: Path, tmp_path: Path) -> None:
    """A folder holding another run's config.json and metrics.jsonl (its checkpoints gone): distill refuses it with
    one line and changes nothing; --resume cannot continue it and says so; --force replaces it with a run equal to
    one made alone, which --resume then continues (here: writes last.pth again, nothing left to train). A folder
    that exists but is empty, or holds a run stopped before its first epoch was saved, starts a run."""
    out = tmp_path / "other"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(alone / name, out / name)
    before = {name: digest(out / name) for name in ("config.json", "metrics.jsonl")}
    args = distill_args(stores, out)
    for extra, want in (
            ((), f"Error: {out} already holds a run; pass --resume to continue it, --force to replace it, or "
                 "choose another --out (it holds config.json, metrics.jsonl)"),
            (("--resume",), f"Error: --resume: {out / 'checkpoint.pth'} does not exist, so the run in {out} "
                            "(config.json, metrics.jsonl) cannot be continued; pass --force instead to replace it, "
                            "or choose another --out"),
            (("--resume", "--force"), "Error: --resume continues the run in --out and --force replaces it: give one "
                                      "of them")):
        result = run_cli(*args, *extra)
        assert result.exit_code == 1 and result.output.strip().splitlines() == [want], result.output
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]
        assert {name: digest(out / name) for name in before} == before

    (out / "metrics.jsonl").write_text("{\"epoch\": 1, \"test_top1\": 1.0, \"other\": true}\n")
    result = run_cli(*args, "--force")
    assert result.exit_code == 0, result.output
    assert metric_epochs(out) == [1, 2] and (out / "config.json").read_text() != ""
    same_weights(out, alone)
    (out / "last.pth").unlink()
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    same_weights(out, alone)

    empty = RunDir(tmp_path / "empty")
    empty.path.mkdir()
    empty.check_can_start(resume=False)
    empty.start({"args": {}})  # config.json and an empty metrics.jsonl: started, no epoch saved
    assert empty.held() == []
    empty.check_can_start(resume=False)
