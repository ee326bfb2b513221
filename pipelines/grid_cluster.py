"""A grid on a dask cluster: teachers, stores and every (row, seed) run as dask tasks, each started once what it
needs exists, so that independent work runs side by side.

Read top to bottom (:func:`run_grid_on_cluster`):

1. the cluster starts (a local one of ``--workers`` devices with ``--runs-per-device``
   worker processes each, or the existing one at ``--scheduler``), and its dashboard's
   address is said when it has one;
2. every teacher that is missing or part-trained is trained as a task, side by side;
3. as each teacher is final, this process prepares its store (the teacher's id, the
   plan, the writer lock) and submits its pending chunks as the cluster precompute's
   own tasks (:mod:`kdcache.pipelines.precompute_cluster`); a store whose chunks are
   all written is finished here (test evaluation, marked complete);
4. once every teacher is final (every id known), it refuses a finished run of another
   grid before any student trains, evaluates the teachers' ensemble, and submits
   every run whose teachers' stores are complete, then each other run as its stores
   complete;
5. each run (:func:`distill_task`, on whatever worker) resumes its run directory when
   an epoch of it was saved and trains it; its top-1 or its failure's one line is
   recorded as it arrives and the caller's ``on_update`` writes the table.

A worker killed mid-run loses only the epochs after the run's last checkpoint: the
scheduler runs the task again on a live worker (up to
``distributed.scheduler.allowed-failures`` times), which resumes from it. A run that
fails is recorded and the rest go on; a teacher or a store that fails stops the grid,
since the runs need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kdcache.data import DataSet
from kdcache.errors import KdcacheError
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.grid import (
    GridResult, GridSpec, OnUpdate, Progress, Row, Say, Tally, ensemble_of, one_line, plan_runs, store_request,
    teacher_entry, teacher_request, teacher_state, training_line,
)
from kdcache.pipelines.precompute_engine import TeacherJob, ensure_plan, finish, prepare, warn_lacking_guarantee
from kdcache.pipelines.precompute_cluster import (
    Cluster, ClusterOptions, chunk_tasks, check_cluster_options, dask_client, submit_fill, teacher_spec,
)
from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher
from kdcache.runs import RunDir
from kdcache.store import Cache, TeacherStore


def run_grid_on_cluster(spec: GridSpec, result: GridResult, dataset: DataSet, options: ClusterOptions,
                        device: str | None, say: Say, progress: Progress | None, on_update: OnUpdate) -> None:
    """Run ``spec`` on a dask cluster, filling ``result`` as :func:`kdcache.pipelines.grid_runner.run_grid` does."""
    check_cluster_options(spec.cache, device)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(dask_client(options.workers, options.scheduler, device,
                                                  options.runs_per_device, dashboard=True))
        _check_one_task_a_process(cluster)
        say(_describe(cluster, options))
        _Grid(spec, result, dataset, cluster, device, say, progress, on_update, stack).run()


def _check_one_task_a_process(cluster: Cluster) -> None:
    """Refuse workers that run several tasks at once in one process: a run seeds torch's process-wide generators
    and sets its threads, so two runs in one process would change each other's numbers."""
    workers = cluster.client.scheduler_info().get("workers", {})
    shared = sorted(a for a, w in workers.items() if int(w.get("nthreads", 1)) > 1)
    if shared:
        raise KdcacheError(f"dask worker {shared[0]} runs {workers[shared[0]]['nthreads']} tasks at once in one "
                           "process, where runs would change each other's random numbers; start the workers with "
                           "--nthreads 1 (one process a run: `dask worker ADDRESS --nthreads 1`)")


def _describe(cluster: Cluster, options: ClusterOptions) -> str:
    where = f"the dask cluster at {options.scheduler}" if options.scheduler else "a local dask cluster"
    kind = "GPU" if cluster.gpu_workers else "CPU"
    threads = f", {cluster.torch_threads} torch thread(s) a task" if cluster.torch_threads else ""
    board = (f"; dashboard at {cluster.dashboard}" if cluster.dashboard else
             "; no dashboard (dask serves one when bokeh is installed: pip install bokeh)" if not options.scheduler
             else "")
    return f"grid on {where}: {cluster.slots} {kind} task slot(s){threads}{board}"


