"""Training defaults of the official CA-MKD / RepDistiller scripts (docs/LOSSES.md), and checkpoint writing.

SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05
(0.01 for MobileNetV2, ShuffleV1, ShuffleV2) divided by 10 at epochs 150, 180, 210.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, cast

import torch

from kdcache import atomic
from kdcache.errors import KdcacheError
from kdcache.request import differing, result_args

from kdcache.defaults import (BATCH_SIZE, EPOCHS, LR, LR_DECAY, LR_SMALL_NETS, MILESTONES, MOMENTUM,  # noqa: F401
                              SMALL_NETS, WEIGHT_DECAY)


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
    lr, milestones = resolve_schedule(arch, epochs, lr, milestones)
    optimizer = make_optimizer(params, lr, momentum, weight_decay)
    return optimizer, make_scheduler(optimizer, milestones), lr, milestones


def resolve_schedule(arch: str, epochs: int, lr: float | None,
                     milestones: list[int] | None) -> tuple[float, list[int]]:
    """The learning rate and milestones a run of ``arch`` for ``epochs`` uses: those given, else the official ones."""
    return (lr if lr is not None else official_lr(arch),
            list(milestones) if milestones is not None else milestones_for(epochs))


def recorded_args(req: Any, arch: str) -> dict[str, Any]:
    """What a training run records of its request ``req`` and compares (config.json's "args"): its result
    arguments (:func:`kdcache.request.result_args`), with ``lr`` and ``milestones`` as resolved for ``arch`` and
    its epochs, and the milestones as given (None: scaled to ``epochs``) kept under ``lr_milestones``.

    ``req`` has the fields every training request has: ``epochs``, ``lr`` and ``milestones`` among them.
    """
    args = result_args(req)
    lr, milestones = resolve_schedule(arch, req.epochs, req.lr, req.milestones)
    args.update(lr=lr, milestones=milestones, lr_milestones=args["milestones"])
    return args


def resume_changes(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The result arguments (:func:`recorded_args`) a ``--resume`` with ``now`` would change from the run that
    recorded ``recorded``, sorted: a resumed run must compute what the recorded one did.

    ``epochs`` alone may change: it may grow (the caller refuses fewer epochs than were trained). The schedule is
    the same when the milestones resolved now equal the recorded ones, or when neither run gave
    ``--lr-milestones``: the milestones scaled to ``--epochs`` then follow it (:func:`reschedule`).
    """
    schedule = ("epochs", "milestones", "lr_milestones")
    changed = differing(recorded, {k: v for k, v in now.items() if k not in schedule})
    follows = recorded.get("lr_milestones") is None and now.get("lr_milestones") is None
    if "milestones" in recorded and recorded["milestones"] != now.get("milestones") and not follows:
        changed.append("lr_milestones")
    return sorted(changed)


def reschedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.MultiStepLR,
               milestones: list[int]) -> None:
    """Give a resumed run the milestones resolved for its (possibly grown) --epochs: the epochs still to train
    follow them as a run started with them would, the epochs already trained keep the lr they had."""
    if Counter(milestones) == scheduler.milestones:
        return  # the schedule the checkpoint holds: keep its lr bit for bit
    scheduler.milestones = Counter(milestones)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        lr = base
        for m in sorted(milestones):
            if m <= scheduler.last_epoch:
                lr = lr * scheduler.gamma  # one decay at a time, as MultiStepLR applies them
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_hyperparameters(epochs: int, batch_size: int, lr: float | None, weight_decay: float,
                          momentum: float, seed: int = 0) -> None:
    """Refuse out-of-range or non-finite training options with one line each, before any work."""
    if not 1 <= epochs <= MAX_EPOCHS:
        raise KdcacheError(f"--epochs must lie in [1, {MAX_EPOCHS:,}] (got {epochs:,})")
    if batch_size < 2:  # the incomplete last batch is dropped, so every training batch has batch_size samples
        raise KdcacheError(f"--batch-size must be at least 2 (got {batch_size}): BatchNorm, which every zoo model and "
                           "the aligners of fitnet, fitnet-mkd and camkd train, needs 2 samples a batch")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise KdcacheError(f"--lr must be a finite positive number (got {lr})")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise KdcacheError(f"--weight-decay must be a finite number of at least 0 (got {weight_decay})")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise KdcacheError(f"--momentum must lie in [0, 1) (got {momentum})")
    check_seed("--seed", seed)


# Seeds go to torch.manual_seed (which takes 0 to 2^64 - 1), numpy's SeedSequence (any size) and epoch_seed, and are
# recorded in JSON (config.json, zarr attributes), whose readers commonly hold an int64: 0 to 2^63 - 1 works everywhere.
MAX_SEED = 2**63 - 1
# epoch_seed(seed, e) = seed * 1,000,003 + e: epochs up to 1,000,002 keep every (seed, epoch) pair's draw distinct.
MAX_EPOCHS = 1_000_000


