"""`kdcache report` on real run directories: the PNGs, what each figure draws, and the refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("matplotlib", reason="kdcache report draws with matplotlib")
from matplotlib.patches import StepPatch  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import run_cli
from fakes import write_fake_cifar
from kdcache.cli.report import COMMANDS, report as report_cmd
from kdcache.errors import KdcacheError
from kdcache.models import build_model
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.report import report, run_names
from kdcache.plots import plot_accuracy_curves, plot_weight_distributions
from kdcache.runs import RunRecord, SampleWeights, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 2-epoch runs from two teacher stores (resnet8, wrn_16_1): camkd seed 0 and aver seed 1.

    On a 320-image fake CIFAR-10 in the real on-disk format (digits' 1437 would take 4x as long),
    with one torch thread, which is several times faster than two on a busy CPU.
    """
    root = tmp_path_factory.mktemp("report")
    data = write_fake_cifar(root / "data", "cifar10", n_train=320, n_test=100)
    cache = root / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = []
        for seed, arch in enumerate(("resnet8", "wrn_16_1")):
            torch.manual_seed(seed)
            ckpt = root / f"{arch}.pth"
            torch.save({"model": build_model(arch, 10).state_dict()}, ckpt)
            result = run_cli("precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", "cifar10",
                             "--data-root", data, "--cache", cache, "--views", 1, "--device", "cpu")
            assert result.exit_code == 0, result.output
            ids.append(result.stdout.strip().splitlines()[-1])
        out = {}
        for method, seed in (("camkd", 0), ("aver", 1)):
            out[method] = root / "runs" / method
            distill(DistillRequest(student="resnet8", teachers=ids, method=method, out=out[method], cache=cache,
                                   data_root=data, epochs=2, batch_size=64, milestones=[2], device="cpu", seed=seed))
    finally:
        torch.set_num_threads(threads)
    return out


def assert_png(path: Path, min_width: int = 600) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_width and im.height >= 400


def test_report_writes_accuracy_and_one_weights_figure_per_camkd_run(runs, tmp_path: Path) -> None:
    out = tmp_path / "figs" / "nested"
    written = report([runs["camkd"], runs["aver"]], out)
    assert written == [out / "accuracy.png", out / "weights-camkd.png"]  # aver records no per-sample weights
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "weights-camkd.png"]
    for p in written:
        assert_png(p)
    with Image.open(out / "accuracy.png") as im:
        assert im.size == (960, 600)  # 8 x 5 inches at 120 dpi


def test_accuracy_figure_has_one_labelled_line_per_run(runs, tmp_path: Path) -> None:
    records = [load_run(runs["camkd"]), load_run(runs["aver"])]
    fig = plot_accuracy_curves(records, tmp_path / "acc.png")
    assert_png(tmp_path / "acc.png")
    (ax,) = fig.axes
    assert len(ax.lines) == 2
    for line, run in zip(ax.lines, runs.values()):
        metrics = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        assert list(line.get_xdata()) == [1, 2]
        assert list(line.get_ydata()) == [m["test_top1"] for m in metrics]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["camkd seed=0", "aver seed=1"]
    assert "epoch" in ax.get_xlabel() and "top-1" in ax.get_ylabel() and ax.get_title()


def test_runs_that_read_the_same_are_told_apart_by_name(runs, tmp_path: Path) -> None:
    copy = tmp_path / "again" / "camkd"
    shutil.copytree(runs["camkd"], copy)
    paths = [runs["camkd"], copy]
    assert run_names(paths) == ["runs-camkd", "again-camkd"]
    written = report([*paths, runs["camkd"]], tmp_path / "out")  # the same directory twice counts once
    assert [p.name for p in written] == ["accuracy.png", "weights-runs-camkd.png", "weights-again-camkd.png"]
    fig = plot_accuracy_curves([load_run(p, n) for p, n in zip(paths, run_names(paths))], tmp_path / "a.png")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["camkd seed=0 (runs-camkd)",
                                                                 "camkd seed=0 (again-camkd)"]


