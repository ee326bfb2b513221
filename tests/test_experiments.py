"""The paper's experiments: the settings (as the text tables parsed at import gave them), the registry (loaded at
its first lookup, open to plug-ins), the dry-run arithmetic against a hand calculation, the CLI, and a tiny
experiment end to end on synthetic CIFAR-100 files (teachers shared, every run, resume, the grid's rules, the
table)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import spy_on_format_table, torch_threads
from fakes import write_fake_cifar, write_fake_imagefolder
from kdcache import registry
from kdcache.cli.experiment import COMMANDS, experiment as experiment_group
from kdcache.errors import CheckpointError, KdcacheError, UnknownNameError
from kdcache.models import build_model
from kdcache.pipelines import experiment_spec, experiments, grid
from kdcache.pipelines.experiment_spec import Experiment
from kdcache.pipelines.experiments import plan_experiment, run_experiment
from kdcache.runs import RunDir
from kdcache.store.form import FeatureForm

TINY = Experiment(name="test-tiny", table="Table 1", dataset="cifar100", teachers=("resnet8",) * 3, student="resnet8",
              seeds=2, epochs=1, views=1, source="test only")


def invoke(*args: object):
    return CliRunner().invoke(experiment_group, [str(a) for a in args])


# -- registry and dry-run arithmetic ----------------------------------------------------------

PAPER_SETTINGS = {
    "Table 1": ["t1-wrn_40_2-ShuffleV1", "t1-resnet56-MobileNetV2", "t1-vgg13-vgg8", "t1-vgg13-MobileNetV2",
                "t1-resnet32x4-resnet8x4", "t1-resnet32x4-ShuffleV2", "t1-resnet32x4-vgg8"],
    "Table 2": ["t2-wrn_40_2-ShuffleV1", "t2-resnet32x4-vgg8", "t2-resnet56-MobileNetV2"],
    "Table 3": ["t3-resnet8x4-resnet20x4-resnet32x4-vgg8"],
    "Table 4": ["t4-vgg13-MobileNetV2"],
    "Figure 4": ["f4-resnet56-MobileNetV2"],
    "Appendix": ["app-tiny-imagenet-resnet32x4-vgg8", "app-stanford-dogs-resnet34-shufflenet_v2_x0_5"],
}


def test_registry_holds_every_setting_of_the_paper() -> None:
    assert experiments.experiment_names() == [n for names in PAPER_SETTINGS.values() for n in names]
    for table, names in PAPER_SETTINGS.items():
        for name in names:
            r = experiments.find_experiment(name)
            assert r.table == table and r.source and r.features is FeatureForm.SPATIAL and r.seeds == 3
    # Table 1: seven columns, each figure as printed in the paper
    t1 = experiments.find_experiment("t1-resnet32x4-vgg8")
    assert t1.teachers == ("resnet32x4",) * 3 and t1.student == "vgg8" and t1.dataset == "cifar100"
    assert t1.methods == ("ce", "aver", "fitnet-mkd", "ebkd", "aekd", "camkd")
    assert dict(t1.paper) == {"teacher": "79.31 ± 0.14", "ensemble": "81.16", "ce": "70.74 ± 0.40",
                              "aver": "73.26 ± 0.39", "fitnet-mkd": "73.27 ± 0.19", "ebkd": "73.60 ± 0.22",
                              "aekd": "73.11 ± 0.27", "camkd": "75.26 ± 0.32"}
    assert experiments.find_experiment("t1-wrn_40_2-ShuffleV1").paper["camkd"] == "77.94 ± 0.31"
    assert experiments.find_experiment("t1-vgg13-MobileNetV2").paper["ebkd"] == "68.24 ± 0.82"
    # Table 2: KD and FitNet on one teacher, AT/VID/CRD listed and never run, CA-MKD on three
    t2 = experiments.find_experiment("t2-resnet32x4-vgg8")
    rows = {v.label: v for v in t2.variants}
    assert [v.label for v in t2.variants] == ["ce", "kd", "fitnet", "at", "vid", "crd", "camkd"]
    assert rows["kd"].teachers_of(3) == rows["fitnet"].teachers_of(3) == 1 and rows["camkd"].teachers_of(3) == 3
    assert [v.label for v in t2.variants if not v.implemented] == ["at", "vid", "crd"]
    assert t2.methods == ("ce", "kd", "fitnet", "camkd")
    assert (t2.paper["kd"], t2.paper["crd"], t2.paper["camkd"], t2.paper["teacher"]) == (
        "72.90 ± 0.34", "73.57 ± 0.25", "75.26 ± 0.13", "79.31")
    # Table 3: three architectures
    t3 = experiments.find_experiment("t3-resnet8x4-resnet20x4-resnet32x4-vgg8")
    assert t3.teachers == ("resnet8x4", "resnet20x4", "resnet32x4") and t3.paper["camkd"] == "75.96 ± 0.05"
    assert (t3.paper["teacher 1"], t3.paper["teacher 2"], t3.paper["teacher 3"]) == ("72.79", "78.39", "79.31")
    # Table 4: the ablations are camkd with options
    t4 = experiments.find_experiment("t4-vgg13-MobileNetV2")
    assert [(v.label, v.method, v.method_options().params["camkd_weights"], v.method_options().beta,
             v.method_options().params["camkd_feature_weights"]) for v in t4.variants] == [
        ("camkd-uniform", "camkd", "uniform", None, "v"), ("camkd-beta0", "camkd", "confidence", 0.0, "v"),
        ("camkd-feature-w", "camkd", "confidence", None, "w"), ("camkd", "camkd", "confidence", None, "v")]
    assert [v.flags() for v in t4.variants] == ["camkd --camkd-weights uniform", "camkd --beta 0",
                                                "camkd --camkd-feature-weights w", "camkd"]  # None: beta 50
    assert t4.paper == {"camkd-uniform": "67.74 ± 0.87", "camkd-beta0": "68.11 ± 0.02",
                        "camkd-feature-w": "68.82 ± 0.63", "camkd": "69.41 ± 0.20"}
    # Figure 4: every method on the first 1..4 of four resnet56 teachers
    f4 = experiments.find_experiment("f4-resnet56-MobileNetV2")
    assert f4.teachers == ("resnet56",) * 4 and f4.student == "MobileNetV2"
    sweep = [(v.method, v.teachers_of(4)) for v in f4.variants if v.curve]
    assert sweep == [(m, k) for m in ("aver", "fitnet-mkd", "ebkd", "aekd", "camkd") for k in (1, 2, 3, 4)]
    # the appendix: image folders, Stanford Dogs on CS-KD's set-up
    tiny = experiments.find_experiment("app-tiny-imagenet-resnet32x4-vgg8")
    dogs = experiments.find_experiment("app-stanford-dogs-resnet34-shufflenet_v2_x0_5")
    assert (tiny.dataset, tiny.data, tiny.setup, tiny.paper["camkd"]) == ("imagefolder", "tiny-imagenet", "official",
                                                                         "49.55 ± 0.12")
    assert (dogs.dataset, dogs.data, dogs.setup, dogs.paper["crd"]) == ("imagefolder", "stanford-dogs", "cs-kd",
                                                                       "64.61 ± 0.17")
    assert dogs.teachers == ("resnet34",) * 3 and dogs.student == "shufflenet_v2_x0_5"

    with pytest.raises(UnknownNameError, match="known: t1-wrn_40_2-ShuffleV1"):
        experiments.find_experiment("t9-nothing")
    with pytest.raises(UnknownNameError):
        experiments.register_experiment(Experiment("bad", "Table 1", "cifar100", ("resnet999",), "vgg8"))
    with pytest.raises(KdcacheError, match="takes one teacher"):
        experiments.register_experiment(Experiment("bad", "Table 2", "cifar100", ("vgg8",) * 3, "vgg8",
                                       variants=(experiment_spec.variant("kd", "kd", "KD"),)))
    with pytest.raises(KdcacheError, match="unknown rows nope"):
        experiments.register_experiment(Experiment("bad", "Table 1", "cifar100", ("vgg8",), "vgg8", paper={"nope": "1"}))
    with pytest.raises(KdcacheError, match="row 'x'"):
        experiments.register_experiment(Experiment("bad", "Table 1", "cifar100", ("vgg8",), "vgg8",
                                       variants=(experiment_spec.variant("x", "camkd", "X", no_such_option=1),)))
    assert "bad" not in experiments.experiment_names()


# sha256 of each paper setting as experiment.json records it (json.dumps(asdict(experiment)): every field, its
# rows and the paper's figures in order; an Enum as its value), recorded from 28e4895, where experiments.py parsed
# Tables 1 and 2 from pipe-delimited text at import and built the rest in code: the settings as data must be those
# same objects.
PAPER_SETTING_PINS = {
    "t1-wrn_40_2-ShuffleV1": "1cf5b21d222913dc2658c0a373581427e28ad0d617a429b69532f56ba436430e",
    "t1-resnet56-MobileNetV2": "5b5b174c6a5c7a808268e0cb16018e3f86b8ff31c0d546a11128c30a0f176913",
    "t1-vgg13-vgg8": "7cda4c5e0ce6086edeea564561d88152b9e20aa570be0dabfdcd5b9cb3d86538",
    "t1-vgg13-MobileNetV2": "6a0f97fb0c1369a0b3bd753cea5e7ff61b84f554974a22f84056f5f9ac328992",
    "t1-resnet32x4-resnet8x4": "6c693232583e42297d47bd473814c92fe34def02c9a69959f28c2931a0296527",
    "t1-resnet32x4-ShuffleV2": "1fdc01de30aa2f4666b25c43adbac2bc7a0a8f217dc031fa6b78547b58ec2356",
    "t1-resnet32x4-vgg8": "c71937b4d7f197b5563918c264138cdc9536cf551e23c15d0d4f60b826e22d97",
    "t2-wrn_40_2-ShuffleV1": "371812b74591d121f1f8df03daf3b08c389ce8210f1aa313aababf82bbc402c5",
    "t2-resnet32x4-vgg8": "9057a3e56b596e7c31b1ede4b532a29d29ea510dfdad512a2878433ef85b6b91",
    "t2-resnet56-MobileNetV2": "374437fd724b3dafd965c23ccba8e21c82637b23d67b570c1519d3654737781a",
    "t3-resnet8x4-resnet20x4-resnet32x4-vgg8": "2a4bf588df061f8d3d3e5879964896528e642691e681c55a01f20467d0cedb6b",
    "t4-vgg13-MobileNetV2": "813a1e8cba95d200baaa6e0570b6d66581799f534e087f1357f38cffcb64b2ed",
    "f4-resnet56-MobileNetV2": "18cba3111c6e6601504446768737e13aeb4be336cc5b5214e8a0f549d780d892",
    "app-tiny-imagenet-resnet32x4-vgg8": "43692ba6addf416c865ea21fdb68cc839b88760e0dfca9885f16986ce1fc0e49",
    "app-stanford-dogs-resnet34-shufflenet_v2_x0_5": "c5ecc687722c31267f97c0687a021e64e2bd4890e698782a780a96a3321603b8",
}


def _value(member: object) -> object:
    """A JSON value for what json cannot write itself: an Enum member (a typed form) as its value."""
    assert isinstance(member, Enum), member
    return member.value


def test_every_paper_setting_is_registered_as_the_text_tables_gave_it() -> None:
    assert experiments.experiment_names() == list(PAPER_SETTING_PINS)
    for name, pin in PAPER_SETTING_PINS.items():
        record = json.dumps(dataclasses.asdict(experiments.find_experiment(name)), ensure_ascii=False, default=_value)
        assert hashlib.sha256(record.encode()).hexdigest() == pin, (name, record)
    # a few of Table 1's and Table 2's figures as printed, where the text tables held them
    t2 = experiments.find_experiment("t2-wrn_40_2-ShuffleV1").paper
    assert list(t2.items()) == [("teacher", "76.62"), ("ce", "71.70"), ("kd", "75.77 ± 0.14"), ("fitnet", "76.22 ± 0.21"),
                                ("at", "76.44 ± 0.38"), ("vid", "76.32 ± 0.08"), ("crd", "76.58 ± 0.23"),
                                ("camkd", "77.94 ± 0.31")]
    t1 = experiments.find_experiment("t1-resnet32x4-ShuffleV2").paper
    assert (t1["ensemble"], t1["aver"], t1["camkd"]) == ("81.16", "75.87 ± 0.19", "77.41 ± 0.14")


def test_settings_are_read_at_the_registrys_first_lookup_not_at_import(tmp_path: Path) -> None:
    code = ("import sys\n"
            "import kdcache.cli.main, kdcache.cli.experiment, kdcache.pipelines.experiments as e\n"
            "assert 'kdcache.pipelines.paper_settings' not in sys.modules, 'read at import'\n"
            "names = e.experiment_names()\n"
            "assert 'kdcache.pipelines.paper_settings' in sys.modules and len(names) == 15, names\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_a_plug_in_registers_its_experiments_after_the_papers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution's ``kdcache.plugins`` entry point registers an experiment as it would a model."""
    site = tmp_path / "site"
    (site / "kdcache_exp_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "kdcache_exp_plugin.py").write_text(
        "from kdcache.pipelines.experiment_spec import CE, KD, Experiment\n"
        "from kdcache.pipelines.experiments import register_experiment\n"
        "register_experiment(Experiment(name='plug-resnet8', table='Plug-in', dataset='cifar100',\n"
        "                               teachers=('resnet8',) * 2, student='resnet8', variants=(CE, KD),\n"
        "                               paper={'kd': '1.00'}, source='a plug-in'))\n")
    info = site / "kdcache_exp_plugin-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdcache-exp-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdcache.plugins]\nexp = kdcache_exp_plugin\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))
    registry.reset_plugins()
    try:
        assert experiments.experiment_names() == [*PAPER_SETTING_PINS, "plug-resnet8"]
        assert experiments.find_experiment("plug-resnet8").methods == ("ce", "kd")
        listed = invoke("list")
        assert listed.exit_code == 0 and re.search(r"^Plug-in: \n  plug-resnet8\s+resnet8 ×2 → resnet8\s+cifar100\s+ce, kd$",
                                                   listed.output, re.M), listed.output
        with pytest.raises(KdcacheError, match="experiment 't1-resnet32x4-vgg8' is registered already"):
            experiments.register_experiment(experiments.find_experiment("t1-resnet32x4-vgg8"))
    finally:
        experiments._EXPERIMENTS.remove("plug-resnet8")
        sys.modules.pop("kdcache_exp_plugin", None)
        monkeypatch.undo()
        registry.reset_plugins()
    assert "plug-resnet8" not in experiments.experiment_names()