class _Grid:
    """The coordinator's state while a grid runs: what each pending future is, and what waits for what."""

    def __init__(self, spec: GridSpec, result: GridResult, dataset: DataSet, cluster: Cluster, device: str | None,
                 say: Say, progress: Progress | None, on_update: OnUpdate, stack: contextlib.ExitStack) -> None:
        from distributed import as_completed

        self.spec, self.result, self.dataset, self.cluster, self.device = spec, result, dataset, cluster, device
        self.say, self.progress, self.on_update, self.stack = say, progress, on_update, stack
        self.pending = as_completed()
        self.what: dict[str, tuple[Any, ...]] = {}       # a future's key -> ("teacher", i, name) / ("fill", ...) / ...
        self.futures: list[Any] = []
        self.jobs: dict[int, TeacherJob] = {}            # by teacher (0-based), once its checkpoint is final
        self.stores: dict[str, TeacherStore] = {}        # stores being written, by teacher id
        self.locks: dict[str, contextlib.AbstractContextManager[object]] = {}  # their writer locks, until complete
        self.fills_left: dict[str, int] = {}
        self.ticks: dict[str, Any] = {}
        self.complete: set[str] = set()                  # teacher ids whose stores are complete
        self.plan_ready = False
        self.waiting: list[tuple[Row, int, DistillRequest]] = []
        self.tally: Tally | None = None
        self.t0 = time.perf_counter()

    def run(self) -> None:
        try:
            self._train_teachers()
            for future in self.pending:
                self._arrived(future, *self.what.pop(future.key))
        finally:
            self.cluster.client.cancel(self.futures)
        self.result.seconds["distill"] = time.perf_counter() - self.t0

    def _submit(self, fn: Any, *args: Any, key: str, what: tuple[Any, ...]) -> None:
        future = self.cluster.client.submit(fn, *args, key=key, resources=self.cluster.resources, pure=False)
        self.what[future.key] = what
        self.futures.append(future)
        self.pending.add(future)

    # -- the events -----------------------------------------------------------------------------

    def _arrived(self, future: Any, kind: str, *about: Any) -> None:
        try:
            value = future.result()
        except Exception as exc:  # noqa: BLE001 - dask re-raises the task's own error, or KilledWorker
            if kind != "run":
                raise KdcacheError(f"{about[-1]} failed: {_reason(exc)}") from None
            row, seed, _ = about
            reason = _reason(exc)
            self.result.add_failure(row.label, seed, reason)
            assert self.tally is not None
            self.tally.fail(row.label, seed, reason)
            self.on_update(self.result)
            return
        if kind == "teacher":
            self.say(f"{about[-1]}: trained in {value['seconds']:.1f} s on {value['worker']}")
            self._start_store(about[0])
            if not any(w[0] == "teacher" for w in self.what.values()):
                self._plan_runs()
        elif kind == "fill":
            teacher_id = about[0]
            self.ticks[teacher_id](value)
            self.fills_left[teacher_id] -= 1
            if not self.fills_left[teacher_id]:
                self._finish_store(teacher_id)
        else:
            row, seed, req = about
            record = RunDir(req.out).load()
            self.result.add_run(row.label, seed, record, seconds=round(value["seconds"], 1), worker=value["worker"])
            assert self.tally is not None
            self.tally.finish(row.label, seed, record.best_top1, record.final_top1, value["seconds"], value["worker"])
            self.on_update(self.result)

    # -- 2. teachers ----------------------------------------------------------------------------

    def _train_teachers(self) -> None:
        """Submit every teacher that is missing or part-trained; start the stores of the others."""
        spec = self.spec
        final = []
        for i, t in enumerate(spec.teachers):
            state = teacher_state(t.checkpoint, t.epochs)
            if state == "done":
                self.result.reused["teachers"] += 1
                final.append(i)
                continue
            self.say(training_line(spec, i, state) + ", as a task")
            t.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            req = teacher_request(spec, t, self.device, resume=state == "partial")
            self._submit(train_teacher_task, req, self.cluster.torch_threads, key=_key("teacher", req.out),
                         what=("teacher", i, f"teacher {i + 1} ({t.arch})"))
        for i in final:
            self._start_store(i)
        if len(final) == len(spec.teachers):
            self._plan_runs()

    # -- 3. stores, as each teacher is final -----------------------------------------------------

    def _start_store(self, i: int) -> None:
        """Prepare teacher ``i``'s store and submit its pending chunks (nothing when it is complete)."""
        spec = self.spec
        job = self.jobs[i] = prepare(store_request(spec, spec.teachers[i], self.device), self.dataset)
        if any(j.teacher_id == job.teacher_id for n, j in self.jobs.items() if n != i):
            return  # the same teacher twice: one store
        if job.is_complete():
            self.result.reused["stores"] += 1
            self.complete.add(job.teacher_id)
            return
        cache = job.cache
        if not self.stores:  # the first store written: the cache's checks, and the plan the teachers share
            warn_lacking_guarantee(cache, self.say)
            cache.ensure_writable()
            ensure_plan(cache, job.dataset, job.recipe, spec.views, spec.plan_seed, job.plan_id, None)
        lock = self.locks[job.teacher_id] = cache.teacher_lock(job.teacher_id)
        self.stack.enter_context(lock)
        store = self.stores[job.teacher_id] = job.open_store()
        if store.attrs.get("complete"):  # finished by someone else meanwhile
            self._let_go(job.teacher_id)
            self.complete.add(job.teacher_id)
            return
        tasks = chunk_tasks(job, store, teacher_spec(job, self.cluster.torch_threads))
        self.say(f"store of {job.req.teacher} ({job.teacher_id[:12]}): {len(tasks)} chunk task(s) over "
                 f"{spec.views} views")
        total = job.shape.views * job.shape.samples
        self.ticks[job.teacher_id] = (self.progress(total, total - sum(t.rows for t in tasks)) if self.progress
                                      else (lambda _rows: None))
        self.fills_left[job.teacher_id] = len(tasks)
        for task in tasks:
            future = submit_fill(self.cluster.client, task, self.cluster.resources)
            self.what[future.key] = ("fill", job.teacher_id, f"the store of {job.req.teacher}")
            self.futures.append(future)
            self.pending.add(future)
        if not tasks:  # every chunk was written by a run that stopped before marking the store complete
            self._finish_store(job.teacher_id)

    def _let_go(self, teacher_id: str) -> None:
        """Release a complete store's writer lock now, not at the grid's end: the runs read it under a shared lock."""
        lock = self.locks.pop(teacher_id, None)
        if lock is not None:
            lock.__exit__(None, None, None)

    def _finish_store(self, teacher_id: str) -> None:
        """Every chunk written: evaluate the teacher, mark the store complete, start the runs that waited for it."""
        job = next(j for j in self.jobs.values() if j.teacher_id == teacher_id)
        finish(job, self.stores[teacher_id])
        self._let_go(teacher_id)
        self.complete.add(teacher_id)
        if self.plan_ready and all(j.teacher_id in self.complete for j in self.jobs.values()):
            self.result.seconds["precompute"] = time.perf_counter() - self.t0
        self._submit_ready()

    # -- 4. the runs, once every teacher is final -------------------------------------------------

    def _plan_runs(self) -> None:
        """Every teacher's id is known: refuse another grid's finished runs (before any run), evaluate the
        ensemble, and submit the runs whose stores are complete."""
        spec, result = self.spec, self.result
        result.seconds["teachers"] = time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        jobs = [self.jobs[i] for i in range(len(spec.teachers))]
        result.teachers = [teacher_entry(spec, t, j.teacher_id, j.plan_id, None) for t, j in zip(spec.teachers, jobs)]
        planned = plan_runs(spec, result.ids, self.device, result)
        self.waiting = [(row, seed, req) for row, seed, req in planned if not RunDir(req.out).finished]
        self.tally = Tally.after_planning(result, len(self.waiting), self.cluster.slots, self.say)
        result.ensemble = ensemble_of(spec, result.ids, self.dataset, self.device, self.say)
        self.plan_ready = True
        if all(j.teacher_id in self.complete for j in jobs):
            result.seconds["precompute"] = time.perf_counter() - self.t0
        self._submit_ready()

    def _submit_ready(self) -> None:
        if not self.plan_ready:
            return
        for t in self.result.teachers:
            if t["test_accuracy"] is None and t["id"] in self.complete:
                t["test_accuracy"] = Cache.at(self.spec.cache).open_teacher(t["id"]).attrs.get("test_accuracy")
        ready = [(row, seed, req) for row, seed, req in self.waiting if set(req.teachers) <= self.complete]
        self.waiting = [w for w in self.waiting if w not in ready]
        for row, seed, req in ready:
            assert self.tally is not None
            self.tally.start()
            self._submit(distill_task, req, self.cluster.torch_threads,
                         key=_key(f"run-{row.label}-seed{seed}", req.out), what=("run", row, seed, req))


