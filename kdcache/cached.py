"""Cached teachers for any training loop: K teacher stores, their plan and data set, as batches on a device.

:class:`CachedTeachers` opens the stores (ids or unique prefixes) and does every check
``kdcache distill`` does: complete stores, one plan, the data set the plan was drawn on
(by content fingerprint), class counts, one feature form. Per epoch it yields
:class:`CachedBatch` es: the student's augmented views replayed on the device
(bit-identical to what the teachers saw), the labels, each teacher's logits and
features as float32 on the device, and the sample ids. A top-K store's logits arrive as the
spread reconstruction of :class:`kdcache.topk.TopKLogits` (exact at the top K, the rest of the
mass shared equally), with its exact rows in ``teacher_topk``. Under torchrun each rank gets
its slice of every global batch, as distill's ranks do. ``kdcache distill`` trains
from this class; :meth:`CachedTeachers.as_dataset` serves users of DataLoader.

On a GPU nothing here makes the host wait for the device: each batch's arrays go through
:class:`kdcache.staging.Staging` (reused pinned buffers, copies on a side stream, the next
batch's copies started before the current batch is handed out), a resident data set sits on
the device where it fits (:func:`resident_source`) and is gathered there with sample ids
staged with the batch, and replay parameters are staged to the device for a recipe that
replays there, else kept on the host (``kdcache.views.replay.replays_on_device``).

    teachers = CachedTeachers(["3f2a", "9c1e"], batch_size=64, device="cuda")
    for epoch in range(1, 241):
        for b in teachers.epoch(epoch):
            loss = my_loss(student(b.views), b.labels, b.teacher_logits, b.teacher_features)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from kdcache import arguments
from kdcache.batches import view_batch
from kdcache.data import DataSet, load_dataset
from kdcache.data.base import ImageSource, TensorSource
from kdcache.device import resolve_device
from kdcache.distributed import split_batch
from kdcache.errors import ArgumentTypeError, KdcacheError, StoreError
from kdcache.resident import VIEW_SHARE, ResidentView, ResidentViews, views_fit
from kdcache.store import Cache, PlanStore, TeacherStore
from kdcache.store.form import FeatureForm
from kdcache.store.location import Where
from kdcache.staging import Staged, Staging, fits_on_device
from kdcache.stream import StreamBatch, TeacherStream, check_compatible
from kdcache.topk import TopKLogits
from kdcache.views import get_recipe
from kdcache.views.replay import replays_on_device


EPOCHS_FROM_1 = "epochs count from 1 (the first epoch is 1), with no upper bound"


@dataclass
class CachedBatch:
    """One training batch (this rank's slice of it under torchrun), everything on the device."""

    epoch: int
    step: int                             # 0-based within the epoch
    view: int                             # the stored view the epoch reads
    views: torch.Tensor                   # (B, 3, S, S) float32: the augmented, normalised images
    labels: torch.Tensor                  # (B,) int64
    teacher_logits: list[torch.Tensor]    # K x (B, C) float32 (empty with read_teachers=False); a top-K store's
    # is its spread reconstruction at the store's temperature (TopKLogits.dense)
    teacher_features: list[torch.Tensor]  # K x (B, D_k) pooled or (B, C'_k, H, W) spatial, float32; empty in form none
    indices: np.ndarray                   # (B,) sample ids in the training set
    # K entries when teachers are read: a top-K store's rows (exact CE, entropy, remaining mass), None for a
    # dense store's; empty with read_teachers=False
    teacher_topk: list[TopKLogits | None] = field(default_factory=list)


class CachedTeachers:
    """K teacher stores on one plan, with the data set they were computed on, as per-epoch batches.

    ``teachers``: store ids or unique prefixes (``kdcache cache ls``); ``cache``: a directory or URL
    (default $KDCACHE_HOME, else ~/.cache/kdcache); ``dataset``/``data_root``: where the training images
    lie (default: the data set the plan was drawn on; its content is checked by fingerprint);
    ``batch_size``: the global batch; ``seed``: which view each epoch reads and in which order
    (a pure function of seed and epoch, so a resumed loop sees the same batches); ``rank``/``world``:
    default from torch.distributed when initialised, else torchrun's environment, else a single process.
    ``read_teachers=False`` yields views and labels only (for live teachers, or a method without any).
    ``read_threads``: threads decoding the stores' chunks (default: the cores this process may use).
    ``resident_share``: when the views held at once (two, or one for a plan of one view) fit in this share of
    the device's free memory (on the CPU, of the memory available), each view is read whole onto the device,
    the next in the background while the current one trains, and batches are gathered there
    (:mod:`kdcache.resident`); else they are streamed block by block. 0 always streams. The batches are the
    same either way; ``resident_views`` says which it is.
    Every refusal is a KdcacheError with one line saying what to do.
    """

    def __init__(self, teachers: Sequence[str], cache: Where | None = None, *, dataset: str | None = None,
                 data_root: Path | None = None, batch_size: int = 64, seed: int = 0,
                 device: str | torch.device | None = None, prefetch: int = 2, rank: int | None = None,
                 world: int | None = None, read_teachers: bool = True, read_threads: int | None = None,
                 resident_share: float = VIEW_SHARE) -> None:
        # Each argument checked before any work: a str of ids, a float or bool count is one line, not a numpy error.
        teachers = arguments.ids("teachers", teachers)
        dataset = arguments.text("dataset", dataset, optional=True)
        data_root = arguments.path("data_root", data_root)
        batch_size = arguments.integer("batch_size", batch_size, low=1)
        seed = arguments.integer("seed", seed, low=0)
        prefetch = arguments.integer("prefetch", prefetch, low=1)
        read_threads = arguments.optional_integer("read_threads", read_threads, low=1)
        resident_share = arguments.fraction("resident_share", resident_share)
        read_teachers = arguments.flag("read_teachers", read_teachers)
        world = arguments.optional_integer("world", world, low=1)
        rank = arguments.optional_integer("rank", rank, low=0)
        self.cache = Cache.at(cache)
        self.stores = [self.cache.open_for_reading(t) for t in teachers]  # checked, and locked against removal
        self.plan = open_plan(self.cache, self.stores)
        self.feature_form = feature_form(self.stores)
        logits_temperature(self.stores)
        self.dataset = dataset_of(self.plan, dataset, data_root)
        teacher_classes_fit(self.stores, self.dataset)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.rank, self.world = _place(rank, world)
        split_batch(batch_size, self.world)  # an uneven split is refused before any work
        if self.plan.n_samples < batch_size:
            raise KdcacheError(f"--batch-size {batch_size} exceeds the {self.plan.n_samples} training samples")
        self.batch_size = batch_size
        self._source = resident_source(self.dataset.train, self.device)
        # Whole views on the device where two fit in resident_share of its free memory (after the data set
        # took its place there); else the stream reads them block by block while the epoch trains.
        self.resident_views = read_teachers and views_fit(self.stores, self.plan.n_views, self.device, resident_share)
        self._views = ResidentViews(self.stores, self.device, read_threads) if self.resident_views else None
        # No pinning per batch: epoch() stages the arrays through reused (pinned, on CUDA) buffers.
        self.stream = TeacherStream(self.plan, self.stores, seed, prefetch,
                                    read_teachers=read_teachers and not self.resident_views, pin_memory=False,
                                    rank=self.rank, world=self.world, read_threads=read_threads)
        # Sample ids go to the device with the batch when its images are gathered there; replay parameters
        # when the recipe's replay reads them there (else they stay host ints: no device-to-host copy).
        self._ids_on_device = _images_on(self._source, self.device)
        self._params_on_device = replays_on_device(self.plan.recipe)

    # -- what the stores hold ----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def n_views(self) -> int:
        """Views stored per teacher; epoch e reads view σ(e mod V) of a per-seed permutation."""
        return self.plan.n_views

    @property
    def view_size(self) -> int:
        """The side of the square views."""
        return get_recipe(self.plan.recipe).size

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the incomplete last batch is dropped)."""
        return self.stream.schedule.steps(self.batch_size)

    def heads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each teacher's final linear layer: weight (C, D) and bias (C,), float32 on the device."""
        return [(w.to(self.device), b.to(self.device)) for w, b in (s.head() for s in self.stores)]

    @property
    def logits_temperature(self) -> float | None:
        """The temperature the top-K stores serve (their remaining mass is known at this T only); None when
        every store is dense."""
        return logits_temperature(self.stores)

    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Each teacher's per-row feature shape: (D,) pooled, (C', H, W) spatial, () none."""
        return [s.feature_shape for s in self.stores]

    # -- batches -----------------------------------------------------------------------------

    def epoch(self, epoch: int) -> Iterator[CachedBatch]:
        """The batches of ``epoch`` (1-based), read ahead on background threads; stops early without harm.

        Any integer epoch from 1 up is valid, with no upper bound: epoch e reads view σ(e mod V) of the
        plan's V views, so after V epochs the views come round again, in another order of batches. An epoch
        that is not an integer of at least 1 is refused here, at the call, not at the first batch.

        Each batch's arrays are staged (:class:`kdcache.staging.Staging`): copied into reused host
        buffers, pinned on CUDA, and on to the device on a side stream. Batch i+1's copies are started
        before batch i is handed out, so they run while the consumer's step on batch i does. Every tensor
        of a batch is the batch's own (never a staging buffer): a consumer may keep batches.
        """
        return self._epoch(arguments.integer("epoch", epoch, low=1, why=EPOCHS_FROM_1))

    def _epoch(self, epoch: int) -> Iterator[CachedBatch]:
        """The batches of the checked ``epoch``."""
        view = self.stream.schedule.view(epoch)
        held = None
        if self._views is not None:
            coming = self.stream.schedule.view(epoch + 1)
            held = self._views.get(view, coming if coming != view else None)
            if self.device.type == "cuda":  # gathered on the consumer's stream: freed only once its work is done
                consumer = torch.cuda.current_stream(self.device)
                for t in held.logits + held.features:
                    t.record_stream(consumer)
        staging = Staging(self.device)
        ahead: tuple[int, StreamBatch, Staged] | None = None
        for step, batch in enumerate(self.stream.epoch(epoch, self.batch_size)):
            staged = (step, batch, staging.put(self._arrays(batch, held is not None)))
            if ahead is not None:
                yield self._on_device(epoch, view, *ahead, held)
            ahead = staged
        if ahead is not None:
            yield self._on_device(epoch, view, *ahead, held)

    def _arrays(self, batch: StreamBatch, resident: bool = False) -> dict[str, np.ndarray]:
        """What of ``batch`` goes to the device, by name (the staging keys): with the view ``resident`` there,
        the rows to gather instead of the teachers' arrays."""
        arrays = {"labels": batch.labels}
        if resident:
            arrays["rows"] = batch.rows.astype(np.int64)
        if self._ids_on_device:
            arrays["indices"] = batch.indices
        if self._params_on_device:
            arrays["params"] = batch.params
        arrays.update((f"logits{k}", z.numpy()) for k, z in enumerate(batch.teacher_logits))
        arrays.update((f"features{k}", h.numpy()) for k, h in enumerate(batch.teacher_features))
        return arrays

    def _on_device(self, epoch: int, view: int, step: int, batch: StreamBatch, staged: Staged,
                   held: ResidentView | None = None) -> CachedBatch:
        """The batch made on the device, on the current stream, from its staged arrays (and its rows of the
        view ``held`` there, when resident)."""
        t = staged.ready()
        views = view_batch(self.dataset, self._source, self.plan.recipe, t.get("indices", batch.indices),
                           t.get("params", batch.params), self.device)
        if held is not None:
            logits = [z[t["rows"]] for z in held.logits]
            features = [h[t["rows"]] for h in held.features]
        else:
            logits = [t[f"logits{k}"] for k in range(len(batch.teacher_logits))]
            features = [t[f"features{k}"] for k in range(len(batch.teacher_features))]
        topk = [None if s.form.temperature is None else TopKLogits.unpack(z, s.num_classes, s.form.temperature)
                for s, z in zip(self.stores, logits)]
        return CachedBatch(epoch, step, view, views, t["labels"],
                           [z.float() if k is None else k.dense() for k, z in zip(topk, logits)],
                           [h.float() for h in features], batch.indices, topk)

    def as_dataset(self, epochs: int, start: int = 1) -> "CachedTeacherDataset":
        """An IterableDataset of every batch of epochs ``start`` .. ``epochs`` (both counted from 1, ``start`` at
        most ``epochs``), for ``DataLoader(..., batch_size=None)`` (the batches are already made and on the
        device)."""
        return CachedTeacherDataset(self, epochs, start)


