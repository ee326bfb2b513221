"""One training loop for teachers and students, in one run directory format (:class:`kdcache.runs.RunDir`).

``kdcache train-teacher`` (a teacher is cross-entropy over fresh augmented views) and
``kdcache distill`` (a student, a method's loss over stored views) each build their
network, optimiser and schedule, then hand the epochs to :class:`Loop`, which does
the rest the same way for both: start the run directory or restore the run in it
(``--resume``: the result arguments compared, :func:`kdcache.training.resume_changes`;
model, optimiser, schedule and torch's RNG restored), and after each epoch's training
(the caller's function) stop on a non-finite loss, step the schedule, evaluate (every
``eval_every``-th epoch and the last: evaluation draws nothing at random, so the weights do not
depend on it), and write metrics.jsonl, best.pth and checkpoint.pth (atomically,
:func:`kdcache.training.save_atomic`); after the last epoch, last.pth. Under torchrun
rank 0 alone reads and writes the run directory and evaluates.

A write that fails (a full disk, a file size limit) stops the run with one line naming the file, the
cause, the epoch checkpoint.pth still holds and how to go on (``--resume``); the files of an epoch
whose checkpoint was not written are those of an epoch not trained: ``--resume`` drops its metrics
line and trains it again. When even epoch 1's checkpoint could not be written, its metrics line,
best.pth and sample weights are removed, so the same command starts the run again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kdcache import __version__, arguments, training
from kdcache.atomic import WriteError
from kdcache.distributed import DistContext
from kdcache.errors import CheckpointError, KdcacheError
from kdcache.runs import RunDir
from kdcache.tblog import TensorBoardLog


@dataclass
class EpochMetrics:
    """One line of metrics.jsonl."""

    epoch: int
    view: int | None                 # the stored view the epoch read (distill); None for fresh views (teachers)
    train: dict[str, float]          # the epoch's mean training numbers: each loss term (and a teacher's accuracy)
    teacher_weights: list[float] | None
    test_top1: float | None          # None in an epoch not evaluated (--eval-every)
    test_top5: float | None
    lr: float
    seconds: float

    @property
    def test_text(self) -> str:
        """The epoch's test accuracies as a progress line shows them."""
        if self.test_top1 is None or self.test_top5 is None:
            return "test not evaluated this epoch"
        return f"test top-1 {self.test_top1:6.2f}%  top-5 {self.test_top5:6.2f}%"


@dataclass
class Trained:
    """What one epoch's training gives the loop to record."""

    train: dict[str, float]
    view: int | None = None
    teacher_weights: list[float] | None = None
    files: Callable[[RunDir], None] | None = None   # the epoch's own files (sample weights), written before its checkpoint


@dataclass
class Trainee:
    """What a run trains and checkpoints: its network (``arch``), the other trained modules (saved beside the
    model's state under their names: a distill method's aligners as "method"), the optimiser and the schedule."""

    arch: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    parts: dict[str, torch.nn.Module] = field(default_factory=dict)


def versions() -> dict[str, str | None]:
    """What made a run, for its config.json: kdcache's version, its git commit when known, torch's version."""
    return {"kdcache_version": __version__, "git_sha": _git_sha(), "torch_version": torch.__version__}


