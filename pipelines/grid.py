"""One experiment grid, for ``kdcache demo`` and ``kdcache experiment run``: teachers → plan → stores → every
row × seed → one table.

A :class:`GridSpec` is everything a grid is: its teachers (architecture, checkpoint,
how to train one that is missing), the data set, the plan (views, plan seed), the
stores' feature form, the rows (a method with options on the first n teachers), the
seeds, the student epochs and the training set-up (:class:`Setup`).
:func:`kdcache.pipelines.grid_runner.run_grid` makes it so, by the rules kept here,
reusing whatever exists:

1. a teacher checkpoint is used when it is finished or not kdcache's own (a
   pretrained one), resumed when a kdcache training run of it stopped early, and
   trained when missing (:func:`teacher_state`);
2. every teacher is precomputed on one plan (a complete store is found, not redone);
3. the teachers' ensemble is evaluated once and kept in ``<out>/ensemble.json``;
4. every row × seed is distilled into ``<runs>/<label>/seed<k>/``. A finished run
   (:attr:`kdcache.runs.RunDir.finished`: last.pth, written after the last epoch) is
   read back, once every finished run has been checked to be this grid's
   (:func:`check_same_grid`, before any training); a started one (checkpoint.pth)
   resumes; any other starts. A run that fails (a refused option, a NaN stop, a crash)
   is recorded with its one-line reason and the others go on; a re-run retries it.

With :class:`~kdcache.pipelines.precompute_cluster.ClusterOptions` the same grid runs on
a dask cluster (:mod:`kdcache.pipelines.grid_cluster`): teachers side by side, their stores' chunks
on every worker, and each run as soon as its stores are complete. Either way
:class:`Tally` says each finished run and what is left.

:func:`format_table` is the one table of a grid (markdown), :func:`write_result` its
one JSON record and :func:`summary_line` the one line saying where things are and what
was reused; the demo and the experiments add their own paragraphs and lines to them.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kdcache import training
from kdcache.data import DataSet
from kdcache.evaluate import ensemble_accuracies
from kdcache.errors import CheckpointError, KdcacheError, UnknownNameError
from kdcache.losses import method_info, resolve_options
from kdcache.losses.base import MethodOptions
from kdcache.pipelines.distill import DistillRequest, run_args
from kdcache.pipelines.precompute_engine import PrecomputeRequest
from kdcache.pipelines.train_teacher import TrainTeacherRequest, legacy_state, teacher_run
from kdcache.runs import RunDir, RunRecord, write_json
from kdcache.store import Cache
from kdcache.store.form import FeatureForm, StoreForm
from kdcache.text import duration

Say = Callable[[str], None]
Progress = Callable[[int, int], Callable[[int], None]]
OnUpdate = Callable[["GridResult"], object]


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


# -- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of a grid's table: ``method`` with ``options``, run on the grid's first ``n_teachers`` teachers.

    ``label`` names the runs (``<runs>/<label>/seed<k>/``) and keys the row's reference
    figure; ``title`` is its name in the table; ``options`` are
    :class:`~kdcache.losses.base.MethodOptions` values that differ from the method's
    defaults, as (name, value) pairs; ``implemented`` False lists a method kdcache does
    not have (shown with its reference figure, never run).
    """

    label: str
    method: str
    title: str = ""
    options: tuple[tuple[str, object], ...] = ()
    n_teachers: int | None = None    # None: all the grid's teachers
    implemented: bool = True

    def method_options(self) -> MethodOptions:
        """The row's options, checked and with every option of the method filled in (what its runs record):
        the ones every method shares as fields, the method's own in ``params``."""
        try:
            return resolve_options(self.method, MethodOptions.from_flat(dict(self.options)))
        except KdcacheError as exc:
            raise KdcacheError(f"row {self.label!r}: {exc}") from None

    def teachers_of(self, k: int) -> int:
        """How many of the grid's ``k`` teachers this row reads (0 for ce)."""
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