class CachedTeacherDataset(torch.utils.data.IterableDataset[CachedBatch]):
    """The batches of :class:`CachedTeachers` over a range of epochs, as a DataLoader source.

    Use ``num_workers=0``: the batches are made on the device, with reading already on background threads.
    """

    def __init__(self, teachers: CachedTeachers, epochs: int, start: int = 1) -> None:
        super().__init__()
        if not isinstance(teachers, CachedTeachers):
            raise ArgumentTypeError(f"teachers must be a kdcache.CachedTeachers (got a {type(teachers).__name__})")
        epochs = arguments.integer("epochs", epochs, low=1, why="the last epoch served; " + EPOCHS_FROM_1)
        start = arguments.integer("start", start, low=1, high=epochs,
                                  why=f"the first epoch served, counted from 1, up to epochs={epochs}")
        self.teachers, self.epochs, self.start = teachers, epochs, start

    def __iter__(self) -> Iterator[CachedBatch]:
        for epoch in range(self.start, self.epochs + 1):
            yield from self.teachers.epoch(epoch)

    def __len__(self) -> int:
        return (self.epochs - self.start + 1) * self.teachers.steps_per_epoch


# -- the checks distill and CachedTeachers share ------------------------------------------------


def open_plan(cache: Cache, stores: list[TeacherStore]) -> PlanStore:
    """The one plan all teachers were computed on (it fixes the views, even for ``ce``); teachers on
    different plans are refused with what differs between the plans."""
    if not stores:
        raise KdcacheError("no teacher stores given: pass --teachers ID (from `kdcache cache ls`); "
                           "their plan fixes the views, even for ce")
    plans = {}
    for plan_id in dict.fromkeys(s.plan_id for s in stores):
        with contextlib.suppress(StoreError):  # a missing plan is refused below, for the first store's
            plans[plan_id] = PlanStore.open(cache.plan_path(plan_id), plan_id)
    plan = plans.get(stores[0].plan_id) or PlanStore.open(cache.plan_path(stores[0].plan_id), stores[0].plan_id)
    check_compatible(plan, stores, plans)
    return plan


