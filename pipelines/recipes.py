"""The CA-MKD paper's recipes: one call per setting of its Table 1 and Table 3, end to end.

A recipe names a data set, K teacher architectures, a student and the methods the
paper compares. :func:`run_recipe` takes it from raw data to the paper's table:

1. each teacher is trained with :func:`~kdcache.pipelines.train_teacher.train_teacher`
   unless ``<teachers_dir>/<arch>-<i>.pth`` exists (``i`` counts the teachers of one
   architecture, so three resnet32x4 teachers are ``resnet32x4-0/1/2.pth``, trained
   with seeds 0, 1, 2); a pretrained checkpoint put there is used as it is;
2. each teacher is precomputed with the same views and plan seed, so all K stores
   share one plan;
3. every method is distilled for every seed into ``<out>/<method>/seed<k>/``; a run
   whose ``last.pth`` exists is skipped and a killed one resumes, so running the
   recipe again finishes the grid;
4. the table, in the paper's layout, goes to ``<out>/table.md``.

``dry_run`` computes, without writing anything, the disk each store takes and the
teacher forward passes the stores save against online distillation
(:func:`plan_recipe`).

Sources of the settings (looked up for this module; the paper's PDF itself was not
available to us, only its first page):

- The official code, https://github.com/Rorozhl/CA-MKD (commit acc8c2b):
  ``scripts/run.sh`` runs every compared method (AVER, FitNet-MKD, EBKD, AEKD,
  CA-MKD) with ``--model_s vgg8 --teacher_num 3``, and ``setting.py`` lists the
  teachers ``cifar100-resnet32x4-0/1/2``: three resnet32x4 teachers to a vgg8
  student on CIFAR-100, the setting the paper's Table 1 (teachers of one
  architecture) is built around.
- The authors' follow-up, https://github.com/Rorozhl/MMKD (ICME 2023, same
  comparison code): ``setting.py`` lists three vgg13 teachers (``cifar100-vgg13-0/1/2``)
  and, commented out, the mixed triple ``resnet56, resnet20x4, vgg13``; its README
  runs them with ``--model_s vgg8 --teacher_num 3``.

Not found: the exact list of teacher/student columns of the paper's Table 1 and
Table 3, and every number the paper reports. So each recipe's ``paper`` figures
are empty (the table prints "n/a"), the vgg13 and mixed-teacher recipes are the
closest documented settings rather than confirmed columns, and the Table 3
student is vgg8 because it is the only student the official scripts name. Each
recipe's ``source`` says which of these applies.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from kdcache import training
from kdcache.data import dataset_names, load_dataset
from kdcache.errors import CheckpointError, DatasetError, KdcacheError, UnknownNameError
from kdcache.evaluate import ensemble_accuracy
from kdcache.losses import method_info
from kdcache.models import build_model, feature_dim, model_info
from kdcache.models.checkpoint import read_checkpoint
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher
from kdcache.runs import load_run
from kdcache.store import Cache
from kdcache.store.format import STORED_DTYPE
from kdcache.text import human_bytes
from kdcache.views import get_recipe as get_view_recipe

# ce is the paper's "Student" row (the student trained alone); the others its compared methods.
PAPER_METHODS = ("ce", "aver", "fitnet-mkd", "ebkd", "aekd", "camkd")
METHOD_LABELS = {"ce": "Student", "aver": "AVER", "fitnet-mkd": "FitNet-MKD", "ebkd": "EBKD", "aekd": "AEKD",
                 "camkd": "CA-MKD", "kd": "KD", "fitnet": "FitNet"}

# Stored bytes / compressed bytes of teacher logits + features, Blosc zstd-1 bit shuffle
# (benchmarks/RESULTS.md, "Bytes on disk per stored row"): measured on one store, so an estimate here.
COMPRESSION_RATIO = 1.27

# Training split size and class count of the data sets recipes use, for a dry run without the data.
KNOWN_SIZES = {"cifar100": (50000, 100), "cifar10": (50000, 10)}

_STORED_ITEMSIZE = {"float16": 2, "float32": 4}[STORED_DTYPE]

Say = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """One setting of the paper: data set, K teacher architectures, student, methods and schedule."""

    name: str
    table: str                       # the paper's table this setting belongs to, e.g. "Table 1"
    dataset: str
    teachers: tuple[str, ...]
    student: str
    methods: tuple[str, ...] = PAPER_METHODS
    seeds: int = 3
    epochs: int = training.EPOCHS
    views: int = training.EPOCHS     # one fresh view per student epoch
    plan_seed: int = 0
    source: str = ""                 # where the setting was found, and what is not confirmed
    paper: dict[str, str] = field(default_factory=dict)  # row label -> the paper's figure, when known

    @property
    def title(self) -> str:
        """'resnet32x4 ×3 → vgg8' or 'resnet56 + resnet20x4 + vgg13 → vgg8'."""
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
    """A setting not in the registry (any column of the paper's tables): K teachers to one student.

    It runs the paper's methods over three seeds with the official schedule, like
    the registered recipes; its name records the setting, e.g. ``custom-resnet32x4x3-ShuffleV2``.
    """
    counts = Counter(teachers)
    label = "-".join(f"{a}x{n}" if n > 1 else a for a, n in counts.items())
    return check_recipe(Recipe(name=f"custom-{label}-{student}", table="custom", dataset=dataset,
                               teachers=tuple(teachers), student=student,
                               source="given on the command line (kdcache recipe run custom)"))


def check_recipe(recipe: Recipe) -> Recipe:
    """Refuse unknown architectures, methods or data set and non-positive counts; return the recipe."""
    if not recipe.teachers:
        raise KdcacheError(f"recipe {recipe.name!r} has no teachers")
    for arch in (*recipe.teachers, recipe.student):
        model_info(arch)
    for method in recipe.methods:
        method_info(method)
    if recipe.dataset not in dataset_names():
        raise UnknownNameError(f"recipe {recipe.name!r}: unknown data set {recipe.dataset!r}; "
                               f"known: {', '.join(dataset_names())}")
    for label, value in (("seeds", recipe.seeds), ("epochs", recipe.epochs), ("views", recipe.views)):
        if value < 1:
            raise KdcacheError(f"recipe {recipe.name!r}: {label} must be at least 1 (got {value})")
    return recipe


def unregister_recipe(name: str) -> None:
    """Remove a recipe (for tests that register a tiny one)."""
    _REGISTRY.pop(name, None)


def recipe_names() -> list[str]:
    """Registered recipe names, in registration order."""
    return list(_REGISTRY)


def find_recipe(name: str) -> Recipe:
    """The recipe called ``name``; UnknownNameError listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown recipe {name!r}; known: {', '.join(_REGISTRY)} "
                               "(`kdcache recipe list`)") from None