@dataclass(frozen=True)
class GridTeacher:
    """One teacher: its architecture and checkpoint, and how it is trained there when the checkpoint is missing."""

    arch: str
    checkpoint: Path
    epochs: int                      # a kdcache training run with fewer epochs is resumed to this many
    seed: int = 0
    name: str = ""                   # said beside "Teacher i (arch)" in the table
    label_map: Mapping[int, int] | None = None  # taught class a as label_map[a] (the demo's corrupted teacher)


@dataclass(frozen=True)
class GridSpec:
    """Everything a grid is: teachers, data, plan, store form, rows, seeds, epochs, set-up, and where it goes.

    ``out`` holds the grid's own files (ensemble.json, and the table and JSON record its
    caller writes); ``runs`` the run directories ``<runs>/<label>/seed<k>/``.
    """

    name: str
    dataset: str
    teachers: tuple[GridTeacher, ...]
    student: str
    rows: tuple[Row, ...]
    out: Path
    runs: Path
    views: int
    epochs: int
    seeds: int = 1
    features: FeatureForm = FeatureForm.SPATIAL
    plan_seed: int = 0
    setup: Setup = SETUPS["official"]
    cache: Path | None = None
    data_root: Path | None = None
    data_name: str = ""              # the data's name in the table (default: the data set's)

    @property
    def ran(self) -> tuple[Row, ...]:
        """The rows that are run (the implemented ones)."""
        return tuple(r for r in self.rows if r.implemented)

    def run_dir(self, label: str, seed: int) -> RunDir:
        return RunDir(self.runs / label / f"seed{seed}")

    def runs_in_order(self) -> list[tuple[Row, int]]:
        """Every (row, seed) that is run, in the serial runner's order: seed by seed, row by row."""
        return [(row, seed) for seed in range(self.seeds) for row in self.ran]


def distill_request(spec: GridSpec, row: Row, ids: Sequence[str], seed: int,
                    device: str | None = None) -> DistillRequest:
    """The :class:`DistillRequest` of one row and seed: its method, options, teachers and the set-up."""
    k = row.teachers_of(len(ids))
    s = spec.setup
    return DistillRequest(student=spec.student, teachers=list(ids[:k] if k else ids), method=row.method,
                          out=spec.run_dir(row.label, seed).path, cache=spec.cache, dataset=spec.dataset,
                          data_root=spec.data_root,
                          epochs=spec.epochs, batch_size=s.batch_size, lr=s.lr_for(spec.student),
                          weight_decay=s.weight_decay, milestones=s.milestones_for(spec.epochs), seed=seed,
                          device=device, options=row.method_options())


# -- the rules: a teacher's state, a finished run of this grid ------------------------------------


def teacher_state(ckpt: Path, epochs: int) -> str:
    """'missing', 'partial' (a train-teacher run that stopped before ``epochs``, or finished with fewer: resumed)
    or 'done' (finished with ``epochs`` or more, or a checkpoint from elsewhere: used as it is), read from the run
    directory of ``ckpt`` (:func:`~kdcache.pipelines.train_teacher.teacher_run`: beside it, named without .pth);
    one line when it cannot be read, or when ``ckpt`` is a part-trained teacher of an earlier kdcache's one-file
    format, which cannot be resumed."""
    run, weights = teacher_run(ckpt)
    if run.started:
        trained = run.read_config()["args"].get("epochs", 0) if run.finished else 0
        return "done" if weights.is_file() and int(trained) >= epochs else "partial"
    if not weights.is_file():
        return "missing"
    try:
        state = legacy_state(weights)
    except CheckpointError:
        raise CheckpointError(f"teacher checkpoint {ckpt} cannot be read; delete it to train the teacher "
                              "again, or put a valid checkpoint there") from None
    if state is not None and int(state["epoch"]) < epochs:
        raise CheckpointError(f"teacher checkpoint {ckpt} was trained {state['epoch']} of {epochs} epochs by an "
                              "earlier kdcache, whose runs cannot be resumed; delete it to train the teacher again, "
                              "or put a finished checkpoint there")
    return "done"  # finished, or not written by train-teacher (a pretrained checkpoint): used as it is


