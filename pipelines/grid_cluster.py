"""A grid on a dask cluster: teachers, stores and every (row, seed) run as dask tasks, each started once what it
needs exists, so that independent work runs side by side.

Read top to bottom (:func:`run_grid_on_cluster`):

1. the cluster starts (a local one of ``--workers`` devices with ``--runs-per-device``
   worker processes each, or the existing one at ``--scheduler``), and its dashboard's
   address is said when it has one;
2. every teacher that is missing or part-trained is trained as a task, side by side;
3. once every teacher is final, this process prepares each store (the teacher's id,
   the plan, the writer lock), refuses a finished run of another grid before any
   student trains, and submits every store's pending chunks as the cluster
   precompute's own tasks (:mod:`kdcache.pipelines.precompute_cluster`); it evaluates
   the teachers' ensemble while they run;
4. a store whose chunks are all written is finished here (test evaluation, marked
   complete), and every run whose teachers' stores are complete is submitted;
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
import time
from dataclasses import replace
from typing import Any

import torch

from kdcache.data import DataSet
from kdcache.errors import KdcacheError
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.grid import (
    GridResult, GridSpec, OnUpdate, Progress, Row, Say, Tally, _ensemble, one_line, plan_runs,
    teacher_state,
)
from kdcache.pipelines.precompute import (
    PrecomputeRequest, TeacherJob, ensure_plan, finish, prepare, warn_lacking_guarantee,
)
from kdcache.pipelines.precompute_cluster import (
    Cluster, ClusterOptions, chunk_tasks, check_cluster_options, dask_client, submit_fill, teacher_spec,
)
from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher
from kdcache.runs import RunDir
from kdcache.store import TeacherStore


def run_grid_on_cluster(spec: GridSpec, result: GridResult, dataset: DataSet, options: ClusterOptions,
                        device: str | None, say: Say, progress: Progress | None, on_update: OnUpdate) -> None:
    """Run ``spec`` on a dask cluster, filling ``result`` as :func:`kdcache.pipelines.grid.run_grid` does."""
    check_cluster_options(spec.cache, device)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(dask_client(options.workers, options.scheduler, device,
                                                  options.runs_per_device, dashboard=True))
        say(_describe(cluster, options))
        _Grid(spec, result, dataset, cluster, device, say, progress, on_update, stack).run()


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
        self.what: dict[str, tuple[Any, ...]] = {}       # a future's key -> ("teacher", i) / ("fill", id) / ("run", ...)
        self.futures: list[Any] = []
        self.jobs: list[TeacherJob] = []
        self.stores: dict[str, TeacherStore] = {}        # stores being written, by teacher id
        self.fills_left: dict[str, int] = {}
        self.complete: set[str] = set()                  # teacher ids whose stores are complete
        self.waiting: list[tuple[Row, int, DistillRequest]] = []
        self.tally: Tally | None = None
        self.tick: Any = None
        self.t0 = time.perf_counter()

    def run(self) -> None:
        try:
            self._train_teachers()
            if not self.futures:
                self._start_stores()
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
            self.result.add_failure(row.label, seed, _reason(exc))
            assert self.tally is not None
            self.tally.fail(row.label, seed, _reason(exc))
            self.on_update(self.result)
            return
        if kind == "teacher":
            self.say(f"{about[-1]}: trained in {value['seconds']:.1f} s on {value['worker']}")
            if not any(w[0] == "teacher" for w in self.what.values()):
                self._start_stores()
        elif kind == "fill":
            teacher_id = about[0]
            if self.tick:
                self.tick(value)
            self.fills_left[teacher_id] -= 1
            if not self.fills_left[teacher_id]:
                job = next(j for j in self.jobs if j.teacher_id == teacher_id)
                finish(job, self.stores[teacher_id])
                self._store_complete(teacher_id)
        else:
            row, seed, req = about
            record = RunDir(req.out).load()
            self.result.add_run(row.label, seed, record, seconds=round(value["seconds"], 1), worker=value["worker"])
            assert self.tally is not None
            self.tally.finish(row.label, seed, record.best_top1, record.final_top1, value["seconds"], value["worker"])
            self.on_update(self.result)

    # -- 2. teachers ----------------------------------------------------------------------------

    def _train_teachers(self) -> None:
        spec, setup, k = self.spec, self.spec.setup, len(self.spec.teachers)
        for i, t in enumerate(spec.teachers, 1):
            state = teacher_state(t.checkpoint, t.epochs)
            if state == "done":
                self.result.reused["teachers"] += 1
                continue
            self.say(f"teacher {i}/{k}: training {t.arch}{' (' + t.name + ')' if t.name else ''} for {t.epochs} "
                     f"epochs (seed {t.seed}, set-up {setup.name}) into {t.checkpoint}"
                     f"{' (resuming)' if state == 'partial' else ''}, as a task")
            t.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            req = TrainTeacherRequest(arch=t.arch, dataset=spec.dataset, out=t.checkpoint.resolve(),
                                      data_root=spec.data_root.resolve() if spec.data_root else None,
                                      epochs=t.epochs, batch_size=setup.batch_size, lr=setup.lr_for(t.arch),
                                      weight_decay=setup.weight_decay, milestones=setup.milestones_for(t.epochs),
                                      seed=t.seed, device=self.device, resume=state == "partial",
                                      label_map=dict(t.label_map) if t.label_map else None)
            self._submit(train_teacher_task, req, self.cluster.torch_threads,
                         key=f"kdcache-teacher-{i}-{t.checkpoint.name}", what=("teacher", f"teacher {i} ({t.arch})"))

    # -- 3. stores, the ensemble, the runs' plan -----------------------------------------------

    def _start_stores(self) -> None:
        spec, result = self.spec, self.result
        result.seconds["teachers"] = time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        self.jobs = [prepare(PrecomputeRequest(teacher=t.arch, checkpoint=t.checkpoint, dataset=spec.dataset,
                                               data_root=spec.data_root, cache=spec.cache, views=spec.views,
                                               plan_seed=spec.plan_seed, device=self.device, features=spec.features),
                             self.dataset)
                     for t in spec.teachers]
        result.teachers = [{"name": t.name, "arch": t.arch, "checkpoint": str(t.checkpoint), "id": j.teacher_id,
                            "plan_id": j.plan_id, "features": spec.features, "test_accuracy": None}
                           for t, j in zip(spec.teachers, self.jobs)]
        planned = plan_runs(spec, result.ids, self.device, result)  # refuses another grid's runs, before any run
        self.waiting = [(row, seed, req) for row, seed, req in planned if not RunDir(req.out).finished]
        result.reused["runs"] += len(planned) - len(self.waiting)
        self.tally = Tally(len(planned) + result.n_failed, len(planned) - len(self.waiting), self.cluster.slots,
                           self.say)
        self.tally.failed = result.n_failed

        job0 = self.jobs[0]
        cache = job0.cache
        warn_lacking_guarantee(cache, self.say)
        fills = []
        for job in {j.teacher_id: j for j in self.jobs}.values():
            if job.is_complete():
                result.reused["stores"] += 1
                self.complete.add(job.teacher_id)
                continue
            cache.ensure_writable()
            ensure_plan(cache, job0.dataset, job0.recipe, spec.views, spec.plan_seed, job0.plan_id, None)
            self.stack.enter_context(cache.teacher_lock(job.teacher_id))
            store = job.open_store()
            if store.attrs.get("complete"):  # finished by someone else meanwhile
                self.complete.add(job.teacher_id)
                continue
            self.stores[job.teacher_id] = store
            tasks = chunk_tasks(job, store, teacher_spec(job, self.cluster.torch_threads))
            fills += tasks
            self.fills_left[job.teacher_id] = len(tasks)
            self.say(f"store of {job.req.teacher} ({job.teacher_id[:12]}): {len(tasks)} chunk task(s) "
                     f"over {spec.views} views")
        if fills and self.progress:
            total = sum(j.shape[0] * j.shape[1] for j in self.jobs if j.teacher_id in self.fills_left)
            self.tick = self.progress(total, total - sum(t.rows for t in fills))
        for task in fills:
            future = submit_fill(self.cluster.client, task, self.cluster.resources)
            self.what[future.key] = ("fill", task.teacher.teacher_id, f"the store of {task.teacher.arch}")
            self.futures.append(future)
            self.pending.add(future)
        for teacher_id in [t for t, n in self.fills_left.items() if n == 0]:  # nothing left to write
            job = next(j for j in self.jobs if j.teacher_id == teacher_id)
            finish(job, self.stores[teacher_id])
            self.complete.add(teacher_id)
        result.ensemble = _ensemble(spec, result.ids, self.dataset, self.device, self.say)
        self._submit_ready()

    def _store_complete(self, teacher_id: str) -> None:
        self.complete.add(teacher_id)
        store = self.stores[teacher_id]
        for t in self.result.teachers:
            if t["id"] == teacher_id:
                t["test_accuracy"] = store.attrs.get("test_accuracy")
        if all(j.teacher_id in self.complete for j in self.jobs):
            self.result.seconds["precompute"] = time.perf_counter() - self.t0
        self._submit_ready()

    # -- 4. runs -----------------------------------------------------------------------------------

    def _submit_ready(self) -> None:
        if all(j.teacher_id in self.complete for j in self.jobs):
            for t, j in zip(self.result.teachers, self.jobs):  # complete before this run: read it from the store
                if t["test_accuracy"] is None:
                    t["test_accuracy"] = j.open_store().attrs.get("test_accuracy")
        ready = [(row, seed, req) for row, seed, req in self.waiting if set(req.teachers) <= self.complete]
        self.waiting = [w for w in self.waiting if w not in ready]
        for row, seed, req in ready:
            assert self.tally is not None
            self.tally.start()
            self._submit(distill_task, req, self.cluster.torch_threads,
                         key=f"kdcache-run-{row.label}-seed{seed}",
                         what=("run", row, seed, req))


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
