"""A grid on a dask cluster (`--workers`): the serial runner's table and final weights bit for bit with a worker
SIGKILLed mid-run, failures (a refused option, a NaN stop, a damaged checkpoint) contained, reported and retried,
the progress lines, and the refusals."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli, torch_threads
from kdcache.models import build_model
from kdcache.pipelines import demo, grid, grid_cluster, grid_runner
from kdcache.pipelines import precompute_cluster as pcc
from kdcache.pipelines.grid import GridSpec, GridTeacher, Row, Tally
from kdcache.pipelines.precompute_cluster import ClusterOptions
from kdcache.runs import RunDir
from kdcache.store.form import FeatureForm

WORKERS = 2
ROWS = (Row("ce", "ce"), Row("aver", "aver"), Row("camkd", "camkd"), Row("fitnet-mkd", "fitnet-mkd"))


def task_threads() -> int:
    """The torch threads a task of a local cluster of WORKERS gets here: the serial reference runs with as many,
    since torch's CPU kernels sum in an order that depends on the thread count."""
    return max(1, pcc._cpu_count() // WORKERS)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[GridTeacher, ...]:
    """Three digits resnet8 checkpoints from elsewhere (seeded random weights): used as they are, never trained."""
    root = tmp_path_factory.mktemp("grid-teachers")
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        path = root / f"resnet8-{seed}.pth"
        torch.save({"model": build_model("resnet8", 10).state_dict()}, path)
        out.append(GridTeacher("resnet8", path, epochs=1, seed=seed))
    return tuple(out)


def grid_spec(root: Path, teachers: tuple[GridTeacher, ...], rows: tuple[Row, ...] = ROWS) -> GridSpec:
    return GridSpec(name="t", dataset="digits", teachers=teachers, student="resnet8", rows=rows, out=root,
                    runs=root / "runs", views=2, epochs=2, seeds=1, features=FeatureForm.SPATIAL, cache=root / "cache")


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory, teachers: tuple[GridTeacher, ...]) -> tuple[GridSpec, str]:
    """The grid run by the serial runner, at a cluster task's torch threads: the reference spec and table."""
    spec = grid_spec(tmp_path_factory.mktemp("serial"), teachers)
    with torch_threads(task_threads()):
        result = grid_runner.run_grid(spec, "cpu")
    assert result.n_failed == 0 and len(result.students) == len(ROWS)
    return spec, grid.format_table(result, "t")


def final_weights(run: RunDir) -> dict[str, torch.Tensor]:
    return torch.load(run.file(RunDir.LAST), map_location="cpu", weights_only=False)["model"]


def test_a_worker_killed_mid_run_ends_in_the_serial_runners_table_and_weights(
        serial, teachers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster_faults import KillAfterCheckpoint

    ref, ref_table = serial
    log, marker = tmp_path / "faults.log", tmp_path / "killed"
    original = grid_cluster.dask_client

    @contextlib.contextmanager
    def with_a_killer(*args, **kwargs):  # type: ignore[no-untyped-def]
        with original(*args, **kwargs) as cluster:
            cluster.client.register_plugin(KillAfterCheckpoint(str(log), str(marker), "camkd/seed0"))
            yield cluster

    monkeypatch.setattr(grid_cluster, "dask_client", with_a_killer)
    said: list[str] = []
    spec = grid_spec(tmp_path / "cluster", teachers)
    result = grid_runner.run_grid(spec, "cpu", said.append, cluster=ClusterOptions(workers=WORKERS))

    events = log.read_text().splitlines()
    kills = [e for e in events if e.startswith("kill ")]
    assert len(kills) == 1 and kills[0].split()[2] == "1", events  # killed after epoch 1 of 2 was saved
    killed_pid = kills[0].split()[1]
    camkd_saves = [e.split() for e in events if e.startswith("save ") and e.split()[2] == "camkd/seed0"]
    assert [s[3] for s in camkd_saves] == ["1", "2"]                # resumed at epoch 2, epoch 1 not trained again
    assert camkd_saves[1][1] != killed_pid                          # by another worker process
    assert result.n_failed == 0
    assert grid.format_table(result, "t") == ref_table
    for row in ROWS:
        got, want = final_weights(spec.run_dir(row.label, 0)), final_weights(ref.run_dir(row.label, 0))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), row.label
    # the cluster's own precompute wrote the stores; the progress said every run, where, and what was left
    assert sum(line.startswith("store of resnet8") for line in said) == 3
    finished = [line for line in said if re.match(r"^run \S+ seed 0: top-1 \d+\.\d\d% \(last epoch", line)]
    assert len(finished) == len(ROWS) and all(" on worker " in line for line in finished)
    assert said[-1] == f"runs: {len(ROWS)} done, 0 running, 0 queued, 0 failed of {len(ROWS)}"
    assert re.search(r"^grid on a local dask cluster: 2 CPU task slot\(s\), \d+ torch thread\(s\) a task; ",
                     said[0]), said[0]
    assert "runs: 4 done" in (spec.out / "grid.log").read_text()


