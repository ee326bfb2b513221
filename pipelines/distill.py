"""The distill stage: train a student from K cached teachers (or, with ``online``, from the live teachers).

Read top to bottom: open the stores and their plan, load the data set they were
computed on, build the student and the method, restore a checkpoint if resuming,
then train epoch by epoch: stream batches (teacher rows read ahead on background
threads), replay the same views for the student, compute the method's loss, step;
evaluate, log and checkpoint after every epoch (the epochs, the run directory and
``--resume`` are :class:`kdcache.loop.Loop`'s, which train-teacher shares). The cached
path never builds a teacher network: model construction is forbidden once the student
exists.

Under torchrun the same function runs on every rank as data-parallel training
(``kdcache.distributed``): the global batch is ``--batch-size``, as for a single
process; rank r trains on the contiguous slice ``[r·B/N, (r+1)·B/N)`` of every global
batch, reading only those rows of the stores, and DistributedDataParallel averages
the gradients, so each step follows the mean loss over the global batch wherever a
method's loss is a mean over samples. Batch-norm layers (the student's, the
aligners') normalise each slice with its own statistics; DDP hands rank 0's running
statistics to all ranks before every forward pass. Rank 0 alone checks and writes
the run directory, evaluates and reports; logged loss terms and teacher weights are
means over the ranks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import numpy as np
import torch

from kdcache import distributed, tblog, training
from kdcache.defaults import VIEW_SHARE
from kdcache.data import DataSet
from kdcache.device import resolve_device
from kdcache.distributed import DistContext
from kdcache.errors import CheckpointError, KdcacheError, StoreError
from kdcache.evaluate import evaluate
from kdcache.losses import (Batch, LossTerms, Method, MethodInfo, MethodOptions, build_method, method_info,
                            resolve_options)
from kdcache.models import (build_model, feature_dim, forbid_construction, forward_with_map, load_checkpoint,
                            map_shape, model_info)
from kdcache.cached import CachedBatch, CachedTeachers
from kdcache.loop import EpochMetrics, Loop, Trained, Trainee, versions
from kdcache.request import how, how_args, jsonable
from kdcache.runs import RunDir
from kdcache.store import PlanStore, TeacherStore, sha256_file
from kdcache.store.form import FeatureForm, Forward
from kdcache.topk import TopKLogits


@dataclass
class DistillRequest:
    """Everything ``kdcache distill`` takes; None means the official default. Fields declared with
    :func:`~kdcache.request.how` say how the run goes (where, on what, with how many threads: the batches are
    the same bit for bit either way); every other one is what the run computes from (recorded in config.json,
    compared on ``--resume`` and by a grid's :func:`~kdcache.pipelines.grid.check_same_grid`, through
    :func:`run_args`)."""

    student: str
    teachers: list[str]
    method: str
    out: Path = how()
    cache: Path | None = how(None)
    dataset: str | None = None        # default: the data set the plan was drawn on
    data_root: Path | None = how(None)
    epochs: int = training.EPOCHS     # may grow on --resume
    batch_size: int = training.BATCH_SIZE
    lr: float | None = None
    momentum: float = training.MOMENTUM
    weight_decay: float = training.WEIGHT_DECAY
    milestones: list[int] | None = None
    seed: int = 0
    device: str | None = how(None)
    resume: bool = how(False)
    force: bool = how(False)          # replace the run in ``out`` (without it, an existing run is refused)
    online: bool = False
    amp: bool = False
    prefetch: int = how(2)
    read_threads: int | None = how(None)  # threads decoding the stores' chunks (default: the cores available)
    resident_share: float = how(VIEW_SHARE)  # views whole on the device when they fit in this share of it (0: stream)
    options: MethodOptions = field(default_factory=MethodOptions)
    eval_every: int = how(1)  # evaluate the test split after every N-th epoch and the last (the weights do not change)
    tensorboard: Path | None = how(None)  # also write the per-epoch scalars there (the tensorboard extra)


@dataclass
class StepRecord:
    """One training step, for callers that watch every batch (tests, benchmarks)."""

    epoch: int
    step: int
    indices: torch.Tensor
    terms: dict[str, float]
    total: float


@dataclass
class DistillResult:
    out: Path
    best_top1: float | None                  # the best evaluated epoch's; None only where no epoch was evaluated
    history: list[EpochMetrics]
    student: torch.nn.Module | None = None   # the trained student (this rank's copy)
    is_main: bool = True                     # False on the ranks of a torchrun job other than rank 0


class StudentLoss(torch.nn.Module):
    """The student and the method as one module: one forward pass gives the loss of a batch.

    One module so that DistributedDataParallel averages the gradients of both the
    student and the method's trainable parts (the aligners of fitnet, fitnet-mkd, camkd).
    """

    def __init__(self, student: torch.nn.Module, method: Method, spatial: bool = False) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.spatial = spatial

    def forward(self, x: torch.Tensor, labels: torch.Tensor, teacher_logits: list[torch.Tensor],
                teacher_features: list[torch.Tensor], epoch: int,
                teacher_topk: list[TopKLogits | None] | None = None) -> LossTerms:
        """The method's loss terms for the student's outputs on ``x`` (its last-block map as the feature when the
        teachers' stores are spatial, else its pooled vector)."""
        m, g, s = forward_with_map(self.student, x, as_student=True)
        return self.method(Batch(s.float(), (m if self.spatial else g).float(), labels, teacher_logits,
                                 teacher_features, epoch, teacher_topk or None))


def distill(req: DistillRequest, on_epoch: Callable[[EpochMetrics], None] | None = None,
            on_step: Callable[[StepRecord], None] | None = None,
            on_start: Callable[[DistContext], None] | None = None) -> DistillResult:
    """Train ``req.student`` with ``req.method`` from the teacher stores; write the run directory ``req.out``.

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: ``req.batch_size`` stays
    the global batch, each rank trains on its equal slice of it (reading only its rows
    of the stores), DDP averages the gradients, and rank 0 alone checks and writes the
    run directory and evaluates. ``on_start`` (with the rank's context) and
    ``on_epoch`` (metrics averaged over the ranks) are called on rank 0 only;
    ``on_step`` on every rank, with that rank's slice and its own loss terms.
    """
    training.check_hyperparameters(req.epochs, req.batch_size, req.lr, req.weight_decay, req.momentum, req.seed)
    model_info(req.student)
    info = method_info(req.method)
    # Every option of the method, defaults filled in, is what the run records (and --resume compares).
    req = replace(req, options=resolve_options(req.method, req.options))
    if req.tensorboard is not None:
        tblog.check_available()
    with distributed.process_group(resolve_device(req.device)) as ctx, contextlib.ExitStack() as held:
        distributed.split_batch(req.batch_size, ctx.world, minimum=2)
        teachers = CachedTeachers(req.teachers, req.cache, dataset=req.dataset, data_root=req.data_root,
                                  batch_size=req.batch_size, seed=req.seed, device=ctx.device, prefetch=req.prefetch,
                                  rank=ctx.rank, world=ctx.world,
                                  read_teachers=info.n_teachers != "0" and not req.online,
                                  read_threads=req.read_threads, resident_share=req.resident_share)
        for store in teachers.stores:  # their reader locks (no `cache rm` while the run reads them), let go at its end
            held.callback(store.close)
        if info.uses_features and teachers.feature_form is FeatureForm.NONE:
            raise StoreError(f"{info.name} needs the teachers' features but store {teachers.stores[0].id} holds "
                             "logits only (precomputed with --features none); precompute with --features pooled "
                             "or spatial")
        if info.n_teachers != "0":
            check_compact_stores(teachers.stores, info, req.options.temperature, req.online)
        if on_start and ctx.is_main:
            on_start(ctx)
        return _train(req, info, teachers, ctx, on_epoch, on_step)


def check_compact_stores(stores: list[TeacherStore], info: MethodInfo, temperature: float, online: bool) -> None:
    """Refuse, in one line, a top-K or int8 store where it cannot serve: a top-K store at another temperature
    than the run's (its remaining mass is known at its own T only), under ``--online`` (the live teachers give
    every logit, so the run would not be the store's), or under a method that declares it needs every logit
    (``MethodInfo.dense_logits``); an int8 store under a method that needs float16 features
    (``MethodInfo.float_features``)."""
    for s in stores:
        form = s.form
        if form.topk is not None:
            if online:
                raise StoreError(f"--online runs the teachers live, but store {s.id} keeps top-{form.topk} logits: "
                                 "give --online a dense store (precomputed with --logits dense), or drop --online")
            if info.dense_logits:
                raise StoreError(f"{info.name} needs every class's logit, but store {s.id} keeps the top "
                                 f"{form.topk} only: precompute the teacher with --logits dense")
            if not math.isclose(float(form.temperature or 0.0), float(temperature), rel_tol=1e-9):
                raise StoreError(f"store {s.id} keeps top-{form.topk} logits at T={form.temperature:g}, which serve "
                                 f"that temperature only: distil with --temperature {form.temperature:g}, or "
                                 f"precompute the teacher with --logits-temperature {temperature:g}")
        if form.int8 and info.float_features and info.uses_features:
            raise StoreError(f"{info.name} needs float16 features, but store {s.id} keeps them as int8: precompute "
                             "the teacher with --feature-dtype float16")


def _train(req: DistillRequest, info: MethodInfo, teachers: CachedTeachers, ctx: DistContext,
           on_epoch: Callable[[EpochMetrics], None] | None,
           on_step: Callable[[StepRecord], None] | None) -> DistillResult:
    """Build the student and the method, restore or start the run directory, then train epoch by epoch."""
    device = ctx.device
    stores, plan, dataset = teachers.stores, teachers.plan, teachers.dataset
    run = RunDir(req.out)
    ctx.on_main(lambda: run.check_can_start(req.resume, req.force))
    # Opened before the run directory is written, so a log directory that cannot be made leaves no run behind.
    board = tblog.TensorBoardLog(req.tensorboard) if req.tensorboard is not None and ctx.is_main else None

    torch.manual_seed(req.seed)
    student = build_model(req.student, dataset.num_classes)
    student_map = map_shape(student, teachers.view_size, as_student=True)  # a student that cannot take the views fails here
    student = student.to(device)
    spatial = teachers.feature_form is FeatureForm.SPATIAL
    # The method's aligners draw their initial weights from a fork of the generator, so every method at one seed
    # leaves it where the student alone did: runs of different methods stay paired (docs/EVIDENCE.md).
    with torch.random.fork_rng(devices=[]):
        method = build_method(req.method, num_classes=dataset.num_classes,
                              student_dim=student_map if spatial else feature_dim(student),
                              teacher_dims=[s.feature_shape if spatial else s.feature_dim for s in stores],
                              teacher_heads=[s.head() for s in stores] if info.uses_heads else None,
                              options=req.options).to(device)
    optimizer, scheduler, _, _ = training.build_sgd(
        [*student.parameters(), *method.parameters()], req.student, req.epochs, req.lr, req.momentum,
        req.weight_decay, req.milestones)
    loop = Loop(run, "distill", _config(req, stores, plan, dataset),
                Trainee(req.student, student, optimizer, scheduler, {"method": method}), req.epochs,
                about={"num_classes": dataset.num_classes, "dataset": dataset.name, "seed": req.seed}, ctx=ctx,
                eval_every=req.eval_every)
    loop.begin(req.resume, req.force)
    # The method's parameters (aligners) go unused where its feature term is off (camkd's first epoch, beta 0).
    model = ctx.wrap(StudentLoss(student, method, spatial),
                     find_unused_parameters=any(p.requires_grad for p in method.parameters()))
    step = _Stepper(model, optimizer, torch.amp.GradScaler(device.type, enabled=req.amp and device.type == "cuda"),
                    loop.watch, req.amp, spatial)

    def one_epoch(epoch: int, live: list[torch.nn.Module] | None) -> Trained:
        """Every batch of the epoch's stored view, one step each; the terms and weights averaged over the ranks."""
        sums = train_epoch(step, teachers, epoch, live, on_step)
        if sums.steps == 0:
            raise KdcacheError(f"--batch-size {req.batch_size} exceeds the {plan.n_samples} training samples")
        sums = sums.over_ranks(ctx)

        def save_sample_weights(run: RunDir) -> None:
            indices, weights = sums.sample_weights()
            run.save_sample_weights(epoch, indices, plan.labels[indices], weights)

        return Trained(sums.mean_terms(), teachers.stream.schedule.view(epoch), sums.mean_weights(),
                       save_sample_weights if sums.per_sample else None)

    with _teacher_guard(req.online and info.n_teachers != "0", stores, device) as live_teachers:
        # Rank 0's batch-norm running statistics are the ones DDP hands to every rank, so it evaluates.
        loop.run(lambda epoch: one_epoch(epoch, live_teachers), lambda: evaluate(student, dataset, plan.recipe, device),
                 on_epoch, board)
    loop.finish()
    return DistillResult(run.path, loop.best_top1, loop.history, student, ctx.is_main)


@dataclass
class _Stepper:
    """One optimisation step of the student and the method's trainable parts on a batch.

    No host sync: the loss terms stay on the device (the watch records them there). Two exceptions outside
    this code: a method that solves on the host (aekd's teacher weights), and, with --amp on CUDA, the
    GradScaler's inf check, which torch reads on the host before each optimizer step.
    """

    model: torch.nn.Module               # StudentLoss, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    watch: training.NonFiniteWatch
    amp: bool
    spatial: bool

    def __call__(self, batch: CachedBatch, epoch: int, live: list[torch.nn.Module] | None) -> LossTerms:
        t_logits, t_feats = _teacher_outputs(batch, live, self.spatial)
        device = batch.views.device
        with torch.autocast(device.type, dtype=_amp_dtype(device), enabled=self.amp):
            loss: LossTerms = self.model(batch.views, batch.labels, t_logits, t_feats, epoch,
                              batch.teacher_topk if live is None else None)
        self.watch.observe(epoch, batch.step, {**loss.terms, "total": loss.total})
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss


@dataclass
class EpochSums:
    """An epoch's loss terms and teacher weights summed over its steps (on the device: no host sync per step),
    and the per-sample weights of each step."""

    steps: int = 0
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    per_sample: list[tuple[np.ndarray, torch.Tensor]] = field(default_factory=list)

    def add(self, loss: LossTerms, indices: np.ndarray) -> None:
        self.steps += 1
        for name, value in {**loss.terms, "total": loss.total}.items():
            self.terms[name] = self.terms[name] + value.detach() if name in self.terms else value.detach()
        if loss.teacher_weights is not None:
            self.weights = loss.teacher_weights if self.weights is None else self.weights + loss.teacher_weights
        if loss.sample_weights is not None:
            self.per_sample.append((indices, loss.sample_weights))

    def over_ranks(self, ctx: DistContext) -> "EpochSums":
        """Under torchrun: the terms and weights averaged over the ranks (each runs the same number of steps),
        the per-sample weights of every rank, step by step in rank order (the global batches' order)."""
        if not ctx.distributed:
            return self
        names = sorted(self.terms)
        mean = ctx.all_reduce_mean(torch.stack([self.terms[n].float() for n in names]))
        per_sample = self.per_sample
        if per_sample:
            ranks = ctx.all_gather([(i, w.cpu()) for i, w in per_sample])
            per_sample = [part for step in zip(*ranks) for part in step]
        return EpochSums(self.steps, dict(zip(names, mean)),
                         None if self.weights is None else ctx.all_reduce_mean(self.weights), per_sample)

    def mean_terms(self) -> dict[str, float]:
        return {k: float(v) / self.steps for k, v in self.terms.items()}

    def mean_weights(self) -> list[float] | None:
        return None if self.weights is None else [float(w) / self.steps for w in self.weights]

    def sample_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The sample ids and their ``(n, K)`` KD weights, over the epoch."""
        indices = np.concatenate([i for i, _ in self.per_sample])
        return indices, torch.cat([w for _, w in self.per_sample]).float().cpu().numpy()


def train_epoch(step: _Stepper, teachers: CachedTeachers, epoch: int, live: list[torch.nn.Module] | None,
                on_step: Callable[[StepRecord], None] | None = None) -> EpochSums:
    """One epoch: every batch of the epoch's stored view, one step each; the summed terms.

    Nothing is read back from the device per step (the terms are summed there; the NaN watch reads its
    flag every CHECK_EVERY steps), except for ``on_step``: its record holds the step's terms as floats,
    one host sync per step, taken only when a callback is given.
    """
    step.model.train()
    sums = EpochSums()
    for batch in teachers.epoch(epoch):
        loss = step(batch, epoch, live)
        sums.add(loss, batch.indices)
        if on_step:
            on_step(StepRecord(epoch, batch.step, torch.as_tensor(batch.indices),
                               {k: float(v.detach()) for k, v in loss.terms.items()}, float(loss.total.detach())))
    return sums


# -- opening --------------------------------------------------------------------------------


@contextlib.contextmanager
def _teacher_guard(online: bool, stores: list[TeacherStore],
                   device: torch.device) -> Iterator[list[torch.nn.Module] | None]:
    """Cached: forbid building any network for the run. Online: build the recorded teachers (sha256 checked)."""
    if not online:
        with forbid_construction("the cached distill path runs no teacher network"):
            yield None
        return
    teachers = []
    for s in stores:
        ckpt = Path(s.attrs["checkpoint"]["path"])
        if not ckpt.is_file():
            raise CheckpointError(f"--online needs teacher {s.id}'s checkpoint {ckpt}, which no longer exists")
        if sha256_file(ckpt) != s.attrs["checkpoint"]["sha256"]:
            raise CheckpointError(f"--online: checkpoint {ckpt} changed since teacher store {s.id} was written "
                                  "(sha256 differs)")
        model = build_model(s.attrs["arch"], s.num_classes)
        load_checkpoint(model, ckpt)
        teachers.append(model.eval().to(device))
    yield teachers


def _teacher_outputs(batch: CachedBatch, live: list[torch.nn.Module] | None,
                     spatial: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The K teachers' logits and features (last-block maps when ``spatial``) for this batch, float32 on the
    device: as stored, or computed now by the live teachers (``--online``) on the same views."""
    if live is None:  # cached (or a method that uses no teacher: the lists are empty)
        return batch.teacher_logits, batch.teacher_features
    logits, feats = [], []
    with torch.no_grad():
        for t in live:
            m, h, z = forward_with_map(t, batch.views)
            logits.append(z.float())
            feats.append((m if spatial else h).float())
    return logits, feats


def _amp_dtype(device: torch.device) -> torch.dtype:
    """The student's autocast dtype under --amp: the device's own, by the rule a teacher store's --amp follows."""
    dtype: torch.dtype = getattr(torch, cast(str, Forward.AMP.on(device.type).autocast_dtype))
    return dtype


# -- the run directory ----------------------------------------------------------------------


def run_args(req: DistillRequest, teachers: list[str] | None = None, dataset: str | None = None) -> dict[str, Any]:
    """What a distill run of ``req`` records and compares (config.json's "args"): its result arguments
    (:func:`kdcache.training.recorded_args`), the method's options with every default filled in, the teachers'
    full ids and the data set's name (default: as ``req`` gives them). The run itself, ``--resume`` and a
    grid's :func:`~kdcache.pipelines.grid.check_same_grid` all take them from here."""
    args = training.recorded_args(req, req.student)
    args.update(options=jsonable(resolve_options(req.method, req.options)),
                teachers=list(teachers if teachers is not None else req.teachers),
                dataset=dataset if dataset is not None else req.dataset)
    return args


def _config(req: DistillRequest, stores: list[TeacherStore], plan: PlanStore, dataset: DataSet) -> dict[str, Any]:
    return {"kind": "distill", "args": run_args(req, [s.id for s in stores], dataset.name), "how": how_args(req),
            "plan_id": plan.id,
            "teachers": [{"id": s.id, "arch": s.attrs["arch"], "test_accuracy": s.attrs.get("test_accuracy")}
                         for s in stores],
            **versions()}
