"""`kdcache demo`: the whole pipeline end to end, its reuse on a second run, the grid's rules for finished and
foreign runs, and its evidence arithmetic."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import error_lines, run_cli, spy_on_format_table
from kdcache.pipelines import demo
from kdcache.pipelines.train_teacher import _relabel
from kdcache.runs import RunDir, SampleWeights
from kdcache.store import Cache


def test_corrupted_labels_rotate_only_the_named_classes() -> None:
    labels = np.array([0, 3, 5, 8, 9, 3])
    assert _relabel(labels, {3: 5, 5: 8, 8: 3}).tolist() == [0, 5, 8, 3, 9, 5]
    assert _relabel(labels, None) is labels


def test_weight_evidence_is_the_mean_over_the_named_classes() -> None:
    saved = [SampleWeights(1, np.arange(3), np.array([3, 1, 5]), np.array([[0.5, 0.1], [0.2, 0.6], [0.7, 0.3]])),
             SampleWeights(2, np.arange(2), np.array([8, 2]), np.array([[0.4, 0.2], [0.9, 0.8]]))]
    got = demo.corrupted_teacher_weights(saved, [3, 5, 8], teacher=1)
    assert got["corrupted_classes"] == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    assert got["other_classes"] == pytest.approx((0.6 + 0.8) / 2)


def test_demo_end_to_end_and_second_run_reuses_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = tuple(demo.DemoTeacher(t.name, "resnet8", 1, t.label_map) for t in demo.TEACHERS)
    monkeypatch.setattr(demo, "TEACHERS", tiny)
    args = ["demo", "--out", tmp_path / "d", "--epochs", 1, "--seeds", 1, "--device", "cpu"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    out = first.stdout
    for name in ("good", "corrupted", "weak"):
        assert re.search(rf"^\| Teacher \d \(resnet8\): {name}, 1 epoch", out, re.M), out
    assert "3 → 5, 5 → 8, 8 → 3" in out
    assert "| Ensemble of the 3 (majority vote) |" in out and "| Ensemble of the 3 (averaged softmax) |" in out
    for method in demo.METHODS:  # each method's student: best and last epoch over the seeds
        assert re.search(rf"^\| `{method}` \(.*, resnet8\) \| \d+\.\d\d \| \d+\.\d\d \| 1 \|$", out, re.M), method
    assert "camkd's mean weight on the corrupted teacher" in out
    # what the cache buys: camkd seed 0 again with live teachers, both runs' top-1 and seconds, and the grid's cost
    online = RunDir(tmp_path / "d" / "runs" / "spatial" / "camkd-online" / "seed0")
    assert online.finished and online.read_config()["args"]["online"] is True
    pair = re.search(r"^What the cache buys, camkd seed 0 run both ways: from the stores (\d+\.\d\d) % in "
                     r"(\d+\.\d) s of training; with live teachers \(`--online`, the same seed and views\) "
                     r"(\d+\.\d\d) % in (\d+\.\d) s\. The two see the same batches; ", out, re.M)
    assert pair, out
    cached_run = RunDir(tmp_path / "d" / "runs" / "spatial" / "camkd" / "seed0").load()
    assert float(pair[1]) == pytest.approx(cached_run.best_top1, abs=0.005)
    assert float(pair[3]) == pytest.approx(online.load().best_top1, abs=0.005)
    assert float(pair[2]) == pytest.approx(sum(m["seconds"] for m in cached_run.metrics), abs=0.05)
    saving = re.search(r"^5 student runs from these stores \(the table's, each taken at camkd's time\): (\d+) s, the "
                       r"stores' precompute \((\d+) s\) included; the same runs with live teachers: (\d+) s\.$", out, re.M)
    assert saving, out
    assert "docs/EVIDENCE.md says what this demo does and does not show" in out
    assert "**Run here: students 1 epoch (constant lr: the 240-epoch schedule scaled)" in out
    assert "stores in the **spatial** feature form" in out
    assert out.splitlines()[-1].startswith(f"table in {tmp_path / 'd' / 'demo-spatial.md'}, runs in "
                                           f"{tmp_path / 'd' / 'runs' / 'spatial'}, stores in {tmp_path / 'd' / 'cache'}")
    assert (tmp_path / "d" / "demo-spatial.md").read_text() == "\n".join(out.splitlines()[:-1]) + "\n"
    record = json.loads((tmp_path / "d" / "demo-spatial.json").read_text())
    assert set(record["students"]) == set(demo.METHODS)
    cache = Cache.at(tmp_path / "d" / "cache")
    assert [cache.open_teacher(t["id"]).form.features.value for t in record["teachers"]] == ["spatial"] * 3
    assert 0 < record["camkd_weights_on_corrupted_teacher"]["corrupted_classes"] < 1
    seconds = [cache_store.attrs["precompute_seconds"] for cache_store in
               (Cache.at(tmp_path / "d" / "cache").open_teacher(t["id"]) for t in record["teachers"])]
    assert record["cached_against_online"]["runs"] == 5 and all(s > 0 for s in seconds)
    assert record["cached_against_online"]["precompute_seconds"] == pytest.approx(sum(seconds))
    assert int(saving[2]) == round(sum(seconds))
    assert len(list((tmp_path / "d" / "cache" / "teachers").iterdir())) == 3
    assert len(list((tmp_path / "d" / "cache" / "plans").iterdir())) == 1  # one plan shared by the teachers
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "d").rglob("*.pth")}

    t0 = time.perf_counter()
    tables = spy_on_format_table(monkeypatch)
    second = run_cli(*args)
    assert second.exit_code == 0, second.output
    assert "reused 3 teachers, 3 stores, 6 runs" in second.stdout
    assert time.perf_counter() - t0 < 30
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "d").rglob("*.pth")} == stamps
    assert second.stdout.splitlines()[:-1] == first.stdout.splitlines()[:-1]  # the same table
    assert tables and second.stdout.startswith(tables[-1])  # from the grid's one formatter, as the experiments'

    # the grid's one rule for "finished" (last.pth), as for the experiments: a run killed after its last epoch's
    # checkpoint is resumed, not counted; a finished run of another grid is refused with one line, before any training
    runs = tmp_path / "d" / "runs" / "spatial"
    killed, foreign = RunDir(runs / "ce" / "seed0"), RunDir(runs / "camkd" / "seed0")
    killed.file(RunDir.LAST).unlink()
    config = foreign.read_config()
    foreign.write_config({**config, "args": {**config["args"], "epochs": 7}})
    refused = run_cli(*args)
    assert refused.exit_code == 1
    lines = error_lines(refused.stderr)
    assert lines[-1].startswith("Error: ") and "holds a finished run of another grid (epochs differ: epochs 7)" in \
        lines[-1] and len(lines[-1].splitlines()) == 1, refused.stderr
    assert not killed.finished and not re.search("^run ", refused.stderr, re.M)
    foreign.write_config(config)
    resumed = run_cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "run 1/6: ce (ce, 0 teachers), seed 0, resnet8 for 1 epochs (resuming)" in resumed.stderr
    assert "reused 3 teachers, 3 stores, 5 runs" in resumed.stdout and killed.finished

