"""The one grid runner's table and the light command modules: ``kdcache demo`` and ``kdcache experiment run`` print
through one formatter, and importing their commands loads no torch, zarr or dask. (The runner itself is tested end to
end, its rules for finished, killed and foreign runs included, by tests/test_demo.py and tests/test_experiments.py.)"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kdcache.errors import KdcacheError
from kdcache.pipelines import grid
from kdcache.pipelines.distill import run_args
from kdcache.pipelines.grid import GridResult, GridSpec, GridTeacher, Reference, Row
from kdcache.request import how_args
from kdcache.store.form import FeatureForm


def _result(rows: tuple[Row, ...]) -> GridResult:
    teachers = tuple(GridTeacher("resnet8", Path(f"t{i}.pth"), 1, i, name) for i, name in enumerate(("good", "")))
    spec = GridSpec(name="t", dataset="digits", teachers=teachers, student="resnet8", rows=rows, out=Path("o"),
                    runs=Path("o"), views=2, epochs=2, seeds=2)
    result = GridResult(spec, 100, 10, 32, "crop-flip")
    result.teachers = [{"name": t.name, "arch": t.arch, "id": f"{i}" * 16, "test_accuracy": 90.0 + i}
                       for i, t in enumerate(teachers)]
    result.ensemble = {"vote": 93.0, "softmax": 94.5}
    result.students = {"kd": [{"seed": 0, "best": 80.0, "last": 79.0}, {"seed": 1, "best": 82.0, "last": 81.0}]}
    return result


def test_one_table_with_and_without_reference_figures() -> None:
    rows = (Row("kd", "kd", "KD (teacher 1)", n_teachers=1), Row("camkd", "camkd"),
            Row("crd", "crd", "CRD", implemented=False))
    result = _result(rows)
    plain = grid.format_table(result, "the demo", about=["About it."], after=["", "a line after"])
    lines = plain.splitlines()
    assert lines[:4] == ["# the demo", "", "About it.", ""]
    assert "| | best epoch | last epoch | seeds |" in lines and "|---|---|---|---|" in lines
    assert "| Teacher 1 (resnet8): good | 90.00 | | |" in lines and "| Teacher 2 (resnet8) | 91.00 | | |" in lines
    assert "| Teacher (resnet8, mean ± std of 2) | 90.50 ± 0.71 | | |" in lines
    assert "| Ensemble of the 2 (majority vote) | 93.00 | | |" in lines
    assert "| Ensemble of the 2 (averaged softmax) | 94.50 | | |" in lines
    assert "| KD (teacher 1) (`kd`, teacher 1, resnet8) | 81.00 ± 1.41 | 80.00 ± 1.41 | 2 |" in lines
    assert "| `camkd` (2 teachers, resnet8) | not run | | 0 |" in lines
    assert "| CRD | not implemented in kdcache | | |" in lines
    assert lines.index("a line after") > lines.index("| CRD | not implemented in kdcache | | |")
    # the schedule the runs trained, not only the set-up's 240 epochs: official milestones 150, 180, 210 of 240
    # scaled to 2 epochs round to 1, 2, 2 (kept below 2: 1); to 1 epoch, to none
    assert any(line.startswith("Set-up: **official**, the official CA-MKD scripts") and line.endswith(
        "lr ×0.1 at 150, 180, 210. The paper's text states lr 0.1 (0.05) and weight decay 1e-4 instead (`--setup "
        "paper`). **Run here: students 2 epochs (lr ×0.1 at 1: the 240-epoch schedule scaled); teachers trained by "
        "this grid 1 epoch (constant lr)** (a teacher checkpoint from elsewhere is used as it is).") for line in lines)
    assert "Settings: 2 views of 32×32 (crop-flip, plan seed 0), 2 student epochs, 100 training samples. " \
           "Teacher stores: 000000000000, 111111111111." in lines

    paper = Reference("paper", {"kd": "72.90 ± 0.34", "crd": "73.57", "ensemble": "81.16"}, "paper: as printed")
    beside = grid.format_table(result, "an experiment", reference=paper, notes=["Source: here."]).splitlines()
    assert "| | reproduced (best epoch) | paper | last epoch | seeds |" in beside and "|---|---|---|---|---|" in beside
    assert "| Teacher 1 (resnet8): good | 90.00 | n/a | | |" in beside
    assert "| Ensemble of the 2 (majority vote) | 93.00 | 81.16 | | |" in beside
    assert "| Ensemble of the 2 (averaged softmax) | 94.50 | n/a | | |" in beside
    assert "| KD (teacher 1) (`kd`, teacher 1, resnet8) | 81.00 ± 1.41 | 72.90 ± 0.34 | 80.00 ± 1.41 | 2 |" in beside
    assert "| CRD | not implemented in kdcache | 73.57 | | |" in beside
    assert beside[-2:] == ["", "Source: here."] and any("; paper: as printed." in line for line in beside)


def test_the_commands_import_no_torch_and_offer_the_pipelines_choices() -> None:
    from kdcache.cli import demo as demo_cli, experiment as experiment_cli
    from kdcache.pipelines import demo

    assert experiment_cli.SETUP_NAMES == list(grid.SETUPS)
    assert demo_cli.FEATURES == demo.FEATURES and demo_cli.SEEDS == demo.SEEDS
    assert set(demo_cli.FEATURE_FORMS) <= set(FeatureForm) and set(experiment_cli.FEATURE_FORMS) <= set(FeatureForm)
    for module in ("kdcache.cli.demo", "kdcache.cli.experiment"):
        probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'zarr', 'dask') if m in sys.modules))"
        loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        assert loaded.strip() == "[]", (module, loaded)


def test_a_finished_run_is_this_grids_however_it_ran(tmp_path: Path) -> None:
    """check_same_grid compares the result arguments (distill.run_args, from DistillRequest's one declaration)
    and nothing else: a run that ran elsewhere or otherwise (device, cache, data root, threads, out; the
    how-arguments an earlier kdcache recorded among its args) is this grid's; one of another data set, epochs,
    schedule, seed or teachers' mode is another grid's."""
    spec = GridSpec(name="t", dataset="digits", teachers=(GridTeacher("resnet8", tmp_path / "t.pth", 1),),
                    student="resnet8", rows=(Row("kd", "kd"),), out=tmp_path, runs=tmp_path / "runs", views=2, epochs=2)
    req = grid.distill_request(spec, spec.rows[0], ["a" * 16], 0, device="cpu")
    assert req.dataset == "digits"  # the grid states its data set, so that it is compared as recorded
    run = spec.run_dir("kd", 0)
    run.start({"kind": "distill", "args": run_args(req), "how": how_args(req)})
    grid.check_same_grid(run, req)
    earlier = {**run_args(req), "out": "/elsewhere", "cache": "/c", "data_root": "/d", "device": "cuda:3",
               "prefetch": 8, "read_threads": 1, "resident_share": 0.0, "tensorboard": "/tb", "resume": True}
    run.write_config({"args": earlier})
    grid.check_same_grid(run, replace(req, device=None, read_threads=4, cache=tmp_path))
    for key, other in (("dataset", "cifar10"), ("epochs", 3), ("milestones", [2]), ("seed", 1), ("online", True)):
        run.write_config({"args": {**earlier, key: other}})
        with pytest.raises(KdcacheError, match=rf"holds a finished run of another grid \({key} differ"):
            grid.check_same_grid(run, req)
