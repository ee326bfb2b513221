"""The Fashion-MNIST study (issue 11): does CA-MKD work from cached teachers, in which feature form, at which
β, and how many stored views does a student need?

    python studies/fashion_mnist.py --out /tmp/fmnist                 # the whole study, resumable
    python studies/fashion_mnist.py --out /tmp/fmnist --jobs 2        # two runs at a time, one thread each
    python studies/fashion_mnist.py --out /tmp/fmnist --report        # tables and figures from what is finished
    python studies/fashion_mnist.py --out /tmp/fmnist --parts long --long-seeds 5   # the long part at 5 seeds
    python studies/fashion_mnist.py --out /tmp/fmnist --parts long --long-seeds 5 --only 'long/aver-*'  # one method
    mkdir -p /tmp/fmnist && cp -r studies/results/runs /tmp/fmnist/   # count the committed finished runs as done
    mkdir -p /tmp/fmnist/teachers && cp studies/results/teachers/*.pth /tmp/fmnist/teachers/   # and its teachers

The teachers train deterministically on a given machine (all four, retrained on 2026-12-05 and 06, reached the test
top-1 recorded in studies/results/teachers.json to the digit: 84.44, 84.16, 85.72, 57.58); the finished ones are kept in
studies/results/teachers/ so that a study resumed elsewhere skips their 10-15 minutes each.

Everything goes through kdcache's own pipelines (train_teacher, precompute, distill), so the study measures the
tool as a user runs it. A second invocation skips every finished teacher, store and run; ``--report`` writes
``tables.md``, ``results.json`` and the PNG figures from the runs found, and says which are missing.

Parts (each a list of runs; all share one training subset and one test split):

- A:     three resnet20 teachers, seeds 0, 1, 2; the student resnet8 with every method, three seeds.
- B:     the same, with the third teacher trained on labels rotated on three classes (Trouser -> Dress ->
         Bag -> Trouser), so it is confidently wrong there (the paper's Figure 1).
- beta:  camkd on A in both feature forms over β ∈ {0, 5, 15, 50}.
- abl:   the paper's Table 4 on A, spatial form: uniform weights, β = 0, feature term weighted by w.
- views: aver and camkd (spatial) on A from stores of V ∈ {1, 2, 4, 8} views; disk per teacher in both forms.
- online: camkd (spatial) on A with the teachers run live on the same views, against the cached runs.
- paired: camkd (spatial), aver, kd, aekd and fitnet-mkd in A and B over 10 seeds (issue 28), the same runs as
         parts A and B at their first three seeds; each method's difference from camkd, seed by seed.
- long:  aver and camkd (spatial) on A over 40 epochs from V ∈ {1, 2, 5, 10, 40} stored views (issue 28).
- longbeta: camkd (spatial) on A over 40 epochs at V = 40 with β ∈ {0, 5}, three seeds, beside the long part's
         β = 50 and aver: is the feature term what holds camkd below aver on the long schedule?

Every method at a given seed starts from the same student weights and reads the same views in the same order
(the student is built before the method's aligners draw their initial weights, and the batch order is a function
of the seed and of the stores' chunking, the same for every paired run because all of them read the spatial
stores), so differences between methods at one seed are paired.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch

from kdcache.data import load_dataset
from kdcache.data.mnist import FILES, read_idx
from kdcache.evaluate import ensemble_accuracies
from kdcache.losses.base import MethodOptions
from kdcache.models import build_model
from kdcache.models.checkpoint import load_checkpoint, read_checkpoint
from kdcache.batches import test_batches
from kdcache.device import resolve_device
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.store.form import StoreForm
from kdcache.pipelines.train_teacher import TrainTeacherRequest, teacher_run, train_teacher

from fashion_mnist_report import finished_top1, write_report  # the study's own modules, beside it
from fashion_mnist_setting import CLASSES, PAIRED_METHODS, ROTATED, SETTINGS, Config, StoreIds, best_teacher

DATASET = "fashion-mnist"
SOURCE = Path("/usr/share/datasets/fashion-mnist")

PARTS = ("A", "beta", "B", "paired", "abl", "views", "online", "long", "longbeta")
METHODS = ("ce", "kd", "aver", "ebkd", "aekd", "fitnet-mkd", "camkd")


@dataclass(frozen=True)
class Run:
    """One student run: where it goes and everything distill needs besides the stores."""

    part: str
    name: str                     # e.g. "camkd-spatial-beta5"
    method: str
    teachers: tuple[str, ...]     # teacher names
    form: str                     # store form the run reads
    views: int
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    online: bool = False
    epochs: int | None = None     # None: the study's (Config.epochs)
    stage: str = ""               # the --parts name that selects it, where not its part (paired runs of A and B)

    @property
    def key(self) -> str:
        return f"{self.part}/{self.name}/seed{self.seed}"

    @property
    def group(self) -> str:
        return self.stage or self.part


@dataclass(frozen=True)
class Teacher:
    name: str
    seed: int
    label_map: dict[int, int] | None = None


TEACHERS = (Teacher("t0", 0), Teacher("t1", 1), Teacher("t2", 2), Teacher("t2-rotated", 2, ROTATED))


# ----------------------------------------------------------------------------------------------- data

def write_subset(out: Path, per_class: int, test_per_class: int, source: Path = SOURCE) -> Path:
    """Class-stratified subsets of Fashion-MNIST's training and test splits as flat IDX files."""
    root = out / "data"
    if all((root / f).is_file() for pair in FILES.values() for f in pair):
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        images = read_idx(_find(source, FILES[split][0]), 3)
        labels = read_idx(_find(source, FILES[split][1]), 1)
        keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False)
                                       for c in range(len(CLASSES))]))
        _write_idx(root / FILES[split][0], images[keep])
        _write_idx(root / FILES[split][1], labels[keep])
    return root