def check_same_grid(run: RunDir, req: DistillRequest) -> None:
    """Refuse, with one line, a finished run in ``run`` that recorded other result arguments than ``req``'s
    (:func:`~kdcache.pipelines.distill.run_args`: method, options, teachers, data set, epochs, seed, optimiser):
    it belongs to another grid and would be reported as this one's. How it ran (device, paths, threads) does not
    count."""
    differ = run.differing_args(run_args(req))
    if differ:
        args = run.read_config()["args"]
        raise KdcacheError(f"{run.path} holds a finished run of another grid ({', '.join(differ)} differ: "
                           f"{', '.join(f'{k} {args[k]!r}' for k in differ)}); choose another --out or remove it")


# -- running a grid ---------------------------------------------------------------------------


@dataclass
class GridResult:
    """What a grid found: its teachers and their ensemble, every run's top-1, what was reused, and the data's size."""

    spec: GridSpec
    n_samples: int
    num_classes: int
    image_size: int
    view_recipe: str                 # the plan's augmentation recipe
    teachers: list[dict[str, Any]] = field(default_factory=list)   # name, arch, checkpoint, id, plan_id, ...
    ensemble: dict[str, float] | None = None                       # "vote" and "softmax" test top-1
    students: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # row label -> [{seed, best, last}]
    failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # row label -> [{seed, reason}]
    reused: dict[str, int] = field(default_factory=lambda: {"teachers": 0, "stores": 0, "runs": 0})
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [t["id"] for t in self.teachers]

    @property
    def n_failed(self) -> int:
        return sum(len(f) for f in self.failures.values())

    def add_run(self, label: str, seed: int, record: RunRecord, **about: Any) -> None:
        """Record a finished run's top-1 (``about``: its seconds and worker, for the JSON record), in seed order."""
        self._put(self.students, label, {"seed": seed, "best": record.best_top1, "last": record.final_top1, **about})
        self._drop(self.failures, label, seed)

    def add_failure(self, label: str, seed: int, reason: str) -> None:
        """Record a run that failed, with its one-line reason."""
        self._put(self.failures, label, {"seed": seed, "reason": reason})
        self._drop(self.students, label, seed)

    @staticmethod
    def _put(table: dict[str, list[dict[str, Any]]], label: str, entry: dict[str, Any]) -> None:
        runs = [r for r in table.get(label, []) if r["seed"] != entry["seed"]] + [entry]
        table[label] = sorted(runs, key=lambda r: r["seed"])

    @staticmethod
    def _drop(table: dict[str, list[dict[str, Any]]], label: str, seed: int) -> None:
        if label in table:
            table[label] = [r for r in table[label] if r["seed"] != seed]
            if not table[label]:
                del table[label]


