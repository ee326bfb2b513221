"""The CA-MKD paper's settings as recipes: one call per setting, from raw data to the paper's table.

A recipe names a data set, K teacher architectures, a student and the rows of its
table. A row (:class:`Variant`) is a method with its options and the teachers it
reads: ``camkd`` as the paper runs it, ``camkd-uniform`` (the Table 4 ablation with
``w = v = 1/K``), ``kd`` on teacher 1 only (Table 2), ``aver-k2`` (Figure 4, the
first two teachers), or a method kdcache does not implement (AT, VID, CRD), which
is shown with the paper's figure and never run. :func:`run_recipe` does:

1. each teacher is trained with :func:`~kdcache.pipelines.train_teacher.train_teacher`
   unless its checkpoint exists: ``<teachers_dir>/<arch>-<i>.pth`` for CIFAR-100
   (``i`` counts the teachers of one architecture, so three resnet32x4 teachers are
   ``resnet32x4-0/1/2.pth``, trained with seeds 0, 1, 2), ``<teachers_dir>/<data>/<arch>-<i>.pth``
   for the other data sets; a pretrained checkpoint put there is used as it is. Recipes
   that share a ``--teachers-dir`` and a ``--cache`` share their teachers and stores
   (Tables 1, 2 and 4 and Figure 4 all train ``<arch>-0/1/2``);
2. each teacher is precomputed on one plan, in the recipe's feature form (``spatial``,
   the last-block map the official code matches and the paper's β = 50 was set for;
   ``pooled`` to save disk);
3. every row is distilled for every seed into ``<out>/<label>/seed<k>/``; a run whose
   ``last.pth`` exists is skipped and a killed one resumes, so running the recipe
   again finishes the grid;
4. the table goes to ``<out>/table.md``: each reproduced figure (mean ± std over the
   seeds) beside the paper's, "n/a" where the paper gives none.

``dry_run`` computes, without writing anything, the disk each store takes in both the
pooled and the spatial form and the teacher forward passes the stores save against
online distillation (:func:`plan_recipe`).

Sources: every setting and every figure comes from the paper (Zhang, Chen, Wang,
"Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022, arXiv
2201.00007) as transcribed in the planning repository's ``shared/PAPER.md``:

- Table 1, three teachers of one architecture, seven columns: ``t1-*``;
- Table 2, single-teacher KD and FitNet (AT, VID, CRD listed, not implemented) beside
  CA-MKD with three teachers: ``t2-*``;
- Table 3, resnet8x4 + resnet20x4 + resnet32x4 → vgg8: ``t3-*`` (the paper's Figure 3,
  CA-MKD's per-sample weights, is ``kdcache report`` on its ``camkd`` runs);
- Table 4, the CA-MKD ablation on vgg13 ×3 → MobileNetV2: ``t4-*``;
- Figure 4, one to four teachers, resnet56 → MobileNetV2 (the paper's example; curves
  only, so no paper figures): ``f4-*``;
- the appendix, Tiny-ImageNet (the CIFAR set-up) and Stanford Dogs (CS-KD's set-up),
  multi-teacher and single-teacher rows together: ``app-*``.

Training set-up: the paper's text states lr 0.1 (0.05 for MobileNetV2 / ShuffleV1 /
ShuffleV2) and weight decay 1e-4; the official scripts (Rorozhl/CA-MKD) use 0.05 / 0.01
and 5e-4, and kdcache defaults to the scripts. Every recipe runs the ``official`` set-up
unless told ``setup="paper"`` (Stanford Dogs runs ``cs-kd``); each table's header says
which one ran (:data:`SETUPS`).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from kdcache import training
from kdcache.batches import test_batches
from kdcache.data import dataset_names, load_dataset
from kdcache.device import resolve_device
from kdcache.errors import CheckpointError, DatasetError, KdcacheError, UnknownNameError
from kdcache.losses import method_info
from kdcache.losses.base import MethodOptions
from kdcache.models import build_model, feature_dim, load_checkpoint, map_shape, model_info
from kdcache.models.checkpoint import read_checkpoint
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher
from kdcache.runs import load_run
from kdcache.store import Cache
from kdcache.store.format import FEATURE_FORMS, STORED_DTYPE, feature_shape, row_bytes
from kdcache.text import human_bytes
from kdcache.views import get_recipe as get_view_recipe

# Stored bytes / compressed bytes of teacher logits + features in each form (benchmarks/RESULTS.md, "Bytes on
# disk per stored row" and "Feature forms"): measured on one digits teacher each, so an estimate here.
COMPRESSION_RATIO = {"pooled": 1.27, "spatial": 1.86, "none": 1.27}

_ITEMSIZE = {"float16": 2, "float32": 4}[STORED_DTYPE]

Say = Callable[[str], None]


# -- data sets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSize:
    """What a dry run needs of a data set it cannot read: training images, classes, view side and recipe."""

    n_train: int
    num_classes: int
    image_size: int
    view_recipe: str


# Published sizes of the data the recipes use, keyed by the recipe's data label, for a dry run without the data.
KNOWN_SIZES: dict[str, DataSize] = {
    "cifar100": DataSize(50000, 100, 32, "crop-flip"),
    "cifar10": DataSize(50000, 10, 32, "crop-flip"),
    "tiny-imagenet": DataSize(100000, 200, 64, "crop-flip"),        # 200 classes × 500 train images, 64 px
    "stanford-dogs": DataSize(12000, 120, 224, "resized-crop-flip"),  # 120 breeds × 100 train images
}

DATA_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "tiny-imagenet": "Tiny-ImageNet",
              "stanford-dogs": "Stanford Dogs"}


# -- training set-ups ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """An optimiser and schedule for teachers and students; ``None`` means kdcache's (the official scripts')."""

    name: str
    description: str                 # for the table header
    epochs: int
    lr: float | None = None          # None: training.official_lr(arch)
    lr_small_nets: float | None = None
    weight_decay: float = training.WEIGHT_DECAY
    batch_size: int = training.BATCH_SIZE
    milestones: tuple[int, ...] | None = None   # at ``epochs``; None: training.milestones_for

    def lr_for(self, arch: str) -> float | None:
        """The learning rate this set-up gives ``arch``; None leaves kdcache's official default."""
        if self.lr is None:
            return None
        small = self.lr_small_nets if self.lr_small_nets is not None else self.lr
        return small if arch in training.SMALL_NETS else self.lr

    def resolved_lr(self, arch: str) -> float:
        lr = self.lr_for(arch)
        return training.official_lr(arch) if lr is None else lr

    def milestones_for(self, epochs: int) -> list[int] | None:
        """The decay epochs for a run of ``epochs``, scaled from this set-up's; None: kdcache's official ones."""
        if self.milestones is None:
            return None
        if epochs == self.epochs:
            return list(self.milestones)
        scaled = (round(m * epochs / self.epochs) for m in self.milestones)
        return sorted({max(1, m) for m in scaled if m < epochs})

    def resolved_milestones(self, epochs: int) -> list[int]:
        ms = self.milestones_for(epochs)
        return training.milestones_for(epochs) if ms is None else ms


