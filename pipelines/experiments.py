"""The CA-MKD paper's settings as experiments: one call per setting, from raw data to the paper's table.

An experiment (:class:`~kdcache.pipelines.experiment_spec.Experiment`) names a data set, K
teacher architectures, a student and the rows of its table; the paper's settings are data in
:mod:`kdcache.pipelines.paper_settings`, added to this module's registry (a
:class:`kdcache.registry.Registry`, open to plug-ins through :func:`register_experiment`) at
its first lookup. :func:`run_experiment` builds the experiment's grid (:func:`grid_spec`) and
runs it with :func:`~kdcache.pipelines.grid_runner.run_grid`, the runner ``kdcache demo`` uses too:

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
pooled and the spatial form (bytes a row and a store from :func:`kdcache.store.sizes.store_size`,
the figures ``kdcache sizes`` prints, with an estimate of compression on top) and the teacher
forward passes the stores save against online distillation (:func:`plan_experiment`).

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
from typing import Sequence

import torch

from kdcache import atomic
from kdcache.data import DataSet, dataset_names, load_dataset
from kdcache.errors import DatasetError, KdcacheError, UnknownNameError
from kdcache.losses import method_info
from kdcache.models import build_model, feature_dim, map_shape, model_info
from kdcache.pipelines import grid
from kdcache.pipelines.experiment_spec import Experiment
from kdcache.pipelines.grid import GridSpec, GridTeacher, Setup, find_setup
from kdcache.pipelines.grid_runner import run_grid
from kdcache.pipelines.precompute_cluster import ClusterOptions
from kdcache.registry import Registry, builtin_registrations
from kdcache.store.form import FeatureForm, StoreForm
from kdcache.store.format import STORED_DTYPE
from kdcache.store.layout import StoreShape
from kdcache.store.sizes import StoreSize, store_size
from kdcache.text import human_bytes
from kdcache.views import get_recipe as get_view_recipe

# Experiment is defined in experiment_spec (with the rows); named here too for a plug-in registering its own.
__all__ = ["Experiment", "ExperimentPlan", "ExperimentResult", "custom_experiment", "experiment_names",
           "find_experiment", "grid_spec", "plan_experiment", "register_experiment", "run_experiment",
           "teacher_checkpoints"]

# Stored bytes / compressed bytes of teacher logits + features in each form (benchmarks/RESULTS.md, "Bytes on
# disk per stored row" and "Feature forms"): measured on one digits teacher each, so an estimate here.
COMPRESSION_RATIO = {FeatureForm.POOLED: 1.27, FeatureForm.SPATIAL: 1.86, FeatureForm.NONE: 1.27}


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


# -- the registry -------------------------------------------------------------------------------

_EXPERIMENTS: Registry[Experiment] = Registry("experiment")
_paper_added = False


def _registry() -> Registry[Experiment]:
    """The experiments' registry with the paper's settings in it: their module is imported and they are added at
    the first use, so that importing this module (or the command line) reads no setting."""
    global _paper_added
    if not _paper_added:
        _paper_added = True
        from kdcache.pipelines.paper_settings import PAPER_EXPERIMENTS

        # all added before any is checked: checking loads the plug-ins, whose experiments come after the paper's;
        # kdcache's own even when a plug-in's register_experiment makes this first use (its failure keeps them)
        with builtin_registrations():
            for e in PAPER_EXPERIMENTS:
                _EXPERIMENTS.add(e.name, e)
        for e in PAPER_EXPERIMENTS:
            check_experiment(e)
    return _EXPERIMENTS


def register_experiment(experiment: Experiment, replace: bool = False) -> Experiment:
    """Add ``experiment`` to the registry after checking its names, so a typo fails here and not hours later."""
    registry = _registry()
    return registry.add(experiment.name, check_experiment(experiment), replace=replace)


def experiment_names() -> list[str]:
    """Registered experiment names, in registration order (the paper's: Tables 1-4, Figure 4, appendix; then
    the plug-ins')."""
    return _registry().names()


def find_experiment(name: str) -> Experiment:
    """The experiment called ``name``; UnknownNameError listing the known ones otherwise."""
    try:
        return _registry().get(name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc} (`kdcache experiment list`)") from None


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
    for v in experiment.ran:
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


# -- the dry-run arithmetic -------------------------------------------------------------------


@dataclass(frozen=True)
class StorePlan:
    """What one teacher store holds, in each feature form: array shapes, and bytes before compression from
    :func:`kdcache.store.sizes.store_size` (what ``kdcache sizes`` prints), with a compression estimate on top."""

    arch: str
    views: int
    n_samples: int
    num_classes: int
    feature_dim: int                 # D of the pooled form
    map_shape: tuple[int, int, int]  # (C', H, W) of the spatial form

    @property
    def shape(self) -> StoreShape:
        return StoreShape(self.views, self.n_samples, self.num_classes, self.feature_dim, self.map_shape)

    def features_shape(self, form: FeatureForm) -> tuple[int, ...]:
        """The per-row shape of ``features`` in ``form``: (D,), (C', H, W) or ()."""
        return self.shape.feature_shape(StoreForm(features=form))

    def size(self, form: FeatureForm) -> StoreSize:
        """The store with dense logits and float16 features in ``form``, uncompressed: the one place the dry run
        asks the store's own arithmetic (what ``kdcache sizes`` prints) for its figures."""
        return store_size(StoreForm(features=form), self.shape)

    def row_bytes(self, form: FeatureForm) -> int:
        """Logits plus features of one row, float16."""
        return self.size(form).row_bytes

    @property
    def rows(self) -> int:
        return self.views * self.n_samples

    @property
    def logits_bytes(self) -> int:
        """The logits alone: the store without features."""
        return self.size(FeatureForm.NONE).store_bytes

    def arrays_bytes(self, form: FeatureForm) -> int:
        """Logits + features: ``V · N · row bytes``."""
        return self.size(form).store_bytes

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
        return sum(self.seeds * self.epochs * self.n_samples * v.teachers_of(k) for v in self.experiment.ran)

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
        return self.seeds * len(self.experiment.ran)

    def lines(self) -> list[str]:
        """The dry run, for a person."""
        r, n, v, k, c = self.experiment, self.n_samples, self.views, len(self.stores), self.num_classes
        skipped = [x.label for x in r.variants if not x.implemented]
        out = [f"experiment {r.name} ({r.table}): {r.title} on {r.data_name} "
               f"(data set {r.dataset})",
               f"set-up     {self.setup.name}: {self.setup.description}",
               f"rows       {', '.join(x.label for x in r.ran)} × {self.seeds} seeds × {self.epochs} epochs = "
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
                f"{COMPRESSION_RATIO[FeatureForm.POOLED]} pooled, {COMPRESSION_RATIO[FeatureForm.SPATIAL]} spatial "
                "(post-ReLU maps hold about half zeros); real maps may compress differently. The paper's β = 50 was set "
                "for the spatial form; at the same β the pooled form pushes the student about 3× harder.",
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
    if not any(method_info(v.method).uses_features for v in experiment.ran):
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
                    data_name=experiment.data_name)


def run_experiment(name: str | Experiment, data_root: Path | None, cache: Path | None, out: Path,
                   teachers_dir: Path | None = None, seeds: int | None = None, epochs: int | None = None,
                   views: int | None = None, device: str | None = None, dry_run: bool = False,
                   teacher_epochs: int | None = None, features: FeatureForm | None = None, setup: str | None = None,
                   say: grid.Say | None = None, precompute_progress: grid.Progress | None = None,
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
        atomic.write_bytes(spec.out / "table.md", result.table.encode())  # whole or not at all
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
            f"{experiment.data_name}, but data set {experiment.dataset} gives {dataset.image_size}×{dataset.image_size} "
            f"{dataset.recipe} views")


def _dry_run(experiment: Experiment, spec: GridSpec) -> ExperimentResult:
    """Compute and describe, writing nothing; reads the data set for its size when it is there."""
    known = KNOWN_SIZES.get(experiment.data_label)
    try:
        dataset = load_dataset(experiment.dataset, spec.data_root)
        n, c, size, view = len(dataset.train), dataset.num_classes, dataset.image_size, dataset.recipe
        where = f"{n} training samples, {c} classes, read from {spec.data_root}"
    except DatasetError:
        if known is None:
            raise
        n, c, size, view = known.n_train, known.num_classes, known.image_size, known.view_recipe
        where = (f"{n} training samples, {c} classes, {size} px: {experiment.data_name}'s published size "
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
    from kdcache.pipelines.paper_settings import TABLES

    r, found = result.experiment, result.grid
    assert found is not None, "a dry run has no table"
    return grid.format_table(
        found, title=f"{r.name}: CA-MKD {r.table}, {r.title} on {r.data_name}",
        about=[f"{r.table}: {TABLES.get(r.table, 'a setting given on the command line')}."],
        reference=grid.Reference("paper", r.paper, _PAPER_NOTE), after=_curves(result),
        notes=[f"Source of the setting: {r.source}"])


def _curves(result: ExperimentResult) -> list[str]:
    """Figure 4's curves as a grid (rows: methods, columns: number of teachers), when the experiment sweeps K."""
    points = [v for v in result.experiment.ran if v.curve]
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
