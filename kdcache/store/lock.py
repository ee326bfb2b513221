"""One writer per store, and no removal while it is read, enforced with an advisory file lock.

``fcntl.flock`` is released by the kernel when its holder dies, however it dies,
so a killed precompute never leaves a lock that blocks the next one: there is no
stale lock to detect. The lock file also records who holds it, for the message
a refused writer prints.

A writer (precompute) and a remover (``cache rm``) take the lock exclusively (:class:`WriterLock`); a reader
(distill, ``cache verify``) takes it shared (:class:`ReaderLock`) for as long as it reads, so that a store is
never removed under a reader. Readers write nothing: who holds a shared lock is read from ``/proc/locks``.
On a read-only cache a reader that cannot create the lock file reads without it (nothing can remove the store
there either).
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

    def __init__(self, path: str | os.PathLike[str], what: str, wait: bool = False, removing: str | None = None) -> None:
        """``removing``: the command that removes the store (``kdcache cache rm ID``), for a remover's refusals."""
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self.removing = removing
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
            readers = [pid for pid, kind in lock_holders(self.path) if kind == "READ"]
            os.close(fd)
            raise StoreError(self._refusal(holder, readers)) from None
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

    def _refusal(self, holder: str, readers: list[int]) -> str:
        """The line a refused writer or remover prints: who holds the store, and what to do."""
        if readers:
            who = f"pid{'s' if len(readers) > 1 else ''} {', '.join(map(str, readers))}"
            if self.removing is not None:
                return (f"cannot remove {self.what}: it is in use, being read by another process ({who}); run "
                        f"`{self.removing}` again when that run ends")
            return f"{self.what} is in use, being read by another process ({who}); run again when that run ends"
        if self.removing is not None:
            return (f"cannot remove {self.what}: it is being written or removed by another process ({holder}); "
                    f"wait for it to finish (or stop it), then run `{self.removing}` again")
        return (f"{self.what} is being written by another process ({holder}); "
                "wait for it to finish, or stop it and run again")

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


class ReaderLock:
    """A shared lock on ``path``, held while a store is read: readers share it, a writer or a remover (exclusive)
    is refused while any reader holds it. Where the lock file cannot be made (a read-only cache) the reader goes
    on without it (:attr:`held` False): nothing can remove the store there either."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the shared lock, waiting up to ``wait_s`` seconds for an exclusive holder (a writer, a remover) to
        let go. True once held (or where there is no lock file to take: a read-only cache); False while an
        exclusive holder keeps it past ``wait_s``."""
        if self._fd is not None:
            return True
        fd = _open_lock_file(self.path)
        if fd is None:
            return True
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
                continue
            self._fd = fd
            return True

    def holder(self) -> str:
        """Who holds the lock exclusively, as the lock file records it, for a refused reader's message."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return "holder unknown"
        try:
            return _read_holder(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Let a writer or a remover in (once every other reader has let go too)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def _open_lock_file(path: Path) -> int | None:
    """The lock file opened for a shared lock (made if it is missing and its folder writable); None where it cannot
    be made or opened (a read-only cache)."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


def lock_holders(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(pid, ``READ`` or ``WRITE``) of every process holding an flock on the file ``path``, from ``/proc/locks``
    (Linux; empty elsewhere, or where it cannot be read)."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  READ  1234 08:02:131081 0 EOF"; waiters are marked "->" and hold nothing
        if len(parts) < 6 or parts[1] != "FLOCK" or "->" in parts:
            continue
        try:
            pid, node = int(parts[4]), int(parts[5].rsplit(":", 1)[-1])
        except ValueError:
            continue
        if node == inode:
            out.append((pid, parts[3]))
    return sorted(set(out))
