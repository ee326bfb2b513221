"""Precompute on a dask cluster: this process coordinates, dask workers fill the chunks.

Read top to bottom:

1. the coordinator (:func:`precompute_on_cluster`) resolves every teacher, draws or
   opens the plan, takes each teacher's writer lock for the whole run and creates
   every store before anything is submitted;
2. it submits one task per (teacher, view, run of at most ``TASK_ROWS`` rows of
   pending chunks) to a local cluster (``workers``: one process per CPU share, or one
   per GPU with that GPU alone visible to it) or to an existing scheduler;
3. each task (:func:`fill_chunks`, on a worker) loads the teacher once per worker
   process, skips the chunks whose completion marker exists, replays the rows of
   the others, forwards them in exactly the batches the serial path uses (so the
   stores are bit-identical to a serial run on the same device), refuses NaN or
   inf, and writes those chunks and their markers. Workers write disjoint chunks
   only; they never create a store nor mark one complete;
4. when every task is done, the coordinator evaluates each teacher on the test
   split and marks its store complete.

A worker that dies mid-task loses only its unmarked chunks: the scheduler runs the
task again on a live worker (up to ``distributed.scheduler.allowed-failures``
times), and the rerun skips what was marked. A task that raises is retried once
(``retries=1``: a transient storage error).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from kdcache.data import DataSet, load_dataset
from kdcache.device import resolve_device
from kdcache.errors import CheckpointError, DatasetError, KdcacheError
from kdcache.models import build_model, load_checkpoint
from kdcache.pipelines.precompute_engine import (
    PrecomputeRequest, PrecomputeResult, Progress, ProgressFactory, TeacherJob, Warn, ensure_plan, finish,
    forward_batch_size, prepare, warn_lacking_guarantee, write_chunks,
)
from kdcache.store import Cache, PlanStore, TeacherStore, sha256_file

TASK_ROWS = 65536  # a task covers at most this many rows (whole chunks, one view): a CIFAR view is one task
TASK_RETRIES = 1
LOG_LEVEL = logging.ERROR  # dask's own logging: errors only, on the command line


@dataclass(frozen=True)
class TeacherSpec:
    """What a worker needs to rebuild a teacher and find its store: plain, picklable values."""

    cache: str               # absolute local path or URL, as the workers must see it
    teacher_id: str
    plan_id: str
    arch: str
    checkpoint: str          # absolute path, checked against checkpoint_sha256 on the worker
    checkpoint_sha256: str
    dataset: str
    data_root: str | None
    fingerprint: str         # of the data set the plan was drawn on
    batch_size: int | None   # None: the device's default, as in the serial path
    device: str | None
    torch_threads: int | None  # CPU threads per worker process on a local cluster (None: the worker's setting)


@dataclass(frozen=True)
class ChunkTask:
    """Whole chunks of one view of one teacher's store."""

    teacher: TeacherSpec
    view: int
    chunks: tuple[int, ...]
    rows: int


# -- the coordinator ----------------------------------------------------------------------------


def precompute_on_cluster(reqs: Sequence[PrecomputeRequest], workers: int | None = None, scheduler: str | None = None,
                          progress: ProgressFactory | None = None, warn: Warn | None = None) -> list[PrecomputeResult]:
    """Precompute several teachers on one plan with dask workers; results in the order of ``reqs``."""
    _check_cluster_options(reqs, workers, scheduler)
    first = reqs[0]
    dataset = load_dataset(first.dataset, first.data_root)
    jobs = [prepare(r, dataset) for r in reqs]
    complete = [j for j in jobs if j.is_complete()]
    for job in complete:  # complete, and what it says it is (as precompute checks in one process)
        job.cache.check_teacher(job.cache.open_teacher(job.teacher_id))
    results = {j.teacher_id: j.complete_result() for j in complete}
    todo = list({j.teacher_id: j for j in jobs if j.teacher_id not in results}.values())
    if todo:
        results.update(_run(todo, workers, scheduler, progress, warn))
    return [results[j.teacher_id] for j in jobs]