_SMALL = "/".join(training.SMALL_NETS)
SETUPS: dict[str, Setup] = {s.name: s for s in (
    Setup("official", f"the official CA-MKD scripts (kdcache's defaults): SGD, Nesterov momentum 0.9, lr "
                      f"{training.LR:g} ({training.LR_SMALL_NETS:g} for {_SMALL}), weight decay "
                      f"{training.WEIGHT_DECAY:g}, batch {training.BATCH_SIZE}, {training.EPOCHS} epochs, lr ×0.1 at "
                      f"{', '.join(map(str, training.MILESTONES))}. The paper's text states lr 0.1 (0.05) and weight "
                      "decay 1e-4 instead (`--setup paper`)",
          training.EPOCHS),
    Setup("paper", f"the paper's text: SGD momentum 0.9 (kdcache's SGD is Nesterov), lr 0.1 (0.05 for {_SMALL}), "
                   f"weight decay 1e-4, batch {training.BATCH_SIZE}, {training.EPOCHS} epochs, lr ×0.1 at "
                   f"{', '.join(map(str, training.MILESTONES))}. The official scripts use lr 0.05 (0.01) and weight "
                   "decay 5e-4 (`--setup official`)",
          training.EPOCHS, lr=0.1, lr_small_nets=0.05, weight_decay=1e-4),
    Setup("cs-kd", "CS-KD's (Yun et al., CVPR 2020; alinlab/cs-kd train.py and its fine-grained command): SGD "
                   "momentum 0.9 (kdcache's SGD is Nesterov, CS-KD's is not), lr 0.1 for every network, weight decay "
                   "1e-4, batch 32, 200 epochs, lr ×0.1 after 101 and 151 epochs (CS-KD's code divides after its "
                   "0-based epochs 100 and 150); the incomplete last batch is dropped (CS-KD keeps it)",
          200, lr=0.1, lr_small_nets=0.1, weight_decay=1e-4, batch_size=32, milestones=(101, 151)),
)}


def find_setup(name: str) -> Setup:
    try:
        return SETUPS[name]
    except KeyError:
        raise UnknownNameError(f"unknown training set-up {name!r}; known: {', '.join(SETUPS)}") from None


# -- rows: a method, its options, its teachers ----------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One row of a recipe's table: a method with options, run on the recipe's first ``n_teachers`` teachers.

    ``label`` names the runs (``<out>/<label>/seed<k>/``) and the row's paper figure;
    ``options`` are :class:`~kdcache.losses.base.MethodOptions` fields that differ from
    the method's defaults, as (name, value) pairs; ``implemented`` False lists a method of
    the paper's table that kdcache does not have (shown with its figure, never run);
    ``curve`` groups the points of a teacher-number sweep (Figure 4) for the grid.
    """

    label: str
    method: str
    row: str
    options: tuple[tuple[str, object], ...] = ()
    n_teachers: int | None = None    # None: all the recipe's teachers
    implemented: bool = True
    curve: str | None = None

    def method_options(self) -> MethodOptions:
        try:
            return MethodOptions(**dict(self.options))
        except TypeError as exc:
            raise KdcacheError(f"row {self.label!r}: {exc}") from None

    def teachers_of(self, k: int) -> int:
        """How many of the recipe's ``k`` teachers this row reads (0 for ce)."""
        if method_info(self.method).n_teachers == "0":
            return 0
        return k if self.n_teachers is None else self.n_teachers

    def flags(self) -> str:
        """The row as `kdcache distill` options: 'camkd --camkd-weights uniform'."""
        parts = [self.method]
        for name, value in self.options:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"--{name.replace('_', '-')} {shown}")
        return " ".join(parts)


def variant(label: str, method: str, row: str, n_teachers: int | None = None, curve: str | None = None,
            **options: object) -> Variant:
    """A row with ``options`` given as keywords (``camkd_weights="uniform"``)."""
    return Variant(label, method, row, tuple(options.items()), n_teachers, curve=curve)


def not_implemented(label: str, row: str) -> Variant:
    """A method of the paper's table that kdcache does not implement: shown with its figure, never run."""
    return Variant(label, label, row, implemented=False)


CE = variant("ce", "ce", "Student alone")
AVER = variant("aver", "aver", "AVER")
FITNET_MKD = variant("fitnet-mkd", "fitnet-mkd", "FitNet-MKD")
EBKD = variant("ebkd", "ebkd", "EBKD")
AEKD = variant("aekd", "aekd", "AEKD")
CAMKD = variant("camkd", "camkd", "CA-MKD")
KD = variant("kd", "kd", "KD (teacher 1)", n_teachers=1)
FITNET = variant("fitnet", "fitnet", "FitNet (teacher 1)", n_teachers=1)
AT = not_implemented("at", "AT (one teacher)")
VID = not_implemented("vid", "VID (one teacher)")
CRD = not_implemented("crd", "CRD (one teacher)")
CAMKD_UNIFORM = variant("camkd-uniform", "camkd", "CA-MKD, uniform weights (w = v = 1/K)", camkd_weights="uniform")
CAMKD_BETA0 = variant("camkd-beta0", "camkd", "CA-MKD without the feature term (β = 0)", beta=0.0)
CAMKD_FEATURE_W = variant("camkd-feature-w", "camkd", "CA-MKD, feature term weighted by w instead of v",
                          camkd_feature_weights="w")

# Table 1's rows, the paper's compared methods with the student alone first.
MULTI_TEACHER = (CE, AVER, FITNET_MKD, EBKD, AEKD, CAMKD)
SINGLE_TEACHER = (KD, FITNET, AT, VID, CRD)
PAPER_METHODS = tuple(v.method for v in MULTI_TEACHER)


def rows_summary(variants: Sequence[Variant]) -> str:
    """The rows in one line: 'ce, kd, at (not implemented)', a teacher sweep as 'aver, camkd with 1-4 teachers'."""
    parts, curves = [], {}
    for v in variants:
        if v.curve:
            curves.setdefault(v.method, []).append(v.n_teachers)
            continue
        parts.append(v.label + ("" if v.implemented else " (not implemented)"))
    if curves:
        counts = sorted({n for ns in curves.values() for n in ns})
        parts.append(f"{', '.join(curves)} with {counts[0]}-{counts[-1]} teachers")
    return ", ".join(parts)


def teacher_sweep(methods: Sequence[Variant], counts: Sequence[int]) -> tuple[Variant, ...]:
    """Figure 4's points: every method of ``methods`` on the first n teachers, for each n in ``counts``."""
    out = []
    for base in methods:
        for n in counts:
            out.append(Variant(f"{base.label}-k{n}", base.method, f"{base.row}, {n} teacher{'s' if n > 1 else ''}",
                               base.options, n_teachers=n, curve=base.row))
    return tuple(out)


# -- recipes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One setting of the paper: data set, K teacher architectures, student, rows, set-up and the paper's figures.

    ``paper`` maps a row to the paper's figure as printed: a variant's label, ``"teacher"``
    (the teachers' mean, or the one teacher), ``"teacher <i>"``, ``"ensemble"``.
    ``data`` labels the data when ``dataset`` alone does not say which (``imagefolder`` is
    both Tiny-ImageNet and Stanford Dogs): it keys :data:`KNOWN_SIZES` and the teachers'
    folder. ``epochs`` and ``views`` default to the set-up's epochs.
    """

    name: str
    table: str                       # "Table 1", "Table 2", "Table 3", "Table 4", "Figure 4", "Appendix", "custom"
    dataset: str
    teachers: tuple[str, ...]
    student: str
    variants: tuple[Variant, ...] = MULTI_TEACHER
    data: str = ""
    setup: str = "official"
    features: str = "spatial"
    seeds: int = 3
    epochs: int | None = None
    views: int | None = None         # default: one fresh view per student epoch
    plan_seed: int = 0
    source: str = ""                 # where the setting comes from, and what is not reproduced
    paper: Mapping[str, str] = field(default_factory=dict)

    @property
    def data_label(self) -> str:
        return self.data or self.dataset

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods run (implemented rows), in order, each once."""
        return tuple(dict.fromkeys(v.method for v in self.variants if v.implemented))

    @property
    def runs(self) -> tuple[Variant, ...]:
        """The rows that are run."""
        return tuple(v for v in self.variants if v.implemented)

    @property
    def title(self) -> str:
        """'resnet32x4 ×3 → vgg8' or 'resnet8x4 + resnet20x4 + resnet32x4 → vgg8'."""
        counts = Counter(self.teachers)
        if len(counts) == 1:
            teachers = f"{self.teachers[0]} ×{len(self.teachers)}"
        else:
            teachers = " + ".join(self.teachers)
        return f"{teachers} → {self.student}"


_REGISTRY: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, replace: bool = False) -> Recipe:
    """Add ``recipe`` to the registry after checking its names, so a typo fails here and not hours later."""
    if recipe.name in _REGISTRY and not replace:
        raise KdcacheError(f"recipe {recipe.name!r} is already registered")
    _REGISTRY[recipe.name] = check_recipe(recipe)
    return recipe