def _find(source: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (source / name).is_file():
            return source / name
    sys.exit(f"no {stem}[.gz] in {source}: install Debian's dataset-fashion-mnist or pass --source")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------- runs

def plan_runs(cfg: Config) -> list[Run]:
    """Every student run of the study, without duplicates (a run shared by two parts is listed once)."""
    runs: dict[str, Run] = {}

    def add(run: Run) -> None:
        runs.setdefault(run.key, run)

    for seed in range(cfg.paired_seeds):  # first, so that parts A and B's runs of these methods are "paired" ones
        for setting, names in SETTINGS.items():
            for name in PAIRED_METHODS:
                # Every paired run reads the spatial stores (aver, kd and aekd only their logits, the same numbers
                # as the pooled stores'): the batch order follows the stores' chunking, so runs of one seed share
                # it only when they read stores of one layout.
                method = name.split("-spatial")[0]
                add(Run(setting, name, method, ("best",) if method == "kd" else names, "spatial", cfg.views, seed,
                        stage="paired"))
    for seed in range(cfg.seeds):
        for setting, names in SETTINGS.items():
            for method in METHODS:
                if method == "ce" and setting == "B":
                    continue  # ce never reads a teacher: A's runs serve both
                teachers = names if method != "kd" else ("best",)
                if method in ("camkd",):
                    for form in ("pooled", "spatial"):
                        add(Run(setting, f"camkd-{form}", method, names, form, cfg.views, seed))
                else:
                    form = "spatial" if method == "fitnet-mkd" else "pooled"
                    add(Run(setting, method, method, teachers, form, cfg.views, seed))
        a = SETTINGS["A"]
        for form in ("pooled", "spatial"):
            for beta in cfg.betas:
                if beta == 50:
                    continue  # the default: part A's camkd runs
                add(Run("beta", f"camkd-{form}-beta{beta}", "camkd", a, form, cfg.views, seed, {"beta": beta}))
        add(Run("abl", "camkd-spatial-uniform", "camkd", a, "spatial", cfg.views, seed, {"camkd_weights": "uniform"}))
        add(Run("abl", "camkd-spatial-feature-by-w", "camkd", a, "spatial", cfg.views, seed,
                {"camkd_feature_weights": "w"}))
        for v in cfg.view_counts:
            if v == cfg.views:
                continue
            for method in ("aver", "camkd"):
                add(Run("views", f"{method}-spatial-V{v}", method, a, "spatial", v, seed))
        add(Run("online", "camkd-spatial-online", "camkd", a, "spatial", cfg.views, seed, online=True))
    for seed in range(cfg.long_seeds):
        for v in cfg.long_view_counts:
            for method in ("aver", "camkd"):
                add(Run("long", f"{method}-spatial-V{v}", method, SETTINGS["A"], "spatial", v, seed,
                        epochs=cfg.long_epochs))
    top_v = max(cfg.long_view_counts)
    for seed in range(cfg.long_beta_seeds):
        for beta in cfg.long_betas:
            add(Run("longbeta", f"camkd-spatial-V{top_v}-beta{beta}", "camkd", SETTINGS["A"], "spatial", top_v, seed,
                    {"beta": beta}, epochs=cfg.long_epochs))
    return sorted(runs.values(), key=run_order)


def run_order(run: Run) -> tuple[int, int, int, int, str]:
    """A, beta and B part by part; then the paired runs, the other parts and the long schedule, each seed by
    seed, so a study cut short still has every part at the first seeds."""
    tier = 0 if run.group in PARTS[:3] else 1 if run.group == "paired" else 3 if run.group.startswith("long") else 2
    return (tier, run.seed if tier else 0, PARTS.index(run.group), run.seed, run.name)


def chosen(run: Run, parts: Sequence[str], only: Sequence[str] | None = None) -> bool:
    """Whether a run is in one of ``parts`` and, with ``only``, its key (``group/name/seedS``) matches one of
    those shell patterns."""
    return run.group in parts and (only is None or any(fnmatch(run.key, pattern) for pattern in only))


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.key


def is_done(out: Path, run: Run) -> bool:
    return finished_top1(run_dir(out, run)) is not None


def _distill_one(out: Path, run: Run, ids: list[str], cfg: Config, threads: int) -> tuple[str, float]:
    """One distill run; a worker process's task (``threads`` torch threads)."""
    torch.set_num_threads(threads)
    d = run_dir(out, run)
    t0 = time.perf_counter()
    epochs = run.epochs or cfg.epochs
    # The test split is evaluated at each quarter of the schedule and at the end (the report reads the final
    # top-1; evaluating 5,000 images after each epoch took a third of a run, and it does not change the weights).
    distill(DistillRequest(student=cfg.student, teachers=ids, method=run.method, out=d, cache=out / "cache",
                           data_root=out / "data", epochs=epochs, batch_size=cfg.batch_size, seed=run.seed,
                           device="cpu", online=run.online, eval_every=max(1, epochs // 4),
                           resume=(d / "checkpoint.pth").is_file(), options=MethodOptions.from_flat(run.options)))
    return run.key, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- stages

def train_teachers(out: Path, cfg: Config, say: Callable[[str], None]) -> dict[str, Path]:
    ckpts = {}
    for t in TEACHERS:
        ckpt = out / "teachers" / f"{t.name}-{cfg.teacher}.pth"
        ckpts[t.name] = ckpt
        # the study's own train-teacher checkpoints: dicts
        if ckpt.is_file() and int(cast("dict[str, Any]", read_checkpoint(ckpt)).get("epoch", 0)) >= cfg.teacher_epochs:
            continue
        say(f"training teacher {t.name} ({cfg.teacher}, seed {t.seed}, {cfg.teacher_epochs} epochs"
            f"{', rotated labels ' + str(t.label_map) if t.label_map else ''})")
        train_teacher(TrainTeacherRequest(arch=cfg.teacher, dataset=DATASET, data_root=out / "data", out=ckpt,
                                          epochs=cfg.teacher_epochs, batch_size=cfg.batch_size, seed=t.seed,
                                          device="cpu",
                                          label_map=t.label_map, resume=teacher_run(ckpt)[0].started))
    return ckpts


def store_ids(out: Path, cfg: Config, ckpts: dict[str, Path], runs: list[Run], say: Callable[[str], None],
              look_only: bool = False) -> StoreIds:
    """Precompute every (teacher, form, V) store the runs read, plus t0's pooled stores at each V (for disk);
    ``look_only``: write nothing, and give the path of those already on disk (the report's disk columns)."""
    wanted = {(t, r.form, r.views) for r in runs for t in r.teachers if t != "best"}
    wanted |= {("t0", form, v) for form in ("pooled", "spatial", "none") for v in cfg.view_counts}
    ids: StoreIds = {}
    for name, form, views in sorted(wanted, key=lambda k: (k[2] != cfg.views, k)):
        pre = precompute(PrecomputeRequest(teacher=cfg.teacher, checkpoint=ckpts[name], dataset=DATASET,
                                           data_root=out / "data", cache=out / "cache", views=views,
                                           device="cpu", form=StoreForm(features=form), dry_run=look_only))
        if pre.status == "written":
            say(f"precomputed {name} {form} V={views}: {pre.teacher_id}")
        ids[(name, form, views)] = pre.teacher_id
        if not look_only or Path(pre.path).is_dir():
            ids[(name, form, views, "path")] = str(pre.path)
    return ids


def teacher_facts(out: Path, cfg: Config, ckpts: dict[str, Path]) -> dict[str, Any]:
    """Each teacher's test accuracy (overall and on the rotated classes) and each setting's ensemble."""
    dataset = load_dataset(DATASET, out / "data")
    dev = resolve_device("cpu")
    facts: dict[str, Any] = {"teachers": {}, "ensemble": {}}
    for t in TEACHERS:
        model = build_model(cfg.teacher, dataset.num_classes)
        load_checkpoint(model, ckpts[t.name])
        model.eval()
        preds, labels = [], []
        with torch.inference_mode():
            for x, yb in test_batches(dataset, dataset.recipe, dev, 256):
                preds.append(model(x)[1].argmax(1))
                labels.append(yb)
        p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        rotated = np.isin(y, list(ROTATED))
        facts["teachers"][t.name] = {"seed": t.seed, "label_map": t.label_map, "test": 100 * float((p == y).mean()),
                                     "rotated_classes": 100 * float((p[rotated] == y[rotated]).mean()),
                                     "other_classes": 100 * float((p[~rotated] == y[~rotated]).mean())}
    for setting, names in SETTINGS.items():
        facts["ensemble"][setting] = ensemble_accuracies([(cfg.teacher, ckpts[n]) for n in names], dataset,
                                                         "cpu")[1]  # averaged softmax
    return facts


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None, cfg: Config | None = None) -> int:
    """Run (or, with --report, only report) the study; ``cfg`` replaces the sizes (the tests make it tiny)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="study folder (data subset, teachers, cache, runs)")
    ap.add_argument("--source", type=Path, default=SOURCE, help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--jobs", type=int, default=2, help="student runs at a time (each gets cores/jobs threads)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS),
                    help="which parts to run (A first: the other parts reuse its runs)")
    ap.add_argument("--report", action="store_true", help="only write tables and figures from finished runs")
    ap.add_argument("--only", nargs="+", metavar="GLOB", default=None,
                    help="run only the runs whose key matches one of these (e.g. 'long/aver-*'); the report "
                         "still counts every run")
    ap.add_argument("--long-seeds", type=int, default=None,
                    help=f"seeds of the long part (default {Config.long_seeds}; give it to --report too)")
    args = ap.parse_args(argv)
    cfg = cfg or Config()
    if args.long_seeds is not None:
        if args.long_seeds < 1:
            ap.error(f"--long-seeds must be at least 1, not {args.long_seeds}")
        cfg = replace(cfg, long_seeds=args.long_seeds)
    runs = [r for r in plan_runs(cfg) if args.report or chosen(r, args.parts, args.only)]
    if args.only and not runs:
        ap.error(f"--only {' '.join(args.only)} matches no run of the parts {' '.join(args.parts)} "
                 "(keys look like long/aver-spatial-V1/seed0)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}

    def timed(stage: str, seconds: float) -> None:
        timing[stage] = timing.get(stage, 0.0) + seconds
        timing_path.write_text(json.dumps(timing, indent=2) + "\n")

    if not args.report:
        t0 = time.perf_counter()
        write_subset(out, cfg.per_class, cfg.test_per_class, args.source)
        ckpts = train_teachers(out, cfg, say)
        timed("teachers", time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids = store_ids(out, cfg, ckpts, runs, say)
        timed("precompute", time.perf_counter() - t0)
        facts_path = out / "teachers.json"
        if not facts_path.is_file():
            facts_path.write_text(json.dumps(teacher_facts(out, cfg, ckpts), indent=2) + "\n")
        facts = json.loads(facts_path.read_text())
        todo = [r for r in runs if not is_done(out, r)]
        say(f"{len(runs) - len(todo)} of {len(runs)} runs finished; {len(todo)} to go, {args.jobs} at a time")
        threads = max(1, torch.get_num_threads() // args.jobs)
        tasks = [(out, r, _ids_for(r, ids, facts, cfg), cfg, threads) for r in todo]
        groups = {r.key: r.group for r in todo}
        if args.jobs == 1:
            done = (_distill_one(*task) for task in tasks)
        else:
            pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"))
            done = (f.result() for f in as_completed([pool.submit(_distill_one, *task) for task in tasks]))
        for i, (key, seconds) in enumerate(done, 1):
            timed("runs:" + groups[key], seconds)
            say(f"[{i}/{len(todo)}] {key} in {seconds:.0f} s")
        if args.jobs != 1:
            pool.shutdown()
    else:
        ckpts = {t.name: out / "teachers" / f"{t.name}-{cfg.teacher}.pth" for t in TEACHERS}
        ids = store_ids(out, cfg, ckpts, plan_runs(cfg), say, look_only=True)
    write_report(out, cfg, ids, plan_runs(cfg), json.loads((out / "teachers.json").read_text()), timing)
    say(f"wrote {out / 'tables.md'}")
    return 0


def _ids_for(run: Run, ids: StoreIds, facts: dict[str, Any], cfg: Config) -> list[str]:
    names = (best_teacher(facts, run.part if run.part in SETTINGS else "A"),) if run.teachers == ("best",) \
        else run.teachers
    return [ids[(n, run.form, run.views)] for n in names]


if __name__ == "__main__":
    sys.exit(main())