_OFFICIAL = ("Rorozhl/CA-MKD scripts/run.sh (every method with --model_s vgg8 --teacher_num 3) and "
             "setting.py (teachers cifar100-resnet32x4-0/1/2), commit acc8c2b")
_FOLLOW_UP = ("Rorozhl/MMKD setting.py and README (the authors' ICME 2023 follow-up, same comparison code)")

register_recipe(Recipe(
    name="t1-resnet32x4-vgg8", table="Table 1", dataset="cifar100", teachers=("resnet32x4",) * 3, student="vgg8",
    source=f"{_OFFICIAL}. The paper's reported figures for this column were not found."))
register_recipe(Recipe(
    name="t1-vgg13-vgg8", table="Table 1", dataset="cifar100", teachers=("vgg13",) * 3, student="vgg8",
    source=f"{_FOLLOW_UP}: teachers cifar100-vgg13-0/1/2, student vgg8. Not confirmed as a column of the "
           "CA-MKD paper's Table 1 (its column list was not found); the paper's figures were not found."))
register_recipe(Recipe(
    name="t3-resnet56-resnet20x4-vgg13-vgg8", table="Table 3", dataset="cifar100",
    teachers=("resnet56", "resnet20x4", "vgg13"), student="vgg8",
    source=f"{_FOLLOW_UP}: the mixed teacher triple resnet56, resnet20x4, vgg13. The CA-MKD paper's Table 3 "
           "columns were not found: these teachers are the authors' documented mixed set and vgg8 is the only "
           "student their scripts name, so this is the closest documented setting; the paper's figures were "
           "not found."))


# -- the dry-run arithmetic -------------------------------------------------------------------