def custom_recipe(teachers: Sequence[str], student: str, dataset: str = "cifar100") -> Recipe:
    """A setting not in the registry: K teachers to one student, with Table 1's rows.

    It runs the paper's methods over three seeds with the official schedule, like
    the registered recipes; its name records the setting, e.g. ``custom-resnet32x4x3-ShuffleV2``.
    """
    counts = Counter(teachers)
    label = "-".join(f"{a}x{n}" if n > 1 else a for a, n in counts.items())
    return check_recipe(Recipe(name=f"custom-{label}-{student}", table="custom", dataset=dataset,
                               teachers=tuple(teachers), student=student,
                               source="given on the command line (kdcache recipe run custom)"))


def check_recipe(recipe: Recipe) -> Recipe:
    """Refuse unknown architectures, methods, options, data set, set-up or form, bad counts and stray figures."""
    name = recipe.name
    if not recipe.teachers:
        raise KdcacheError(f"recipe {name!r} has no teachers")
    for arch in (*recipe.teachers, recipe.student):
        model_info(arch)
    if recipe.dataset not in dataset_names():
        raise UnknownNameError(f"recipe {name!r}: unknown data set {recipe.dataset!r}; "
                               f"known: {', '.join(dataset_names())}")
    find_setup(recipe.setup)
    if recipe.features not in FEATURE_FORMS:
        raise KdcacheError(f"recipe {name!r}: feature form must be one of {', '.join(FEATURE_FORMS)}")
    labels = [v.label for v in recipe.variants]
    if len(set(labels)) != len(labels) or not labels:
        raise KdcacheError(f"recipe {name!r}: its rows need distinct labels (got {', '.join(labels) or 'none'})")
    k = len(recipe.teachers)
    for v in recipe.runs:
        info = method_info(v.method)
        v.method_options()
        if v.n_teachers is not None and not 1 <= v.n_teachers <= k:
            raise KdcacheError(f"recipe {name!r}, row {v.label!r}: {v.n_teachers} teachers of {k}")
        if info.n_teachers == "1" and v.teachers_of(k) != 1:
            raise KdcacheError(f"recipe {name!r}, row {v.label!r}: {v.method} takes one teacher; "
                               "give the row n_teachers=1")
    known = {*labels, "teacher", "ensemble", *(f"teacher {i}" for i in range(1, k + 1))}
    stray = sorted(set(recipe.paper) - known)
    if stray:
        raise KdcacheError(f"recipe {name!r}: paper figures for unknown rows {', '.join(stray)}")
    for label, value in (("seeds", recipe.seeds), ("epochs", recipe.epochs), ("views", recipe.views)):
        if value is not None and value < 1:
            raise KdcacheError(f"recipe {name!r}: {label} must be at least 1 (got {value})")
    return recipe


def unregister_recipe(name: str) -> None:
    """Remove a recipe (for tests that register a tiny one)."""
    _REGISTRY.pop(name, None)


def recipe_names() -> list[str]:
    """Registered recipe names, in registration order (the paper's order: Tables 1-4, Figure 4, appendix)."""
    return list(_REGISTRY)