def test_set_ups_give_the_paper_and_cs_kd_optimisers() -> None:
    official, paper, cskd = (grid.find_setup(n) for n in ("official", "paper", "cs-kd"))
    assert (official.resolved_lr("vgg8"), official.resolved_lr("MobileNetV2"), official.weight_decay) == (0.05, 0.01, 5e-4)
    assert (paper.resolved_lr("vgg8"), paper.resolved_lr("ShuffleV1"), paper.weight_decay) == (0.1, 0.05, 1e-4)
    assert official.resolved_milestones(240) == paper.resolved_milestones(240) == [150, 180, 210]
    assert (cskd.epochs, cskd.batch_size, cskd.resolved_lr("shufflenet_v2_x0_5")) == (200, 32, 0.1)
    assert cskd.resolved_milestones(200) == [101, 151] and cskd.resolved_milestones(20) == [10, 15]
    dogs = experiments.find_experiment("app-stanford-dogs-resnet34-shufflenet_v2_x0_5")
    fitnet = next(v for v in dogs.variants if v.label == "fitnet")
    dogs_grid = experiments.grid_spec(dogs, None, None, Path("r"), epochs=200, setup="cs-kd")
    req = grid.distill_request(dogs_grid, fitnet, ["a", "b", "c"], 1)
    assert (req.method, req.teachers, req.lr, req.weight_decay, req.batch_size, req.milestones) == (
        "fitnet", ["a"], 0.1, 1e-4, 32, [101, 151])
    t4 = experiments.find_experiment("t4-vgg13-MobileNetV2")
    req = grid.distill_request(experiments.grid_spec(t4, None, None, Path("r"), epochs=240, setup="official"),
                               t4.variants[0], ["a", "b", "c"], 0)
    assert (req.teachers, req.lr, req.options.params["camkd_weights"], req.milestones) == (["a", "b", "c"], None, "uniform", None)
    with pytest.raises(UnknownNameError, match="known: official, paper, cs-kd"):
        grid.find_setup("sgd")