def dataset_of(plan: PlanStore, name: str | None = None, data_root: Path | None = None) -> DataSet:
    """The data set the plan was drawn on (or ``name``), refused unless its content fingerprint matches."""
    recorded = plan.attrs["dataset"]
    dataset = load_dataset(name or recorded["name"], data_root)
    if dataset.fingerprint != recorded["fingerprint"]:
        raise KdcacheError(f"the stores were computed on a different copy of {recorded['name']} "
                           f"({recorded['n_samples']} samples) than the one under --data-root; "
                           "point --data-root at the data precompute used")
    return dataset


def feature_form(stores: list[TeacherStore]) -> FeatureForm:
    """The feature form every store shares (pooled, spatial or none); refused when they differ."""
    forms = {s.form.features for s in stores}
    if len(forms) > 1:
        listing = ", ".join(f"{s.id} {s.form.features.value}" for s in stores)
        raise StoreError(f"the teachers were precomputed in different feature forms ({listing}); "
                         "precompute them with the same --features")
    return forms.pop()


def logits_temperature(stores: list[TeacherStore]) -> float | None:
    """The one temperature of the top-K stores among ``stores`` (None when all are dense); top-K stores of
    different temperatures are refused, since a run distils at one T."""
    temps = {s.form.temperature for s in stores if s.form.topk is not None}
    if len(temps) > 1:
        listing = ", ".join(f"{s.id} T={s.form.temperature:g}" for s in stores if s.form.topk is not None)
        raise StoreError(f"the top-K teacher stores were precomputed at different temperatures ({listing}); "
                         "precompute them with the same --logits-temperature")
    return temps.pop() if temps else None