def check_seed(option: str, seed: int) -> None:
    """Refuse a seed outside [0, MAX_SEED] with one line naming ``option``."""
    if not 0 <= seed <= MAX_SEED:
        raise KdcacheError(f"{option} must lie in [0, 2**63 - 1] (got {seed})")


class NonFiniteLossError(KdcacheError):
    """A loss term became NaN or infinite during training: the run stops there, keeping its last good checkpoint."""


class NonFiniteWatch:
    """Stops training at the first step whose loss terms are not finite, without a host sync per step.

    :meth:`observe` records each step's terms on the device; :meth:`check` (one sync) raises
    NonFiniteLossError naming the epoch, the step and the term. Training loops check every
    ``CHECK_EVERY`` steps and at the end of every epoch, before anything of that epoch is saved.
    ``kept(epoch)`` says what the run keeps when epoch ``epoch`` fails (its last good checkpoint);
    ``any_rank(flag)``, under torchrun, tells every rank whether any rank found a bad step.
    A check with nothing observed since the last one returns at once (no sync, and no collective:
    every rank observes and checks the same steps, so all skip it alike).
    """

    CHECK_EVERY = 50

    def __init__(self, device: torch.device, kept: Callable[[int], str],
                 any_rank: Callable[[bool], bool] | None = None) -> None:
        self.device, self.kept, self.any_rank = device, kept, any_rank
        self.epoch = 0
        self.names: list[str] = []
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad = torch.zeros(0, dtype=torch.bool, device=device)
        self.values = torch.zeros(0, device=device)
        self.unchecked = False   # steps observed since the last check

    def observe(self, epoch: int, step: int, terms: dict[str, torch.Tensor]) -> None:
        """Note the loss terms of training step ``step`` (0-based) of ``epoch``; check every CHECK_EVERY steps."""
        names = list(terms)
        if names != self.names or epoch != self.epoch:
            if self.names:
                self.check()  # settle the previous terms (or epoch) before watching the new ones
            self.epoch, self.names = epoch, names
            self.bad = torch.zeros(len(names), dtype=torch.bool, device=self.device)
            self.values = torch.zeros(len(names), device=self.device)
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        bad = ~torch.isfinite(values)
        hit = bad.any() & (self.step < 0)
        self.step = torch.where(hit, torch.full_like(self.step, step), self.step)
        self.bad = torch.where(hit, bad, self.bad)
        self.values = torch.where(hit, values, self.values)
        self.unchecked = True
        if (step + 1) % self.CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        """Raise NonFiniteLossError if a step observed so far had a non-finite term (on any rank)."""
        if not self.unchecked:
            return  # checked already: what it found would have been raised then
        self.unchecked = False
        step = int(self.step)
        found = step >= 0
        if self.any_rank is not None and self.any_rank(found) and not found:
            raise NonFiniteLossError(non_finite_message(self.epoch, None, "on another rank", float("nan"),
                                                        self.kept(self.epoch)))
        if found:
            k = int(torch.nonzero(self.bad)[0])
            raise NonFiniteLossError(non_finite_message(self.epoch, step, self.names[k], float(self.values[k]),
                                                        self.kept(self.epoch)))


def non_finite_message(epoch: int, step: int | None, term: str, value: float, kept: str) -> str:
    """The one line a run stopped by a NaN or infinite loss term prints (``step`` None: found on another rank)."""
    where = f"epoch {epoch}, step {step}: the loss term {term!r} became {value}" if step is not None else \
        f"epoch {epoch}: a loss term became non-finite {term}"
    return f"{where} and training stopped; {kept}. Lower --lr (or check the data and the stores) and run again"


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsynced, then renamed: a reader never sees half a file,
    and a failed write (no space left, a file size limit) keeps the previous file and is one
    :class:`kdcache.atomic.WriteError` line naming the file and the cause, not torch's "[enforce fail at
    inline_container.cc]" (the bytes go through :class:`kdcache.atomic.FileSink`, which keeps the OSError)."""
    path = Path(path)
    previous = path.stat().st_size if path.is_file() else None

    def write(sink: atomic.FileSink) -> None:
        torch.save(obj, cast("IO[bytes]", sink))  # it needs write() alone

    try:
        atomic.replace_file(path, write)
    except atomic.WriteError as exc:
        kept = f"the previous {path.name} is kept" if path.exists() else ""
        raise atomic.WriteError(exc.path, exc.cause, kept, exc.then, previous) from None


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed for each epoch's augmentation draw."""
    return seed * 1_000_003 + epoch
