"""The Fashion-MNIST study runner (studies/fashion_mnist.py) end to end on tiny fake IDX files: every part runs
through the real pipelines, the tables and figures are written from the run directories, and a second invocation
redoes nothing but what is missing."""

from __future__ import annotations

import json
import shutil
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
                        views=2, seeds=1, betas=(0, 50), view_counts=(1, 2), paired_seeds=2, long_epochs=3,
                        long_view_counts=(1, 3), long_seeds=1, long_betas=(0,), long_beta_seeds=1)


def test_plan_lists_every_part_once(study):
    runs = study.plan_runs(study.Config())
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    per_group = {p: sum(r.group == p for r in runs) for p in study.PARTS}
    # paired: 10 seeds x 2 settings x 5 methods, parts A and B's runs of those methods at every seed; A keeps its
    # other three methods (ce, ebkd, camkd pooled) at 3 seeds, B two (ce never reads a teacher); beta 3 values x
    # 2 forms (50 is A's); Table 4's two other ablations (β = 0 is in beta); views V in 1, 2, 4 x aver, camkd;
    # online camkd; long: V in 1, 2, 5, 10, 40 x aver, camkd x 3 seeds; longbeta: camkd at V = 40, β 0 and 5 x 3 seeds
    assert per_group == {"A": 9, "B": 6, "beta": 18, "paired": 100, "abl": 6, "views": 18, "online": 3, "long": 30,
                         "longbeta": 6}
    assert {(r.name, r.views, r.epochs, r.options["beta"], r.seed) for r in runs if r.group == "longbeta"} == {
        (f"camkd-spatial-V40-beta{b}", 40, 40, b, s) for b in (0, 5) for s in range(3)}
    paired = [r for r in runs if r.group == "paired"]
    assert {r.part for r in paired} == {"A", "B"}
    assert {(r.part, r.name, r.seed) for r in paired} == {
        (p, m, s) for p in "AB" for m in study.PAIRED_METHODS for s in range(10)}
    assert all(r.epochs is None for r in runs if not r.group.startswith("long"))
    assert {r.epochs for r in runs if r.group == "long"} == {40}
    # --parts and --only choose what runs: a part, then shell patterns on the run keys
    assert {r.key for r in runs if study.chosen(r, ["long"], ["long/aver-*"])} == {
        f"long/aver-spatial-V{v}/seed{s}" for v in (1, 2, 5, 10, 40) for s in range(3)}
    assert sum(study.chosen(r, ["long"]) for r in runs) == 30
    assert not any(study.chosen(r, ["views"], ["long/*"]) for r in runs)
    # A, beta and B part by part; then the paired runs seed by seed; the other parts seed by seed; long last
    order = [(r.group, r.seed) for r in runs]
    first = 9 + 18 + 6
    assert order[:first] == sorted(order[:first], key=lambda k: (study.PARTS.index(k[0]), k[1]))
    assert [g for g, _ in order[first:first + 100]] == ["paired"] * 100
    assert order[first:first + 100] == sorted(order[first:first + 100], key=lambda k: k[1])
    rest = order[first + 100:-36]
    assert rest == sorted(rest, key=lambda k: (k[1], study.PARTS.index(k[0])))
    assert order[-36:] == sorted(order[-36:], key=lambda k: (k[1], study.PARTS.index(k[0])))
    assert {g for g, _ in order[-36:]} == {"long", "longbeta"}