# (experiment, K, N, C, V, pooled D, spatial (C', H, W), teacher-rows run: sum over run rows of their teachers)
HAND = [
    ("t1-resnet32x4-vgg8", 3, 50000, 100, 240, 256, (256, 8, 8), 5 * 3),
    ("t2-resnet32x4-vgg8", 3, 50000, 100, 240, 256, (256, 8, 8), 1 + 1 + 3),
    ("t3-resnet8x4-resnet20x4-resnet32x4-vgg8", 3, 50000, 100, 240, 256, (256, 8, 8), 5 * 3),
    ("t4-vgg13-MobileNetV2", 3, 50000, 100, 240, 512, (512, 4, 4), 4 * 3),
    ("f4-resnet56-MobileNetV2", 4, 50000, 100, 240, 64, (64, 8, 8), 5 * (1 + 2 + 3 + 4)),
    ("app-tiny-imagenet-resnet32x4-vgg8", 3, 100000, 200, 240, 256, (256, 16, 16), 5 * 3 + 1 + 1),
    ("app-stanford-dogs-resnet34-shufflenet_v2_x0_5", 3, 12000, 120, 200, 512, (512, 7, 7), 5 * 3 + 1 + 1),
]


@pytest.mark.parametrize("name, k, n, c, v, d, spatial, teacher_rows", HAND)
def test_dry_run_numbers_match_a_hand_calculation(name: str, k: int, n: int, c: int, v: int, d: int,
                                                  spatial: tuple[int, int, int], teacher_rows: int) -> None:
    plan = plan_experiment(name)
    seeds, epochs = 3, v  # every experiment: three seeds, one stored view per student epoch
    assert (plan.views, plan.n_samples, plan.num_classes, plan.seeds, plan.epochs) == (v, n, c, seeds, epochs)
    assert plan.features is FeatureForm.SPATIAL and len(plan.stores) == k
    pooled_row = (c + d) * 2
    spatial_row = (c + spatial[0] * spatial[1] * spatial[2]) * 2
    pooled, maps, none = FeatureForm.POOLED, FeatureForm.SPATIAL, FeatureForm.NONE
    for s in plan.stores:
        assert (s.feature_dim, s.map_shape) == (d, spatial)
        assert (s.row_bytes(pooled), s.row_bytes(maps), s.row_bytes(none)) == (pooled_row, spatial_row, c * 2)
        assert s.arrays_bytes(maps) == v * n * spatial_row and s.arrays_bytes(pooled) == v * n * pooled_row
        assert s.head_bytes == (c * d + c) * 4
        # after compression: the ratios measured on digits teachers (benchmarks/RESULTS.md)
        assert s.estimated_bytes(maps) == round(v * n * spatial_row / 1.86) + (c * d + c) * 4
        assert s.estimated_bytes(pooled) == round(v * n * pooled_row / 1.27) + (c * d + c) * 4
    params = {"crop-flip": 3, "resized-crop-flip": 5}[plan.view_recipe]  # (top, left, flip), (+ height, width)
    plan_bytes = v * n * 4 + v * n * params * 2 + n * 4  # order int32, params int16, labels int32
    assert plan.plan_bytes == plan_bytes
    assert plan.total_raw_bytes(FeatureForm.SPATIAL) == k * (v * n * spatial_row + (c * d + c) * 4) + plan_bytes
    assert plan.online_forward_passes == seeds * epochs * n * teacher_rows
    assert plan.cached_forward_passes == v * n * k
    assert plan.saved_forward_passes == seeds * epochs * n * teacher_rows - v * n * k