def one_line(exc: BaseException) -> str:
    """An error as the one line a table shows: kdcache's own message, else the exception's type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, KdcacheError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Tally:
    """Progress of a grid's runs: one line a finished or failed run, and the count of runs done / running /
    queued / failed with the time left (the mean of this session's runs, over the slots running at once)."""

    def __init__(self, total: int, reused: int, slots: int, say: Say, failed: int = 0) -> None:
        self.total, self.slots, self.say = total, max(1, slots), say
        self.done, self.failed, self.running = reused, failed, 0
        self.took: list[float] = []

    @classmethod
    def after_planning(cls, result: GridResult, todo: int, slots: int, say: Say) -> Tally:
        """The tally of a grid whose runs :func:`plan_runs` has planned: those reused and refused, and ``todo``."""
        reused = result.reused["runs"]
        return cls(reused + todo + result.n_failed, reused, slots, say, failed=result.n_failed)

    def start(self) -> None:
        self.running += 1

    def finish(self, label: str, seed: int, best: float, last: float, seconds: float, worker: str) -> None:
        self.running -= 1
        self.done += 1
        self.took.append(seconds)
        self.say(f"run {label} seed {seed}: top-1 {best:.2f}% (last epoch {last:.2f}%) in {seconds:.1f} s on {worker}")
        self.say(self.counts())

    def fail(self, label: str, seed: int, reason: str) -> None:
        self.running -= 1
        self.failed += 1
        self.say(f"run {label} seed {seed} FAILED: {reason}")
        self.say(self.counts())

    def counts(self) -> str:
        """'runs: 3 done, 2 running, 7 queued, 0 failed of 12; about 4 min 10 s left'."""
        running = min(self.running, self.slots)  # the rest of those submitted wait for a slot
        queued = self.total - self.done - self.failed - running
        text = f"runs: {self.done} done, {running} running, {queued} queued, {self.failed} failed of {self.total}"
        left = running + queued
        if self.took and left:
            text += f"; about {duration(statistics.mean(self.took) * left / min(self.slots, left))} left"
        return text


def training_line(spec: GridSpec, i: int, state: str) -> str:
    """What is said when teacher ``i`` (0-based) is trained, or resumed when ``state`` is 'partial'."""
    t = spec.teachers[i]
    return (f"teacher {i + 1}/{len(spec.teachers)}: training {t.arch}{' (' + t.name + ')' if t.name else ''} for "
            f"{t.epochs} epochs (seed {t.seed}, set-up {spec.setup.name}) into {t.checkpoint}"
            f"{' (resuming)' if state == 'partial' else ''}")


def teacher_entry(spec: GridSpec, t: GridTeacher, teacher_id: str, plan_id: str,
                  test_accuracy: float | None) -> dict[str, Any]:
    """Teacher ``t``'s entry in :attr:`GridResult.teachers` (and the JSON record)."""
    return {"name": t.name, "arch": t.arch, "checkpoint": str(t.checkpoint), "id": teacher_id, "plan_id": plan_id,
            "features": spec.features.value, "test_accuracy": test_accuracy}


def teacher_request(spec: GridSpec, t: GridTeacher, device: str | None, resume: bool) -> TrainTeacherRequest:
    """How ``t`` is trained (or resumed) in this grid: the set-up's optimiser and schedule, absolute paths."""
    setup = spec.setup
    return TrainTeacherRequest(arch=t.arch, dataset=spec.dataset, out=t.checkpoint.resolve(),
                               data_root=spec.data_root.resolve() if spec.data_root else None, epochs=t.epochs,
                               batch_size=setup.batch_size, lr=setup.lr_for(t.arch), weight_decay=setup.weight_decay,
                               milestones=setup.milestones_for(t.epochs), seed=t.seed, device=device, resume=resume,
                               label_map=dict(t.label_map) if t.label_map else None)


def store_request(spec: GridSpec, t: GridTeacher, device: str | None) -> PrecomputeRequest:
    """``t``'s store in this grid: the grid's plan (views, plan seed) and feature form, in the grid's cache."""
    return PrecomputeRequest(teacher=t.arch, checkpoint=t.checkpoint, dataset=spec.dataset, data_root=spec.data_root,
                             cache=spec.cache, views=spec.views, plan_seed=spec.plan_seed, device=device,
                             form=StoreForm(features=spec.features))


def plan_runs(spec: GridSpec, ids: list[str], device: str | None,
              result: GridResult) -> list[tuple[Row, int, DistillRequest]]:
    """Every (row, seed) with its request, refusing (one line) a finished run of another grid before any training;
    the runs of a row whose options are refused are recorded as failed in ``result`` and left out, the finished
    ones as reused."""
    planned = []
    for row, seed in spec.runs_in_order():
        try:
            req = distill_request(spec, row, ids, seed, device)
        except KdcacheError as exc:
            result.add_failure(row.label, seed, one_line(exc))
            continue
        planned.append((row, seed, req))
    for _, _, req in planned:
        run = RunDir(req.out)
        if run.finished:
            check_same_grid(run, req)
    for row, seed, req in planned:
        run = RunDir(req.out)
        if run.finished:
            result.add_run(row.label, seed, run.load())
            result.reused["runs"] += 1
    return planned


def ensemble_of(spec: GridSpec, ids: list[str], dataset: DataSet, device: str | None, say: Say) -> dict[str, float]:
    """Test top-1 of the teachers' majority vote and averaged softmax, kept in ``<out>/ensemble.json``."""
    path = spec.out / "ensemble.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("teachers") == ids:
                return {"vote": float(saved["vote_top1"]), "softmax": float(saved["softmax_top1"])}
        except (ValueError, KeyError, TypeError):
            pass
    say("evaluating the teachers' ensemble on the test split")
    vote, softmax = ensemble_accuracies([(t.arch, t.checkpoint) for t in spec.teachers], dataset, device)
    spec.out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"teachers": ids, "vote_top1": vote, "softmax_top1": softmax})
    return {"vote": vote, "softmax": softmax}