def _run(jobs: list[TeacherJob], workers: int | None, scheduler: str | None, progress: ProgressFactory | None,
         warn: Warn | None) -> dict[str, PrecomputeResult]:
    job0 = jobs[0]
    cache = job0.cache
    warn_lacking_guarantee(cache, warn)
    cache.ensure_writable()
    ensure_plan(cache, job0.dataset, job0.recipe, job0.req.views, job0.req.plan_seed, job0.plan_id, progress)
    results: dict[str, PrecomputeResult] = {}
    with contextlib.ExitStack() as stack:
        for job in jobs:
            stack.enter_context(cache.teacher_lock(job.teacher_id))
        cluster = stack.enter_context(dask_client(workers, scheduler, job0.req.device))
        stores = {job.teacher_id: job.open_store() for job in jobs}  # every store exists before any task runs
        for job in jobs:
            cache.check_teacher(stores[job.teacher_id])  # what it says it is, before it is resumed or called complete
            if stores[job.teacher_id].attrs.get("complete"):  # finished by someone else meanwhile
                results[job.teacher_id] = job.complete_result()
        jobs = [j for j in jobs if j.teacher_id not in results]
        tasks = [t for job in jobs for t in chunk_tasks(job, stores[job.teacher_id],
                                                        teacher_spec(job, cluster.torch_threads))]
        total = sum(job.shape.views * job.shape.samples for job in jobs)
        tick = progress(total, total - sum(t.rows for t in tasks)) if progress else None
        run_tasks(cluster.client, tasks, cluster.resources, tick)
        for job in jobs:
            results[job.teacher_id] = job.result("written", finish(job, stores[job.teacher_id]))
    return results