def find_recipe(name: str) -> Recipe:
    """The recipe called ``name``; UnknownNameError listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown recipe {name!r}; known: {', '.join(_REGISTRY)} "
                               "(`kdcache recipe list`)") from None


# What each of the paper's tables is, for `kdcache recipe list` and the table headers.
TABLES = {
    "Table 1": "three teachers of one architecture, CIFAR-100",
    "Table 2": "single-teacher methods (one teacher) beside CA-MKD (three teachers), CIFAR-100",
    "Table 3": "three teachers of different architectures, CIFAR-100",
    "Table 4": "ablation of CA-MKD, CIFAR-100",
    "Figure 4": "number of teachers (1 to 4), CIFAR-100",
    "Appendix": "Tiny-ImageNet and Stanford Dogs, multi- and single-teacher rows",
}

_PAPER = "the CA-MKD paper (ICASSP 2022, arXiv 2201.00007) as transcribed in shared/PAPER.md"
_TEACHERS = ("Teachers of one architecture are three separately trained copies (the official settings name "
             "them cifar100-<arch>-0/1/2); here <arch>-0/1/2.pth, trained with seeds 0, 1, 2 unless supplied.")
_ENSEMBLE = "The paper's ensemble is the three teachers' majority vote."

# Table 1, as printed: teacher ×3 | student | teacher | ensemble | student alone | AVER | FitNet-MKD | EBKD | AEKD | CA-MKD
_TABLE1 = """
wrn_40_2   | ShuffleV1   | 76.62 ± 0.26 | 79.62 | 71.70 ± 0.43 | 76.30 ± 0.25 | 76.59 ± 0.17 | 76.61 ± 0.14 | 76.34 ± 0.24 | 77.94 ± 0.31
resnet56   | MobileNetV2 | 73.28 ± 0.30 | 76.00 | 65.64 ± 0.19 | 70.21 ± 0.10 | 70.69 ± 0.56 | 70.91 ± 0.22 | 70.47 ± 0.15 | 71.38 ± 0.02
vgg13      | vgg8        | 75.17 ± 0.18 | 77.07 | 70.74 ± 0.40 | 74.07 ± 0.23 | 73.97 ± 0.22 | 74.10 ± 0.27 | 73.78 ± 0.03 | 74.30 ± 0.16
vgg13      | MobileNetV2 | 75.17 ± 0.18 | 77.07 | 65.64 ± 0.19 | 68.91 ± 0.35 | 68.48 ± 0.07 | 68.24 ± 0.82 | 68.39 ± 0.50 | 69.41 ± 0.20
resnet32x4 | resnet8x4   | 79.31 ± 0.14 | 81.16 | 72.79 ± 0.14 | 74.99 ± 0.24 | 74.86 ± 0.21 | 75.59 ± 0.15 | 74.75 ± 0.28 | 75.90 ± 0.13
resnet32x4 | ShuffleV2   | 79.31 ± 0.14 | 81.16 | 72.94 ± 0.24 | 75.87 ± 0.19 | 76.09 ± 0.13 | 76.41 ± 0.12 | 75.95 ± 0.20 | 77.41 ± 0.14
resnet32x4 | vgg8        | 79.31 ± 0.14 | 81.16 | 70.74 ± 0.40 | 73.26 ± 0.39 | 73.27 ± 0.19 | 73.60 ± 0.22 | 73.11 ± 0.27 | 75.26 ± 0.32
"""
_TABLE1_KEYS = ("teacher", "ensemble", "ce", "aver", "fitnet-mkd", "ebkd", "aekd", "camkd")

# Table 2, as printed: teacher (its accuracy) | student (alone) | KD | FitNet | AT | VID | CRD | CA-MKD (3 teachers)
_TABLE2 = """
wrn_40_2   | 76.62 | ShuffleV1   | 71.70 | 75.77 ± 0.14 | 76.22 ± 0.21 | 76.44 ± 0.38 | 76.32 ± 0.08 | 76.58 ± 0.23 | 77.94 ± 0.31
resnet32x4 | 79.31 | vgg8        | 70.74 | 72.90 ± 0.34 | 72.55 ± 0.66 | 72.16 ± 0.12 | 73.09 ± 0.29 | 73.57 ± 0.25 | 75.26 ± 0.13
resnet56   | 73.28 | MobileNetV2 | 65.64 | 69.96 ± 0.14 | 69.02 ± 0.28 | 69.79 ± 0.26 | 69.45 ± 0.17 | 71.15 ± 0.44 | 71.38 ± 0.02
"""
_TABLE2_KEYS = ("teacher", "ce", "kd", "fitnet", "at", "vid", "crd", "camkd")


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")] for line in text.strip().splitlines()]


for _t, _s, *_figures in _rows(_TABLE1):
    register_recipe(Recipe(
        name=f"t1-{_t}-{_s}", table="Table 1", dataset="cifar100", teachers=(_t,) * 3, student=_s,
        paper=dict(zip(_TABLE1_KEYS, _figures)),
        source=f"{_PAPER}, Table 1, column {_t} → {_s}: teacher = one teacher's accuracy (mean ± std of the three), "
               f"ensemble, student alone and the five methods. {_ENSEMBLE} {_TEACHERS}"))

for _t, _ta, _s, _sa, *_figures in _rows(_TABLE2):
    _fig = dict(zip(_TABLE2_KEYS, [_ta, _sa, *_figures]))
    register_recipe(Recipe(
        name=f"t2-{_t}-{_s}", table="Table 2", dataset="cifar100", teachers=(_t,) * 3, student=_s,
        variants=(CE, *SINGLE_TEACHER, CAMKD), paper=_fig,
        source=f"{_PAPER}, Table 2, row {_t} ({_ta}) → {_s} ({_sa}): KD and FitNet distil from one teacher "
               "(kdcache uses teacher 1, <arch>-0.pth; the paper does not say which of its three it used); AT, VID "
               "and CRD are listed with the paper's figures and not run (kdcache does not implement them); CA-MKD "
               "uses all three teachers, the same runs as Table 1's column (share --teachers-dir and --cache to "
               "reuse the teachers and stores)."
               + (" Table 2 prints CA-MKD's figure here as 75.26 ± 0.13, Table 1 as 75.26 ± 0.32: the Table 2 "
                  "figure is shown." if (_t, _s) == ("resnet32x4", "vgg8") else "")))

register_recipe(Recipe(
    name="t3-resnet8x4-resnet20x4-resnet32x4-vgg8", table="Table 3", dataset="cifar100",
    teachers=("resnet8x4", "resnet20x4", "resnet32x4"), student="vgg8",
    paper={"teacher 1": "72.79", "teacher 2": "78.39", "teacher 3": "79.31", "ce": "70.74 ± 0.40",
           "aver": "74.55 ± 0.24", "fitnet-mkd": "74.47 ± 0.21", "ebkd": "74.07 ± 0.17", "aekd": "74.69 ± 0.29",
           "camkd": "75.96 ± 0.05"},
    source=f"{_PAPER}, Table 3: teachers resnet8x4 (72.79), resnet20x4 (78.39), resnet32x4 (79.31), student vgg8 "
           "(70.74 ± 0.40); the paper gives no ensemble figure here. Its Figure 3 (CA-MKD's per-sample weights per "
           "teacher on this setting) is `kdcache report` on <out>/camkd/seed<k>."))

register_recipe(Recipe(
    name="t4-vgg13-MobileNetV2", table="Table 4", dataset="cifar100", teachers=("vgg13",) * 3,
    student="MobileNetV2", variants=(CAMKD_UNIFORM, CAMKD_BETA0, CAMKD_FEATURE_W, CAMKD),
    paper={"camkd-uniform": "67.74 ± 0.87", "camkd-beta0": "68.11 ± 0.02", "camkd-feature-w": "68.82 ± 0.63",
           "camkd": "69.41 ± 0.20"},
    source=f"{_PAPER}, Table 4 (ablation on vgg13 ×3 → MobileNetV2): uniform weights (w = v = 1/K, "
           "--camkd-weights uniform), no feature term (--beta 0), feature term weighted by w instead of v "
           "(--camkd-feature-weights w), and CA-MKD (equal to Table 1's column). The teachers and CA-MKD runs are "
           "those of t1-vgg13-MobileNetV2."))

register_recipe(Recipe(
    name="f4-resnet56-MobileNetV2", table="Figure 4", dataset="cifar100", teachers=("resnet56",) * 4,
    student="MobileNetV2", variants=(CE, *teacher_sweep((AVER, FITNET_MKD, EBKD, AEKD, CAMKD), (1, 2, 3, 4))),
    source=f"{_PAPER}, Figure 4: student accuracy as the number of teachers grows, CA-MKD against the other "
           "methods, on the paper's example resnet56 → MobileNetV2. The paper draws curves and prints no numbers, "
           "so every paper figure is n/a; it does not say how many teachers its curves reach: here 1 to 4, the "
           "first n of resnet56-0..3.pth."))

register_recipe(Recipe(
    name="app-tiny-imagenet-resnet32x4-vgg8", table="Appendix", dataset="imagefolder", data="tiny-imagenet",
    teachers=("resnet32x4",) * 3, student="vgg8", variants=(*MULTI_TEACHER, *SINGLE_TEACHER),
    paper={"teacher": "53.38 ± 0.11", "teacher 1": "53.45", "ce": "44.40 ± 0.15", "aver": "47.82 ± 0.15",
           "fitnet-mkd": "47.82 ± 0.05", "ebkd": "47.20 ± 0.10", "aekd": "47.62 ± 0.38", "camkd": "49.55 ± 0.12",
           "kd": "47.42 ± 0.07", "fitnet": "47.24 ± 0.28", "at": "45.73 ± 0.05", "vid": "47.76 ± 0.08",
           "crd": "48.11 ± 0.07"},
    source=f"{_PAPER}, appendix, Tiny-ImageNet rows of both tables: the multi-teacher row (teacher 53.38 ± 0.11) "
           "and the single-teacher row (its teacher 53.45, shown on teacher 1, which kdcache's KD and FitNet use; "
           "the paper does not say which teacher it was). The paper says Tiny-ImageNet uses the CIFAR-100 set-up: "
           "the official schedule and CIFAR-style views (random crop with zero padding + flip) at 64×64; the data "
           "set is `imagefolder` with train/<class>/ and val/<class>/ (Tiny-ImageNet's val images sorted into class "
           "folders), 100,000 training images, 200 classes. No ensemble figure is given."))

register_recipe(Recipe(
    name="app-stanford-dogs-resnet34-shufflenet_v2_x0_5", table="Appendix", dataset="imagefolder",
    data="stanford-dogs", teachers=("resnet34",) * 3, student="shufflenet_v2_x0_5",
    variants=(*MULTI_TEACHER, *SINGLE_TEACHER), setup="cs-kd",
    paper={"teacher": "64.76 ± 1.06", "teacher 1": "65.97", "ce": "59.36 ± 0.73", "aver": "64.49 ± 0.16",
           "fitnet-mkd": "64.11 ± 0.80", "ebkd": "64.32 ± 0.23", "aekd": "64.19 ± 0.34", "camkd": "65.19 ± 0.23",
           "kd": "63.90 ± 0.08", "fitnet": "62.45 ± 0.61", "at": "63.48 ± 0.60", "vid": "64.45 ± 0.23",
           "crd": "64.61 ± 0.17"},
    source=f"{_PAPER}, appendix, Stanford Dogs rows of both tables: the multi-teacher row (teacher 64.76 ± 1.06) "
           "and the single-teacher row (its teacher 65.97, shown on teacher 1, which kdcache's KD and FitNet use; "
           "the paper does not say which teacher it was). The paper says Stanford Dogs follows CS-KD's set-up "
           "(Yun et al., CVPR 2020; alinlab/cs-kd). Reproduced of it: torchvision ResNet-style networks trained "
           "from scratch on 224×224 views, RandomResizedCrop(224) + horizontal flip for training, shorter side 256 "
           "+ centre 224 crop for testing, ImageNet normalisation, SGD momentum 0.9, lr 0.1, weight decay 1e-4, "
           "batch 32, 200 epochs, lr ×0.1 after 101 and 151 epochs (CS-KD's code), 12,000 training images of 120 "
           "classes (`imagefolder`: train/<class>/ and val/<class>/, the latter CS-KD's test split). Not "
           "reproduced: CS-KD's SGD has no Nesterov momentum (kdcache's has); CS-KD keeps the incomplete last "
           "batch (kdcache drops it); the student sees a fixed schedule of 200 stored views rather than fresh "
           "random crops; CS-KD's own class-wise regularisation loss is not part of the set-up and is not used; "
           "T = 4, α = 1, β = 50 are the CIFAR values, as the paper states them for every data set. No ensemble "
           "figure is given."))


# -- the dry-run arithmetic -------------------------------------------------------------------


@dataclass(frozen=True)
class StorePlan:
    """What one teacher store holds, in each feature form: array shapes and bytes before compression."""

    arch: str
    views: int
    n_samples: int
    num_classes: int
    feature_dim: int                 # D of the pooled form
    map_shape: tuple[int, int, int]  # (C', H, W) of the spatial form

    def features_shape(self, form: str) -> tuple[int, ...]:
        """The per-row shape of ``features`` in ``form``: (D,), (C', H, W) or ()."""
        return feature_shape(form, self.feature_dim, self.map_shape)

    def row_bytes(self, form: str) -> int:
        """Logits plus features of one row, float16."""
        return row_bytes(self.num_classes, self.features_shape(form), _ITEMSIZE)

    @property
    def rows(self) -> int:
        return self.views * self.n_samples

    @property
    def logits_bytes(self) -> int:
        return self.rows * self.num_classes * _ITEMSIZE

    def arrays_bytes(self, form: str) -> int:
        """Logits + features: ``V · N · row bytes``."""
        return self.rows * self.row_bytes(form)

    @property
    def head_bytes(self) -> int:
        """The classifier, float32: ``(C · D + C) · 4``."""
        return (self.num_classes * self.feature_dim + self.num_classes) * 4

    def raw_bytes(self, form: str) -> int:
        return self.arrays_bytes(form) + self.head_bytes

    def estimated_bytes(self, form: str) -> int:
        """On disk after compression: an estimate from the ratio measured in benchmarks/RESULTS.md."""
        return round(self.arrays_bytes(form) / COMPRESSION_RATIO[form]) + self.head_bytes


@dataclass(frozen=True)
class RecipePlan:
    """The dry-run numbers of a recipe: stores in both forms, disk, teacher forward passes saved."""

    recipe: Recipe
    n_samples: int
    num_classes: int
    image_size: int
    view_recipe: str
    views: int
    seeds: int
    epochs: int
    setup: Setup
    features: str                    # the form this run stores
    stores: list[StorePlan]
    plan_bytes: int                  # the shared plan: order (V, N) int32, params (V, N, P) int16, labels (N,) int32

    def total_raw_bytes(self, form: str | None = None) -> int:
        return sum(s.raw_bytes(form or self.features) for s in self.stores) + self.plan_bytes

    def total_estimated_bytes(self, form: str | None = None) -> int:
        return sum(s.estimated_bytes(form or self.features) for s in self.stores) + self.plan_bytes

    @property
    def online_forward_passes(self) -> int:
        """Teacher forward passes of online distillation: Σ over run rows of seeds × epochs × N × (its teachers)."""
        k = len(self.stores)
        return sum(self.seeds * self.epochs * self.n_samples * v.teachers_of(k) for v in self.recipe.runs)

    @property
    def cached_forward_passes(self) -> int:
        """Teacher forward passes of precompute: V × N × K."""
        return self.views * self.n_samples * len(self.stores)

    @property
    def saved_forward_passes(self) -> int:
        return self.online_forward_passes - self.cached_forward_passes

    @property
    def ratio(self) -> float:
        return self.online_forward_passes / self.cached_forward_passes

    @property
    def n_runs(self) -> int:
        return self.seeds * len(self.recipe.runs)

    def lines(self) -> list[str]:
        """The dry run, for a person."""
        r, n, v, k, c = self.recipe, self.n_samples, self.views, len(self.stores), self.num_classes
        skipped = [x.label for x in r.variants if not x.implemented]
        out = [f"recipe     {r.name} ({r.table}): {r.title} on {DATA_NAMES.get(r.data_label, r.data_label)} "
               f"(data set {r.dataset})",
               f"set-up     {self.setup.name}: {self.setup.description}",
               f"rows       {', '.join(x.label for x in r.runs)} × {self.seeds} seeds × {self.epochs} epochs = "
               f"{self.n_runs} student runs"
               + (f"; listed, not run (not implemented): {', '.join(skipped)}" if skipped else ""),
               f"views      {v} views of {self.image_size}×{self.image_size} ({self.view_recipe}), plan seed "
               f"{r.plan_seed}"]
        for i, s in enumerate(self.stores, 1):
            out.append(f"store {i}    {s.arch}: logits ({v}, {n}, {c}) {STORED_DTYPE} {_bytes(s.logits_bytes)}, "
                       f"head {_bytes(s.head_bytes)}, and features in either form:")
            for form in ("pooled", "spatial"):
                mark = "  <- this run" if form == self.features else ""
                out.append(f"  {form:<8} features {_shape((v, n, *s.features_shape(form)))} {STORED_DTYPE}: "
                           f"{s.row_bytes(form):,} B a row × {s.rows:,} rows = {_bytes(s.arrays_bytes(form))} "
                           f"raw, about {human_bytes(s.estimated_bytes(form))} on disk{mark}")
        out.append(f"plan       shared by the {k} stores: order ({v}, {n}) int32, params, labels: "
                   f"{_bytes(self.plan_bytes)}")
        for form in ("pooled", "spatial"):
            which = "this run" if form == self.features else "the other form"
            out.append(f"disk       {form:<8} {_bytes(self.total_raw_bytes(form))} raw, about "
                       f"{human_bytes(self.total_estimated_bytes(form))} after compression ({which})")
        if self.features not in ("pooled", "spatial"):
            out.append(f"disk       {self.features:<8} {_bytes(self.total_raw_bytes())} raw (this run)")
        out += ["           compression estimated with the ratios measured on digits teachers (benchmarks/RESULTS.md): "
                f"{COMPRESSION_RATIO['pooled']} pooled, {COMPRESSION_RATIO['spatial']} spatial (post-ReLU maps hold "
                "about half zeros); real maps may compress differently. The paper's β = 50 was set for the spatial "
                "form; at the same β the pooled form pushes the student about 3× harder.",
                f"forward    online: Σ over the rows of seeds × epochs × samples × the row's teachers = "
                f"{self.online_forward_passes:,} teacher forward passes",
                f"           cached: {v} views × {n} samples × {k} teachers = {self.cached_forward_passes:,}",
                f"           saved:  {self.saved_forward_passes:,} ({self.ratio:.1f}× fewer teacher forward "
                "passes; teacher training is the same either way)"]
        return out


def plan_recipe(recipe: Recipe | str, seeds: int | None = None, epochs: int | None = None, views: int | None = None,
                n_samples: int | None = None, num_classes: int | None = None, image_size: int | None = None,
                view_recipe: str | None = None, features: str | None = None,
                setup: str | None = None) -> RecipePlan:
    """The dry-run numbers of ``recipe``, computed without data, weights or disk.

    The data's size defaults to :data:`KNOWN_SIZES` (CIFAR-100: 50000 training images,
    100 classes, 32 px); feature widths and last-block maps come from running each
    teacher on the meta device.
    """
    recipe = find_recipe(recipe) if isinstance(recipe, str) else recipe
    setup_ = find_setup(setup or recipe.setup)
    seeds, epochs, views = resolve_schedule(recipe, seeds, epochs, views, setup_)
    form = store_form(recipe, features)
    known = KNOWN_SIZES.get(recipe.data_label)
    if known is None and None in (n_samples, num_classes, image_size):
        raise KdcacheError(f"the size of {recipe.data_label} is not known without reading it; give --data-root")
    n = int(n_samples if n_samples is not None else known.n_train)
    c = int(num_classes if num_classes is not None else known.num_classes)
    size = int(image_size if image_size is not None else known.image_size)
    view = view_recipe or (known.view_recipe if known is not None else "crop-flip")
    stores = []
    for arch in recipe.teachers:
        d, m = meta_shapes(arch, c, size)
        stores.append(StorePlan(arch, int(views), n, c, d, m))
    n_params = get_view_recipe(view).n_params
    plan_bytes = views * n * 4 + views * n * n_params * 2 + n * 4
    return RecipePlan(recipe, n, c, size, view, views, seeds, epochs, setup_, form, stores, plan_bytes)


def meta_shapes(arch: str, num_classes: int, image_size: int) -> tuple[int, tuple[int, int, int]]:
    """``(D, (C', H, W))`` of ``arch``: its pooled width and its last-block map, on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    return feature_dim(model), map_shape(model, image_size)


def meta_feature_dim(arch: str, num_classes: int) -> int:
    """Width of ``arch``'s penultimate features, from a model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return feature_dim(build_model(arch, num_classes))


def store_form(recipe: Recipe, features: str | None = None) -> str:
    """The form the recipe's stores take: ``features`` or the recipe's, ``none`` when no row reads features."""
    form = features or recipe.features
    if form not in FEATURE_FORMS:
        raise KdcacheError(f"--features must be one of {', '.join(FEATURE_FORMS)} (got {form!r})")
    if not any(method_info(v.method).uses_features for v in recipe.runs):
        return "none"
    return form


def resolve_schedule(recipe: Recipe, seeds: int | None, epochs: int | None, views: int | None,
                     setup: Setup | None = None) -> tuple[int, int, int]:
    """Seeds, student epochs and views of a run: the recipe's (or its set-up's) unless overridden.

    A shorter ``epochs`` without ``views`` stores only as many views as the students use.
    """
    setup = setup or find_setup(recipe.setup)
    base_epochs = recipe.epochs or setup.epochs
    base_views = recipe.views or base_epochs
    seeds = recipe.seeds if seeds is None else seeds
    views = views if views is not None else (base_views if epochs is None else min(base_views, epochs))
    epochs = base_epochs if epochs is None else epochs
    for label, value in (("--seeds", seeds), ("--epochs", epochs), ("--views", views)):
        if value < 1:
            raise KdcacheError(f"{label} must be at least 1 (got {value})")
    return seeds, epochs, views


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(x) for x in shape) + ")"


