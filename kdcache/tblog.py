"""TensorBoard logs of training runs, as the official CA-MKD code and other KD toolkits keep them.

An optional extra (``pip install 'kdcache[tensorboard]'``): ``metrics.jsonl`` stays the record;
this writes the same per-epoch numbers as scalars for TensorBoard's plots.

The log is append-only: a resumed run opens a new events file beside the old ones (TensorBoard reads
them all, and drops a last record cut short by a kill); the epochs are written after their
checkpoint, so no epoch is logged twice. A write that fails (a full disk, a file size limit) is one
:class:`kdcache.atomic.WriteError` line; tensorboard writes from a thread of its own, whose failure
is raised at the next flush, so that thread's traceback is not printed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from kdcache.atomic import WriteError
from kdcache.errors import KdcacheError


def check_available() -> None:
    """Refuse ``--tensorboard`` before any work when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise KdcacheError("--tensorboard needs the tensorboard package: pip install 'kdcache[tensorboard]'") from None


class TensorBoardLog:
    """Per-epoch scalars in ``logdir``: ``train/<term>``, ``test/top1``, ``test/top5``, ``lr`` and, for methods
    that weigh their teachers, ``teacher_weight/T<k>`` (the epoch's mean weight of teacher k)."""

    def __init__(self, logdir: Path | str) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        _quiet_writer_threads()
        try:
            self.writer: Any = SummaryWriter(log_dir=str(logdir))
        except OSError as exc:
            raise KdcacheError(f"cannot write TensorBoard logs in {logdir}: {exc.strerror or exc}") from None

    def epoch(self, epoch: int, train: dict[str, float], test_top1: float | None, test_top5: float | None, lr: float,
              teacher_weights: list[float] | None = None) -> None:
        """Write one epoch's numbers (the ones metrics.jsonl records) at step ``epoch``, flushed; a failed write
        raises :class:`~kdcache.atomic.WriteError` naming the events file."""
        try:
            for name, value in train.items():
                self.writer.add_scalar(f"train/{name}", value, epoch)
            if test_top1 is not None and test_top5 is not None:  # an epoch evaluated (--eval-every)
                self.writer.add_scalar("test/top1", test_top1, epoch)
                self.writer.add_scalar("test/top5", test_top5, epoch)
            self.writer.add_scalar("lr", lr, epoch)
            for k, w in enumerate(teacher_weights or [], 1):
                self.writer.add_scalar(f"teacher_weight/T{k}", w, epoch)
            self.writer.flush()
        except OSError as exc:
            raise WriteError(self._events_file(), exc) from None

    def close(self) -> None:
        """Flush and close the log (a failed write: :class:`~kdcache.atomic.WriteError`)."""
        try:
            self.writer.close()
        except OSError as exc:
            raise WriteError(self._events_file(), exc) from None

    def _events_file(self) -> Path:
        """The events file this log writes (tensorboard's private name for it), else its folder."""
        name = getattr(getattr(getattr(self.writer, "file_writer", None), "event_writer", None), "_file_name", None)
        return Path(name) if isinstance(name, str) else self.logdir


def _quiet_writer_threads() -> None:
    """Keep the OSError that ends tensorboard's writer thread from printing a traceback: the same error is raised
    in the training thread at the next flush (:meth:`TensorBoardLog.epoch`), which says it in one line. Every
    other thread's failure is printed as before."""
    previous = threading.excepthook
    if getattr(previous, "_kdcache_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._kdcache_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook
