"""The train-teacher stage: supervised training of a teacher with the official defaults.

Pretrained CIFAR teachers can no longer be downloaded, so users start here. Each
epoch draws fresh augmentation parameters and replays them on the device, the
same replay precompute and distill use; the loss is plain cross-entropy. The
epochs run through the loop distill uses (:class:`kdcache.loop.Loop`), into the
same run directory format (:class:`kdcache.runs.RunDir`): config.json,
metrics.jsonl, checkpoint.pth (to resume), best.pth and last.pth.

``--out`` names the run directory, or a ``.pth`` file: then the run directory is
beside it, named without the ``.pth`` (``t1.pth`` -> ``t1/``), and the file itself
is written after the last epoch with the trained teacher's weights (the same
``{'model': state_dict, ...}`` as last.pth), for ``precompute --checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch
import torch.nn.functional as F

from kdcache import tblog, training
from kdcache.batches import view_batch
from kdcache.data import load_dataset
from kdcache.device import resolve_device
from kdcache.errors import CheckpointError, KdcacheError
from kdcache.evaluate import evaluate
from kdcache.loop import EpochMetrics, Loop, Trained, Trainee, versions
from kdcache.models import build_model, map_shape, model_info
from kdcache.models.checkpoint import read_checkpoint
from kdcache.request import how, how_args
from kdcache.runs import RunDir
from kdcache.views import draw_plan, get_recipe


@dataclass
class TrainTeacherRequest:
    """Everything ``kdcache train-teacher`` takes; None means the official default. Fields declared with
    :func:`~kdcache.request.how` say how the run goes; every other one is what the trained teacher depends on
    (recorded in config.json, compared on ``--resume``)."""

    arch: str
    dataset: str
    out: Path = how()                # the run directory, or a .pth file with the run directory beside it
    data_root: Path | None = how(None)
    epochs: int = training.EPOCHS    # may grow on --resume
    batch_size: int = training.BATCH_SIZE
    lr: float | None = None
    momentum: float = training.MOMENTUM
    weight_decay: float = training.WEIGHT_DECAY
    milestones: list[int] | None = None
    seed: int = 0
    device: str | None = how(None)
    resume: bool = how(False)
    force: bool = how(False)         # replace an existing ``out`` (without it, an existing run is refused)
    recipe: str | None = None        # view recipe (name or name:size); default: the data set's
    image_size: int | None = None    # side of the views (imagefolder); default: the recipe's
    label_map: dict[int, int] | None = None  # train on corrupted labels: class a is taught as label_map[a]
    eval_every: int = how(1)  # evaluate the test split after every N-th epoch and the last (the weights do not change)
    tensorboard: Path | None = how(None)  # also write the per-epoch scalars there (the tensorboard extra)


@dataclass
class TrainTeacherResult:
    out: Path                        # the run directory
    checkpoint: Path                 # the trained teacher's weights, for precompute --checkpoint
    best_top1: float | None          # the best evaluated epoch's; None only where no epoch was evaluated
    history: list[EpochMetrics] = field(default_factory=list)


def teacher_run(out: Path) -> tuple[RunDir, Path]:
    """The run directory of train-teacher's ``--out`` and the file the trained teacher's weights are read from:
    ``out`` itself when it names a ``.pth`` file (the run directory beside it, named without ``.pth``), else the
    run directory's last.pth."""
    out = Path(out)
    if out.suffix == ".pth":
        return RunDir(out.with_suffix("")), out
    return RunDir(out), out / RunDir.LAST