def _bytes(n: int) -> str:
    """'368.4 GiB = 395.6 GB (395,616,000,000 B)': binary, decimal from 1 GB on, and exact."""
    decimal = f" = {n / 1e12:.2f} TB" if n >= 1e12 else (f" = {n / 1e9:.1f} GB" if n >= 1e9 else "")
    return f"{human_bytes(n)}{decimal} ({n:,} B)"


# -- running a recipe -------------------------------------------------------------------------


@dataclass
class RecipeResult:
    """What a recipe run did or, for a dry run, would do."""

    recipe: Recipe
    out: Path
    plan: RecipePlan
    lines: list[str] = field(default_factory=list)        # the dry run's account
    table: str | None = None                               # table.md's text
    teachers: list[dict] = field(default_factory=list)     # arch, checkpoint, id, test_accuracy
    ensemble: dict[str, float] | None = None               # "vote" and "softmax" test top-1
    students: dict[str, list[dict]] = field(default_factory=dict)  # row label -> [{seed, best, last}]
    reused: dict[str, int] = field(default_factory=dict)   # teachers, stores, runs found done


def teachers_folder(recipe: Recipe, teachers_dir: Path) -> Path:
    """Where the recipe's teacher checkpoints are: ``teachers_dir`` for CIFAR-100, ``teachers_dir/<data>`` otherwise."""
    return Path(teachers_dir) if recipe.data_label == "cifar100" else Path(teachers_dir) / recipe.data_label