def chunk_tasks(job: TeacherJob, store: TeacherStore, spec: TeacherSpec) -> list[ChunkTask]:
    """The store's pending chunks as tasks: runs of whole shards of one view (a shard is one chunk in a store
    without shards), at most ``TASK_ROWS`` rows each (at least one shard). No two tasks share a shard, so no two
    workers ever write the same file."""
    per_task = max(1, TASK_ROWS // store.shard_rows)
    by_view: dict[int, list[int]] = {}
    for v, s in store.pending_shards():
        by_view.setdefault(v, []).append(s)
    tasks = []
    for v, shards in by_view.items():
        for i in range(0, len(shards), per_task):
            run = tuple(c for s in shards[i:i + per_task] for c in store.shard_chunks(s))
            tasks.append(ChunkTask(spec, v, run, store.rows_in(run)))
    return tasks


def run_tasks(client: Any, tasks: list[ChunkTask], resources: dict[str, int] | None,
              tick: Progress | None = None) -> None:
    """Submit every task, wait for all of them (``tick(rows)`` as each finishes); the first failure stops the run."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    futures = {submit_fill(client, t, resources): t for t in tasks}
    try:
        for future in as_completed(futures):
            future.result()  # raises the task's error
            if tick:
                tick(futures[future].rows)
    except KilledWorker as exc:
        raise KdcacheError(f"a precompute task killed every worker that ran it ({exc}); "
                           "see the dask worker logs (out of memory?)") from None
    except FutureCancelledError:
        raise KdcacheError("the dask cluster cancelled the precompute tasks (did the scheduler stop?)") from None
    finally:
        client.cancel(list(futures))


def submit_fill(client: Any, task: ChunkTask, resources: dict[str, int] | None) -> Any:
    """Submit one :class:`ChunkTask` to ``client`` (retried once when it raises); its dask future."""
    return client.submit(fill_chunks, task, key=f"kdcache-fill-{task.teacher.teacher_id}-v{task.view}-c{task.chunks[0]}",
                         retries=TASK_RETRIES, resources=resources)


def teacher_spec(job: TeacherJob, torch_threads: int | None) -> TeacherSpec:
    """What a worker needs to fill ``job``'s chunks, as plain values."""
    req = job.req
    location = job.cache.location
    return TeacherSpec(
        cache=str(Path(location.where).resolve()) if not location.is_url else location.where,
        teacher_id=job.teacher_id, plan_id=job.plan_id, arch=req.teacher,
        checkpoint=str(Path(req.checkpoint).resolve()), checkpoint_sha256=job.checkpoint_sha256,
        dataset=req.dataset, data_root=str(Path(req.data_root).resolve()) if req.data_root else None,
        fingerprint=job.dataset.fingerprint, batch_size=req.batch_size, device=req.device,
        torch_threads=torch_threads,
    )


def _check_cluster_options(reqs: Sequence[PrecomputeRequest], workers: int | None, scheduler: str | None) -> None:
    ClusterOptions(workers, scheduler)
    check_cluster_options(reqs[0].cache, reqs[0].device)


def check_cluster_options(cache: Path | str | None, device: str | None) -> None:
    """Refuse, in one line, a cache the workers cannot see and a device naming one GPU."""
    where = Cache.at(cache)
    if where.location.protocol == "memory":
        raise KdcacheError(f"--cache {where.root} lives in this process's memory, which dask workers cannot see; "
                           "use a directory or a URL every worker can reach")
    try:
        one_gpu = device is not None and torch.device(device).index is not None
    except RuntimeError:  # not a device name: resolve_device says so in one line
        one_gpu = False
    if one_gpu:
        raise KdcacheError(f"--device {device} names one GPU; with --workers/--scheduler each worker uses "
                           "its own GPU: pass --device cuda")


@dataclass(frozen=True)
class ClusterOptions:
    """Where a grid's work runs when not in this process: a local dask cluster of ``workers`` devices (GPUs, or
    shares of the CPU's cores), or the existing cluster at ``scheduler``; ``runs_per_device`` tasks share a device
    (one worker process each)."""

    workers: int | None = None
    scheduler: str | None = None
    runs_per_device: int = 1

    def __post_init__(self) -> None:
        if self.workers is not None and self.scheduler is not None:
            raise KdcacheError("pass --workers N (a local cluster) or --scheduler ADDRESS (an existing one), not both")
        if self.workers is None and self.scheduler is None:
            raise KdcacheError("a cluster needs --workers N or --scheduler ADDRESS")
        if self.workers is not None and self.workers < 1:
            raise KdcacheError(f"--workers must be at least 1 (got {self.workers})")
        if self.runs_per_device < 1:
            raise KdcacheError(f"--runs-per-device must be at least 1 (got {self.runs_per_device})")
        if self.scheduler is not None and self.runs_per_device != 1:
            raise KdcacheError("--runs-per-device shapes a local cluster (--workers); an existing cluster's workers "
                               "are its own")


# -- the cluster --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """A dask client and what its workers are: GPUs (one each) or CPU processes, and torch threads a task."""

    client: Any
    gpu_workers: bool
    torch_threads: int | None      # None: the workers' own setting (an existing cluster)
    dashboard: str | None = None   # the local cluster's dashboard address, when one is served

    @property
    def resources(self) -> dict[str, int] | None:
        """What a task asks of a worker: one GPU on a GPU cluster, nothing else."""
        return {"GPU": 1} if self.gpu_workers else None

    @property
    def slots(self) -> int:
        """How many tasks run at once: every worker's threads."""
        workers = self.client.scheduler_info().get("workers", {})
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None, device: str | None, per_device: int = 1,
                dashboard: bool = False) -> Iterator[Cluster]:
    """A dask client, closed on exit, with what its workers are (:class:`Cluster`).

    ``scheduler``: connect to that existing cluster (its workers must import kdcache and reach
    the cache, the checkpoints and the data). ``workers``: start a local cluster on that many
    devices: ``per_device`` single-threaded worker processes on each GPU if this machine's
    device is CUDA, else ``workers`` × ``per_device`` processes sharing the cores evenly.
    ``dashboard``: serve dask's dashboard on a free port (needs bokeh).
    """
    from distributed import Client

    if scheduler is not None:
        try:
            client = Client(scheduler)
        except (OSError, ValueError) as exc:
            raise KdcacheError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
        with client:
            serves = dashboard and "dashboard" in client.scheduler_info().get("services", {}) and _has_bokeh()
            yield Cluster(client, _has_gpu_workers(client), None, client.dashboard_link if serves else None)
        return
    assert workers is not None
    gpus = _local_gpu_ids(device)
    if gpus and workers > len(gpus):
        raise KdcacheError(f"--workers {workers}, but this machine has {len(gpus)} GPU(s) and kdcache runs "
                           "one worker per GPU; pass fewer workers, or --device cpu")
    address = ":0" if dashboard and _has_bokeh() else None
    with plain_worker_environment():
        cluster = (gpu_cluster(gpus[:workers], per_device, address) if gpus
                   else cpu_cluster(workers * per_device, address))
        with cluster, Client(cluster) as client:
            yield Cluster(client, bool(gpus), max(1, _cpu_count() // (workers * per_device)),
                          client.dashboard_link if address else None)


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


@contextlib.contextmanager
def plain_worker_environment() -> Iterator[None]:
    """Start workers without dask's pre-spawn environment, and leave this process's environment as it was.

    dask's nannies set ``MALLOC_TRIM_THRESHOLD_`` (and thread counts) in ``os.environ``
    before spawning a worker: the former fixes glibc's mmap threshold, which made
    torch's CPU forward pass a third slower in a worker (measured; threads are set per
    task instead), and both would otherwise stay in the coordinator's environment.
    """
    import dask

    saved = dict(os.environ)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
            yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def cpu_cluster(n_workers: int, dashboard_address: str | None = None) -> Any:
    """A local cluster of ``n_workers`` single-threaded worker processes (torch threads are set per task)."""
    from distributed import LocalCluster

    # ":0" when no dashboard is asked for: the scheduler's HTTP server (health, metrics) still starts, on a free
    # port rather than a taken 8787 (a second grid on the machine), which dask would warn about
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        dashboard_address=dashboard_address or ":0", silence_logs=LOG_LEVEL)