def legacy_state(path: Path) -> dict[str, Any] | None:
    """The training state in ``path`` when an earlier kdcache's train-teacher wrote it (one file holding the
    optimiser, schedule and epoch beside the weights), else None. Its weights load as any checkpoint's; its
    training cannot be resumed."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and {"optimizer", "lr_scheduler", "epoch", "arch"} <= set(state):
        return state
    return None


def train_teacher(req: TrainTeacherRequest,
                  on_epoch: Callable[[EpochMetrics], None] | None = None) -> TrainTeacherResult:
    """Train ``req.arch`` on ``req.dataset`` into the run directory of ``req.out`` (checkpointed after every epoch);
    the trained weights end in :attr:`TrainTeacherResult.checkpoint`."""
    training.check_hyperparameters(req.epochs, req.batch_size, req.lr, req.weight_decay, req.momentum, req.seed)
    run, weights = teacher_run(req.out)
    _check_can_start(req, run, weights)
    model_info(req.arch)
    if req.tensorboard is not None:
        tblog.check_available()
    dataset = load_dataset(req.dataset, req.data_root, req.recipe, req.image_size)
    device = resolve_device(req.device)
    torch.manual_seed(req.seed)

    model = build_model(req.arch, dataset.num_classes)
    map_shape(model, dataset.image_size)  # a model that cannot take the views: one line, before any epoch
    model = model.to(device)
    optimizer, scheduler, _, _ = training.build_sgd(model.parameters(), req.arch, req.epochs, req.lr, req.momentum,
                                                    req.weight_decay, req.milestones)
    train = dataset.train
    if getattr(train, "resident", False):
        train = train.to(device)
    labels = torch.as_tensor(_relabel(train.labels, req.label_map)).to(device)
    n = len(train)
    if n < req.batch_size:
        raise KdcacheError(f"--batch-size {req.batch_size} exceeds the {n} training samples")
    sizes = train.sizes if get_recipe(dataset.recipe).needs_sizes else None

    # The data's content is what the teacher depends on, wherever --data-root finds it: compared on --resume too.
    args = {**training.recorded_args(req, req.arch), "data_fingerprint": dataset.fingerprint}
    config = {"kind": "teacher", "args": args, "how": how_args(req),
              "dataset": {"name": dataset.name, "num_classes": dataset.num_classes, "recipe": dataset.recipe},
              **versions()}
    loop = Loop(run, "teacher", config, Trainee(req.arch, model, optimizer, scheduler), req.epochs,
                about={"num_classes": dataset.num_classes, "dataset": dataset.name, "seed": req.seed},
                eval_every=req.eval_every)
    # Opened before the run directory is written, so a log directory that cannot be made leaves no run behind.
    board = tblog.TensorBoardLog(req.tensorboard) if req.tensorboard is not None else None
    if req.force:
        run.clear()
        weights.unlink(missing_ok=True)
    loop.begin(req.resume)

    def one_epoch(epoch: int) -> Trained:
        """Every full batch of a fresh draw of views, one SGD step of cross-entropy each."""
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
            loop.watch.observe(epoch, b, {"ce": loss})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)  # summed on the device: no host sync per step
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        return Trained({"loss": float(loss_sum) / seen, "accuracy": 100.0 * int(correct) / seen})

    loop.run(one_epoch, lambda: evaluate(model, dataset, dataset.recipe, device), on_epoch, board)
    loop.finish(also=weights if weights != run.file(run.LAST) else None)
    return TrainTeacherResult(run.path, weights, loop.best_top1, loop.history)


def _check_can_start(req: TrainTeacherRequest, run: RunDir, weights: Path) -> None:
    """Refuse, with one line, to replace a trained or started teacher without ``--force``, to resume none, or to
    resume a checkpoint of an earlier kdcache's one-file format."""
    if req.resume and req.force:
        raise KdcacheError("--resume continues the run in --out and --force replaces it: give one of them")
    if req.force:
        return
    if not req.resume:
        if weights.exists() or run.held():  # a finished or started run, or another run's files
            raise KdcacheError(f"{req.out} already exists; pass --resume to continue its training, --force to "
                               "replace it, or choose another --out")
        return
    if not run.started and weights.is_file():
        state = legacy_state(weights)
        if state is not None:
            raise CheckpointError(f"--resume: {weights} was written by an earlier kdcache (one file, epoch "
                                  f"{state['epoch']}), whose training cannot be continued; its weights load as they "
                                  "are (precompute --checkpoint), or train the teacher again with --force")
    run.check_can_start(resume=True)


def _relabel(labels: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """Labels with every class ``a`` in ``label_map`` replaced by ``label_map[a]`` (the test split stays true)."""
    if not label_map:
        return labels
    table = np.arange(int(labels.max()) + 1)
    for src, dst in label_map.items():
        table[src] = dst
    return cast(np.ndarray, table[labels])