def teacher_classes_fit(stores: list[TeacherStore], dataset: DataSet) -> None:
    """Refuse a store whose teacher has another number of classes than the data set."""
    for s in stores:
        if s.num_classes != dataset.num_classes:
            raise StoreError(f"teacher store {s.id} has {s.num_classes} classes but {dataset.name} has "
                             f"{dataset.num_classes}")


def resident_source(train: ImageSource, device: torch.device) -> ImageSource:
    """The training images as distill reads them: a resident set (its images one tensor) moved to ``device``
    where it fits there (:func:`kdcache.staging.fits_on_device`: at most half the free device memory), else
    where they are."""
    if train.resident:
        images = getattr(train, "images", None)
        nbytes = images.numel() * images.element_size() if isinstance(images, torch.Tensor) else 0
        if fits_on_device(nbytes, device):
            return train.to(device)
    return train


def _images_on(source: ImageSource, device: torch.device) -> bool:
    """Whether ``source`` gathers a batch's images on ``device`` (a resident set there)."""
    if not isinstance(source, TensorSource):
        return False
    where = source.images.device  # "cuda" names the current CUDA device, "cuda:0" one by number
    return where.type == device.type and (where.index is None or device.index is None or where.index == device.index)


def _place(rank: int | None, world: int | None) -> tuple[int, int]:
    """(rank, world): as given, else torch.distributed's when initialised, else torchrun's environment."""
    if rank is not None and world is not None:
        if not 0 <= rank < world:
            raise KdcacheError(f"rank {rank} outside a world of {world}")
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