@dataclass(frozen=True)
class StorePlan:
    """What one teacher store holds: array shapes and bytes before compression."""

    arch: str
    feature_dim: int
    logits_shape: tuple[int, int, int]
    features_shape: tuple[int, int, int]
    logits_bytes: int
    features_bytes: int
    head_bytes: int                  # the classifier, float32

    @property
    def arrays_bytes(self) -> int:
        """Logits + features: ``V · N · (C + D) · itemsize``."""
        return self.logits_bytes + self.features_bytes

    @property
    def raw_bytes(self) -> int:
        return self.arrays_bytes + self.head_bytes

    @property
    def estimated_bytes(self) -> int:
        """On disk after compression: an estimate from the ratio measured in benchmarks/RESULTS.md."""
        return round(self.arrays_bytes / COMPRESSION_RATIO) + self.head_bytes


@dataclass(frozen=True)
class RecipePlan:
    """The dry-run numbers of a recipe: stores, disk, and teacher forward passes saved against online training."""

    recipe: Recipe
    n_samples: int
    num_classes: int
    views: int
    seeds: int
    epochs: int
    stores: list[StorePlan]
    plan_bytes: int                  # the shared plan: order (V, N) int32, params (V, N, P) int16, labels (N,) int32
    methods_with_teachers: int

    @property
    def total_raw_bytes(self) -> int:
        return sum(s.raw_bytes for s in self.stores) + self.plan_bytes

    @property
    def total_estimated_bytes(self) -> int:
        return sum(s.estimated_bytes for s in self.stores) + self.plan_bytes

    @property
    def online_forward_passes(self) -> int:
        """Teacher forward passes of online distillation: methods × seeds × epochs × N × K."""
        return self.methods_with_teachers * self.seeds * self.epochs * self.n_samples * len(self.stores)

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

    def lines(self) -> list[str]:
        """The dry run, for a person."""
        r, n, v, k = self.recipe, self.n_samples, self.views, len(self.stores)
        out = [f"recipe     {r.name} ({r.table} setting): {r.title} on {r.dataset}",
               f"grid       methods {', '.join(r.methods)} × {self.seeds} seeds × {self.epochs} epochs; "
               f"{v} views, plan seed {r.plan_seed}"]
        for i, s in enumerate(self.stores, 1):
            out += [f"store {i}    {s.arch} (D = {s.feature_dim}): logits {_shape(s.logits_shape)} {STORED_DTYPE} "
                    f"{_bytes(s.logits_bytes)} + features {_shape(s.features_shape)} {STORED_DTYPE} "
                    f"{_bytes(s.features_bytes)} + head {_bytes(s.head_bytes)}",
                    f"           = {_bytes(s.raw_bytes)} raw, about {_bytes(s.estimated_bytes)} on disk "
                    f"(estimate: compression ratio {COMPRESSION_RATIO} measured in benchmarks/RESULTS.md)"]
        out += [f"plan       shared by the {k} stores: order ({v}, {n}) int32, params, labels: "
                f"{_bytes(self.plan_bytes)}",
                f"disk       {_bytes(self.total_raw_bytes)} raw, about {_bytes(self.total_estimated_bytes)} after "
                f"compression (estimate)",
                f"forward    online: {self.methods_with_teachers} methods using teachers × {self.seeds} seeds × "
                f"{self.epochs} epochs × {n} samples × {k} teachers = {self.online_forward_passes:,} teacher "
                "forward passes",
                f"           cached: {v} views × {n} samples × {k} teachers = {self.cached_forward_passes:,}",
                f"           saved:  {self.saved_forward_passes:,} ({self.ratio:.1f}× fewer teacher forward "
                "passes; teacher training is the same either way)"]
        return out


