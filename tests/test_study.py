"""The Fashion-MNIST study runner (studies/fashion_mnist.py) end to end on tiny fake IDX files: every part runs
through the real pipelines, the tables and figures are written from the run directories, and a second invocation
redoes nothing but what is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fakes import write_fake_mnist

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(STUDIES))
    try:
        import fashion_mnist
        yield fashion_mnist
    finally:
        sys.path.remove(str(STUDIES))


def tiny(study):
    return study.Config(per_class=3, test_per_class=2, teacher="resnet8", teacher_epochs=1, epochs=2, batch_size=8,
                        views=2, seeds=1, betas=(0, 50), view_counts=(1, 2))


def test_plan_lists_every_part_once(study):
    runs = study.plan_runs(study.Config())
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    per_part = {p: sum(r.part == p for r in runs) for p in study.PARTS}
    # 3 seeds: A has 8 methods (camkd in two forms); B the same less ce; beta 3 values x 2 forms (50 is A's);
    # Table 4's two other ablations (β = 0 is in beta); views V in 1, 2, 4 x aver, camkd; online camkd
    assert per_part == {"A": 24, "B": 21, "beta": 18, "abl": 6, "views": 18, "online": 3}
    order = [(r.part, r.seed) for r in runs]
    assert order[:24 + 18 + 21] == sorted(order[:63], key=lambda k: (study.PARTS.index(k[0]), k[1]))
    assert {p for p, _ in order[:63]} == {"A", "beta", "B"}
    assert order[63:] == sorted(order[63:], key=lambda k: (k[1], study.PARTS.index(k[0])))


def test_study_runs_reports_and_resumes(study, tmp_path, capsys):
    source = tmp_path / "source"
    write_fake_mnist(source, n_train=40, n_test=20)
    out = tmp_path / "study"
    cfg = tiny(study)
    assert study.main(["--out", str(out), "--source", str(source), "--jobs", "1"], cfg) == 0
    first = capsys.readouterr().out
    runs = study.plan_runs(cfg)
    assert f"0 of {len(runs)} runs finished; {len(runs)} to go" in first
    assert all(study.is_done(out, r) for r in runs)

    # the subset is stratified: 3 images of each class from the 40, 2 of each from the 20 test images
    from kdcache.data import load_dataset
    data = load_dataset("fashion-mnist", out / "data")
    assert sorted(data.train.labels.tolist()) == sorted(list(range(10)) * 3)
    assert len(data.test.labels) == 20

    results = json.loads((out / "results.json").read_text())
    from kdcache.runs import load_run
    for r in runs:
        assert results["runs"][r.key] == load_run(study.run_dir(out, r)).final_top1
    online = json.loads((study.run_dir(out, next(r for r in runs if r.online)) / "config.json").read_text())
    assert online["args"]["online"] is True
    tables = (out / "tables.md").read_text()
    for heading in ("## Teachers", "## Student accuracy by method", "## camkd against β", "Table 4 ablations",
                    "against stored views", "Cached against online", "per-sample KD weights in setting B"):
        assert heading in tables
    assert f"({len(runs)} of {len(runs)} runs finished)" in tables
    for png in ("fmnist-beta.png", "fmnist-views.png", "fmnist-weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    teachers = json.loads((out / "teachers.json").read_text())
    assert teachers["teachers"]["t2-rotated"]["label_map"] == {"1": 3, "3": 8, "8": 1}

    # a second invocation redoes nothing; after losing one run it redoes that run only
    stamps = {r.key: (study.run_dir(out, r) / "last.pth").stat().st_mtime_ns for r in runs}
    lost = next(r for r in runs if r.part == "views")
    (study.run_dir(out, lost) / "last.pth").unlink()
    assert study.main(["--out", str(out), "--source", str(source), "--jobs", "1"], cfg) == 0
    second = capsys.readouterr().out
    assert f"{len(runs) - 1} of {len(runs)} runs finished; 1 to go" in second
    assert lost.key in second and "training teacher" not in second and "precomputed" not in second
    for r in runs:
        changed = (study.run_dir(out, r) / "last.pth").stat().st_mtime_ns != stamps[r.key]
        assert changed == (r.key == lost.key)
