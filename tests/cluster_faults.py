"""A dask worker plugin for tests: log every shard write and kill one worker mid-task, once.

Installed by the test with ``client.register_plugin(KillOnce(...))``; dask sends it to
every worker, including those a nanny restarts, so it lives in its own importable
module (the tests folder is on the workers' ``sys.path``, copied from pytest's).
"""

from __future__ import annotations

import os
import signal

from distributed.diagnostics.plugin import WorkerPlugin


class KillOnce(WorkerPlugin):
    """Wraps ``TeacherStore.write_shard`` (the unit a writer writes: one chunk in a store of one chunk a file)
    in the worker process: each call appends ``write PID TEACHER VIEW SHARD`` to ``log``; the ``kill_at``-th
    call of the first process to reach it logs ``kill ...`` and SIGKILLs its own process instead of writing."""

    name = "kdcache-kill-once"

    def __init__(self, log: str, marker: str, kill_at: int = 2) -> None:
        self.log, self.marker, self.kill_at = log, marker, kill_at

    def setup(self, worker: object) -> None:
        from kdcache.store.teacher import TeacherStore

        original = TeacherStore.write_shard
        log, marker, kill_at = self.log, self.marker, self.kill_at
        calls = [0]

        def write_shard(store, v, c, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == kill_at and _claim(marker):
                _append(log, f"kill {os.getpid()} {store.id} {v} {c}")
                os.kill(os.getpid(), signal.SIGKILL)
            _append(log, f"write {os.getpid()} {store.id} {v} {c}")
            return original(store, v, c, *args, **kwargs)

        TeacherStore.write_shard = write_shard


def _claim(marker: str) -> bool:
    """True for the one process that creates ``marker`` first."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class KillAfterCheckpoint(WorkerPlugin):
    """Wraps ``RunDir.save_checkpoint`` in the worker process: right after the first checkpoint of the run whose
    directory ends with ``run`` (e.g. ``camkd/seed0``), the first process to get there logs ``kill PID EPOCH`` to
    ``log`` and SIGKILLs itself, mid-run; every checkpoint saved is logged as ``save PID RUN EPOCH``."""

    name = "kdcache-kill-after-checkpoint"

    def __init__(self, log: str, marker: str, run: str) -> None:
        self.log, self.marker, self.run = log, marker, run

    def setup(self, worker: object) -> None:
        from kdcache.runs import RunDir

        original = RunDir.save_checkpoint
        log, marker, target = self.log, self.marker, self.run

        def save_checkpoint(run, state):  # type: ignore[no-untyped-def]
            original(run, state)
            name = "/".join(run.path.parts[-2:])
            _append(log, f"save {os.getpid()} {name} {state['epoch']}")
            if name == target and _claim(marker):
                _append(log, f"kill {os.getpid()} {state['epoch']}")
                os.kill(os.getpid(), signal.SIGKILL)

        RunDir.save_checkpoint = save_checkpoint
