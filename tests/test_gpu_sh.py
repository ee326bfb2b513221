"""benchmarks/gpu.sh, the one-command GPU suite, run in its tiny form on this machine's device: every step must
run to the end and leave its figures in the results file, so a GPU session spends none of its minutes on a
broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def run_suite(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SUITE), *args], env=env, capture_output=True, text=True, timeout=900)


def test_tiny_suite_runs_every_step_and_records_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = run_suite("--tiny", str(out))
    results = (out / "results.md").read_text() if (out / "results.md").exists() else ""
    assert done.returncode == 0, done.stderr[-3000:] + results[-3000:]
    assert "FAILED" not in results and "All steps done" in results
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"- device: {device}" in results

    steps = ["readers", "precompute-resnet8-float32", "precompute-resnet8-amp", "distill-step", "distill-ranks",
             "precompute-workers"]
    for name in steps:
        assert f"\n## {name}\n" in results, name
    figures = {name: json.loads((out / f"{name}.json").read_text()) for name in steps}

    for name, precision in (("precompute-resnet8-float32", "float32"),
                            ("precompute-resnet8-amp", "float16" if device == "cuda" else "bfloat16")):
        pre = figures[name]
        assert pre["precision"] == precision
        assert set(pre["batch_sweep"]) == {"32", "64"} and pre["batch_size"] in (32, 64)
        assert pre["batch_sweep"][str(pre["batch_size"])] == max(pre["batch_sweep"].values())  # the best batch
        assert pre["bound_img_s"]["model(x)"] > 0 and pre["precompute"]["pooled"]["loop_img_s"] > 0

    step = figures["distill-step"]
    assert set(step["batches"]) == {"16", "32"}
    for at in step["batches"].values():
        assert {"student", "camkd spatial resident", "camkd spatial cached", "camkd spatial views",
                "camkd spatial online"} == set(at["times_ms"])
        ratios = at["ratios"]["camkd spatial"]
        assert set(ratios) == {"cached/resident", "views/resident", "online/cached", "resident/student"}
        times = at["times_ms"]
        assert ratios["cached/resident"]["median"] == pytest.approx(
            times["camkd spatial cached"]["median"] / times["camkd spatial resident"]["median"])

    ranks = figures["distill-ranks"]["configs"]
    expected = {"1 rank", "2 ranks"} if device == "cpu" else {"1 rank"} | (
        {f"{torch.cuda.device_count()} ranks"} if torch.cuda.device_count() > 1 else set())
    assert expected <= set(ranks)
    for config in ranks.values():
        assert len(config["step_s"]) == config["ranks"] and config["samples_s"] > 0

    readers = figures["readers"]["forms"]
    assert set(readers) == {"spatial", "pooled"}
    for at in readers.values():  # the optional readers (zarrs, tensorstore) are left out of the tiny run
        assert set(at["rows_s"]) == {"zarr", "kdcache", "bound"}
        assert all(rate > 0 for per in at["rows_s"].values() for t in ("1", "2") for rate in per[t])
    assert set(step["reader_rows_s"]["spatial"]) == {"1", "2"}
    assert all(r["stream"] > 0 and r["bound"] > 0 for r in step["reader_rows_s"]["spatial"].values())

    modes = figures["precompute-workers"]["modes"]
    assert "serial" in modes and len(modes) == 2
    assert all(m["chunk_rows_s"] > 0 for m in modes.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_full_suite_refuses_without_a_gpu_in_one_line(tmp_path: Path) -> None:
    done = run_suite(str(tmp_path / "results"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no GPU" in done.stderr and "--tiny" in done.stderr
