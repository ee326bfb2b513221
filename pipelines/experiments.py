"""The CA-MKD paper's settings as experiments: one call per setting, from raw data to the paper's table.

An experiment names a data set, K teacher architectures, a student and the rows of
its table. A row (:class:`Variant`) is a method with its options and the teachers it
reads: ``camkd`` as the paper runs it, ``camkd-uniform`` (the Table 4 ablation with
``w = v = 1/K``), ``kd`` on teacher 1 only (Table 2), ``aver-k2`` (Figure 4, the
first two teachers), or a method kdcache does not implement (AT, VID, CRD), which
is shown with the paper's figure and never run. :func:`run_experiment` builds the
experiment's grid (:func:`grid_spec`) and runs it with
:func:`~kdcache.pipelines.grid_runner.run_grid`, the runner ``kdcache demo`` uses too:

1. each teacher is trained unless its checkpoint exists: ``<teachers_dir>/<arch>-<i>.pth``
   for CIFAR-100 (``i`` counts the teachers of one architecture, so three resnet32x4
   teachers are ``resnet32x4-0/1/2.pth``, trained with seeds 0, 1, 2),
   ``<teachers_dir>/<data>/<arch>-<i>.pth`` for the other data sets; a pretrained
   checkpoint put there is used as it is. Experiments that share a ``--teachers-dir``
   and a ``--cache`` share their teachers and stores (Tables 1, 2 and 4 and Figure 4
   all train ``<arch>-0/1/2``);
2. each teacher is precomputed on one plan, in the experiment's feature form
   (``spatial``, the last-block map the official code matches and the paper's β = 50
   was set for; ``pooled`` to save disk);
3. every row is distilled for every seed into ``<out>/<label>/seed<k>/``; a finished
   run is skipped and a killed one resumes, so running the experiment again finishes
   the grid;
4. the table goes to ``<out>/table.md``: each reproduced figure (mean ± std over the
   seeds) beside the paper's, "n/a" where the paper gives none; the record to
   ``<out>/experiment.json``.

``dry_run`` computes, without writing anything, the disk each store takes in both the
pooled and the spatial form and the teacher forward passes the stores save against
online distillation (:func:`plan_experiment`).

Sources: every setting and every figure comes from the paper (Zhang, Chen, Wang,
"Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022, arXiv
2201.00007): its Tables 1-4, Figure 4 and appendix:

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
and 5e-4, and kdcache defaults to the scripts. Every experiment runs the ``official``
set-up unless told ``setup="paper"`` (Stanford Dogs runs ``cs-kd``); each table's header
says which one ran (:data:`~kdcache.pipelines.grid.SETUPS`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from kdcache.data import DataSet, dataset_names, load_dataset
from kdcache.errors import DatasetError, KdcacheError, UnknownNameError
from kdcache.losses import method_info
from kdcache.models import build_model, feature_dim, map_shape, model_info
from kdcache.pipelines import grid
from kdcache.pipelines.grid import SETUPS, GridSpec, GridTeacher, Row, Setup, find_setup
from kdcache.pipelines.grid_runner import run_grid
from kdcache.pipelines.precompute_cluster import ClusterOptions
from kdcache.store.form import FeatureForm, StoreForm
from kdcache.store.format import STORED_DTYPE
from kdcache.text import human_bytes
from kdcache.views import get_recipe as get_view_recipe

__all__ = ["SETUPS", "Experiment", "ExperimentPlan", "ExperimentResult", "Setup", "Variant", "custom_experiment",
           "experiment_names", "find_experiment", "find_setup", "grid_spec", "plan_experiment",
           "register_experiment", "run_experiment"]

# Stored bytes / compressed bytes of teacher logits + features in each form (benchmarks/RESULTS.md, "Bytes on
# disk per stored row" and "Feature forms"): measured on one digits teacher each, so an estimate here.
COMPRESSION_RATIO = {FeatureForm.POOLED: 1.27, FeatureForm.SPATIAL: 1.86, FeatureForm.NONE: 1.27}

Say = Callable[[str], None]


# -- data sets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSize:
    """What a dry run needs of a data set it cannot read: training images, classes, view side and view recipe."""

    n_train: int
    num_classes: int
    image_size: int
    view_recipe: str


# Published sizes of the data the experiments use, keyed by their data label, for a dry run without the data.
KNOWN_SIZES: dict[str, DataSize] = {
    "cifar100": DataSize(50000, 100, 32, "crop-flip"),
    "cifar10": DataSize(50000, 10, 32, "crop-flip"),
    "tiny-imagenet": DataSize(100000, 200, 64, "crop-flip"),        # 200 classes × 500 train images, 64 px
    "stanford-dogs": DataSize(12000, 120, 224, "resized-crop-flip"),  # 120 breeds × 100 train images
}

DATA_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "tiny-imagenet": "Tiny-ImageNet",
              "stanford-dogs": "Stanford Dogs"}


# -- rows: a method, its options, its teachers ----------------------------------------------------


@dataclass(frozen=True)
class Variant(Row):
    """One row of an experiment's table: a grid :class:`~kdcache.pipelines.grid.Row` (label, method, title,
    options, how many of the experiment's teachers it reads, implemented or only listed) and, for a point of a
    teacher-number sweep (Figure 4), the ``curve`` it belongs to."""

    curve: str | None = None


def variant(label: str, method: str, title: str, n_teachers: int | None = None, curve: str | None = None,
            **options: object) -> Variant:
    """A row with ``options`` given as keywords (``camkd_weights="uniform"``)."""
    return Variant(label, method, title, tuple(options.items()), n_teachers, curve=curve)


def not_implemented(label: str, title: str) -> Variant:
    """A method of the paper's table that kdcache does not implement: shown with its figure, never run."""
    return Variant(label, label, title, implemented=False)


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
    parts: list[str] = []
    curves: dict[str, list[int]] = {}
    for v in variants:
        if v.curve and v.n_teachers is not None:
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
            out.append(Variant(f"{base.label}-k{n}", base.method, f"{base.title}, {n} teacher{'s' if n > 1 else ''}",
                               base.options, n_teachers=n, curve=base.title))
    return tuple(out)