def teacher_checkpoints(recipe: Recipe, teachers_dir: Path) -> list[tuple[str, Path, int]]:
    """``(arch, <folder>/<arch>-<i>.pth, seed i)`` per teacher; ``i`` counts teachers of one architecture."""
    folder = teachers_folder(recipe, teachers_dir)
    seen: Counter[str] = Counter()
    out = []
    for arch in recipe.teachers:
        i = seen[arch]
        seen[arch] += 1
        out.append((arch, folder / f"{arch}-{i}.pth", i))
    return out


def distill_request(recipe: Recipe, row: Variant, ids: Sequence[str], run: Path, seed: int, epochs: int,
                    setup: Setup, cache: Path | None = None, data_root: Path | None = None,
                    device: str | None = None, resume: bool = False) -> DistillRequest:
    """The :class:`DistillRequest` of one row and seed: its method, options, teachers and the set-up."""
    k = row.teachers_of(len(ids))
    return DistillRequest(student=recipe.student, teachers=list(ids[:k] if k else ids), method=row.method, out=run,
                          cache=cache, data_root=data_root, epochs=epochs, batch_size=setup.batch_size,
                          lr=setup.lr_for(recipe.student), weight_decay=setup.weight_decay,
                          milestones=setup.milestones_for(epochs), seed=seed, device=device, resume=resume,
                          options=row.method_options())


