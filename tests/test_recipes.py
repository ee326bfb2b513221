"""The paper's recipes: the registry, the dry-run arithmetic against a hand calculation, the CLI, and a tiny
recipe end to end on synthetic CIFAR-100 files (teachers shared, every run, resume, the table)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fakes import write_fake_cifar
from kdcache.cli.recipe import COMMANDS, recipe as recipe_group
from kdcache.errors import KdcacheError, UnknownNameError
from kdcache.models import build_model
from kdcache.pipelines import recipes
from kdcache.pipelines.recipes import Recipe, plan_recipe, run_recipe

TINY = Recipe(name="test-tiny", table="Table 1", dataset="cifar100", teachers=("resnet8",) * 3, student="resnet8",
              seeds=2, epochs=1, views=1, source="test only")


def invoke(*args: object):
    return CliRunner().invoke(recipe_group, [str(a) for a in args])


# -- registry and dry-run arithmetic ----------------------------------------------------------


def test_registry_holds_the_paper_settings() -> None:
    names = recipes.recipe_names()
    assert "t1-resnet32x4-vgg8" in names
    assert any(recipes.find_recipe(n).table == "Table 3" for n in names)
    for name in names:
        r = recipes.find_recipe(name)
        assert r.dataset == "cifar100" and len(r.teachers) == 3
        assert r.methods == ("ce", "aver", "fitnet-mkd", "ebkd", "aekd", "camkd")
        assert (r.seeds, r.epochs, r.views) == (3, 240, 240)
        assert r.source
    t1 = recipes.find_recipe("t1-resnet32x4-vgg8")
    assert t1.teachers == ("resnet32x4",) * 3 and t1.student == "vgg8"
    with pytest.raises(UnknownNameError, match="known: t1-resnet32x4-vgg8"):
        recipes.find_recipe("t9-nothing")
    with pytest.raises(UnknownNameError):
        recipes.register_recipe(Recipe("bad", "Table 1", "cifar100", ("resnet999",), "vgg8"))
    assert "bad" not in recipes.recipe_names()


def test_dry_run_numbers_match_a_hand_calculation() -> None:
    plan = plan_recipe("t1-resnet32x4-vgg8")
    V, N, C, D, K, S, E = 240, 50000, 100, 256, 3, 3, 240
    per_store = 240 * 50000 * (100 + 256) * 2
    assert per_store == 8_544_000_000
    assert (plan.views, plan.n_samples, plan.num_classes, plan.seeds, plan.epochs) == (V, N, C, S, E)
    assert len(plan.stores) == K
    for s in plan.stores:
        assert (s.arch, s.feature_dim) == ("resnet32x4", D)
        assert s.logits_shape == (V, N, C) and s.features_shape == (V, N, D)
        assert s.arrays_bytes == per_store
        assert s.head_bytes == (C * D + C) * 4
        assert s.estimated_bytes == round(per_store / 1.27) + (C * D + C) * 4
    plan_store = V * N * 4 + V * N * 3 * 2 + N * 4  # order int32, crop-flip params (top, left, flip) int16, labels
    assert plan.plan_bytes == plan_store
    assert plan.total_raw_bytes == K * (per_store + (C * D + C) * 4) + plan_store
    # five of the six methods read teachers (ce does not)
    online = 5 * S * E * N * K
    cached = V * N * K
    assert plan.online_forward_passes == online == 540_000_000
    assert plan.cached_forward_passes == cached == 36_000_000
    assert plan.saved_forward_passes == online - cached == 504_000_000
    assert plan.ratio == pytest.approx(15.0)

    mixed = plan_recipe("t3-resnet56-resnet20x4-vgg13-vgg8", epochs=30)
    assert [s.feature_dim for s in mixed.stores] == [64, 256, 512]
    assert mixed.views == 30  # a shorter run stores only the views it uses
    assert [s.arrays_bytes for s in mixed.stores] == [30 * N * (C + d) * 2 for d in (64, 256, 512)]


def test_cli_list_and_dry_run_write_nothing(tmp_path: Path) -> None:
    assert COMMANDS == (recipe_group,)
    listed = invoke("list")
    assert listed.exit_code == 0, listed.output
    assert re.search(r"t1-resnet32x4-vgg8\s+resnet32x4 ×3 → vgg8\s+cifar100", listed.output)

    out = tmp_path / "out"
    result = invoke("run", "t1-resnet32x4-vgg8", "--data-root", tmp_path / "no-data", "--out", out,
                    "--cache", tmp_path / "cache", "--dry-run")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "(240, 50000, 100) float16" in text and "(240, 50000, 256) float16" in text
    assert "6,144,000,000 B" in text and "2,400,000,000 B" in text
    assert "estimate" in text and "1.27" in text
    assert "540,000,000" in text and "36,000,000" in text and "504,000,000" in text
    assert "resnet32x4-0.pth: missing, will be trained" in text
    assert not out.exists() and not (tmp_path / "cache").exists()

    unknown = invoke("run", "nope", "--data-root", tmp_path, "--out", out)
    assert isinstance(unknown.exception, KdcacheError)
    bad = invoke("run", "t1-resnet32x4-vgg8", "--data-root", tmp_path, "--out", out, "--seeds", 0, "--dry-run")
    assert isinstance(bad.exception, KdcacheError) and "--seeds" in str(bad.exception)


def test_custom_recipe_runs_any_setting_given_on_the_command_line(tmp_path: Path) -> None:
    custom = recipes.custom_recipe(["wrn_40_2", "wrn_40_2", "resnet56"], "ShuffleV1")
    assert custom.name == "custom-wrn_40_2x2-resnet56-ShuffleV1" and custom.name not in recipes.recipe_names()
    assert custom.teachers == ("wrn_40_2", "wrn_40_2", "resnet56") and custom.dataset == "cifar100"
    assert custom.methods == recipes.find_recipe("t1-resnet32x4-vgg8").methods

    out = tmp_path / "out"
    result = invoke("run", "custom", "--teacher", "wrn_40_2", "--teacher", "wrn_40_2", "--teacher", "resnet56",
                    "--student", "ShuffleV1", "--data-root", tmp_path, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    # wrn_40_2's feature is 128 wide, resnet56's 64: 240 views x 50000 rows x D x 2 bytes
    assert f"features (240, 50000, 128) float16 2.9 GiB ({240 * 50000 * 128 * 2:,} B)" in result.output
    assert f"features (240, 50000, 64) float16 1.4 GiB ({240 * 50000 * 64 * 2:,} B)" in result.output
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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mtimes(root: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob(pattern)}


def test_tiny_recipe_end_to_end_resumes_and_tabulates(tmp_path: Path, one_thread: None) -> None:
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
    first = run_recipe(TINY, **kw)

    # teachers: one supplied, two trained here with seeds 1 and 2; one plan, K stores
    assert supplied.stat().st_mtime_ns == supplied_stamp
    assert sum("training resnet8" in m for m in said) == 2
    ckpts = [out / "teachers" / f"resnet8-{i}.pth" for i in range(3)]
    assert [torch.load(c, weights_only=False).get("seed") for c in ckpts[1:]] == [1, 2]
    assert len({t["id"] for t in first.teachers}) == 3
    assert len({t["plan_id"] for t in first.teachers}) == 1
    assert len(list((cache / "plans").iterdir())) == 1
    assert len(list((cache / "teachers").iterdir())) == 3
    assert first.reused == {"teachers": 1, "stores": 0, "runs": 0}

    # every method × seed ran into <out>/<method>/seed<k>/ with its metrics
    for method in TINY.methods:
        for seed in range(2):
            run = out / method / f"seed{seed}"
            assert (run / "last.pth").is_file()
            records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert len(records) == 1
            config = json.loads((run / "config.json").read_text())["args"]
            assert config["seed"] == seed and config["teachers"] == [t["id"] for t in first.teachers]
        assert [r["seed"] for r in first.students[method]] == [0, 1]

    # the table: teachers, ensemble, a mean ± std row per method
    table = (out / "table.md").read_text()
    assert table == first.table
    assert "| Ensemble" in table and "| Teacher 3 (resnet8)" in table
    for method in TINY.methods:
        row = next(line for line in table.splitlines() if f"(`{method}`, resnet8)" in line)
        assert re.search(r"\| \d+\.\d\d ± \d+\.\d\d \| \d+\.\d\d ± \d+\.\d\d \| 2 \| n/a \|$", row), row
    summary = json.loads((out / "recipe.json").read_text())
    assert summary["recipe"]["name"] == "test-tiny" and set(summary["students"]) == set(TINY.methods)

    # a second run does no work: same teachers, stores and runs, untouched
    stamps = {**_mtimes(out, "*.pth"), **_mtimes(cache, "*")}
    said.clear()
    second = run_recipe(TINY, **kw)
    assert second.reused == {"teachers": 3, "stores": 3, "runs": 12}
    assert not any("training" in m or m.startswith(("run ", "evaluating")) for m in said), said
    assert {**_mtimes(out, "*.pth"), **_mtimes(cache, "*")} == stamps
    assert second.table == first.table

    # an unfinished grid resumes: only the missing run is trained again
    gone = out / "camkd" / "seed1"
    for p in gone.iterdir():
        p.unlink()
    gone.rmdir()
    said.clear()
    third = run_recipe(TINY, **kw)
    assert third.reused["runs"] == 11
    runs_said = [m for m in said if m.startswith("run ")]
    assert len(runs_said) == 1 and "camkd, seed 1" in runs_said[0], said
    assert (gone / "last.pth").is_file()

    # the dry run reads the real size and sees the finished grid
    dry = run_recipe(TINY, **{**kw, "say": None}, dry_run=True)
    assert dry.plan.n_samples == 64 and dry.plan.num_classes == 100
    assert dry.plan.stores[0].arrays_bytes == 1 * 64 * (100 + 64) * 2
    assert dry.plan.online_forward_passes == 5 * 2 * 1 * 64 * 3
    assert any("12 student runs" in line and "12 already finished" in line for line in dry.lines)
    assert any("resnet8-0.pth: found, used as it is" in line for line in dry.lines)


def test_teacher_checkpoint_states_and_foreign_runs(tmp_path: Path) -> None:
    ckpt = tmp_path / "resnet8-0.pth"
    assert recipes._checkpoint_state(ckpt, 5) == "missing"
    torch.save({"model": {}, "optimizer": {}, "lr_scheduler": {}, "epoch": 3, "arch": "resnet8"}, ckpt)
    assert recipes._checkpoint_state(ckpt, 5) == "partial"  # kdcache's own run, stopped early: resumed
    assert recipes._checkpoint_state(ckpt, 3) == "done"
    torch.save({"model": {}, "epoch": 3}, ckpt)  # a pretrained checkpoint from elsewhere: used as it is
    assert recipes._checkpoint_state(ckpt, 240) == "done"
    assert [(a, p.name, s) for a, p, s in recipes.teacher_checkpoints(
        recipes.find_recipe("t3-resnet56-resnet20x4-vgg13-vgg8"), tmp_path)] == [
        ("resnet56", "resnet56-0.pth", 0), ("resnet20x4", "resnet20x4-0.pth", 0), ("vgg13", "vgg13-0.pth", 0)]

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"args": {"epochs": 240, "teachers": ["a", "b"]}}))
    recipes._check_finished_run(run, 240, ["a", "b"])
    with pytest.raises(KdcacheError, match="another grid"):
        recipes._check_finished_run(run, 30, ["a", "b"])