class Loop:
    """The epochs of one run of ``kind`` ("teacher" or "distill") in the run directory ``run``.

    ``config`` is what config.json holds (its "args" from :func:`kdcache.training.recorded_args`);
    ``epochs`` how many the run trains in all; ``about`` is added to every weights file
    (best.pth, last.pth: its data set, classes, seed); ``ctx`` places this process in a
    torchrun job (default: a single process on the model's device); the test split is evaluated
    after every ``eval_every``-th epoch and after the last. :attr:`watch` is the
    non-finite loss watch the caller's steps report to. Use: :meth:`begin`, then
    :meth:`run`, then :meth:`finish`.
    """

    def __init__(self, run: RunDir, kind: str, config: dict[str, Any], trainee: Trainee, epochs: int,
                 about: dict[str, Any] | None = None, ctx: DistContext | None = None, eval_every: int = 1) -> None:
        self.run_dir, self.kind, self.config, self.trainee, self.epochs = run, kind, config, trainee, epochs
        self.eval_every = arguments.integer("eval_every", eval_every, low=1, why="the epochs between evaluations")
        self.about = about or {}
        device = next(trainee.model.parameters()).device
        self.ctx = ctx if ctx is not None else DistContext(device=device)
        self.watch = training.NonFiniteWatch(device, self._kept, _any_rank(self.ctx))
        self.start = 1
        self.best_top1: float | None = None  # the best evaluated epoch's test top-1; None before the first
        self.history: list[EpochMetrics] = []

    # -- starting ---------------------------------------------------------------------------------

    def begin(self, resume: bool, force: bool = False) -> None:
        """Start a new run directory (config.json, an empty metrics.jsonl; ``force``: the run files there removed
        first), or restore the run in it (``resume``): rank 0 reads and checks checkpoint.pth and hands it to
        every rank."""
        run, ctx = self.run_dir, self.ctx
        if not resume:
            if ctx.is_main:
                if force:
                    run.clear()
                run.start(self.config)
            return
        ckpt = ctx.on_main(self._read_checkpoint)
        t = self.trainee
        try:
            t.model.load_state_dict(ckpt["model"])
            for name, part in t.parts.items():
                part.load_state_dict(ckpt[name])
            t.optimizer.load_state_dict(ckpt["optimizer"])
            t.scheduler.load_state_dict(ckpt["lr_scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"--resume: {run.file(run.CHECKPOINT)} does not fit this run: "
                                  f"{str(exc).splitlines()[0]}") from None
        training.reschedule(t.optimizer, t.scheduler, self.config["args"]["milestones"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        epoch = int(ckpt["epoch"])
        best = ckpt.get("best_top1")
        self.start, self.best_top1 = epoch + 1, None if best is None else float(best)
        if ctx.is_main:
            try:
                run.keep_metrics_through(epoch)  # and a last line cut short by a kill
                if epoch < self.epochs:  # it trains again: not finished until its new last epoch
                    run.file(run.LAST).unlink(missing_ok=True)
                run.write_config(self.config)
            except WriteError as exc:
                raise exc.told(kept=f"{run.file(run.CHECKPOINT).name} keeps epoch {epoch}") from None

    def _read_checkpoint(self) -> dict[str, Any]:
        """checkpoint.pth, refused unless it is this kind's, with these parts, of the same result arguments."""
        run, args = self.run_dir, self.config["args"]
        ckpt = run.read_checkpoint(self.kind, tuple(self.trainee.parts))
        if int(ckpt["epoch"]) > self.epochs:
            raise KdcacheError(f"--resume: the run in {run.path} has trained {ckpt['epoch']} epochs already, more "
                               f"than --epochs {self.epochs}; give --epochs {ckpt['epoch']} or more")
        changed = training.resume_changes(ckpt["args"], args)
        if changed:
            raise KdcacheError(f"--resume: {', '.join(changed)} differ from the run in {run.path}; "
                               "resume with the same options or start a new --out")
        return ckpt

    # -- the epochs -------------------------------------------------------------------------------

    def run(self, train: Callable[[int], Trained], evaluate: Callable[[], tuple[float, float]],
            on_epoch: Callable[[EpochMetrics], None] | None = None, board: TensorBoardLog | None = None) -> None:
        """Train the epochs left: ``train(epoch)`` runs one epoch's steps (reporting each step's loss terms to
        :attr:`watch`); then, unless a loss was not finite, the schedule steps, ``evaluate()`` (rank 0; in the
        epochs :meth:`evaluates`) gives test top-1 and top-5, and rank 0 records the epoch (metrics.jsonl, best.pth,
        checkpoint.pth, ``board``) and calls ``on_epoch``. ``board`` is closed at the end."""
        t, ctx = self.trainee, self.ctx
        for epoch in range(self.start, self.epochs + 1):
            t0 = time.perf_counter()
            trained = train(epoch)
            self.watch.check()  # nothing of an epoch with a NaN or infinite loss is evaluated or saved
            lr_now = t.optimizer.param_groups[0]["lr"]
            t.scheduler.step()
            top1, top5 = ctx.on_main(evaluate) if self.evaluates(epoch) else (None, None)
            metrics = EpochMetrics(epoch, trained.view, trained.train, trained.teacher_weights, top1, top5, lr_now,
                                   time.perf_counter() - t0)
            self.history.append(metrics)
            is_best = top1 is not None and (self.best_top1 is None or top1 > self.best_top1)
            if is_best:
                self.best_top1 = top1
            if ctx.is_main:
                self._save_epoch(metrics, is_best, trained.files)
                if board is not None:
                    try:
                        board.epoch(epoch, metrics.train, metrics.test_top1, metrics.test_top5, metrics.lr,
                                    metrics.teacher_weights)
                    except WriteError as exc:
                        raise exc.told(kept=f"{self.run_dir.CHECKPOINT} keeps epoch {epoch} (the log lacks its "
                                            "numbers; metrics.jsonl has them)",
                                       then=self._resume_from(epoch)) from None
                if on_epoch:
                    on_epoch(metrics)
        if board is not None:
            board.close()

    def evaluates(self, epoch: int) -> bool:
        """Whether the test split is evaluated after ``epoch``: every ``eval_every``-th epoch and the last."""
        return epoch % self.eval_every == 0 or epoch == self.epochs

    def _save_epoch(self, metrics: EpochMetrics, is_best: bool, files: Callable[[RunDir], None] | None) -> None:
        """The epoch's files (``files``: its own, e.g. sample weights), its metrics line, best.pth (``is_best``),
        then checkpoint.pth, which makes the epoch saved; a failed write stops the run with one line."""
        run, t = self.run_dir, self.trainee
        try:
            if files is not None:
                files(run)
            run.append_metrics(asdict(metrics))
            if is_best:
                run.save_best(self._weights(metrics.epoch, metrics.test_top1))
            run.save_checkpoint({
                "kind": self.kind, "model": t.model.state_dict(),
                **{name: part.state_dict() for name, part in t.parts.items()},
                "optimizer": t.optimizer.state_dict(), "lr_scheduler": t.scheduler.state_dict(),
                "epoch": metrics.epoch, "args": self.config["args"], "best_top1": self.best_top1,
                "rng": {"torch": torch.get_rng_state()}, "arch": t.arch,
            })
        except WriteError as exc:
            raise self._unsaved(exc, metrics.epoch) from None

    def _unsaved(self, exc: WriteError, epoch: int) -> WriteError:
        """The one line for a write of ``epoch``'s files that failed: checkpoint.pth keeps the epoch before, to
        resume from. Epoch 1 has none: its files written so far are removed (best-effort: no new space is needed
        for it), so that the folder holds a run started but never saved and the same command starts it again."""
        run = self.run_dir
        if epoch > 1:
            return exc.told(kept=f"{run.CHECKPOINT} keeps epoch {epoch - 1}, the last one saved",
                            then=self._resume_from(epoch - 1))
        with contextlib.suppress(OSError):
            os.truncate(run.file(run.METRICS), 0)
        for name in (run.BEST, run.SAMPLE_WEIGHTS):
            with contextlib.suppress(OSError):
                run.file(name).unlink(missing_ok=True)
        return exc.told(kept="no epoch was saved", then="then run the same command again")

    @staticmethod
    def _resume_from(epoch: int) -> str:
        return f"then run the same command with --resume to continue after epoch {epoch}"

    def _weights(self, epoch: int, test_top1: float | None) -> dict[str, Any]:
        """A weights file (best.pth, last.pth): what ``load_checkpoint`` reads, and what it was."""
        return {"model": self.trainee.model.state_dict(), "epoch": epoch, "arch": self.trainee.arch,
                "test_top1": test_top1, **self.about}

    # -- the end ----------------------------------------------------------------------------------

    def finish(self, also: Path | None = None) -> None:
        """Write last.pth (rank 0), which marks the run finished; ``also``: the same weights there too, written
        first (train-teacher's ``--out X.pth``)."""
        if not self.ctx.is_main:
            return
        run = self.run_dir
        if self.history:
            test_top1: float | None = self.history[-1].test_top1
        else:  # resumed after its last epoch: nothing trained now
            recorded = run.read_metrics()
            top1 = recorded[-1]["test_top1"] if recorded else None
            test_top1 = None if top1 is None else float(top1)
        weights = self._weights(self.epochs, test_top1)
        try:
            if also is not None:
                training.save_atomic(weights, also)
            run.save_last(weights)
        except WriteError as exc:
            raise exc.told(kept=f"{run.CHECKPOINT} keeps the trained epoch {self.epochs}",
                           then="then run the same command with --resume to write it (nothing is trained again)") \
                from None

    def _kept(self, epoch: int) -> str:
        """What a run stopped in ``epoch`` keeps, for the message: the last good checkpoint, if any."""
        if epoch == 1:
            return "no checkpoint was written"
        run = self.run_dir
        return (f"{run.file(run.CHECKPOINT)} and best.pth keep epoch {epoch - 1}, the last good one "
                f"(start again in a new --out with a lower --lr)")


def _any_rank(ctx: DistContext) -> Callable[[bool], bool] | None:
    """Under torchrun: whether any rank's flag is set (every rank calls it at the same step)."""
    if not ctx.distributed:
        return None
    return lambda flag: bool(ctx.all_reduce_mean(torch.tensor(float(flag), device=ctx.device)) > 0)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