def plan_recipe(recipe: Recipe | str, seeds: int | None = None, epochs: int | None = None, views: int | None = None,
                n_samples: int | None = None, num_classes: int | None = None) -> RecipePlan:
    """The dry-run numbers of ``recipe``, computed without data, weights or disk.

    ``n_samples`` and ``num_classes`` default to the data set's published size (CIFAR: 50000
    training images); feature widths come from building each model on the meta device.
    """
    recipe = find_recipe(recipe) if isinstance(recipe, str) else recipe
    seeds, epochs, views = resolve_schedule(recipe, seeds, epochs, views)
    if n_samples is None or num_classes is None:
        if recipe.dataset not in KNOWN_SIZES:
            raise KdcacheError(f"the size of {recipe.dataset} is not known without reading it; pass n_samples "
                               "and num_classes")
        known_n, known_c = KNOWN_SIZES[recipe.dataset]
        n_samples = known_n if n_samples is None else n_samples
        num_classes = known_c if num_classes is None else num_classes
    n, c, v = int(n_samples), int(num_classes), int(views)
    stores = []
    for arch in recipe.teachers:
        d = meta_feature_dim(arch, c)
        stores.append(StorePlan(arch, d, (v, n, c), (v, n, d), v * n * c * _STORED_ITEMSIZE,
                                v * n * d * _STORED_ITEMSIZE, (c * d + c) * 4))
    n_params = get_view_recipe(_view_recipe_of(recipe.dataset)).n_params
    plan_bytes = v * n * 4 + v * n * n_params * 2 + n * 4
    with_teachers = sum(method_info(m).n_teachers != "0" for m in recipe.methods)
    return RecipePlan(recipe, n, c, v, seeds, epochs, stores, plan_bytes, with_teachers)