# -- experiments --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
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
    features: FeatureForm = FeatureForm.SPATIAL
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


_REGISTRY: dict[str, Experiment] = {}


def register_experiment(experiment: Experiment, replace: bool = False) -> Experiment:
    """Add ``experiment`` to the registry after checking its names, so a typo fails here and not hours later."""
    if experiment.name in _REGISTRY and not replace:
        raise KdcacheError(f"experiment {experiment.name!r} is already registered")
    _REGISTRY[experiment.name] = check_experiment(experiment)
    return experiment


def custom_experiment(teachers: Sequence[str], student: str, dataset: str = "cifar100") -> Experiment:
    """A setting not in the registry: K teachers to one student, with Table 1's rows.

    It runs the paper's methods over three seeds with the official schedule, like the
    registered experiments; its name records the setting, e.g. ``custom-resnet32x4x3-ShuffleV2``.
    """
    counts = Counter(teachers)
    label = "-".join(f"{a}x{n}" if n > 1 else a for a, n in counts.items())
    return check_experiment(Experiment(name=f"custom-{label}-{student}", table="custom", dataset=dataset,
                                       teachers=tuple(teachers), student=student,
                                       source="given on the command line (kdcache experiment run custom)"))


def check_experiment(experiment: Experiment) -> Experiment:
    """Refuse unknown architectures, methods, options, data set, set-up or form, bad counts and stray figures."""
    name = experiment.name
    if not experiment.teachers:
        raise KdcacheError(f"experiment {name!r} has no teachers")
    for arch in (*experiment.teachers, experiment.student):
        model_info(arch)
    if experiment.dataset not in dataset_names():
        raise UnknownNameError(f"experiment {name!r}: unknown data set {experiment.dataset!r}; "
                               f"known: {', '.join(dataset_names())}")
    find_setup(experiment.setup)
    if not isinstance(experiment.features, FeatureForm):
        raise KdcacheError(f"experiment {name!r}: its feature form must be a FeatureForm "
                           f"({', '.join(f.value for f in FeatureForm)})")
    labels = [v.label for v in experiment.variants]
    if len(set(labels)) != len(labels) or not labels:
        raise KdcacheError(f"experiment {name!r}: its rows need distinct labels (got {', '.join(labels) or 'none'})")
    k = len(experiment.teachers)
    for v in experiment.runs:
        info = method_info(v.method)
        v.method_options()
        if v.n_teachers is not None and not 1 <= v.n_teachers <= k:
            raise KdcacheError(f"experiment {name!r}, row {v.label!r}: {v.n_teachers} teachers of {k}")
        if info.n_teachers == "1" and v.teachers_of(k) != 1:
            raise KdcacheError(f"experiment {name!r}, row {v.label!r}: {v.method} takes one teacher; "
                               "give the row n_teachers=1")
    known = {*labels, "teacher", "ensemble", *(f"teacher {i}" for i in range(1, k + 1))}
    stray = sorted(set(experiment.paper) - known)
    if stray:
        raise KdcacheError(f"experiment {name!r}: paper figures for unknown rows {', '.join(stray)}")
    for label, value in (("seeds", experiment.seeds), ("epochs", experiment.epochs), ("views", experiment.views)):
        if value is not None and value < 1:
            raise KdcacheError(f"experiment {name!r}: {label} must be at least 1 (got {value})")
    return experiment


