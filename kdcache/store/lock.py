"""One writer per store, enforced with an advisory file lock.

``fcntl.flock`` is released by the kernel when its holder dies, however it dies,
so a killed precompute never leaves a lock that blocks the next one: there is no
stale lock to detect. The lock file also records who holds it, for the message
a refused writer prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from kdcache.errors import StoreError


class WriterLock:
    """An exclusive lock on ``path``; ``wait=False`` refuses at once if another process holds it."""

    def __init__(self, path: str | os.PathLike[str], what: str, wait: bool = False) -> None:
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        """Take the lock or raise StoreError naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create lock {self.path}: {exc.strerror}; is the cache directory writable?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreError(
                f"{self.what} is being written by another process ({holder}); "
                "wait for it to finish, or stop it and run again"
            ) from None
        try:  # who holds it, for the message a refused writer prints
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot write lock {self.path}: {exc.strerror}; free space there (or pass another "
                             "--cache) and run the same command again") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the next writer in."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError):
        return "holder unknown"