def meta_feature_dim(arch: str, num_classes: int) -> int:
    """Width of ``arch``'s penultimate features, from a model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return feature_dim(build_model(arch, num_classes))


def resolve_schedule(recipe: Recipe, seeds: int | None, epochs: int | None,
                     views: int | None) -> tuple[int, int, int]:
    """Seeds, student epochs and views of a run: the recipe's unless overridden.

    A shorter ``epochs`` without ``views`` stores only as many views as the students use.
    """
    seeds = recipe.seeds if seeds is None else seeds
    views = views if views is not None else (recipe.views if epochs is None else min(recipe.views, epochs))
    epochs = recipe.epochs if epochs is None else epochs
    for label, value in (("--seeds", seeds), ("--epochs", epochs), ("--views", views)):
        if value < 1:
            raise KdcacheError(f"{label} must be at least 1 (got {value})")
    return seeds, epochs, views


def _view_recipe_of(dataset: str) -> str:
    return "crop-flip" if dataset in ("cifar10", "cifar100", "digits") else "resized-crop-flip"


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(x) for x in shape) + ")"


def _bytes(n: int) -> str:
    return f"{human_bytes(n)} ({n:,} B)"


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
    ensemble: float | None = None
    students: dict[str, list[dict]] = field(default_factory=dict)  # method -> [{seed, best, last}]
    reused: dict[str, int] = field(default_factory=dict)   # teachers, stores, runs found done


def teacher_checkpoints(recipe: Recipe, teachers_dir: Path) -> list[tuple[str, Path, int]]:
    """``(arch, <teachers_dir>/<arch>-<i>.pth, seed i)`` per teacher; ``i`` counts teachers of one architecture."""
    seen: Counter[str] = Counter()
    out = []
    for arch in recipe.teachers:
        i = seen[arch]
        seen[arch] += 1
        out.append((arch, Path(teachers_dir) / f"{arch}-{i}.pth", i))
    return out


def run_recipe(name: str | Recipe, data_root: Path | None, cache: Path | None, out: Path,
               teachers_dir: Path | None = None, seeds: int | None = None, epochs: int | None = None,
               views: int | None = None, device: str | None = None, dry_run: bool = False,
               teacher_epochs: int | None = None, say: Say | None = None,
               precompute_progress: Callable[[int, int], Callable[[int], None]] | None = None) -> RecipeResult:
    """Run a recipe end to end (teachers, stores, every method × seed, the table), resuming what exists.

    ``teachers_dir`` defaults to ``<out>/teachers``; ``teacher_epochs`` (for teachers trained here)
    to the student epochs. ``say`` is told each step; ``dry_run`` only computes and describes.
    """
    recipe = find_recipe(name) if isinstance(name, str) else name
    seeds, epochs, views = resolve_schedule(recipe, seeds, epochs, views)
    teacher_epochs = epochs if teacher_epochs is None else teacher_epochs
    if teacher_epochs < 1:
        raise KdcacheError(f"--teacher-epochs must be at least 1 (got {teacher_epochs})")
    out = Path(out)
    teachers_dir = Path(teachers_dir) if teachers_dir is not None else out / "teachers"
    say = say or (lambda _msg: None)
    ckpts = teacher_checkpoints(recipe, teachers_dir)

    if dry_run:
        return _dry_run(recipe, data_root, out, ckpts, seeds, epochs, views, teacher_epochs)

    dataset = load_dataset(recipe.dataset, data_root)
    plan = plan_recipe(recipe, seeds, epochs, views, len(dataset.train), dataset.num_classes)
    result = RecipeResult(recipe, out, plan, reused={"teachers": 0, "stores": 0, "runs": 0})

    for i, (arch, ckpt, seed) in enumerate(ckpts, 1):
        state = _checkpoint_state(ckpt, teacher_epochs)
        if state == "done":
            result.reused["teachers"] += 1
            continue
        say(f"teacher {i}/{len(ckpts)}: training {arch} for {teacher_epochs} epochs (seed {seed}) into {ckpt}"
            f"{' (resuming)' if state == 'partial' else ''}")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        train_teacher(TrainTeacherRequest(arch=arch, dataset=recipe.dataset, out=ckpt, data_root=data_root,
                                          epochs=teacher_epochs, seed=seed, device=device,
                                          resume=state == "partial"))

    ids = []
    store_cache = Cache.at(cache)
    for i, (arch, ckpt, _) in enumerate(ckpts, 1):
        say(f"teacher {i}/{len(ckpts)}: the store of {arch} over {views} views (precomputed unless complete)")
        pre = precompute(PrecomputeRequest(teacher=arch, checkpoint=ckpt, dataset=recipe.dataset,
                                           data_root=data_root, cache=cache, views=views,
                                           plan_seed=recipe.plan_seed, device=device),
                         progress=precompute_progress)
        result.reused["stores"] += pre.status == "complete"
        ids.append(pre.teacher_id)
        store = store_cache.open_teacher(pre.teacher_id)
        result.teachers.append({"arch": arch, "checkpoint": str(ckpt), "id": pre.teacher_id,
                                "plan_id": pre.plan_id, "test_accuracy": store.attrs.get("test_accuracy")})
    result.ensemble = _ensemble(out, ckpts, ids, dataset, device, say)

    n_runs = seeds * len(recipe.methods)
    done = 0
    for seed in range(seeds):
        for method in recipe.methods:
            done += 1
            run = out / method / f"seed{seed}"
            if (run / "last.pth").is_file():
                _check_finished_run(run, epochs, ids)
                result.reused["runs"] += 1
            else:
                resume = (run / "checkpoint.pth").is_file()
                say(f"run {done}/{n_runs}: {method}, seed {seed}, {recipe.student} for {epochs} epochs"
                    f"{' (resuming)' if resume else ''}")
                distill(DistillRequest(student=recipe.student, teachers=ids, method=method, out=run, cache=cache,
                                       data_root=data_root, epochs=epochs, seed=seed, device=device,
                                       resume=resume))
            record = load_run(run)
            best, last = record.best_top1, record.final_top1
            result.students.setdefault(method, []).append({"seed": seed, "best": best, "last": last})

    result.table = format_table(result)
    (out / "table.md").write_text(result.table)
    _write_json(out / "recipe.json", _as_json(result, seeds, epochs, views, teacher_epochs))
    return result


def _dry_run(recipe: Recipe, data_root: Path | None, out: Path, ckpts: list[tuple[str, Path, int]], seeds: int,
             epochs: int, views: int, teacher_epochs: int) -> RecipeResult:
    """Compute and describe, writing nothing; reads the data set for its size when it is there."""
    try:
        dataset = load_dataset(recipe.dataset, data_root)
        n, c = len(dataset.train), dataset.num_classes
        where = f"{n} training samples, {c} classes, read from {data_root}"
    except DatasetError:
        if recipe.dataset not in KNOWN_SIZES:
            raise
        n, c = KNOWN_SIZES[recipe.dataset]
        where = (f"{n} training samples, {c} classes: {recipe.dataset}'s published size "
                 f"(not found under {data_root}; needed for the real run)")
    plan = plan_recipe(recipe, seeds, epochs, views, n, c)
    lines = plan.lines()
    lines.insert(1, f"data set   {where}")
    for i, (arch, ckpt, seed) in enumerate(ckpts, 1):
        state = _checkpoint_state(ckpt, teacher_epochs)
        what = {"done": "found, used as it is", "partial": f"found part-trained, training resumes to "
                f"{teacher_epochs} epochs", "missing": f"missing, will be trained for {teacher_epochs} epochs "
                f"(seed {seed})"}[state]
        lines.append(f"teacher {i}  {ckpt}: {what}")
    finished = sum((out / m / f"seed{s}" / "last.pth").is_file() for m in recipe.methods for s in range(seeds))
    lines.append(f"runs       {seeds * len(recipe.methods)} student runs under {out}, {finished} already finished")
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


def _check_finished_run(run: Path, epochs: int, ids: list[str]) -> None:
    """A finished run counts only if it is this grid's: same epochs and teacher stores."""
    try:
        args = json.loads((run / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError):
        return
    if args.get("epochs") != epochs or args.get("teachers") != ids:
        raise KdcacheError(f"{run} holds a finished run of another grid (epochs {args.get('epochs')}, other "
                           f"teachers or stores); choose another --out or remove it")


def _ensemble(out: Path, ckpts: list[tuple[str, Path, int]], ids: list[str], dataset, device: str | None,
              say: Say) -> float:
    """Test top-1 of the teachers' averaged softmax, kept in ``<out>/ensemble.json`` per set of stores."""

    path = out / "ensemble.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("teachers") == ids:
                return float(saved["test_top1"])
        except (ValueError, KeyError):
            pass
    say("evaluating the teachers' ensemble on the test split")
    top1 = ensemble_accuracy([(arch, ckpt) for arch, ckpt, _ in ckpts], dataset, device)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"teachers": ids, "test_top1": top1})
    return top1