def experiment_names() -> list[str]:
    """Registered experiment names, in registration order (the paper's order: Tables 1-4, Figure 4, appendix)."""
    return list(_REGISTRY)


def find_experiment(name: str) -> Experiment:
    """The experiment called ``name``; UnknownNameError listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown experiment {name!r}; known: {', '.join(_REGISTRY)} "
                               "(`kdcache experiment list`)") from None


# What each of the paper's tables is, for `kdcache experiment list` and the table headers.
TABLES = {
    "Table 1": "three teachers of one architecture, CIFAR-100",
    "Table 2": "single-teacher methods (one teacher) beside CA-MKD (three teachers), CIFAR-100",
    "Table 3": "three teachers of different architectures, CIFAR-100",
    "Table 4": "ablation of CA-MKD, CIFAR-100",
    "Figure 4": "number of teachers (1 to 4), CIFAR-100",
    "Appendix": "Tiny-ImageNet and Stanford Dogs, multi- and single-teacher rows",
}

_PAPER = "the CA-MKD paper (Zhang, Chen, Wang, ICASSP 2022, arXiv 2201.00007)"
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
    register_experiment(Experiment(
        name=f"t1-{_t}-{_s}", table="Table 1", dataset="cifar100", teachers=(_t,) * 3, student=_s,
        paper=dict(zip(_TABLE1_KEYS, _figures)),
        source=f"{_PAPER}, Table 1, column {_t} → {_s}: teacher = one teacher's accuracy (mean ± std of the three), "
               f"ensemble, student alone and the five methods. {_ENSEMBLE} {_TEACHERS}"))

for _t, _ta, _s, _sa, *_figures in _rows(_TABLE2):
    _fig = dict(zip(_TABLE2_KEYS, [_ta, _sa, *_figures]))
    register_experiment(Experiment(
        name=f"t2-{_t}-{_s}", table="Table 2", dataset="cifar100", teachers=(_t,) * 3, student=_s,
        variants=(CE, *SINGLE_TEACHER, CAMKD), paper=_fig,
        source=f"{_PAPER}, Table 2, row {_t} ({_ta}) → {_s} ({_sa}): KD and FitNet distil from one teacher "
               "(kdcache uses teacher 1, <arch>-0.pth; the paper does not say which of its three it used); AT, VID "
               "and CRD are listed with the paper's figures and not run (kdcache does not implement them); CA-MKD "
               "uses all three teachers, the same runs as Table 1's column (share --teachers-dir and --cache to "
               "reuse the teachers and stores)."
               + (" Table 2 prints CA-MKD's figure here as 75.26 ± 0.13, Table 1 as 75.26 ± 0.32: the Table 2 "
                  "figure is shown." if (_t, _s) == ("resnet32x4", "vgg8") else "")))

register_experiment(Experiment(
    name="t3-resnet8x4-resnet20x4-resnet32x4-vgg8", table="Table 3", dataset="cifar100",
    teachers=("resnet8x4", "resnet20x4", "resnet32x4"), student="vgg8",
    paper={"teacher 1": "72.79", "teacher 2": "78.39", "teacher 3": "79.31", "ce": "70.74 ± 0.40",
           "aver": "74.55 ± 0.24", "fitnet-mkd": "74.47 ± 0.21", "ebkd": "74.07 ± 0.17", "aekd": "74.69 ± 0.29",
           "camkd": "75.96 ± 0.05"},
    source=f"{_PAPER}, Table 3: teachers resnet8x4 (72.79), resnet20x4 (78.39), resnet32x4 (79.31), student vgg8 "
           "(70.74 ± 0.40); the paper gives no ensemble figure here. Its Figure 3 (CA-MKD's per-sample weights per "
           "teacher on this setting) is `kdcache report` on <out>/camkd/seed<k>."))

register_experiment(Experiment(
    name="t4-vgg13-MobileNetV2", table="Table 4", dataset="cifar100", teachers=("vgg13",) * 3,
    student="MobileNetV2", variants=(CAMKD_UNIFORM, CAMKD_BETA0, CAMKD_FEATURE_W, CAMKD),
    paper={"camkd-uniform": "67.74 ± 0.87", "camkd-beta0": "68.11 ± 0.02", "camkd-feature-w": "68.82 ± 0.63",
           "camkd": "69.41 ± 0.20"},
    source=f"{_PAPER}, Table 4 (ablation on vgg13 ×3 → MobileNetV2): uniform weights (w = v = 1/K, "
           "--camkd-weights uniform), no feature term (--beta 0), feature term weighted by w instead of v "
           "(--camkd-feature-weights w), and CA-MKD (equal to Table 1's column). The teachers and CA-MKD runs are "
           "those of t1-vgg13-MobileNetV2."))

register_experiment(Experiment(
    name="f4-resnet56-MobileNetV2", table="Figure 4", dataset="cifar100", teachers=("resnet56",) * 4,
    student="MobileNetV2", variants=(CE, *teacher_sweep((AVER, FITNET_MKD, EBKD, AEKD, CAMKD), (1, 2, 3, 4))),
    source=f"{_PAPER}, Figure 4: student accuracy as the number of teachers grows, CA-MKD against the other "
           "methods, on the paper's example resnet56 → MobileNetV2. The paper draws curves and prints no numbers, "
           "so every paper figure is n/a; it does not say how many teachers its curves reach: here 1 to 4, the "
           "first n of resnet56-0..3.pth."))

register_experiment(Experiment(
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

register_experiment(Experiment(
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

    def features_shape(self, form: FeatureForm) -> tuple[int, ...]:
        """The per-row shape of ``features`` in ``form``: (D,), (C', H, W) or ()."""
        return StoreForm(features=form).feature_shape(self.feature_dim, self.map_shape)

    def row_bytes(self, form: FeatureForm) -> int:
        """Logits plus features of one row, float16."""
        return StoreForm(features=form).row_bytes(self.num_classes, self.features_shape(form))

    @property
    def rows(self) -> int:
        return self.views * self.n_samples

    @property
    def logits_bytes(self) -> int:
        return self.rows * StoreForm().logits_row_bytes(self.num_classes)

    def arrays_bytes(self, form: FeatureForm) -> int:
        """Logits + features: ``V · N · row bytes``."""
        return self.rows * self.row_bytes(form)

    @property
    def head_bytes(self) -> int:
        """The classifier, float32: ``(C · D + C) · 4``."""
        return (self.num_classes * self.feature_dim + self.num_classes) * 4

    def raw_bytes(self, form: FeatureForm) -> int:
        return self.arrays_bytes(form) + self.head_bytes

    def estimated_bytes(self, form: FeatureForm) -> int:
        """On disk after compression: an estimate from the ratio measured in benchmarks/RESULTS.md."""
        return round(self.arrays_bytes(form) / COMPRESSION_RATIO[form]) + self.head_bytes


@dataclass(frozen=True)
class ExperimentPlan:
    """The dry-run numbers of an experiment: stores in both forms, disk, teacher forward passes saved."""

    experiment: Experiment
    n_samples: int
    num_classes: int
    image_size: int
    view_recipe: str
    views: int
    seeds: int
    epochs: int
    setup: Setup
    features: FeatureForm            # the form this run stores
    stores: list[StorePlan]
    plan_bytes: int                  # the shared plan: order (V, N) int32, params (V, N, P) int16, labels (N,) int32

    def total_raw_bytes(self, form: FeatureForm | None = None) -> int:
        return sum(s.raw_bytes(form or self.features) for s in self.stores) + self.plan_bytes

    def total_estimated_bytes(self, form: FeatureForm | None = None) -> int:
        return sum(s.estimated_bytes(form or self.features) for s in self.stores) + self.plan_bytes

    @property
    def online_forward_passes(self) -> int:
        """Teacher forward passes of online distillation: Σ over run rows of seeds × epochs × N × (its teachers)."""
        k = len(self.stores)
        return sum(self.seeds * self.epochs * self.n_samples * v.teachers_of(k) for v in self.experiment.runs)

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
        return self.seeds * len(self.experiment.runs)

    def lines(self) -> list[str]:
        """The dry run, for a person."""
        r, n, v, k, c = self.experiment, self.n_samples, self.views, len(self.stores), self.num_classes
        skipped = [x.label for x in r.variants if not x.implemented]
        out = [f"experiment {r.name} ({r.table}): {r.title} on {DATA_NAMES.get(r.data_label, r.data_label)} "
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
            for form in (FeatureForm.POOLED, FeatureForm.SPATIAL):
                mark = "  <- this run" if form is self.features else ""
                out.append(f"  {form.value:<8} features {_shape((v, n, *s.features_shape(form)))} {STORED_DTYPE}: "
                           f"{s.row_bytes(form):,} B a row × {s.rows:,} rows = {_bytes(s.arrays_bytes(form))} "
                           f"raw, about {human_bytes(s.estimated_bytes(form))} on disk{mark}")
        out.append(f"plan       shared by the {k} stores: order ({v}, {n}) int32, params, labels: "
                   f"{_bytes(self.plan_bytes)}")
        for form in (FeatureForm.POOLED, FeatureForm.SPATIAL):
            which = "this run" if form is self.features else "the other form"
            out.append(f"disk       {form.value:<8} {_bytes(self.total_raw_bytes(form))} raw, about "
                       f"{human_bytes(self.total_estimated_bytes(form))} after compression ({which})")
        if self.features is FeatureForm.NONE:
            out.append(f"disk       {self.features.value:<8} {_bytes(self.total_raw_bytes())} raw (this run)")
        out += ["           compression estimated with the ratios measured on digits teachers (benchmarks/RESULTS.md): "
                f"{COMPRESSION_RATIO[FeatureForm.POOLED]} pooled, {COMPRESSION_RATIO[FeatureForm.SPATIAL]} spatial (post-ReLU maps hold "
                "about half zeros); real maps may compress differently. The paper's β = 50 was set for the spatial "
                "form; at the same β the pooled form pushes the student about 3× harder.",
                f"forward    online: Σ over the rows of seeds × epochs × samples × the row's teachers = "
                f"{self.online_forward_passes:,} teacher forward passes",
                f"           cached: {v} views × {n} samples × {k} teachers = {self.cached_forward_passes:,}",
                f"           saved:  {self.saved_forward_passes:,} ({self.ratio:.1f}× fewer teacher forward "
                "passes; teacher training is the same either way)"]
        return out


def plan_experiment(experiment: Experiment | str, seeds: int | None = None, epochs: int | None = None,
                    views: int | None = None, n_samples: int | None = None, num_classes: int | None = None,
                    image_size: int | None = None, view_recipe: str | None = None, features: FeatureForm | None = None,
                    setup: str | None = None) -> ExperimentPlan:
    """The dry-run numbers of ``experiment``, computed without data, weights or disk.

    The data's size defaults to :data:`KNOWN_SIZES` (CIFAR-100: 50000 training images,
    100 classes, 32 px); feature widths and last-block maps come from running each
    teacher on the meta device.
    """
    experiment = find_experiment(experiment) if isinstance(experiment, str) else experiment
    setup_ = find_setup(setup or experiment.setup)
    seeds, epochs, views = resolve_schedule(experiment, seeds, epochs, views, setup_)
    form = store_form(experiment, features)
    known = KNOWN_SIZES.get(experiment.data_label)
    if known is None:
        if n_samples is None or num_classes is None or image_size is None:
            raise KdcacheError(f"the size of {experiment.data_label} is not known without reading it; "
                               "give --data-root")
        known = DataSize(n_samples, num_classes, image_size, "crop-flip")
    n = int(n_samples if n_samples is not None else known.n_train)
    c = int(num_classes if num_classes is not None else known.num_classes)
    size = int(image_size if image_size is not None else known.image_size)
    view = view_recipe or known.view_recipe
    stores = []
    for arch in experiment.teachers:
        d, m = meta_shapes(arch, c, size)
        stores.append(StorePlan(arch, int(views), n, c, d, m))
    n_params = get_view_recipe(view).n_params
    plan_bytes = views * n * 4 + views * n * n_params * 2 + n * 4
    return ExperimentPlan(experiment, n, c, size, view, views, seeds, epochs, setup_, form, stores, plan_bytes)


def meta_shapes(arch: str, num_classes: int, image_size: int) -> tuple[int, tuple[int, int, int]]:
    """``(D, (C', H, W))`` of ``arch``: its pooled width and its last-block map, on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    return feature_dim(model), map_shape(model, image_size)


def store_form(experiment: Experiment, features: FeatureForm | None = None) -> FeatureForm:
    """The form the experiment's stores take: ``features`` or the experiment's, ``none`` when no row reads features."""
    if features is not None and not isinstance(features, FeatureForm):  # a caller's text: parsed here, once
        try:
            features = FeatureForm(features)
        except ValueError:
            raise KdcacheError(f"--features must be one of {', '.join(f.value for f in FeatureForm)} "
                               f"(got {features!r})") from None
    if not any(method_info(v.method).uses_features for v in experiment.runs):
        return FeatureForm.NONE
    return features or experiment.features


def resolve_schedule(experiment: Experiment, seeds: int | None, epochs: int | None, views: int | None,
                     setup: Setup | None = None) -> tuple[int, int, int]:
    """Seeds, student epochs and views of a run: the experiment's (or its set-up's) unless overridden.

    A shorter ``epochs`` without ``views`` stores only as many views as the students use.
    """
    setup = setup or find_setup(experiment.setup)
    base_epochs = experiment.epochs or setup.epochs
    base_views = experiment.views or base_epochs
    seeds = experiment.seeds if seeds is None else seeds
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


# -- running an experiment --------------------------------------------------------------------


@dataclass
class ExperimentResult:
    """What an experiment run did (its grid's result and table) or, for a dry run, would do."""

    experiment: Experiment
    out: Path
    plan: ExperimentPlan
    lines: list[str] = field(default_factory=list)        # the dry run's account
    grid: grid.GridResult | None = None                    # None for a dry run
    table: str | None = None                               # table.md's text


def teachers_folder(experiment: Experiment, teachers_dir: Path) -> Path:
    """Where the teacher checkpoints are: ``teachers_dir`` for CIFAR-100, ``teachers_dir/<data>`` otherwise."""
    if experiment.data_label == "cifar100":
        return Path(teachers_dir)
    return Path(teachers_dir) / experiment.data_label


def teacher_checkpoints(experiment: Experiment, teachers_dir: Path) -> list[tuple[str, Path, int]]:
    """``(arch, <folder>/<arch>-<i>.pth, seed i)`` per teacher; ``i`` counts teachers of one architecture."""
    folder = teachers_folder(experiment, teachers_dir)
    seen: Counter[str] = Counter()
    out = []
    for arch in experiment.teachers:
        i = seen[arch]
        seen[arch] += 1
        out.append((arch, folder / f"{arch}-{i}.pth", i))
    return out


def grid_spec(experiment: Experiment, data_root: Path | None, cache: Path | None, out: Path,
              teachers_dir: Path | None = None, seeds: int | None = None, epochs: int | None = None,
              views: int | None = None, teacher_epochs: int | None = None, features: FeatureForm | None = None,
              setup: str | None = None) -> GridSpec:
    """The experiment as a grid: its teachers in ``teachers_dir`` (default ``<out>/teachers``), trained for
    ``teacher_epochs`` (default the student epochs) when missing, its runs under ``out``; seeds, epochs,
    views, the feature form and the set-up are the experiment's unless given."""
    setup_ = find_setup(setup or experiment.setup)
    seeds, epochs, views = resolve_schedule(experiment, seeds, epochs, views, setup_)
    teacher_epochs = epochs if teacher_epochs is None else teacher_epochs
    if teacher_epochs < 1:
        raise KdcacheError(f"--teacher-epochs must be at least 1 (got {teacher_epochs})")
    out = Path(out)
    teachers_dir = Path(teachers_dir) if teachers_dir is not None else out / "teachers"
    teachers = tuple(GridTeacher(arch, ckpt, teacher_epochs, seed)
                     for arch, ckpt, seed in teacher_checkpoints(experiment, teachers_dir))
    return GridSpec(name=experiment.name, dataset=experiment.dataset, teachers=teachers, student=experiment.student,
                    rows=experiment.variants, out=out, runs=out, views=views, epochs=epochs, seeds=seeds,
                    features=store_form(experiment, features), plan_seed=experiment.plan_seed, setup=setup_,
                    cache=cache, data_root=data_root,
                    data_name=DATA_NAMES.get(experiment.data_label, experiment.data_label))


def run_experiment(name: str | Experiment, data_root: Path | None, cache: Path | None, out: Path,
                   teachers_dir: Path | None = None, seeds: int | None = None, epochs: int | None = None,
                   views: int | None = None, device: str | None = None, dry_run: bool = False,
                   teacher_epochs: int | None = None, features: FeatureForm | None = None, setup: str | None = None,
                   say: Say | None = None, precompute_progress: grid.Progress | None = None,
                   cluster: ClusterOptions | None = None) -> ExperimentResult:
    """Run an experiment end to end (teachers, stores, every row × seed, the table), resuming what exists.

    ``teachers_dir`` defaults to ``<out>/teachers``; ``teacher_epochs`` (for teachers trained here)
    to the student epochs; ``features`` (``spatial`` or ``pooled``) and ``setup`` to the experiment's.
    ``say`` is told each step; ``dry_run`` only computes and describes; ``cluster``: run on dask.
    The table and the JSON record are written as each run finishes or fails, and at the end.
    """
    experiment = find_experiment(name) if isinstance(name, str) else name
    spec = grid_spec(experiment, data_root, cache, out, teachers_dir, seeds, epochs, views, teacher_epochs,
                     features, setup)
    if dry_run:
        return _dry_run(experiment, spec)

    dataset = load_dataset(experiment.dataset, data_root)
    _check_views(experiment, dataset)
    plan = plan_experiment(experiment, spec.seeds, spec.epochs, spec.views, len(dataset.train), dataset.num_classes,
                           dataset.image_size, dataset.recipe, spec.features, spec.setup.name)
    result = ExperimentResult(experiment, spec.out, plan)

    def write(found: grid.GridResult) -> None:
        result.grid = found
        result.table = format_table(result)
        (spec.out / "table.md").write_text(result.table)
        grid.write_result(spec.out / "experiment.json", found, experiment=asdict(experiment))

    write(run_grid(spec, device, say, precompute_progress, dataset=dataset, cluster=cluster, on_update=write))
    return result


def _check_views(experiment: Experiment, dataset: DataSet) -> None:
    """Refuse, before any work, a data set whose views are not the experiment's (size or augmentation)."""
    known = KNOWN_SIZES.get(experiment.data_label)
    if known is None:
        return
    if (dataset.image_size, dataset.recipe.partition(":")[0]) != (known.image_size, known.view_recipe):
        raise KdcacheError(
            f"experiment {experiment.name} needs {known.image_size}×{known.image_size} {known.view_recipe} views of "
            f"{DATA_NAMES.get(experiment.data_label, experiment.data_label)}, but data set {experiment.dataset} "
            f"gives {dataset.image_size}×{dataset.image_size} {dataset.recipe} views")


def _dry_run(experiment: Experiment, spec: GridSpec) -> ExperimentResult:
    """Compute and describe, writing nothing; reads the data set for its size when it is there."""
    known = KNOWN_SIZES.get(experiment.data_label)
    label = DATA_NAMES.get(experiment.data_label, experiment.data_label)
    try:
        dataset = load_dataset(experiment.dataset, spec.data_root)
        n, c, size, view = len(dataset.train), dataset.num_classes, dataset.image_size, dataset.recipe
        where = f"{n} training samples, {c} classes, read from {spec.data_root}"
    except DatasetError:
        if known is None:
            raise
        n, c, size, view = known.n_train, known.num_classes, known.image_size, known.view_recipe
        where = (f"{n} training samples, {c} classes, {size} px: {label}'s published size "
                 f"(not found under {spec.data_root}; needed for the real run)")
    plan = plan_experiment(experiment, spec.seeds, spec.epochs, spec.views, n, c, size, view, spec.features,
                           spec.setup.name)
    lines = plan.lines()
    lines.insert(1, f"data set   {where}")
    for i, t in enumerate(spec.teachers, 1):
        what = {"done": "found, used as it is",
                "partial": f"found part-trained, training resumes to {t.epochs} epochs",
                "missing": f"missing, will be trained for {t.epochs} epochs (seed {t.seed})",
                }[grid.teacher_state(t.checkpoint, t.epochs)]
        lines.append(f"teacher {i}  {t.checkpoint}: {what}")
    finished = sum(spec.run_dir(r.label, s).finished for r in spec.ran for s in range(spec.seeds))
    lines.append(f"runs       {plan.n_runs} student runs under {spec.runs}, {finished} already finished")
    return ExperimentResult(experiment, spec.out, plan, lines=lines)


# -- the table --------------------------------------------------------------------------------

_PAPER_NOTE = "paper: the figure the paper prints (mean ± std over 3 seeds), \"n/a\" where it gives none"


def format_table(result: ExperimentResult) -> str:
    """The experiment's table (:func:`kdcache.pipelines.grid.format_table`) with the paper's figure beside each
    reproduced one, Figure 4's curves when the experiment sweeps the number of teachers, and the source."""
    r, found = result.experiment, result.grid
    assert found is not None, "a dry run has no table"
    data = DATA_NAMES.get(r.data_label, r.data_label)
    return grid.format_table(
        found, title=f"{r.name}: CA-MKD {r.table}, {r.title} on {data}",
        about=[f"{r.table}: {TABLES.get(r.table, 'a setting given on the command line')}."],
        reference=grid.Reference("paper", r.paper, _PAPER_NOTE), after=_curves(result),
        notes=[f"Source of the setting: {r.source}"])


def _curves(result: ExperimentResult) -> list[str]:
    """Figure 4's curves as a grid (rows: methods, columns: number of teachers), when the experiment sweeps K."""
    points = [v for v in result.experiment.runs if v.curve]
    if not points or result.grid is None:
        return []
    students = result.grid.students
    k = len(result.experiment.teachers)
    counts = sorted({v.teachers_of(k) for v in points})
    curves = list(dict.fromkeys(v.curve for v in points))
    out = ["", "Reproduced best-epoch top-1 by number of teachers (the paper's Figure 4 draws these curves):", "",
           "| | " + " | ".join(f"{n} teacher{'s' if n > 1 else ''}" for n in counts) + " |",
           "|---|" + "---|" * len(counts)]
    for curve in curves:
        cells = []
        for n in counts:
            v = next((p for p in points if p.curve == curve and p.teachers_of(k) == n), None)
            runs = students.get(v.label, []) if v else []
            cells.append(grid.mean_std([x["best"] for x in runs]) if runs else "n/a")
        out.append(f"| {curve} | " + " | ".join(cells) + " |")
    return out