# -- the table, the JSON record, the summary line ------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Figures printed beside the grid's own (the paper's): keyed by a row's label, ``"teacher"`` (the
    teachers' mean), ``"teacher <i>"`` and ``"ensemble"``; ``note`` says what they are."""

    name: str                        # the column's header
    figures: Mapping[str, str]
    note: str

    def get(self, key: str) -> str:
        return self.figures.get(key, "n/a")


_FORM_NOTES = {
    FeatureForm.SPATIAL: " (the last-block map, as the official code; the paper's β = 50 was set for it).",
    FeatureForm.POOLED: " (the pooled vector: at the paper's β = 50 it pushes the student about 3× harder than the "
                        "official spatial form, so feature-term rows may differ from the paper for that reason).",
    FeatureForm.NONE: " (logits only; no row reads features).",
}


def mean_std(values: list[float]) -> str:
    """'75.12 ± 0.31' (sample standard deviation) for two or more values, '75.12' for one."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def format_table(result: GridResult, title: str, about: Sequence[str] = (), reference: Reference | None = None,
                 after: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """The grid's table as markdown: teachers, their ensemble, one row per :class:`Row` over the seeds.

    Columns: the best epoch's test top-1 (what the official scripts report) as mean ± sample
    std over the seeds, the ``reference`` figure when given ("n/a" where it has none), the
    last epoch's, the seeds. ``about`` paragraphs go under the ``title``, ``after`` lines
    under the table, ``notes`` paragraphs at the end.
    """
    spec = result.spec
    k = len(result.teachers)
    data = spec.data_name or spec.dataset
    seeds = f"{spec.seeds} seed{'s' if spec.seeds > 1 else ''}"

    def line(name: str, figure: str, key: str | None = None, last: str = "", n: str = "") -> str:
        beside = [reference.get(key) if key else "n/a"] if reference is not None else []
        return _md(name, figure, *beside, last, n)

    lines = [f"# {title}", ""]
    for paragraph in about:
        lines += [paragraph, ""]
    lines += [f"Set-up: **{spec.setup.name}**, {spec.setup.description}. {schedule_run(spec)}", "",
              f"Teacher stores in the **{spec.features.value}** feature form{_FORM_NOTES[spec.features]}", "",
              f"Top-1 test accuracy (%) on the {data} test split: mean ± sample standard deviation over {seeds} of "
              "the best epoch (what the official scripts report) and of the last epoch"
              + (f"; {reference.note}" if reference is not None else "") + ".", "",
              _md("", *(["reproduced (best epoch)", reference.name] if reference is not None else ["best epoch"]),
                  "last epoch", "seeds"),
              "|---" * (5 if reference is not None else 4) + "|"]
    accs = [t["test_accuracy"] for t in result.teachers]
    for i, t in enumerate(result.teachers, 1):
        name = f"Teacher {i} ({t['arch']})" + (f": {t['name']}" if t["name"] else "")
        lines.append(line(name, _pct(t["test_accuracy"]), f"teacher {i}"))
    archs = sorted({t["arch"] for t in result.teachers})
    if len(archs) == 1 and k > 1 and all(a is not None for a in accs):
        lines.append(line(f"Teacher ({archs[0]}, mean ± std of {k})", mean_std(accs), "teacher"))
    if result.ensemble is not None:
        vote, softmax = result.ensemble["vote"], result.ensemble["softmax"]
        lines.append(line(f"Ensemble of the {k} (majority vote)", f"{vote:.2f}", "ensemble"))
        lines.append(line(f"Ensemble of the {k} (averaged softmax)", f"{softmax:.2f}"))
    for row in spec.rows:
        if not row.implemented:
            lines.append(line(row.title or row.label, "not implemented in kdcache", row.label))
            continue
        runs, failed = result.students.get(row.label, []), result.failures.get(row.label, [])
        best = mean_std([x["best"] for x in runs]) if runs else ("failed" if failed else "not run")
        last = mean_std([x["last"] for x in runs]) if runs else ""
        used = f"{_teachers_used(row, k)}, {spec.student}"
        name = f"{row.title} (`{row.flags()}`, {used})" if row.title else f"`{row.flags()}` ({used})"
        lines.append(line(name, best, row.label, last, str(len(runs)) + (f" ({len(failed)} failed)" if failed else "")))
    if result.failures:
        lines += ["", f"**{result.n_failed} run{'s' if result.n_failed != 1 else ''} failed** (a re-run of the same "
                      "command retries them):"]
        lines += [f"- {label} seed {f['seed']}: {f['reason']}" for label, fs in result.failures.items() for f in fs]
    lines += list(after)
    lines += ["", f"Settings: {spec.views} views of {result.image_size}×{result.image_size} ({result.view_recipe}, "
                  f"plan seed {spec.plan_seed}), {spec.epochs} student epochs, {result.n_samples} training samples. "
                  f"Teacher stores: {', '.join(t['id'][:12] for t in result.teachers)}."]
    for paragraph in notes:
        lines += ["", paragraph]
    return "\n".join(lines) + "\n"


def schedule_run(spec: GridSpec) -> str:
    """What this grid's runs trained, the set-up's schedule scaled to their epochs: '**Run here: students 10 epochs
    (lr ×0.1 at 6, 8, 9: the 240-epoch schedule scaled); teachers trained by this grid 15 epochs (lr ×0.1 at 9, 11,
    13), 2 epochs (lr ×0.1 at 1).**'"""
    setup = spec.setup

    def schedule(epochs: int, note: str = "") -> str:
        ms = setup.resolved_milestones(epochs)
        lr = f"lr ×0.1 at {', '.join(map(str, ms))}" if ms else "constant lr"
        return f"{epochs} epoch{'s' if epochs != 1 else ''} ({lr}{note})"

    scaled = f": the {setup.epochs}-epoch schedule scaled" if spec.epochs != setup.epochs else ""
    teachers = ", ".join(schedule(e) for e in sorted({t.epochs for t in spec.teachers}, reverse=True))
    return (f"**Run here: students {schedule(spec.epochs, scaled)}; teachers trained by this grid {teachers}** "
            "(a teacher checkpoint from elsewhere is used as it is).")