def test_weights_figure_histograms_exactly_the_saved_weights(runs, tmp_path: Path) -> None:
    record = load_run(runs["camkd"])
    saved = np.load(runs["camkd"] / "sample_weights.npz")
    weights = saved["weights"]
    n, k = weights.shape
    assert k == 2 and np.array_equal(record.sample_weights.weights, weights)
    fig = plot_weight_distributions(record, tmp_path / "w.png")
    assert_png(tmp_path / "w.png")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == k
    config = json.loads((runs["camkd"] / "config.json").read_text())
    for i, (ax, teacher) in enumerate(zip(panels, config["teachers"])):
        (hist,) = [p for p in ax.patches if isinstance(p, StepPatch)]
        counts, edges, _ = hist.get_data()
        assert counts.sum() == n
        assert np.array_equal(counts, np.histogram(weights[:, i], bins=edges)[0])
        assert teacher["arch"] in ax.get_title() and teacher["id"][:8] in ax.get_title()
    assert "camkd seed=0" in fig.get_suptitle() and "epoch 2" in fig.get_suptitle()


def test_weights_figure_leaves_out_non_finite_weights_and_says_so(tmp_path: Path) -> None:
    weights = np.full((100, 3), 1 / 3, dtype=np.float32)  # uniform ablation: every weight equal
    weights[:4, 1] = np.nan
    run = RunRecord("r", tmp_path, {"args": {"method": "camkd", "seed": 0}}, [],
                    SampleWeights(5, np.arange(100), np.zeros(100), weights))
    fig = plot_weight_distributions(run, tmp_path / "w.png")
    assert_png(tmp_path / "w.png")
    sums = [[p for p in ax.patches if isinstance(p, StepPatch)][0].get_data()[0].sum() for ax in fig.axes[:3]]
    assert sums == [100, 96, 100] and "4 non-finite weights left out" in fig.get_suptitle()


def test_a_run_without_sample_weights_has_no_weights_figure(runs, tmp_path: Path) -> None:
    with pytest.raises(KdcacheError, match="no sample_weights.npz"):
        plot_weight_distributions(load_run(runs["aver"]), tmp_path / "w.png")


def test_the_command_prints_each_written_path(runs, tmp_path: Path) -> None:
    assert COMMANDS == (report_cmd,)
    out = tmp_path / "out"
    result = CliRunner().invoke(report_cmd, [str(runs["camkd"]), str(runs["aver"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "accuracy.png"), str(out / "weights-camkd.png")]


def _broken_runs(root: Path, runs: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """Directories that are not readable runs, each with the message it should give."""
    cases = {}
    plain = root / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    cases["plain"] = (plain, "is not a kdcache run: it has no config.json or metrics.jsonl")
    bad_json = root / "bad-json"
    shutil.copytree(runs["aver"], bad_json)
    (bad_json / "metrics.jsonl").write_text('{"epoch": 1, "test_top1": 5.0}\n{"epoch": 2, "te\n')
    cases["bad-json"] = (bad_json, "metrics.jsonl line 2 is not valid JSON")
    bad_npz = root / "bad-npz"
    shutil.copytree(runs["camkd"], bad_npz)
    (bad_npz / "sample_weights.npz").write_bytes(b"not a zip")
    cases["bad-npz"] = (bad_npz, "cannot read")
    return cases


def test_directories_that_are_not_runs_give_one_line(runs, tmp_path: Path) -> None:
    for path, message in _broken_runs(tmp_path, runs).values():
        with pytest.raises(KdcacheError, match=message) as info:
            report([runs["camkd"], path], tmp_path / "out")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written when a run cannot be read


def test_the_command_refuses_a_non_run_without_traceback(runs, tmp_path: Path) -> None:
    for path, message in _broken_runs(tmp_path, runs).values():
        result = CliRunner().invoke(report_cmd, [str(runs["camkd"]), str(path), "--out", str(tmp_path / "o")])
        assert result.exit_code != 0
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0]
    missing = CliRunner().invoke(report_cmd, [str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    no_runs = CliRunner().invoke(report_cmd, ["--out", str(tmp_path / "o")])
    assert no_runs.exit_code == 2 and "Missing argument" in no_runs.stderr


def test_without_matplotlib_drawing_says_what_to_install(runs, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(KdcacheError, match="needs matplotlib: pip install matplotlib"):
        report([runs["aver"]], tmp_path / "out")
