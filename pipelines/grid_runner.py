"""Running a grid (:mod:`kdcache.pipelines.grid`): in this process, one run after another, or on a dask cluster
(:mod:`kdcache.pipelines.grid_cluster`). The front door of ``kdcache demo`` and ``kdcache experiment run``.

Read top to bottom: :func:`run_grid` loads the data set and hands the grid to the cluster
runner, or runs it here: teachers trained or resumed (:func:`_train_teachers`), stores
precomputed unless complete (:func:`_precompute_stores`), the ensemble evaluated, then
every (row, seed) run, a failure recorded and the rest going on (:func:`_distill_runs`).
"""

from __future__ import annotations

import time
from pathlib import Path

from kdcache.data import DataSet, load_dataset
from kdcache.pipelines.distill import distill
from kdcache.pipelines.grid import (
    GridResult, GridSpec, OnUpdate, Progress, Say, Tally, ensemble_of, one_line, plan_runs, store_request,
    teacher_entry, teacher_request, teacher_state, training_line,
)
from kdcache.pipelines.precompute import precompute
from kdcache.pipelines.precompute_cluster import ClusterOptions
from kdcache.pipelines.train_teacher import train_teacher
from kdcache.runs import RunDir
from kdcache.store import Cache


def run_grid(spec: GridSpec, device: str | None = None, say: Say | None = None,
             precompute_progress: Progress | None = None, dataset: DataSet | None = None,
             cluster: ClusterOptions | None = None, on_update: OnUpdate | None = None) -> GridResult:
    """Run ``spec`` end to end (teachers, stores, ensemble, every row × seed), reusing and resuming what exists.

    ``say`` is told each step (and each line also goes to ``<out>/grid.log``); ``dataset`` is
    the spec's data set when the caller has loaded it already; ``cluster``: run on dask
    (:mod:`kdcache.pipelines.grid_cluster`) instead of in this process; ``on_update`` is
    called with the result as each run finishes or fails (the caller writes its table).
    A run's failure is recorded in the result (:attr:`GridResult.failures`), not raised.
    """
    say = _logged(say or (lambda _msg: None), spec.out / "grid.log")
    on_update = on_update or (lambda _result: None)
    dataset = dataset if dataset is not None else load_dataset(spec.dataset, spec.data_root)
    result = GridResult(spec, len(dataset.train), dataset.num_classes, dataset.image_size, dataset.recipe)
    if cluster is not None:
        from kdcache.pipelines.grid_cluster import run_grid_on_cluster

        run_grid_on_cluster(spec, result, dataset, cluster, device, say, precompute_progress, on_update)
        return result

    t0 = time.perf_counter()
    _train_teachers(spec, device, say, result)
    result.seconds["teachers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _precompute_stores(spec, device, say, precompute_progress, result)
    result.ensemble = ensemble_of(spec, result.ids, dataset, device, say)
    result.seconds["precompute"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _distill_runs(spec, result.ids, device, say, result, on_update)
    result.seconds["distill"] = time.perf_counter() - t0
    return result


def _logged(say: Say, log: Path) -> Say:
    """``say``, each line also appended to ``log`` with the time."""
    def both(msg: str) -> None:
        say(msg)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
    return both


def _train_teachers(spec: GridSpec, device: str | None, say: Say, result: GridResult) -> None:
    for i, t in enumerate(spec.teachers):
        state = teacher_state(t.checkpoint, t.epochs)
        if state == "done":
            result.reused["teachers"] += 1
            continue
        say(training_line(spec, i, state))
        t.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        train_teacher(teacher_request(spec, t, device, resume=state == "partial"))


def _precompute_stores(spec: GridSpec, device: str | None, say: Say, progress: Progress | None,
                       result: GridResult) -> None:
    cache, k = Cache.at(spec.cache), len(spec.teachers)
    for i, t in enumerate(spec.teachers, 1):
        say(f"teacher {i}/{k}: the {spec.features.value} store of {t.arch} over {spec.views} views "
            "(precomputed unless complete)")
        pre = precompute(store_request(spec, t, device), progress=progress)
        result.reused["stores"] += pre.status == "complete"
        accuracy = cache.open_teacher(pre.teacher_id).attrs.get("test_accuracy")
        result.teachers.append(teacher_entry(spec, t, pre.teacher_id, pre.plan_id, accuracy))


def _distill_runs(spec: GridSpec, ids: list[str], device: str | None, say: Say, result: GridResult,
                  on_update: OnUpdate) -> None:
    planned = plan_runs(spec, ids, device, result)
    todo = [(n, row, seed, req) for n, (row, seed, req) in enumerate(planned, 1) if not RunDir(req.out).finished]
    tally = Tally.after_planning(result, len(todo), 1, say)
    for place, row, seed, req in todo:
        run = RunDir(req.out)
        req.resume = run.started
        n = len(req.teachers) if row.teachers_of(len(ids)) else 0
        say(f"run {place}/{len(planned)}: {row.label} ({row.flags()}, {n} "
            f"teacher{'s' if n != 1 else ''}), seed {seed}, {spec.student} for {spec.epochs} epochs"
            f"{' (resuming)' if req.resume else ''}")
        tally.start()
        t0 = time.perf_counter()
        try:
            distill(req)
            record = run.load()
        except Exception as exc:  # noqa: BLE001 - a run's failure is its row's, not the grid's
            reason = one_line(exc)
            result.add_failure(row.label, seed, reason)
            tally.fail(row.label, seed, reason)
        else:
            seconds = time.perf_counter() - t0
            result.add_run(row.label, seed, record, seconds=round(seconds, 1), worker="this process")
            tally.finish(row.label, seed, record.best_top1, record.final_top1, seconds, "this process")
        on_update(result)