def _key(what: str, out: Path) -> str:
    """A task's dask key: what it is and a digest of where it writes, so that two grids on one scheduler never
    share a key (dask would hand the second the first one's result)."""
    return f"kdcache-{what}-{hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:12]}"


def _reason(exc: BaseException) -> str:
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    if isinstance(exc, KilledWorker):
        return "its worker died every time it ran (out of memory, or killed?); see the dask worker logs"
    if isinstance(exc, FutureCancelledError):
        return "cancelled by the dask cluster (did the scheduler stop?)"
    return one_line(exc)


# -- the tasks (run on a worker) -----------------------------------------------------------------------


def _worker_name() -> str:
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # not on a worker
        return "this process"
    return f"worker {worker.name}" if str(worker.name) != worker.address else worker.address


def train_teacher_task(req: TrainTeacherRequest, torch_threads: int | None) -> dict[str, Any]:
    """Train (or resume) one teacher on a worker; how long it took and where."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    t0 = time.perf_counter()
    train_teacher(req)
    return {"seconds": time.perf_counter() - t0, "worker": _worker_name()}


def distill_task(req: DistillRequest, torch_threads: int | None) -> dict[str, Any]:
    """Train one (row, seed) run on a worker, resuming it from its last checkpoint when an epoch of it was saved
    (a rerun after a killed worker, or a grid run again); how long it took and where."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
        if req.read_threads is None:
            req = replace(req, read_threads=torch_threads)
    t0 = time.perf_counter()
    run = RunDir(req.out)
    if not run.finished:
        distill(replace(req, resume=run.started))
    return {"seconds": time.perf_counter() - t0, "worker": _worker_name()}
