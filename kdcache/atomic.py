"""Writing run files so that a failed write leaves the previous file whole and says, in one line, what failed.

Every file of a run directory is written one of two ways: replaced whole (:func:`replace_file`: a
temporary file beside it, fsync, rename; a reader, or a run resumed after a kill, sees the old file or
the new one, never half of one), or appended to (:func:`append_line`: one line, fsync; a kill can cut
the last line, which the reader drops). A write that fails (no space left, a file size limit, a disk
quota) is a :class:`WriteError`: one line naming the file, the cause and what to free or raise.

Bytes go to the file through ``os.write`` here, not through the library that made them: ``torch.save``
reports a failed write as a RuntimeError about its zip container ("[enforce fail at
inline_container.cc]"), losing the errno, so :class:`FileSink` keeps the OSError it raised. Python
ignores SIGXFSZ (CPython sets it to SIG_IGN at start-up), so a write past ``ulimit -f`` fails with
EFBIG instead of killing the process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import tempfile
from pathlib import Path
from typing import Callable

from kdcache.errors import KdcacheError
from kdcache.text import human_bytes

AGAIN = "then run the same command again"


class WriteError(KdcacheError):
    """A file that could not be written: its path, the OSError's errno and text, what was kept, what to do next.

    ``kept`` says what survives (e.g. "checkpoint.pth keeps epoch 3"); ``then`` how to go on once the cause is
    fixed (default: run the same command again); ``size`` the bytes the file needs, when known.
    """

    def __init__(self, path: Path, cause: OSError, kept: str = "", then: str = AGAIN, size: int | None = None) -> None:
        self.path, self.cause, self.kept, self.then, self.size = Path(path), cause, kept, then, size
        why, remedy = explain(cause, self.path, size)
        super().__init__(f"cannot write {self.path}: {why}{'; ' + kept if kept else ''}; {remedy}, {then}")

    @property
    def errno(self) -> int | None:
        return self.cause.errno

    def told(self, kept: str | None = None, then: str | None = None) -> WriteError:
        """The same failure, saying what the caller knows: what was kept and how to go on."""
        return WriteError(self.path, self.cause, self.kept if kept is None else kept,
                          self.then if then is None else then, self.size)


def explain(exc: OSError, path: Path, size: int | None = None) -> tuple[str, str]:
    """Why a write to ``path`` failed (the OSError's text, with the limit when a file size limit was reached)
    and what to do about it."""
    why = exc.strerror or str(exc) or type(exc).__name__
    where = path.parent
    need = f" ({path.name} needs about {human_bytes(size)})" if size else ""
    if exc.errno == errno.ENOSPC:
        return why, f"free space on the file system of {where}{need}"
    if exc.errno == errno.EDQUOT:
        return why, f"free space within your disk quota on the file system of {where}{need}, or raise the quota"
    if exc.errno == errno.EFBIG:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return (f"{why} (the file size limit, `ulimit -f`, is {human_bytes(soft)})",
                    "raise the file size limit (`ulimit -f unlimited`)")
        return f"{why} (larger than its file system allows)", f"write it to another file system{need}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return why, f"make {where} writable"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return why, f"a part of {where} is a file, not a folder: give another path"
    if exc.errno == errno.EISDIR:
        return why, f"{path} is a folder: give another path"
    return why, f"check the disk holding {where}"


class FileSink:
    """A binary file-like object over the descriptor ``fd`` that writes every byte with ``os.write`` and keeps the
    first OSError it met in :attr:`error` (a writer such as ``torch.save`` may hide it behind its own error)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.error: OSError | None = None
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                n = os.write(self.fd, view)
                view, self.written = view[n:], self.written + n
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise
        return total

    def flush(self) -> None:
        """Nothing is buffered here."""

    def fileno(self) -> int:
        return self.fd


def replace_file(path: Path | str, write: Callable[[FileSink], None], size: int | None = None) -> None:
    """Make ``path`` hold what ``write`` writes to the sink it is given, whole or not at all: written to a hidden
    temporary file beside ``path`` (``.NAME.*.tmp``), fsynced, renamed over ``path``, the folder fsynced.

    A failed write leaves ``path`` as it was and no temporary file, and raises :class:`WriteError` (``size``: the
    bytes the file needs, when known, for the message). Any other exception ``write`` raises is re-raised once the
    temporary file is removed, unless the sink met an OSError first (the cause the writer's own error hides).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(path, exc, size=size) from None
    sink = FileSink(fd)
    try:
        try:
            write(sink)
        except Exception:
            if sink.error is None:
                raise
        if sink.error is not None:  # the writer swallowed or wrapped it
            raise sink.error
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:  # no space left, a file size limit: the previous file at ``path`` is untouched
        _discard(fd, tmp)
        raise WriteError(path, exc, size=size) from None
    except BaseException:
        _discard(fd, tmp)
        raise


def write_bytes(path: Path | str, data: bytes | memoryview) -> None:
    """``data`` as the whole of ``path`` (see :func:`replace_file`)."""
    def write(sink: FileSink) -> None:
        sink.write(data)

    replace_file(path, write, size=len(data))


def append_line(path: Path | str, line: str) -> None:
    """Add ``line`` (and a newline) at the end of ``path`` and fsync it. A failed write is cut off again (the file
    keeps its old size where the file system lets it) and raises :class:`WriteError`; a kill part-way leaves a
    last line without its newline, which readers drop."""
    path = Path(path)
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        before = os.fstat(fd).st_size
        try:
            FileSink(fd).write(data)
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
            raise
    except OSError as exc:
        raise WriteError(path, exc) from None
    finally:
        os.close(fd)


def _discard(fd: int, tmp: str) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; file systems that cannot fsync a folder are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