def gpu_worker_specs(gpu_ids: Sequence[str], per_device: int = 1) -> dict[str, dict[str, Any]]:
    """``per_device`` single-threaded workers (each under a nanny, each its own process) per GPU, each seeing only
    its own GPU and offering ``GPU: 1``.

    ``CUDA_VISIBLE_DEVICES`` is set in the worker process before its first CUDA call
    (torch initialises CUDA lazily), so ``cuda`` in a worker is that one GPU.
    """
    from distributed import Nanny

    return {
        f"gpu-{gpu}" + (f"-{k}" if per_device > 1 else ""): {
            "cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                      "env": {"CUDA_VISIBLE_DEVICES": str(gpu)}, "silence_logs": LOG_LEVEL}}
        for gpu in gpu_ids for k in range(per_device)
    }


def gpu_cluster(gpu_ids: Sequence[str], per_device: int = 1, dashboard_address: str | None = None) -> Any:
    """A local cluster with ``per_device`` workers on each GPU in ``gpu_ids`` (see :func:`gpu_worker_specs`)."""
    from distributed import Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": dashboard_address is not None,
                                               "dashboard_address": dashboard_address}}
    return SpecCluster(workers=gpu_worker_specs(gpu_ids, per_device), scheduler=scheduler, silence_logs=LOG_LEVEL)


def _local_gpu_ids(device: str | None) -> list[str]:
    """The GPUs a local cluster should use: none unless the device resolves to CUDA here.

    Ids follow this process's ``CUDA_VISIBLE_DEVICES`` when it is set, so a user's
    restriction carries over to the workers.
    """
    if resolve_device(device).type != "cuda":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _has_gpu_workers(client: Any) -> bool:
    workers = client.scheduler_info().get("workers", {})
    return any(w.get("resources", {}).get("GPU") for w in workers.values())


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- the task (runs on a worker) ----------------------------------------------------------------

# per worker process: data sets and teachers, loaded once
_datasets: dict[tuple[str, str | None], DataSet] = {}  # by (name, data root)
_models: dict[tuple[str, str, int, str], torch.nn.Module] = {}  # by (arch, checkpoint sha256, classes, device)
_loading = threading.Lock()


def fill_chunks(task: ChunkTask) -> int:
    """Write the task's chunks whose markers are missing, with their markers; return the rows written. The teacher
    runs in the precision the store records (attribute ``forward``, from the coordinator's ``--amp``), whatever
    this worker's device."""
    spec = task.teacher
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    device = resolve_device(spec.device)
    dataset = _worker_dataset(spec)
    model = _worker_model(spec, dataset.num_classes, device)
    cache = Cache.at(spec.cache)
    store = TeacherStore.open(cache.teacher_location(spec.teacher_id), spec.teacher_id, require_complete=False,
                              writable=True)
    plan = PlanStore.open(cache.plan_location(spec.plan_id), spec.plan_id)
    wanted = set(task.chunks)
    todo = [(v, c) for v, c in store.pending(task.view) if c in wanted]
    write_chunks(model, dataset, plan, store, todo, device, forward_batch_size(device, spec.batch_size))
    return store.rows_in(c for _, c in todo)


def _worker_dataset(spec: TeacherSpec) -> DataSet:
    key = (spec.dataset, spec.data_root)
    with _loading:
        if key not in _datasets:
            _datasets[key] = load_dataset(spec.dataset, spec.data_root)
    dataset = _datasets[key]
    if dataset.fingerprint != spec.fingerprint:
        raise DatasetError(f"the {spec.dataset} data at {spec.data_root} on worker {os.uname().nodename} differs "
                           "from the coordinator's; every worker must see the same data set")
    return dataset


def _worker_model(spec: TeacherSpec, num_classes: int, device: torch.device) -> torch.nn.Module:
    key = (spec.arch, spec.checkpoint_sha256, num_classes, str(device))
    with _loading:
        if key not in _models:
            if not Path(spec.checkpoint).is_file():
                raise CheckpointError(f"checkpoint {spec.checkpoint} not found on worker {os.uname().nodename}; "
                                      "every worker must see the checkpoints at the same path")
            if sha256_file(spec.checkpoint) != spec.checkpoint_sha256:
                raise CheckpointError(f"checkpoint {spec.checkpoint} on worker {os.uname().nodename} differs from "
                                      "the coordinator's (sha256); every worker must see the same file")
            model = build_model(spec.arch, num_classes)
            load_checkpoint(model, spec.checkpoint)
            _models[key] = model.eval().to(device)
    return _models[key]
