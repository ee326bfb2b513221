"""TensorBoard logs of training runs, as the official CA-MKD code and other KD toolkits keep them.

An optional extra (``pip install 'kdcache[tensorboard]'``): ``metrics.jsonl`` stays the record;
this writes the same per-epoch numbers as scalars for TensorBoard's plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

        try:
            self.writer: Any = SummaryWriter(log_dir=str(logdir))
        except OSError as exc:
            raise KdcacheError(f"cannot write TensorBoard logs in {logdir}: {exc.strerror or exc}") from None

    def epoch(self, epoch: int, train: dict[str, float], test_top1: float, test_top5: float, lr: float,
              teacher_weights: list[float] | None = None) -> None:
        """Write one epoch's numbers (the ones metrics.jsonl records) at step ``epoch``."""
        for name, value in train.items():
            self.writer.add_scalar(f"train/{name}", value, epoch)
        self.writer.add_scalar("test/top1", test_top1, epoch)
        self.writer.add_scalar("test/top5", test_top5, epoch)
        self.writer.add_scalar("lr", lr, epoch)
        for k, w in enumerate(teacher_weights or [], 1):
            self.writer.add_scalar(f"teacher_weight/T{k}", w, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