def test_the_paper_setting_in_numbers() -> None:
    """The figures the issue and the README quote for resnet32x4 over 240 CIFAR-100 views, by hand."""
    store = plan_experiment("t1-resnet32x4-vgg8").stores[0]
    pooled, maps = FeatureForm.POOLED, FeatureForm.SPATIAL
    assert store.row_bytes(maps) == (100 + 256 * 8 * 8) * 2 == 32_968
    assert store.arrays_bytes(maps) == 240 * 50000 * 32_968 == 395_616_000_000  # about 390 GB per teacher
    assert store.row_bytes(pooled) == 712 and store.arrays_bytes(pooled) == 8_544_000_000
    plan = plan_experiment("t1-resnet32x4-vgg8", epochs=30)
    assert plan.views == 30  # a shorter run stores only the views it uses
    assert plan_experiment("t1-resnet32x4-vgg8", features=FeatureForm.POOLED).features is FeatureForm.POOLED
    assert plan_experiment("t4-vgg13-MobileNetV2", features=FeatureForm.POOLED).features is FeatureForm.POOLED
    with pytest.raises(KdcacheError, match="--features"):
        plan_experiment("t1-resnet32x4-vgg8", features="maps")


def test_cli_lists_and_dry_runs_every_setting_writing_nothing(tmp_path: Path) -> None:
    assert COMMANDS == (experiment_group,)
    listed = invoke("list")
    assert listed.exit_code == 0, listed.output
    for table, names in PAPER_SETTINGS.items():
        assert f"{table}: " in listed.output
        for name in names:
            assert re.search(rf"^  {re.escape(name)}\s", listed.output, re.M), name
    assert re.search(r"t1-resnet32x4-vgg8\s+resnet32x4 ×3 → vgg8\s+cifar100\s+ce, aver", listed.output)
    assert "at (not implemented)" in listed.output and "with 1-4 teachers" in listed.output

    out, cache = tmp_path / "out", tmp_path / "cache"
    for name in experiments.experiment_names():
        result = invoke("run", name, "--data-root", tmp_path / "no-data", "--out", out, "--cache", cache, "--dry-run")
        assert result.exit_code == 0, (name, result.output)
        text = result.output
        assert re.search(r"^  pooled   features .* on disk", text, re.M), name
        assert re.search(r"^  spatial  features .* on disk  <- this run", text, re.M), name
        assert "saved: " in text and "teacher forward passes" in text, name
    text = invoke("run", "t1-resnet32x4-vgg8", "--data-root", tmp_path / "no-data", "--out", out, "--dry-run").output
    assert "(240, 50000, 100) float16" in text and "(240, 50000, 256, 8, 8) float16" in text
    assert "32,968 B a row" in text and "395,616,000,000 B" in text and "8,544,000,000 B" in text
    assert "540,000,000" in text and "36,000,000" in text and "504,000,000" in text
    assert "resnet32x4-0.pth: missing, will be trained" in text
    pooled = invoke("run", "t1-resnet32x4-vgg8", "--data-root", tmp_path, "--out", out, "--dry-run",
                    "--features", "pooled").output
    assert re.search(r"^  pooled   features .*  <- this run", pooled, re.M)
    dogs = invoke("run", "app-stanford-dogs-resnet34-shufflenet_v2_x0_5", "--data-root", tmp_path, "--out", out,
                  "--dry-run").output
    assert "set-up     cs-kd" in dogs and "200 views of 224×224 (resized-crop-flip)" in dogs
    assert "listed, not run (not implemented): at, vid, crd" in dogs
    assert str(out / "teachers" / "stanford-dogs" / "resnet34-2.pth") in dogs
    assert not out.exists() and not cache.exists()

    unknown = invoke("run", "nope", "--data-root", tmp_path, "--out", out)
    assert isinstance(unknown.exception, KdcacheError)
    bad = invoke("run", "t1-resnet32x4-vgg8", "--data-root", tmp_path, "--out", out, "--seeds", 0, "--dry-run")
    assert isinstance(bad.exception, KdcacheError) and "--seeds" in str(bad.exception)