def run_recipe(name: str | Recipe, data_root: Path | None, cache: Path | None, out: Path,
               teachers_dir: Path | None = None, seeds: int | None = None, epochs: int | None = None,
               views: int | None = None, device: str | None = None, dry_run: bool = False,
               teacher_epochs: int | None = None, features: str | None = None, setup: str | None = None,
               say: Say | None = None,
               precompute_progress: Callable[[int, int], Callable[[int], None]] | None = None) -> RecipeResult:
    """Run a recipe end to end (teachers, stores, every row × seed, the table), resuming what exists.

    ``teachers_dir`` defaults to ``<out>/teachers``; ``teacher_epochs`` (for teachers trained here)
    to the student epochs; ``features`` (``spatial`` or ``pooled``) and ``setup`` to the recipe's.
    ``say`` is told each step; ``dry_run`` only computes and describes.
    """
    recipe = find_recipe(name) if isinstance(name, str) else name
    setup_ = find_setup(setup or recipe.setup)
    seeds, epochs, views = resolve_schedule(recipe, seeds, epochs, views, setup_)
    form = store_form(recipe, features)
    teacher_epochs = epochs if teacher_epochs is None else teacher_epochs
    if teacher_epochs < 1:
        raise KdcacheError(f"--teacher-epochs must be at least 1 (got {teacher_epochs})")
    out = Path(out)
    teachers_dir = Path(teachers_dir) if teachers_dir is not None else out / "teachers"
    say = say or (lambda _msg: None)
    ckpts = teacher_checkpoints(recipe, teachers_dir)

    if dry_run:
        return _dry_run(recipe, data_root, out, ckpts, seeds, epochs, views, teacher_epochs, form, setup_)

    dataset = load_dataset(recipe.dataset, data_root)
    _check_views(recipe, dataset)
    plan = plan_recipe(recipe, seeds, epochs, views, len(dataset.train), dataset.num_classes, dataset.image_size,
                       dataset.recipe, form, setup_.name)
    result = RecipeResult(recipe, out, plan, reused={"teachers": 0, "stores": 0, "runs": 0})

    for i, (arch, ckpt, seed) in enumerate(ckpts, 1):
        state = _checkpoint_state(ckpt, teacher_epochs)
        if state == "done":
            result.reused["teachers"] += 1
            continue
        say(f"teacher {i}/{len(ckpts)}: training {arch} for {teacher_epochs} epochs (seed {seed}, set-up "
            f"{setup_.name}) into {ckpt}{' (resuming)' if state == 'partial' else ''}")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        train_teacher(TrainTeacherRequest(arch=arch, dataset=recipe.dataset, out=ckpt, data_root=data_root,
                                          epochs=teacher_epochs, batch_size=setup_.batch_size,
                                          lr=setup_.lr_for(arch), weight_decay=setup_.weight_decay,
                                          milestones=setup_.milestones_for(teacher_epochs), seed=seed,
                                          device=device, resume=state == "partial"))

    ids = []
    store_cache = Cache.at(cache)
    for i, (arch, ckpt, _) in enumerate(ckpts, 1):
        say(f"teacher {i}/{len(ckpts)}: the {form} store of {arch} over {views} views (precomputed unless complete)")
        pre = precompute(PrecomputeRequest(teacher=arch, checkpoint=ckpt, dataset=recipe.dataset,
                                           data_root=data_root, cache=cache, views=views,
                                           plan_seed=recipe.plan_seed, device=device, features=form),
                         progress=precompute_progress)
        result.reused["stores"] += pre.status == "complete"
        ids.append(pre.teacher_id)
        store = store_cache.open_teacher(pre.teacher_id)
        result.teachers.append({"arch": arch, "checkpoint": str(ckpt), "id": pre.teacher_id,
                                "plan_id": pre.plan_id, "features": form,
                                "test_accuracy": store.attrs.get("test_accuracy")})
    result.ensemble = _ensemble(out, ckpts, ids, dataset, device, say)

    done = 0
    for seed in range(seeds):
        for row in recipe.runs:
            done += 1
            run = out / row.label / f"seed{seed}"
            req = distill_request(recipe, row, ids, run, seed, epochs, setup_, cache, data_root, device)
            if (run / "last.pth").is_file():
                _check_finished_run(run, req)
                result.reused["runs"] += 1
            else:
                req.resume = (run / "checkpoint.pth").is_file()
                say(f"run {done}/{plan.n_runs}: {row.label} ({row.flags()}, {len(req.teachers)} teacher"
                    f"{'s' if len(req.teachers) != 1 else ''}), seed {seed}, {recipe.student} for {epochs} epochs"
                    f"{' (resuming)' if req.resume else ''}")
                distill(req)
            record = load_run(run)
            result.students.setdefault(row.label, []).append(
                {"seed": seed, "best": record.best_top1, "last": record.final_top1})

    result.table = format_table(result)
    (out / "table.md").write_text(result.table)
    _write_json(out / "recipe.json", _as_json(result, seeds, epochs, views, teacher_epochs))
    return result


def _check_views(recipe: Recipe, dataset) -> None:
    """Refuse, before any work, a data set whose views are not the recipe's (size or augmentation)."""
    known = KNOWN_SIZES.get(recipe.data_label)
    if known is None:
        return
    if (dataset.image_size, dataset.recipe.partition(":")[0]) != (known.image_size, known.view_recipe):
        raise KdcacheError(
            f"recipe {recipe.name} needs {known.image_size}×{known.image_size} {known.view_recipe} views of "
            f"{DATA_NAMES.get(recipe.data_label, recipe.data_label)}, but data set {recipe.dataset} gives "
            f"{dataset.image_size}×{dataset.image_size} {dataset.recipe} views")


def _dry_run(recipe: Recipe, data_root: Path | None, out: Path, ckpts: list[tuple[str, Path, int]], seeds: int,
             epochs: int, views: int, teacher_epochs: int, form: str, setup: Setup) -> RecipeResult:
    """Compute and describe, writing nothing; reads the data set for its size when it is there."""
    known = KNOWN_SIZES.get(recipe.data_label)
    label = DATA_NAMES.get(recipe.data_label, recipe.data_label)
    try:
        dataset = load_dataset(recipe.dataset, data_root)
        n, c, size, view = len(dataset.train), dataset.num_classes, dataset.image_size, dataset.recipe
        where = f"{n} training samples, {c} classes, read from {data_root}"
    except DatasetError:
        if known is None:
            raise
        n, c, size, view = known.n_train, known.num_classes, known.image_size, known.view_recipe
        where = (f"{n} training samples, {c} classes, {size} px: {label}'s published size "
                 f"(not found under {data_root}; needed for the real run)")
    plan = plan_recipe(recipe, seeds, epochs, views, n, c, size, view, form, setup.name)
    lines = plan.lines()
    lines.insert(1, f"data set   {where}")
    for i, (arch, ckpt, seed) in enumerate(ckpts, 1):
        state = _checkpoint_state(ckpt, teacher_epochs)
        what = {"done": "found, used as it is", "partial": f"found part-trained, training resumes to "
                f"{teacher_epochs} epochs", "missing": f"missing, will be trained for {teacher_epochs} epochs "
                f"(seed {seed})"}[state]
        lines.append(f"teacher {i}  {ckpt}: {what}")
    finished = sum((out / r.label / f"seed{s}" / "last.pth").is_file() for r in recipe.runs for s in range(seeds))
    lines.append(f"runs       {plan.n_runs} student runs under {out}, {finished} already finished")
    return RecipeResult(recipe, out, plan, lines=lines)


def _checkpoint_state(ckpt: Path, teacher_epochs: int) -> str:
    """'missing', 'partial' (a train-teacher run of kdcache's that stopped early) or 'done' (anything else)."""
    if not ckpt.is_file():
        return "missing"
    try:
        state = read_checkpoint(ckpt)
    except CheckpointError:
        raise CheckpointError(f"teacher checkpoint {ckpt} cannot be read; delete it to train the teacher "
                              "again, or put a valid checkpoint there") from None
    ours = isinstance(state, dict) and {"lr_scheduler", "arch", "epoch"} <= set(state)
    if ours and int(state["epoch"]) < teacher_epochs:
        return "partial"
    return "done"


