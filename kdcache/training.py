"""Training defaults of the official CA-MKD / RepDistiller scripts (METHODS.md), and checkpoint writing.

SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05
(0.01 for MobileNetV2, ShuffleV1, ShuffleV2) divided by 10 at epochs 150, 180, 210.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from kdcache.errors import KdcacheError

EPOCHS = 240
BATCH_SIZE = 64
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR = 0.05
LR_SMALL_NETS = 0.01
SMALL_NETS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
MILESTONES = (150, 180, 210)
LR_DECAY = 0.1


def official_lr(arch: str) -> float:
    """The official scripts' learning rate for this architecture."""
    return LR_SMALL_NETS if arch in SMALL_NETS else LR


def milestones_for(epochs: int) -> list[int]:
    """The official milestones, scaled to a shorter or longer run so the decays keep their place."""
    if epochs == EPOCHS:
        return list(MILESTONES)
    return sorted({max(1, round(m * epochs / EPOCHS)) for m in MILESTONES if round(m * epochs / EPOCHS) < epochs})


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, momentum: float = MOMENTUM,
                   weight_decay: float = WEIGHT_DECAY) -> torch.optim.SGD:
    """SGD as the official scripts set it up (Nesterov only where momentum is used)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, milestones: list[int],
                   decay: float = LR_DECAY) -> torch.optim.lr_scheduler.MultiStepLR:
    """Step decay at the milestones, stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=decay)


def build_sgd(params: Iterable[torch.nn.Parameter], arch: str, epochs: int, lr: float | None, momentum: float,
              weight_decay: float, milestones: list[int] | None
              ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR, float, list[int]]:
    """Optimizer and schedule with the official defaults filled in for ``arch`` and ``epochs``.

    Returns them with the learning rate and milestones actually used, for the run's record.
    """
    lr = lr if lr is not None else official_lr(arch)
    milestones = milestones if milestones is not None else milestones_for(epochs)
    optimizer = make_optimizer(params, lr, momentum, weight_decay)
    return optimizer, make_scheduler(optimizer, milestones), lr, milestones


def check_hyperparameters(epochs: int, batch_size: int, lr: float | None, weight_decay: float,
                          momentum: float) -> None:
    """Refuse out-of-range training options with one line each."""
    if epochs < 1:
        raise KdcacheError(f"--epochs must be at least 1 (got {epochs})")
    if batch_size < 1:
        raise KdcacheError(f"--batch-size must be at least 1 (got {batch_size})")
    if lr is not None and lr <= 0:
        raise KdcacheError(f"--lr must be positive (got {lr})")
    if weight_decay < 0:
        raise KdcacheError(f"--weight-decay must not be negative (got {weight_decay})")
    if not 0 <= momentum < 1:
        raise KdcacheError(f"--momentum must lie in [0, 1) (got {momentum})")


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise KdcacheError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # e.g. no space left: the previous file at ``path`` is untouched
        Path(tmp).unlink(missing_ok=True)
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise KdcacheError(f"cannot write {path}: {exc.strerror or exc}{kept}; free space and run the "
                              "command again (with --resume to continue)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed for each epoch's augmentation draw."""
    return seed * 1_000_003 + epoch