def test_failed_runs_are_reported_and_the_others_go_on(teachers, tmp_path: Path) -> None:
    """A refused option and a NaN stop (beta 1e38 overflows the feature term) fail their runs only; the table and
    the JSON record say why; a re-run retries the failed ones and skips the finished."""
    rows = (Row("ce", "ce"), Row("nan", "camkd", options=(("beta", 1e38),)), Row("bad", "camkd", options=(("nope", 1),)),
            Row("aver", "aver"))
    spec = grid_spec(tmp_path, teachers, rows)
    said: list[str] = []
    result = grid_runner.run_grid(spec, "cpu", said.append, cluster=ClusterOptions(workers=WORKERS))
    assert set(result.students) == {"ce", "aver"}
    reasons = {label: [f["reason"] for f in fs] for label, fs in result.failures.items()}
    assert reasons["bad"] == ["row 'bad': camkd has no option --nope (it takes --camkd-weights, --camkd-feature-weights)"]
    assert len(reasons["nan"]) == 1 and "became nan and training stopped" in reasons["nan"][0], reasons
    table = grid.format_table(result, "t")
    assert re.search(r"^\| `camkd --beta 1e\+38` \(3 teachers, resnet8\) \| failed \| \| 0 \(1 failed\) \|$", table, re.M)
    assert "**2 runs failed** (a re-run of the same command retries them):" in table
    assert f"- nan seed 0: {reasons['nan'][0]}" in table and f"- bad seed 0: {reasons['bad'][0]}" in table
    assert any(line.startswith("run nan seed 0 FAILED: ") for line in said)
    assert said[-1].endswith("2 failed of 4")
    grid.write_result(tmp_path / "experiment.json", result)
    assert json.loads((tmp_path / "experiment.json").read_text())["failures"]["nan"][0]["reason"] == reasons["nan"][0]

    again: list[str] = []  # the serial runner: the same containment; finished runs reused, the failed retried
    second = grid_runner.run_grid(spec, "cpu", again.append)
    assert second.reused["runs"] == 2 and set(second.failures) == {"nan", "bad"}
    assert any(line.startswith("run 2/3: nan (camkd --beta 1e+38, 3 teachers), seed 0") for line in again), again


def test_the_demo_on_two_workers_reports_a_damaged_run_exits_1_and_a_rerun_retries_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = tuple(demo.DemoTeacher(t.name, "resnet8", 1, t.label_map) for t in demo.TEACHERS)
    monkeypatch.setattr(demo, "TEACHERS", tiny)
    damaged = RunDir(tmp_path / "d" / "runs" / "spatial" / "aver" / "seed0")
    damaged.path.mkdir(parents=True)
    damaged.file(RunDir.CHECKPOINT).write_bytes(b"not a checkpoint")
    args = ["demo", "--out", tmp_path / "d", "--epochs", 1, "--seeds", 1, "--device", "cpu", "--workers", WORKERS]
    first = run_cli(*args)
    assert first.exit_code == 1, first.output
    assert re.search(r"^\| `aver` \(3 teachers, resnet8\) \| failed \| \| 0 \(1 failed\) \|$", first.stdout, re.M)
    assert re.search(r"^- aver seed 0: .*checkpoint", first.stdout, re.M), first.stdout
    assert first.stderr.splitlines()[-1] == ("Error: 1 of 6 runs failed (the reasons are in the table); run the same "
                                             "command again to retry them")
    record = json.loads((tmp_path / "d" / "demo-spatial.json").read_text())
    assert set(record["students"]) == set(demo.METHODS) - {"aver"} and list(record["failures"]) == ["aver"]

    damaged.file(RunDir.CHECKPOINT).unlink()
    second = run_cli(*args)
    assert second.exit_code == 0, second.output
    assert "reused 3 teachers, 3 stores, 5 runs" in second.stdout
    assert "failed" not in second.stdout and damaged.finished