def test_only_matching_no_run_is_refused_before_any_work(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        study.main(["--out", str(tmp_path / "out"), "--parts", "long", "--only", "long/kd-*"])
    assert exit_.value.code == 2 and "--only long/kd-* matches no run of the parts long" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_paired_stats_against_a_hand_calculation(study):
    import fashion_mnist_report as report
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302652729911275, half width 4.3027 / sqrt(3)
    found = report.paired_stats([1.0, 2.0, 3.0])
    assert found["mean"] == 2.0
    assert found["t"] == pytest.approx((2 - 2.4841377118, 2 + 2.4841377118), abs=1e-9)
    lo, hi = found["bootstrap"]
    assert 1.0 <= lo < 2.0 < hi <= 3.0  # resampled means of three values lie between the smallest and largest
    assert report.paired_stats([0.5]) == {"mean": 0.5}
    assert report.paired_stats([]) == {}
    assert report._resolved(report.paired_stats([-1.0, -1.2, -0.8, -1.1])) == "yes: camkd ahead"
    assert report._resolved(found) == "no"
    # two-sided p of t = 2 / (1 / sqrt 3) = sqrt 12 on 2 degrees of freedom, whose CDF is 1/2 + t / (2 sqrt(2 + t^2)):
    # p = 1 - sqrt(12 / 14)
    assert found["p"] == pytest.approx(1 - (12 / 14) ** 0.5, abs=1e-12)
    assert report.paired_stats([0.0, 0.0])["p"] == 1.0


def test_holm_against_a_hand_calculation(study):
    import fashion_mnist_report as report
    # sorted 0.01, 0.03, 0.04 of 3: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04 = 0.04, raised to the 0.06 before it
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], abs=1e-15)
    assert report.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert report.holm([]) == []


