"""The train-teacher stage: supervised training of a teacher with the official defaults.

Pretrained CIFAR teachers can no longer be downloaded, so users start here. Each
epoch draws fresh augmentation parameters and replays them on the device, the
same replay precompute and distill use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.batches import view_batch
from kdcache.data import load_dataset
from kdcache.device import resolve_device
from kdcache.errors import CheckpointError, KdcacheError
from kdcache.evaluate import evaluate
from kdcache.models import build_model, map_shape, model_info
from kdcache.models.checkpoint import read_checkpoint
from kdcache import tblog, training
from kdcache.views import draw_plan, get_recipe


@dataclass
class TrainTeacherRequest:
    """Everything ``kdcache train-teacher`` takes; None means the official default."""

    arch: str
    dataset: str
    out: Path
    data_root: Path | None = None
    epochs: int = training.EPOCHS
    batch_size: int = training.BATCH_SIZE
    lr: float | None = None
    momentum: float = training.MOMENTUM
    weight_decay: float = training.WEIGHT_DECAY
    milestones: list[int] | None = None
    seed: int = 0
    device: str | None = None
    resume: bool = False
    force: bool = False              # replace an existing ``out`` (without it, an existing file is refused)
    recipe: str | None = None        # view recipe (name or name:size); default: the data set's
    image_size: int | None = None    # side of the views (imagefolder); default: the recipe's
    label_map: dict[int, int] | None = None  # train on corrupted labels: class a is taught as label_map[a]
    tensorboard: Path | None = None  # also write the per-epoch scalars there (the tensorboard extra)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_acc: float
    test_top1: float
    test_top5: float
    lr: float
    seconds: float


@dataclass
class TrainTeacherResult:
    out: Path
    best_acc: float
    history: list[EpochRecord] = field(default_factory=list)


def train_teacher(req: TrainTeacherRequest,
                  on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainTeacherResult:
    """Train ``req.arch`` on ``req.dataset`` and keep the latest state in ``req.out`` after every epoch."""
    training.check_hyperparameters(req.epochs, req.batch_size, req.lr, req.weight_decay, req.momentum, req.seed)
    if req.resume and req.force:
        raise KdcacheError("--resume continues the run in --out and --force replaces it: give one of them")
    if not req.resume and not req.force and Path(req.out).exists():
        raise KdcacheError(f"{req.out} already exists; pass --resume to continue its training, --force to replace "
                           "it, or choose another --out")
    model_info(req.arch)
    if req.tensorboard is not None:
        tblog.check_available()
    dataset = load_dataset(req.dataset, req.data_root, req.recipe, req.image_size)
    device = resolve_device(req.device)
    torch.manual_seed(req.seed)

    model = build_model(req.arch, dataset.num_classes)
    map_shape(model, dataset.image_size)  # a model that cannot take the views: one line, before any epoch
    model = model.to(device)
    optimizer, scheduler, _, milestones = training.build_sgd(model.parameters(), req.arch, req.epochs, req.lr,
                                                             req.momentum, req.weight_decay, req.milestones)
    start, best_acc = 1, 0.0
    if req.resume:
        start, best_acc = _resume(req, model, optimizer, scheduler)
        training.reschedule(optimizer, scheduler, milestones)

    train = dataset.train
    if getattr(train, "resident", False):
        train = train.to(device)
    labels = torch.as_tensor(_relabel(train.labels, req.label_map)).to(device)
    n = len(train)
    if n < req.batch_size:
        raise KdcacheError(f"--batch-size {req.batch_size} exceeds the {n} training samples")
    sizes = train.sizes if get_recipe(dataset.recipe).needs_sizes else None
    result = TrainTeacherResult(Path(req.out), best_acc)
    board = tblog.TensorBoardLog(req.tensorboard) if req.tensorboard is not None else None
    watch = training.NonFiniteWatch(device, lambda e: f"{req.out} keeps epoch {e - 1}, the last good one" if e > 1
                                    else f"{req.out} was not written")
    for epoch in range(start, req.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order, params = draw_plan(dataset.recipe, 1, n, training.epoch_seed(req.seed, epoch), sizes)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for b in range(n // req.batch_size):  # the incomplete last batch is dropped, as officially
            rows = slice(b * req.batch_size, (b + 1) * req.batch_size)
            idx = order[0, rows]
            x = view_batch(dataset, train, dataset.recipe, idx, params[0, rows], device)
            y = labels[torch.as_tensor(idx, device=device)]
            _, logits = model(x)
            loss = F.cross_entropy(logits, y)
            watch.observe(epoch, b, {"ce": loss})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)  # summed on the device: no host sync per step
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        watch.check()  # nothing of an epoch with a NaN or infinite loss is evaluated or saved
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        top1, top5 = evaluate(model, dataset, dataset.recipe, device)
        result.best_acc = max(result.best_acc, top1)
        record = EpochRecord(epoch, float(loss_sum) / seen, 100.0 * int(correct) / seen, top1, top5, lr_now,
                             time.perf_counter() - t0)
        result.history.append(record)
        training.save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "best_acc": result.best_acc,
            "arch": req.arch, "num_classes": dataset.num_classes, "dataset": dataset.name,
            "test_top1": top1, "seed": req.seed,
        }, req.out)
        if board is not None:
            board.epoch(epoch, {"loss": record.loss, "accuracy": record.train_acc}, top1, top5, lr_now)
        if on_epoch:
            on_epoch(record)
    if board is not None:
        board.close()
    return result


def _relabel(labels: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """Labels with every class ``a`` in ``label_map`` replaced by ``label_map[a]`` (the test split stays true)."""
    if not label_map:
        return labels
    table = np.arange(int(labels.max()) + 1)
    for src, dst in label_map.items():
        table[src] = dst
    return table[labels]


def _resume(req: TrainTeacherRequest, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, float]:
    """Restore a run from ``req.out``; returns the next epoch and the best accuracy so far."""
    if not Path(req.out).is_file():
        raise CheckpointError(f"--resume: {req.out} does not exist; drop --resume to start a new run")
    ckpt = read_checkpoint(req.out)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"--resume: {req.out} is not a train-teacher checkpoint (not a dict)")
    missing = [k for k in ("model", "optimizer", "lr_scheduler", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume: {req.out} is not a train-teacher checkpoint (no {', '.join(missing)})")
    if ckpt.get("arch") not in (None, req.arch):
        raise CheckpointError(f"--resume: {req.out} holds a {ckpt['arch']} run, not {req.arch}")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--resume: {req.out} does not fit this run: {str(exc).splitlines()[0]}") from None
    return int(ckpt["epoch"]) + 1, float(ckpt.get("best_acc", 0.0))