def _md(*cells: str) -> str:
    """One line of a markdown table; an empty cell is written '| |'."""
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _teachers_used(row: Row, k: int) -> str:
    n = row.teachers_of(k)
    if n == 0:
        return "no teacher"
    if n == 1:
        return "teacher 1"
    return f"teachers 1-{n}" if n < k else f"{n} teachers"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_result(path: Path, result: GridResult, **extra: Any) -> None:
    """The grid's JSON record at ``path``: its settings, teachers, ensemble, every run's top-1, what was
    reused and how long each stage took, with ``extra`` (the caller's own findings) added."""
    spec = result.spec
    record = {"grid": spec.name, "dataset": spec.dataset, "student": spec.student, "features": spec.features.value,
              "setup": asdict(spec.setup), "seeds": spec.seeds, "epochs": spec.epochs, "views": spec.views,
              "plan_seed": spec.plan_seed, "rows": [asdict(r) for r in spec.rows],
              "teacher_epochs": [t.epochs for t in spec.teachers], "teachers": result.teachers,
              "ensemble": result.ensemble, "students": result.students, "failures": result.failures,
              "reused": result.reused,
              "seconds": result.seconds, "cache": str(Cache.at(spec.cache).root), "runs": str(spec.runs)}
    write_json(path, {**record, **extra})


def summary_line(result: GridResult, table: Path) -> str:
    """Where the table, runs and stores are, how long each stage took, and what was reused, in one line."""
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    reused = ", ".join(f"{n} {k}" for k, n in result.reused.items() if n)
    return (f"table in {table}, runs in {result.spec.runs}, stores in {Cache.at(result.spec.cache).root} "
            f"({timing}{'; reused ' + reused if reused else ''})")