def test_image_folder_experiments_read_their_size_and_refuse_other_views(tmp_path: Path) -> None:
    tree = write_fake_imagefolder(tmp_path / "tiny", n_classes=4, sizes=[(64, 64)])
    dry = run_experiment("app-tiny-imagenet-resnet32x4-vgg8", tree, tmp_path / "cache", tmp_path / "out", dry_run=True)
    assert (dry.plan.n_samples, dry.plan.num_classes, dry.plan.image_size, dry.plan.view_recipe) == (
        16, 4, 64, "crop-flip:64")
    assert dry.plan.stores[0].map_shape == (256, 16, 16)
    small = write_fake_imagefolder(tmp_path / "small", n_classes=2, sizes=[(32, 32)])
    with pytest.raises(KdcacheError, match="needs 64×64 crop-flip views of Tiny-ImageNet"):
        run_experiment("app-tiny-imagenet-resnet32x4-vgg8", small, tmp_path / "cache", tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "cache").exists()


def test_custom_experiment_runs_any_setting_given_on_the_command_line(tmp_path: Path) -> None:
    custom = experiments.custom_experiment(["wrn_40_2", "wrn_40_2", "resnet56"], "ShuffleV1")
    assert custom.name == "custom-wrn_40_2x2-resnet56-ShuffleV1" and custom.name not in experiments.experiment_names()
    assert custom.teachers == ("wrn_40_2", "wrn_40_2", "resnet56") and custom.dataset == "cifar100"
    assert custom.methods == experiments.find_experiment("t1-resnet32x4-vgg8").methods

    out = tmp_path / "out"
    result = invoke("run", "custom", "--teacher", "wrn_40_2", "--teacher", "wrn_40_2", "--teacher", "resnet56",
                    "--student", "ShuffleV1", "--data-root", tmp_path, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    # wrn_40_2's pooled feature is 128 wide, resnet56's 64; their maps 128x8x8 and 64x8x8
    assert f"pooled   features (240, 50000, 128) float16: {(100 + 128) * 2:,} B a row" in result.output
    assert f"spatial  features (240, 50000, 64, 8, 8) float16: {(100 + 64 * 64) * 2:,} B a row" in result.output
    assert f"({240 * 50000 * (100 + 128 * 64) * 2:,} B)" in result.output
    assert "wrn_40_2-1.pth: missing" in result.output and "resnet56-0.pth: missing" in result.output
    assert not out.exists()

    for args, message in ((["--student", "vgg8"], "needs --teacher"),
                          (["--teacher", "vgg13"], "needs --teacher"),
                          (["--teacher", "vgg13", "--student", "vgg8", "--dataset", "svhn"], "unknown data set")):
        bad = invoke("run", "custom", *args, "--data-root", tmp_path, "--out", out, "--dry-run")
        assert bad.exit_code != 0 and message in bad.output + str(bad.exception)
    named = invoke("run", "t1-resnet32x4-vgg8", "--student", "vgg8", "--data-root", tmp_path, "--out", out)
    assert named.exit_code == 2 and "NAME custom only" in named.output


# -- end to end on tiny synthetic CIFAR-100 ---------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core machine run much faster on one intra-op thread (no spinning at barriers)."""
    with torch_threads(1):
        yield


def _mtimes(root: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob(pattern)}


def test_tiny_experiment_end_to_end_resumes_and_tabulates(tmp_path: Path, one_thread: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_fake_cifar(tmp_path / "data", kind="cifar100", n_train=64, n_test=16, seed=0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    # a user-supplied pretrained teacher in the RepDistiller format: used as it is, never trained
    torch.manual_seed(123)
    supplied = out / "teachers" / "resnet8-0.pth"
    supplied.parent.mkdir(parents=True)
    torch.save({"model": build_model("resnet8", 100).state_dict()}, supplied)
    supplied_stamp = supplied.stat().st_mtime_ns

    said: list[str] = []
    kw = dict(data_root=data, cache=cache, out=out, device="cpu", say=said.append)
    first = run_experiment(TINY, **kw)

    # teachers: one supplied, two trained here with seeds 1 and 2; one plan, K stores
    assert supplied.stat().st_mtime_ns == supplied_stamp
    assert sum("training resnet8" in m for m in said) == 2
    ckpts = [out / "teachers" / f"resnet8-{i}.pth" for i in range(3)]
    assert [torch.load(c, weights_only=False).get("seed") for c in ckpts[1:]] == [1, 2]
    assert len({t["id"] for t in first.grid.teachers}) == 3
    assert len({t["plan_id"] for t in first.grid.teachers}) == 1
    assert len(list((cache / "plans").iterdir())) == 1
    assert len(list((cache / "teachers").iterdir())) == 3
    assert first.grid.reused == {"teachers": 1, "stores": 0, "runs": 0}

    # every row × seed ran into <out>/<label>/seed<k>/ with its metrics
    for method in TINY.methods:
        for seed in range(2):
            run = out / method / f"seed{seed}"
            assert (run / "last.pth").is_file()
            records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert len(records) == 1
            config = json.loads((run / "config.json").read_text())["args"]
            assert config["seed"] == seed and config["teachers"] == first.grid.ids
        assert [r["seed"] for r in first.grid.students[method]] == [0, 1]

    # the table: teachers, ensemble, a mean ± std row per method beside the paper's figure (n/a: none given)
    table = (out / "table.md").read_text()
    assert table == first.table
    assert "| Ensemble of the 3 (majority vote) |" in table and "| Teacher 3 (resnet8)" in table
    assert "stores in the **spatial** feature form" in table
    for method in TINY.methods:
        row = next(line for line in table.splitlines() if f"(`{method}`, " in line)
        assert re.search(r"\| \d+\.\d\d ± \d+\.\d\d \| n/a \| \d+\.\d\d ± \d+\.\d\d \| 2 \|$", row), row
    summary = json.loads((out / "experiment.json").read_text())
    assert summary["experiment"]["name"] == "test-tiny" and set(summary["students"]) == set(TINY.methods)

    # a second run does no work: same teachers, stores and runs, untouched; its table is the grid's one formatter's
    stamps = {**_mtimes(out, "*.pth"), **_mtimes(cache, "*")}
    said.clear()
    tables = spy_on_format_table(monkeypatch)
    second = run_experiment(TINY, **kw)
    assert second.grid.reused == {"teachers": 3, "stores": 3, "runs": 12}
    assert not any("training" in m or m.startswith(("run ", "evaluating")) for m in said), said
    assert {**_mtimes(out, "*.pth"), **_mtimes(cache, "*")} == stamps
    assert second.table == first.table and tables == [second.table]

    # an unfinished grid resumes: only the missing run is trained again
    gone = out / "camkd" / "seed1"
    for p in gone.iterdir():
        p.unlink()
    gone.rmdir()
    said.clear()
    third = run_experiment(TINY, **kw)
    assert third.grid.reused["runs"] == 11
    runs_said = [m for m in said if re.match(r"run \d+/\d+: ", m)]
    assert len(runs_said) == 1 and runs_said[0].startswith("run 12/12: camkd (camkd, 3 teachers), seed 1"), said
    assert (gone / "last.pth").is_file()

    # the grid's one rule for "finished" (last.pth): a run killed after its last epoch's checkpoint (checkpoint.pth,
    # no last.pth) is resumed, not counted; and a finished run of another grid is refused, before any training
    killed, foreign = RunDir(out / "ce" / "seed0"), RunDir(out / "camkd" / "seed1")
    killed.file(RunDir.LAST).unlink()
    config = foreign.read_config()
    foreign.write_config({**config, "args": {**config["args"], "epochs": 7}})
    said.clear()
    with pytest.raises(KdcacheError, match=r"holds a finished run of another grid \(epochs differ: epochs 7\)") as exc:
        run_experiment(TINY, **kw)
    assert "\n" not in str(exc.value) and not killed.finished and not any(m.startswith("run ") for m in said)
    foreign.write_config(config)
    checkpoint = killed.file(RunDir.CHECKPOINT).stat().st_mtime_ns
    said.clear()
    fourth = run_experiment(TINY, **kw)
    assert fourth.grid.reused["runs"] == 11 and killed.finished
    assert [m for m in said if re.match(r"run \d+/\d+: ", m)] == [
        "run 1/12: ce (ce, 0 teachers), seed 0, resnet8 for 1 epochs (resuming)"], said
    assert said[-2].startswith("run ce seed 0: top-1 ") and said[-2].endswith(" on this process")
    assert said[-1] == "runs: 12 done, 0 running, 0 queued, 0 failed of 12"
    assert killed.file(RunDir.CHECKPOINT).stat().st_mtime_ns == checkpoint and len(killed.read_metrics()) == 1

    # the dry run reads the real size and sees the finished grid
    dry = run_experiment(TINY, **{**kw, "say": None}, dry_run=True)
    assert dry.plan.n_samples == 64 and dry.plan.num_classes == 100
    assert dry.plan.stores[0].arrays_bytes(FeatureForm.SPATIAL) == 1 * 64 * (100 + 64 * 8 * 8) * 2
    assert dry.plan.online_forward_passes == 5 * 2 * 1 * 64 * 3
    assert any("12 student runs" in line and "12 already finished" in line for line in dry.lines)
    assert any("resnet8-0.pth: found, used as it is" in line for line in dry.lines)


def test_teacher_checkpoint_states_and_foreign_runs(tmp_path: Path) -> None:
    ckpt, run = tmp_path / "resnet8-0.pth", RunDir(tmp_path / "resnet8-0")  # train-teacher's run beside its weights
    assert grid.teacher_state(ckpt, 5) == "missing"
    run.start({"kind": "teacher", "args": {"epochs": 3}})
    assert grid.teacher_state(ckpt, 5) == "missing"  # begun, no epoch saved: trained afresh
    torch.save({"epoch": 1}, run.file(RunDir.CHECKPOINT))
    assert grid.teacher_state(ckpt, 3) == "partial"  # kdcache's own run, stopped early: resumed
    torch.save({"model": {}, "epoch": 3}, ckpt)
    torch.save({"model": {}, "epoch": 3}, run.file(RunDir.LAST))
    assert grid.teacher_state(ckpt, 3) == grid.teacher_state(ckpt, 2) == "done"
    assert grid.teacher_state(ckpt, 5) == "partial"  # finished with fewer epochs: resumed to 5
    ckpt.unlink()
    assert grid.teacher_state(ckpt, 3) == "partial"  # finished, its weights file gone: written again
    shutil.rmtree(run.path)
    torch.save({"model": {}, "epoch": 3}, ckpt)  # a pretrained checkpoint from elsewhere: used as it is
    assert grid.teacher_state(ckpt, 240) == "done"
    # an earlier kdcache's one-file teacher: finished, used as it is; part-trained, refused (it cannot resume)
    torch.save({"model": {}, "optimizer": {}, "lr_scheduler": {}, "epoch": 3, "arch": "resnet8"}, ckpt)
    assert grid.teacher_state(ckpt, 3) == "done"
    with pytest.raises(CheckpointError, match="was trained 3 of 5 epochs by an earlier kdcache, whose runs cannot be "
                                              "resumed; delete it to train the teacher again"):
        grid.teacher_state(ckpt, 5)
    ckpt.unlink()
    assert [(a, p.name, s) for a, p, s in experiments.teacher_checkpoints(
        experiments.find_experiment("t3-resnet8x4-resnet20x4-resnet32x4-vgg8"), tmp_path)] == [
        ("resnet8x4", "resnet8x4-0.pth", 0), ("resnet20x4", "resnet20x4-0.pth", 0), ("resnet32x4", "resnet32x4-0.pth", 0)]
    f4 = experiments.teacher_checkpoints(experiments.find_experiment("f4-resnet56-MobileNetV2"), tmp_path)
    assert [(p.name, s) for _, p, s in f4] == [(f"resnet56-{i}.pth", i) for i in range(4)]
    tiny = experiments.teacher_checkpoints(experiments.find_experiment("app-tiny-imagenet-resnet32x4-vgg8"), tmp_path)
    assert tiny[0][1] == tmp_path / "tiny-imagenet" / "resnet32x4-0.pth"

    t4 = experiments.find_experiment("t4-vgg13-MobileNetV2")
    spec = experiments.grid_spec(t4, None, None, tmp_path, epochs=240, setup="official")
    req = grid.distill_request(spec, t4.variants[0], ["a", "b", "c"], 0)
    run = tmp_path / t4.variants[0].label / "seed0"
    run.mkdir(parents=True)
    args = {"method": "camkd", "epochs": 240, "teachers": ["a", "b", "c"], "options": dataclasses.asdict(req.options),
            "weight_decay": 5e-4, "batch_size": 64, "lr": 0.01, "milestones": [150, 180, 210]}
    (run / "config.json").write_text(json.dumps({"args": args}))
    grid.check_same_grid(RunDir(run), req)
    params = {**args["options"]["params"], "camkd_weights": "confidence"}
    for key, other in (("epochs", 30), ("teachers", ["a", "b"]), ("lr", 0.05),
                       ("options", {**args["options"], "params": params})):
        (run / "config.json").write_text(json.dumps({"args": {**args, key: other}}))
        with pytest.raises(KdcacheError, match=f"another grid \\({key} differ"):
            grid.check_same_grid(RunDir(run), req)


def test_rows_with_options_teacher_counts_and_unimplemented_methods_run_as_listed(tmp_path: Path,
                                                                                  one_thread: None) -> None:
    data = write_fake_cifar(tmp_path / "data", kind="cifar100", n_train=64, n_test=16, seed=1)
    rows = (experiment_spec.KD, experiment_spec.CAMKD_UNIFORM, experiment_spec.CAMKD_BETA0,
            *experiment_spec.teacher_sweep((experiment_spec.AVER,), (1, 2)), experiment_spec.AT)
    tiny = Experiment(name="test-rows", table="Table 4", dataset="cifar100", teachers=("resnet8",) * 2,
                      student="resnet8", variants=rows, seeds=1, epochs=1, views=1, features=FeatureForm.POOLED,
                      paper={"at": "12.34 ± 0.56"}, source="test only")
    out = tmp_path / "out"
    result = run_experiment(tiny, data, tmp_path / "cache", out, device="cpu")
    ids = result.grid.ids
    assert all(t["features"] == "pooled" for t in result.grid.teachers)
    expect = {"kd": (ids[:1], "confidence", None), "camkd-uniform": (ids, "uniform", None),  # None: beta 50
              "camkd-beta0": (ids, "confidence", 0.0), "aver-k1": (ids[:1], "confidence", None),
              "aver-k2": (ids, "confidence", None)}
    for label, (teachers, weights, beta) in expect.items():
        args = json.loads((out / label / "seed0" / "config.json").read_text())["args"]
        assert args["teachers"] == teachers, label
        if args["method"] == "camkd":
            assert (args["options"]["params"]["camkd_weights"], args["options"]["beta"]) == (weights, beta), label
    assert not (out / "at").exists()
    table = result.table
    assert "| AT (one teacher) | not implemented in kdcache | 12.34 ± 0.56 | | |" in table
    assert re.search(r"^\| AVER \| \d+\.\d\d \| \d+\.\d\d \|$", table, re.M), table  # the 1- and 2-teacher points
    assert "stores in the **pooled** feature form" in table