# -- the table --------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    """'75.12 ± 0.31' (sample standard deviation) for two or more values, '75.12' for one."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def format_table(result: RecipeResult) -> str:
    """The recipe's column of the paper's table, as markdown: teachers, ensemble, then one row per method.

    Columns: our best-epoch top-1 (what the official scripts report), last-epoch top-1, the
    seeds, and the paper's figure ("n/a" where it was not found).
    """
    r, plan = result.recipe, result.plan

    def paper(label: str) -> str:
        return r.paper.get(label, "n/a")

    head = f"{r.title} (best epoch)"
    rows = [f"# {r.name}: CA-MKD {r.table} setting, {r.dataset}", "",
            f"Top-1 test accuracy (%) on the {r.dataset} test split. Students: mean ± sample standard deviation "
            f"over {plan.seeds} seed{'s' if plan.seeds > 1 else ''}; \"best epoch\" is the best test accuracy over "
            "the run (what the official scripts report), \"last epoch\" the final one.", "",
            f"| | {head} | last epoch | seeds | paper |", "|---|---|---|---|---|"]
    accs = [t["test_accuracy"] for t in result.teachers]
    for i, t in enumerate(result.teachers, 1):
        rows.append(f"| Teacher {i} ({t['arch']}) | {_pct(t['test_accuracy'])} | | | {paper(f'Teacher {i}')} |")
    if len(set(r.teachers)) == 1 and len(accs) > 1 and all(a is not None for a in accs):
        rows.append(f"| Teacher ({r.teachers[0]}, mean of {len(accs)}) | {mean_std(accs)} | | | {paper('Teacher')} |")
    if result.ensemble is not None:
        rows.append(f"| Ensemble (averaged softmax) | {result.ensemble:.2f} | | | {paper('Ensemble')} |")
    for method in r.methods:
        runs = result.students.get(method, [])
        if not runs:
            continue
        label = METHOD_LABELS.get(method, method)
        rows.append(f"| {label} (`{method}`, {r.student}) | {mean_std([x['best'] for x in runs])} | "
                    f"{mean_std([x['last'] for x in runs])} | {len(runs)} | {paper(label)} |")
    rows += ["", f"Settings: {plan.views} views (plan seed {r.plan_seed}), {plan.epochs} student epochs, "
                 f"{plan.n_samples} training samples. Teacher stores: "
                 f"{', '.join(t['id'][:12] for t in result.teachers)}.",
             f"Source of the setting: {r.source}", ""]
    return "\n".join(rows)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _as_json(result: RecipeResult, seeds: int, epochs: int, views: int, teacher_epochs: int) -> dict:
    return {"recipe": asdict(result.recipe), "seeds": seeds, "epochs": epochs, "views": views,
            "teacher_epochs": teacher_epochs, "teachers": result.teachers, "ensemble": result.ensemble,
            "students": result.students, "reused": result.reused}


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