def test_within_noise_rule_against_a_hand_calculation(study):
    import fashion_mnist_report as report
    # reference runs 86.36, 86.34, 85.82: mean 86.17333, squared deviations 0.034844 + 0.027778 + 0.124844 =
    # 0.187467, std sqrt(0.187467 / 2) = 0.30616
    ref = [86.36, 86.34, 85.82]
    # differences -0.38, +0.08, -0.10: mean -0.1333 (within 0.306), sd 0.2318, half width 4.3027 x 0.2318 / sqrt 3
    # = 0.576: [-0.709, +0.443] holds 0
    assert report.within_noise(report.paired_stats([-0.38, 0.08, -0.10]), ref) is True
    # -0.42, -0.52, -0.24: mean -0.393, larger than the std
    assert report.within_noise(report.paired_stats([-0.42, -0.52, -0.24]), ref) is False
    # -0.20, -0.21, -0.19: mean -0.20 is within the std, but sd 0.01 gives [-0.225, -0.175], which excludes 0
    assert report.within_noise(report.paired_stats([-0.20, -0.21, -0.19]), ref) is False
    # one seed decides nothing: no interval, no std
    assert report.within_noise(report.paired_stats([0.0]), ref) is None
    assert report.within_noise(report.paired_stats([0.0, 0.1]), ref[:1]) is None


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
    assert results["paired"]["B"]["aver"]["diffs"] == [
        results["runs"][f"B/aver/seed{s}"] - results["runs"][f"B/camkd-spatial/seed{s}"] for s in range(2)]
    from fashion_mnist_report import holm  # the family: every setting's comparisons with camkd together
    rows = [results["paired"][s][m] for s in ("A", "B") for m in study.PAIRED_METHODS[1:]]
    assert len([row for row in rows if "p" in row]) == 8
    assert [row["holm"] for row in rows if "p" in row] == holm([row["p"] for row in rows if "p" in row])
    assert results["wrong_teacher_cost"]["camkd-spatial"]["diffs"] == [
        results["runs"][f"B/camkd-spatial/seed{s}"] - results["runs"][f"A/camkd-spatial/seed{s}"] for s in range(2)]
    long_run = next(r for r in runs if r.group == "long")
    assert load_run(study.run_dir(out, long_run)).metrics[-1]["epoch"] == 3
    # the long part's curve: the run's test top-1 at each epoch it evaluated (3 epochs: every one), one seed
    curve = results["long"][str(long_run.views)][long_run.method]["curve"]
    assert curve == {str(m["epoch"]): m["test_top1"] for m in load_run(study.run_dir(out, long_run)).metrics}
    assert list(curve) == ["1", "2", "3"]
    # camkd - aver at each V and seed, and each seed's mean of it over the V (one seed here)
    gaps = [results["runs"][f"long/camkd-spatial-V{v}/seed0"] - results["runs"][f"long/aver-spatial-V{v}/seed0"]
            for v in (1, 3)]
    assert [results["long"][v]["camkd_minus_aver"]["diffs"] for v in ("1", "3")] == [[g] for g in gaps]
    assert results["long_camkd_minus_aver"]["per_seed_mean_over_v"] == pytest.approx([(gaps[0] + gaps[1]) / 2])
    # the within-noise rule needs two seeds: at one, neither method's answer is decided, and the table says so
    assert {m: (w["decided"], w["within"]) for m, w in results["long_within_noise"].items()} == {
        "aver": (False, []), "camkd": (False, [])}
    # camkd's β over the long schedule: each β's run against the long part's β = 50 and aver at the largest V,
    # with its last epoch's loss terms
    beta0 = results["runs"]["longbeta/camkd-spatial-V3-beta0/seed0"]
    assert results["long_beta"]["0"]["minus_beta50"]["diffs"] == [beta0 - results["runs"]["long/camkd-spatial-V3/seed0"]]
    assert results["long_beta"]["0"]["minus_aver"]["diffs"] == [beta0 - results["runs"]["long/aver-spatial-V3/seed0"]]
    last = load_run(out / "runs" / "longbeta/camkd-spatial-V3-beta0/seed0").metrics[-1]
    assert results["long_beta"]["0"]["loss_terms_seed0"] == last["train"] and set(last["train"]) >= {"ce", "kd", "feat"}
    assert json.loads((out / "runs" / "longbeta/camkd-spatial-V3-beta0/seed0/config.json").read_text()
                      )["args"]["options"]["beta"] == 0
    online = json.loads((study.run_dir(out, next(r for r in runs if r.online)) / "config.json").read_text())
    assert online["args"]["online"] is True
    tables = (out / "tables.md").read_text()
    for heading in ("## Teachers", "## Student accuracy by method", "## camkd against β", "Table 4 ablations",
                    "against stored views", "Cached against online", "per-sample KD weights in setting B",
                    "## Paired differences from camkd (spatial), 2 seeds",
                    "## What the wrong teacher costs: setting B minus setting A, 2 seeds", "## Stored views over 3 epochs"):
        assert heading in tables
    assert f"({len(runs)} of {len(runs)} runs finished)" in tables
    alone = (out / "tables-paired.md").read_text()  # the paired and long parts alone
    kept = [r for r in runs if r.group in ("paired", "long", "longbeta")]
    assert f"({len(kept)} of {len(kept)} runs finished)" in alone and "## Paired differences" in alone
    assert "## camkd against β" not in alone and "## Stored views over 3 epochs" in alone
    assert "## camkd's β over 3 epochs (V = 3, 1 seeds)" in alone and "longbeta/" in (out / "results-paired.json").read_text()
    assert "Within the noise of V = 3 (aver: " in alone and "not decided (fewer than 2 seeds at some V)" in alone
    assert json.loads((out / "results-paired.json").read_text())["runs"] == {r.key: results["runs"][r.key] for r in kept}
    for png in ("fmnist-beta.png", "fmnist-views.png", "fmnist-weights.png", "fmnist-paired.png",
                "fmnist-views-long.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    teachers = json.loads((out / "teachers.json").read_text())
    assert teachers["teachers"]["t2-rotated"]["label_map"] == {"1": 3, "3": 8, "8": 1}

    # a second invocation redoes nothing; after losing one run it redoes that run only
    # (a finished run kept as its config.json and metrics.jsonl alone, as studies/results/runs/ keeps them, is done)
    kept = next(r for r in runs if r.group == "paired")
    for f in study.run_dir(out, kept).iterdir():
        if f.name not in ("config.json", "metrics.jsonl"):
            f.unlink()
    stamps = {r.key: (study.run_dir(out, r) / "metrics.jsonl").stat().st_mtime_ns for r in runs}
    lost = next(r for r in runs if r.part == "views")
    shutil.rmtree(study.run_dir(out, lost))
    assert study.main(["--out", str(out), "--source", str(source), "--jobs", "1"], cfg) == 0
    second = capsys.readouterr().out
    assert f"{len(runs) - 1} of {len(runs)} runs finished; 1 to go" in second
    assert lost.key in second and "training teacher" not in second and "precomputed" not in second
    for r in runs:
        if r.key != lost.key:
            assert (study.run_dir(out, r) / "metrics.jsonl").stat().st_mtime_ns == stamps[r.key]
    assert study.is_done(out, lost)