def _check_finished_run(run: Path, req: DistillRequest) -> None:
    """A finished run counts only if it is this grid's: method, options, epochs, stores and optimiser."""
    try:
        args = json.loads((run / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError):
        return
    want = {"method": req.method, "epochs": req.epochs, "teachers": list(req.teachers),
            "options": asdict(req.options), "weight_decay": req.weight_decay, "batch_size": req.batch_size,
            "lr": req.lr if req.lr is not None else training.official_lr(req.student),
            "milestones": req.milestones if req.milestones is not None else training.milestones_for(req.epochs)}
    differ = [k for k, v in want.items() if k in args and args[k] != v]
    if differ:
        raise KdcacheError(f"{run} holds a finished run of another grid ({', '.join(differ)} differ: "
                           f"{', '.join(f'{k} {args[k]!r}' for k in differ)}); choose another --out or remove it")


def _ensemble(out: Path, ckpts: list[tuple[str, Path, int]], ids: list[str], dataset, device: str | None,
              say: Say) -> dict[str, float]:
    """Test top-1 of the teachers' majority vote and averaged softmax, kept in ``<out>/ensemble.json``."""
    path = out / "ensemble.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("teachers") == ids:
                return {"vote": float(saved["vote_top1"]), "softmax": float(saved["softmax_top1"])}
        except (ValueError, KeyError, TypeError):
            pass
    say("evaluating the teachers' ensemble on the test split")
    vote, softmax = ensemble_accuracies([(arch, ckpt) for arch, ckpt, _ in ckpts], dataset, device)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"teachers": ids, "vote_top1": vote, "softmax_top1": softmax})
    return {"vote": vote, "softmax": softmax}


@torch.inference_mode()
def ensemble_accuracies(teachers: list[tuple[str, Path]], dataset, device: str | None) -> tuple[float, float]:
    """Test top-1 (%) of the teachers' majority vote and of their averaged softmax, in one pass.

    The vote is the paper's ensemble: each teacher votes its top-1 class; a tie (e.g. three
    teachers, three classes) goes to the tied class with the largest summed softmax.
    """
    dev = resolve_device(device)
    models = []
    for arch, ckpt in teachers:
        m = build_model(arch, dataset.num_classes)
        load_checkpoint(m, ckpt)
        models.append(m.eval().to(dev))
    vote_correct = soft_correct = total = 0
    for x, y in test_batches(dataset, dataset.recipe, dev, 256):
        probs = torch.stack([torch.softmax(m(x)[1].float(), dim=1) for m in models])   # (K, B, C)
        summed = probs.sum(0)
        votes = torch.zeros_like(summed)
        votes.scatter_add_(1, probs.argmax(2).T, torch.ones(y.shape[0], len(models), device=dev))
        top = votes == votes.max(1, keepdim=True).values
        vote = torch.where(top, summed, torch.full_like(summed, -1.0)).argmax(1)
        vote_correct += int((vote == y).sum())
        soft_correct += int((summed.argmax(1) == y).sum())
        total += len(y)
    return 100.0 * vote_correct / total, 100.0 * soft_correct / total


# -- the table --------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    """'75.12 ± 0.31' (sample standard deviation) for two or more values, '75.12' for one."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _teachers_used(row: Variant, k: int) -> str:
    n = row.teachers_of(k)
    if n == 0:
        return "no teacher"
    if n == 1:
        return "teacher 1"
    return f"teachers 1-{n}" if n < k else f"{n} teachers"


def format_table(result: RecipeResult) -> str:
    """The recipe's table as markdown: teachers, ensemble, one row per variant, each beside the paper's figure.

    Columns: our best-epoch top-1 (what the official scripts report) as mean ± sample std over
    the seeds, the paper's figure ("n/a" where it gives none), our last-epoch top-1, the seeds.
    """
    r, plan = result.recipe, result.plan
    k = len(r.teachers)

    def paper(key: str) -> str:
        return r.paper.get(key, "n/a")

    data = DATA_NAMES.get(r.data_label, r.data_label)
    rows = [f"# {r.name}: CA-MKD {r.table}, {r.title} on {data}", "",
            f"{r.table}: {TABLES.get(r.table, 'a setting given on the command line')}.", "",
            f"Set-up run: **{plan.setup.name}**, {plan.setup.description}.", "",
            f"Teacher stores in the **{plan.features}** feature form"
            + {"spatial": " (the last-block map, as the official code; the paper's β = 50 was set for it).",
               "pooled": " (the pooled vector: at the paper's β = 50 it pushes the student about 3× harder than the "
                         "official spatial form, so feature-term rows may differ from the paper for that reason).",
               "none": " (logits only; no row reads features)."}.get(plan.features, "."), "",
            f"Top-1 test accuracy (%) on the {data} test split. Reproduced: mean ± sample standard deviation over "
            f"{plan.seeds} seed{'s' if plan.seeds > 1 else ''} of the best epoch (what the official scripts report); "
            "paper: the figure the paper prints (mean ± std over 3 seeds), \"n/a\" where it gives none.", "",
            "| | reproduced (best epoch) | paper | last epoch | seeds |", "|---|---|---|---|---|"]
    accs = [t["test_accuracy"] for t in result.teachers]
    for i, t in enumerate(result.teachers, 1):
        rows.append(f"| Teacher {i} ({t['arch']}) | {_pct(t['test_accuracy'])} | {paper(f'teacher {i}')} | | |")
    if len(set(r.teachers)) == 1 and k > 1 and accs and all(a is not None for a in accs):
        rows.append(f"| Teacher ({r.teachers[0]}, mean ± std of {len(accs)}) | {mean_std(accs)} | "
                    f"{paper('teacher')} | | |")
    if result.ensemble is not None:
        rows.append(f"| Ensemble of the {k} (majority vote, the paper's) | {result.ensemble['vote']:.2f} | "
                    f"{paper('ensemble')} | | |")
        rows.append(f"| Ensemble of the {k} (averaged softmax) | {result.ensemble['softmax']:.2f} | n/a | | |")
    for row in r.variants:
        if not row.implemented:
            rows.append(f"| {row.row} | not implemented in kdcache | {paper(row.label)} | | |")
            continue
        runs = result.students.get(row.label, [])
        best = mean_std([x["best"] for x in runs]) if runs else "not run"
        last = mean_std([x["last"] for x in runs]) if runs else ""
        rows.append(f"| {row.row} (`{row.flags()}`, {_teachers_used(row, k)}, {r.student}) | {best} | "
                    f"{paper(row.label)} | {last} | {len(runs)} |")
    rows += _curves(result)
    rows += ["", f"Settings: {plan.views} views of {plan.image_size}×{plan.image_size} ({plan.view_recipe}, plan seed "
                 f"{r.plan_seed}), {plan.epochs} student epochs, {plan.n_samples} training samples. Teacher stores: "
                 f"{', '.join(t['id'][:12] for t in result.teachers)}.",
             f"Source of the setting: {r.source}", ""]
    return "\n".join(rows)


def _curves(result: RecipeResult) -> list[str]:
    """Figure 4's curves as a grid (rows: methods, columns: number of teachers), when the recipe sweeps K."""
    points = [v for v in result.recipe.runs if v.curve]
    if not points:
        return []
    k = len(result.recipe.teachers)
    counts = sorted({v.teachers_of(k) for v in points})
    curves = list(dict.fromkeys(v.curve for v in points))
    out = ["", "Reproduced best-epoch top-1 by number of teachers (the paper's Figure 4 draws these curves):", "",
           "| | " + " | ".join(f"{n} teacher{'s' if n > 1 else ''}" for n in counts) + " |",
           "|---|" + "---|" * len(counts)]
    for curve in curves:
        cells = []
        for n in counts:
            v = next((p for p in points if p.curve == curve and p.teachers_of(k) == n), None)
            runs = result.students.get(v.label, []) if v else []
            cells.append(mean_std([x["best"] for x in runs]) if runs else "n/a")
        out.append(f"| {curve} | " + " | ".join(cells) + " |")
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _as_json(result: RecipeResult, seeds: int, epochs: int, views: int, teacher_epochs: int) -> dict:
    return {"recipe": asdict(result.recipe), "setup": asdict(result.plan.setup), "features": result.plan.features,
            "seeds": seeds, "epochs": epochs, "views": views, "teacher_epochs": teacher_epochs,
            "teachers": result.teachers, "ensemble": result.ensemble, "students": result.students,
            "reused": result.reused}


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