def test_progress_counts_the_runs_and_the_time_left() -> None:
    said: list[str] = []
    tally = Tally(total=5, reused=1, slots=2, say=said.append)
    for _ in range(3):
        tally.start()
    assert tally.counts() == "runs: 1 done, 2 running, 2 queued, 0 failed of 5"
    tally.finish("camkd", 0, 91.234, 90.5, 30.0, "worker 1")
    assert said == ["run camkd seed 0: top-1 91.23% (last epoch 90.50%) in 30.0 s on worker 1",
                    "runs: 2 done, 2 running, 1 queued, 0 failed of 5; about 45 s left"]  # 30 s x 3 left / 2 slots
    tally.fail("aver", 1, "NaN")
    assert said[-2:] == ["run aver seed 1 FAILED: NaN", "runs: 2 done, 1 running, 1 queued, 1 failed of 5; about 30 s left"]


def test_several_workers_a_gpu_each_see_that_gpu() -> None:
    specs = pcc.gpu_worker_specs(["0", "3"], per_device=2)
    assert list(specs) == ["gpu-0-0", "gpu-0-1", "gpu-3-0", "gpu-3-1"]
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["0", "0", "3", "3"]
    assert all(s["options"]["resources"] == {"GPU": 1} and s["options"]["nthreads"] == 1 for s in specs.values())


@pytest.mark.parametrize("extra, message", [
    (["--workers", 0], "Invalid value for '--workers'"),
    (["--workers", 2, "--scheduler", "tcp://127.0.0.1:1"], "not both"),
    (["--scheduler", "tcp://127.0.0.1:1", "--runs-per-device", 2], "--runs-per-device shapes a local cluster"),
    (["--workers", 2, "--device", "cuda:1"], "pass --device cuda"),
])
def test_refusals_are_one_clear_line(tmp_path: Path, extra: list, message: str) -> None:
    result = run_cli("demo", "--out", tmp_path / "d", *extra)
    assert result.exit_code == 2 if "Invalid value" in message else result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d" / "runs").exists()


def test_an_existing_cluster_runs_the_grid_and_one_sharing_a_process_is_refused(teachers, tmp_path: Path) -> None:
    from distributed import LocalCluster

    rows = (Row("ce", "ce"), Row("aver", "aver"))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as shared:
        with pytest.raises(grid.KdcacheError, match=r"runs 2 tasks at once in one process.*--nthreads 1"):
            grid_runner.run_grid(grid_spec(tmp_path / "a", teachers, rows), "cpu",
                          cluster=ClusterOptions(scheduler=shared.scheduler_address))
    assert not (tmp_path / "a" / "runs").exists()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        said: list[str] = []
        result = grid_runner.run_grid(grid_spec(tmp_path / "b", teachers, rows), "cpu", said.append,
                               cluster=ClusterOptions(scheduler=cluster.scheduler_address))
    assert set(result.students) == {"ce", "aver"} and not result.failures
    assert said[0] == f"grid on the dask cluster at {cluster.scheduler_address}: 2 CPU task slot(s)"


def test_experiment_run_on_two_workers_prints_the_serial_runners_table(tmp_path: Path) -> None:
    """`kdcache experiment run custom ... --workers 2` from the command line: teachers trained as tasks, the same
    table (and table.md) as the serial runner's at a task's torch threads."""
    from fakes import write_fake_cifar

    data = write_fake_cifar(tmp_path / "data", kind="cifar100", n_train=64, n_test=16, seed=0)
    args = ["experiment", "run", "custom", "--teacher", "resnet8", "--teacher", "resnet8", "--student", "resnet8",
            "--data-root", data, "--epochs", 1, "--seeds", 1, "--device", "cpu"]
    with torch_threads(task_threads()):
        serial = run_cli(*args, "--out", tmp_path / "serial", "--cache", tmp_path / "c1")
    assert serial.exit_code == 0, serial.output
    cluster = run_cli(*args, "--out", tmp_path / "cluster", "--cache", tmp_path / "c2", "--workers", WORKERS)
    assert cluster.exit_code == 0, cluster.output
    assert sum(": trained in " in line for line in cluster.stderr.splitlines()) == 2  # both teachers as tasks
    assert cluster.stdout == serial.stdout
    assert (tmp_path / "cluster" / "table.md").read_text() == serial.stdout
