"""The command line: listings, train-teacher, cache admin, and one clear line for every user error."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import error_lines, run_cli
from fakes import cifar_batch, fake_cifar, flip_byte, write_fake_cifar, write_py2_pickle
from kdcache import training
from kdcache.cli.main import main
from kdcache.data import dataset_names
from kdcache.models import build_model, model_names
from kdcache.runs import RunDir
from kdcache.store import Cache


def precompute_args(ckpt: Path, cache: Path, arch: str = "resnet8", dataset: str = "digits") -> list:
    return ["precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", dataset, "--cache", cache,
            "--views", 2, "--chunk-rows", 512, "--device", "cpu"]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "kdcache"  # where pip puts console scripts of this environment
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "kdcache, version" in out.stdout


def test_listings_name_every_registered_model_and_data_set() -> None:
    models = run_cli("models")
    assert models.exit_code == 0
    listed = [line.split()[0] for line in models.stdout.splitlines()]
    assert listed == model_names()
    assert "resnet32x4" in listed and "mobilenet_v2" in listed and "ShuffleV2" in listed
    datasets = run_cli("datasets")
    assert [line.split()[0] for line in datasets.stdout.splitlines()] == dataset_names()


def test_official_training_defaults() -> None:
    assert training.official_lr("resnet32x4") == 0.05
    assert [training.official_lr(a) for a in ("MobileNetV2", "ShuffleV1", "ShuffleV2")] == [0.01] * 3
    assert training.milestones_for(240) == [150, 180, 210]
    assert training.milestones_for(24) == [15, 18, 21]
    assert training.milestones_for(2) == [1]


def test_train_teacher_checkpoint_and_resume(tmp_path: Path) -> None:
    """--out t.pth: the run directory t/ (distill's format) beside it, and t.pth the trained weights."""
    out, run = tmp_path / "t.pth", RunDir(tmp_path / "t")
    first = run_cli("train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", out, "--epochs", 4,
                    "--lr-milestones", "3", "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == str(out)
    weights = torch.load(out, weights_only=False)
    assert {"model", "epoch", "arch", "test_top1", "num_classes", "dataset", "seed"} <= set(weights)
    assert all(torch.equal(weights["model"][k], v)
               for k, v in torch.load(run.file(RunDir.LAST), weights_only=False)["model"].items())
    ckpt = torch.load(run.file(RunDir.CHECKPOINT), weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "best_top1", "arch", "args", "rng"} <= set(ckpt)
    assert ckpt["kind"] == "teacher" and ckpt["args"] == run.read_config()["args"]
    assert ckpt["epoch"] == weights["epoch"] == 4 and ckpt["arch"] == weights["arch"] == "resnet8"
    assert ckpt["best_top1"] >= weights["test_top1"]
    assert ckpt["best_top1"] == max(r["test_top1"] for r in run.read_metrics()) == run.load().best_top1
    assert torch.load(run.file(RunDir.BEST), weights_only=False)["test_top1"] == ckpt["best_top1"]
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, True)
    assert group["lr"] == pytest.approx(0.005)  # 0.05 divided by 10 at epoch 3
    assert ckpt["best_top1"] > 20.0  # it learns: 10 classes, chance is 10%
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3, 4] and run.finished

    resumed = run_cli("train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", out, "--epochs", 5,
                      "--lr-milestones", "3", "--device", "cpu", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("epoch ") == 1 and "epoch   5/5" in resumed.output
    assert torch.load(out, weights_only=False)["epoch"] == 5
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]

    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(out, weights_only=False)["model"])  # loads into the zoo model unchanged


def test_train_teacher_into_a_run_directory_prints_its_weights_for_precompute(tmp_path: Path) -> None:
    """--out DIR: the run directory itself; the path printed (DIR/last.pth) is what precompute --checkpoint takes."""
    out = tmp_path / "teacher"
    trained = run_cli("train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", out, "--epochs", 1,
                      "--batch-size", 256, "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    weights = Path(trained.stdout.strip().splitlines()[-1])
    assert weights == out / RunDir.LAST and RunDir(out).finished
    stored = run_cli(*precompute_args(weights, tmp_path / "c"))
    assert stored.exit_code == 0, stored.output
    again = run_cli("train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", out, "--epochs", 1,
                    "--device", "cpu")
    assert again.exit_code == 1 and "already exists; pass --resume" in again.output


def test_a_legacy_teacher_checkpoint_loads_but_does_not_resume(tmp_path: Path) -> None:
    """A teacher an earlier kdcache wrote (one file with its optimiser and epoch): precompute takes it, --resume
    says why it cannot continue it, --force trains afresh in its place."""
    model = build_model("resnet8", 10)
    old = tmp_path / "old.pth"
    optimizer = training.make_optimizer(model.parameters(), 0.05)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": training.make_scheduler(optimizer, [1]).state_dict(), "epoch": 1, "best_acc": 10.0,
                "arch": "resnet8", "num_classes": 10, "dataset": "digits", "test_top1": 10.0, "seed": 0}, old)
    assert run_cli(*precompute_args(old, tmp_path / "c")).exit_code == 0
    args = ["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", old, "--epochs", 1,
            "--batch-size", 256, "--device", "cpu"]
    refused = run_cli(*args, "--resume")
    assert refused.exit_code == 1
    assert "was written by an earlier kdcache (one file, epoch 1), whose training cannot be continued" in \
        refused.output
    assert run_cli(*args, "--force").exit_code == 0 and RunDir(tmp_path / "old").finished
    assert "optimizer" not in torch.load(old, weights_only=False)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    common = ["--arch", "resnet8", "--dataset", "digits", "--device", "cpu", "--batch-size", 256, "--epochs", 2]
    straight, split = tmp_path / "straight.pth", tmp_path / "split.pth"
    assert run_cli("train-teacher", *common, "--out", straight).exit_code == 0
    assert run_cli("train-teacher", *common[:-1], 1, "--out", split, "--lr-milestones", "1").exit_code == 0
    assert run_cli("train-teacher", *common, "--out", split, "--resume").exit_code == 0
    a, b = (torch.load(p, weights_only=False)["model"] for p in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_ls_info_verify_rm(digits_teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    tid = run_cli(*precompute_args(digits_teacher, cache)).stdout.strip().splitlines()[-1]
    ls = run_cli("cache", "ls", "--cache", cache)
    assert ls.exit_code == 0
    row = ls.stdout.splitlines()[1].split()
    assert row[0] == tid and row[2:7] == ["resnet8", "pooled", "digits", "2", "1437"] and row[-1] == "complete"
    info = run_cli("cache", "info", tid[:6], "--cache", cache)
    assert info.exit_code == 0 and f'"teacher_id": "{tid}"' in info.stdout and '"n_views": 2' in info.stdout
    assert run_cli("cache", "verify", "--cache", cache).exit_code == 0

    chunk = cache / "teachers" / tid / "features" / "c" / "1" / "2" / "0"
    flip_byte(chunk, 0x55)
    bad = run_cli("cache", "verify", tid, "--cache", cache)
    assert bad.exit_code == 1
    assert "features: chunk (view 1, chunk 2) is damaged" in bad.stdout
    assert bad.stdout.startswith(f"{tid}: 1 problem(s); damaged: remove it with `kdcache cache rm {tid}` and run its "
                                 "`kdcache precompute` again")

    (plan,) = Cache.at(cache).plan_ids()
    held = run_cli("cache", "rm", plan[:6], "--cache", cache)  # a plan in use stays
    assert held.exit_code == 1 and error_lines(held.stderr) == [
        f"Error: cannot remove plan {plan}: teacher store {tid} uses it; remove it first (`kdcache cache rm {tid}`)"]
    assert "no teacher store uses it" not in run_cli("cache", "ls", "--cache", cache).stderr

    rm = run_cli("cache", "rm", tid, "--cache", cache)
    assert rm.exit_code == 0 and rm.stdout == f"removed {tid}\n" and not (cache / "teachers" / tid).exists()
    assert Cache.at(cache).plan_ids() == [plan]  # the plan stays for other teachers
    ls = run_cli("cache", "ls", "--cache", cache)
    assert ls.exit_code == 0 and ls.stderr.splitlines() == [
        f"plan {plan}: no teacher store uses it; `kdcache cache rm {plan}` removes it", f"no teacher stores in {cache}"]
    rm = run_cli("cache", "rm", plan[:6], "--cache", cache)
    assert rm.exit_code == 0 and rm.stdout == f"removed plan {plan}\n"
    assert not (cache / "plans" / plan).exists() and not (cache / "locks" / f"plan-{plan}.lock").exists()
    assert Cache.at(cache).plan_ids() == [] and run_cli("cache", "ls", "--cache", cache).stderr == (
        f"no teacher stores in {cache}\n")


def _other_arch_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "wrn.pth"
    torch.save({"model": build_model("wrn_16_1", 10).state_dict(), "arch": "wrn_16_1"}, path)
    return path


def _truncated_checkpoint(tmp_path: Path, digits_teacher: Path) -> Path:
    path = tmp_path / "cut.pth"
    path.write_bytes(digits_teacher.read_bytes()[:5000])
    return path


def _newer_format_store(tmp_path: Path, digits_teacher: Path) -> tuple[Path, str]:
    cache = tmp_path / "c"
    tid = run_cli(*precompute_args(digits_teacher, cache)).stdout.strip().splitlines()[-1]
    zarr.open_group(cache / "teachers" / tid, mode="r+").attrs["format"] = 99
    return cache, tid


def _info_of_newer_format(tmp_path: Path, digits_teacher: Path) -> list:
    cache, tid = _newer_format_store(tmp_path, digits_teacher)
    return ["cache", "info", tid[:5], "--cache", cache]


def _unwritable(tmp_path: Path) -> Path:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    return blocker / "cache"


@pytest.fixture(scope="module")
def prebuilt(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with two complete stores of the digits teacher: on plan seed 0 and on plan seed 1.
    Every bad-input case starts from a copy of it in ``tmp_path / "c"``."""
    cache = tmp_path_factory.mktemp("prebuilt") / "c"
    for seed in (0, 1):
        result = run_cli(*precompute_args(digits_teacher, cache), "--plan-seed", seed)
        assert result.exit_code == 0, result.output
    return cache


def _stores(tmp_path: Path) -> tuple[str, str]:
    """The ids of the prebuilt stores in ``tmp_path / "c"``: on plan seed 0, and on plan seed 1."""
    cache = Cache.at(tmp_path / "c")
    seeds = {cache.open_plan(cache.open_teacher(t).plan_id).attrs["seed"]: t for t in cache.teacher_ids()}
    return seeds[0], seeds[1]


def distill_args(tmp_path: Path, *teachers: str) -> list:
    ids = teachers or _stores(tmp_path)[:1]
    return ["distill", "--student", "resnet8", "--method", "camkd", *[a for t in ids for a in ("--teachers", t)],
            "--cache", tmp_path / "c", "--out", tmp_path / "run", "--epochs", 1, "--device", "cpu"]


def train_args(tmp_path: Path, *extra: object) -> list:
    return ["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", tmp_path / "x.pth",
            "--device", "cpu", *extra]


def _store_of_other_class_count(tmp_path: Path) -> str:
    tid = _stores(tmp_path)[0]
    zarr.open_group(tmp_path / "c" / "teachers" / tid, mode="r+").attrs["num_classes"] = 100
    return tid


def _checkpoint_of_other_class_count(tmp_path: Path) -> Path:
    path = tmp_path / "r8-100.pth"
    torch.save({"model": build_model("resnet8", 100).state_dict(), "arch": "resnet8"}, path)
    return path


def _overflowing_checkpoint(tmp_path: Path, digits_teacher: Path) -> Path:
    """The digits teacher with its classifier scaled by 1e30: every logit is inf in float16."""
    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(digits_teacher, weights_only=True)["model"])
    with torch.no_grad():
        model.head.weight.mul_(1e30)
        model.head.bias.mul_(1e30)
    path = tmp_path / "inf.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _resume_corrupt_run(tmp_path: Path, digits_teacher: Path) -> list:
    """--resume of a run directory whose checkpoint.pth was cut short."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(digits_teacher.read_bytes()[:3000])
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    return [*distill_args(tmp_path), "--resume"]


def _resume_corrupt_teacher(tmp_path: Path, digits_teacher: Path) -> list:
    """train-teacher --resume of a checkpoint cut short (an earlier kdcache's one file, read to say why not)."""
    (tmp_path / "x.pth").write_bytes(digits_teacher.read_bytes()[:3000])
    return train_args(tmp_path, "--resume")


def _resume_corrupt_teacher_run(tmp_path: Path, digits_teacher: Path) -> list:
    """train-teacher --resume of a run directory whose checkpoint.pth was cut short."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "checkpoint.pth").write_bytes(digits_teacher.read_bytes()[:3000])
    (tmp_path / "x" / "metrics.jsonl").write_text("")
    return train_args(tmp_path, "--resume")


def _cifar_root(tmp_path: Path, damage: str) -> Path:
    """A fake CIFAR-10 with one file missing, cut short, or holding 10 images but 9 labels."""
    root = write_fake_cifar(tmp_path / "data", "cifar10", n_train=50, n_test=20)
    folder = root / "cifar-10-batches-py"
    if damage == "missing":
        (folder / "data_batch_3").unlink()
    elif damage == "short":
        (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:2000])
    else:
        fake = fake_cifar("cifar10", 50, 20)
        write_py2_pickle(folder / "data_batch_1",
                         cifar_batch("cifar10", fake.train_rows[:10], fake.train_labels[:9], "training batch 1 of 5"))
    return root


def _cifar_args(tmp_path: Path, ckpt: Path, damage: str) -> list:
    return [*precompute_args(ckpt, tmp_path / "c", dataset="cifar10"), "--data-root", _cifar_root(tmp_path, damage)]


# (name, arguments as a function of (tmp_path, teacher checkpoint), what the one line must say)
BAD_INPUT = [
    ("unknown architecture", lambda t, c: precompute_args(c, t / "c", arch="resnet9"), "unknown architecture 'resnet9'"),
    ("unknown data set", lambda t, c: precompute_args(c, t / "c", dataset="svhn"), "unknown data set 'svhn'"),
    ("missing checkpoint", lambda t, c: precompute_args(t / "nope.pth", t / "c"), "nope.pth not found"),
    ("checkpoint of another arch", lambda t, c: precompute_args(_other_arch_checkpoint(t), t / "c"),
     "does not fit architecture 'resnet8' (it was saved from architecture 'wrn_16_1')"),
    ("truncated checkpoint", lambda t, c: precompute_args(_truncated_checkpoint(t, c), t / "c"), "cut.pth"),
    ("missing data root", lambda t, c: precompute_args(c, t / "c", dataset="cifar10"), "--data-root"),
    ("data root without CIFAR files", lambda t, c: [*precompute_args(c, t / "c", dataset="cifar10"), "--data-root", t],
     "cifar-10-batches-py"),
    ("unwritable cache", lambda t, c: precompute_args(c, _unwritable(t)), "cannot create cache directory"),
    ("zero views", lambda t, c: [*precompute_args(c, t / "c"), "--views", "0"], "--views must lie in [1, 536,870,911]"),
    ("zero batch", lambda t, c: [*precompute_args(c, t / "c"), "--batch-size", "0"], "--batch-size must be at least 1"),
    ("store of a newer format", _info_of_newer_format, "store format 99"),
    ("newer format on precompute", lambda t, c: precompute_args(c, _newer_format_store(t, c)[0]), "store format 99"),
    ("unknown store id", lambda t, c: ["cache", "verify", "ffff", "--cache", t / "c"], "no teacher store matches 'ffff'"),
    ("train: zero epochs", lambda t, c: ["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out",
                                         t / "x.pth", "--epochs", "0"], "--epochs must lie in [1, 1,000,000] (got 0)"),
    ("train: negative lr", lambda t, c: ["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out",
                                         t / "x.pth", "--lr", "-0.1"], "--lr must be a finite positive number"),
    ("train: resume without checkpoint", lambda t, c: ["train-teacher", "--arch", "resnet8", "--dataset", "digits",
                                                       "--out", t / "x.pth", "--resume"], "does not exist"),
    # unknown names
    ("unknown recipe", lambda t, c: [*precompute_args(c, t / "c"), "--recipe", "zoom"],
     "unknown augmentation recipe 'zoom'"),
    ("distill: unknown student", lambda t, c: [*distill_args(t), "--student", "resnet9"],
     "unknown architecture 'resnet9'"),
    ("distill: unknown method", lambda t, c: [*distill_args(t), "--method", "nope"],
     "Invalid value for '--method': 'nope' is not one of"),
    ("distill: unknown store id", lambda t, c: distill_args(t, "ffff"), "no teacher store matches 'ffff'"),
    # class counts and plans that do not fit
    ("checkpoint of another class count", lambda t, c: precompute_args(_checkpoint_of_other_class_count(t), t / "c"),
     "the checkpoint has 100 classes, the model 10"),
    ("store of another class count", lambda t, c: distill_args(t, _store_of_other_class_count(t)),
     "has 100 classes but digits has 10"),
    ("teachers on different plans", lambda t, c: distill_args(t, *_stores(t)),
     "the teachers were precomputed with different --plan-seed ("),
    ("distill: store of a newer format", lambda t, c: distill_args(t, _newer_format_store(t, c)[1]),
     "store format 99"),
    # data roots with missing or short files
    ("CIFAR folder lacking a batch", lambda t, c: _cifar_args(t, c, "missing"), "lacks data_batch_3"),
    ("truncated CIFAR batch", lambda t, c: _cifar_args(t, c, "short"), "data_batch_2: truncated or not a CIFAR pickle"),
    ("CIFAR batch with the wrong sample count", lambda t, c: _cifar_args(t, c, "count"),
     "data_batch_1 is malformed: 10 data rows but 9 labels"),
    # teacher outputs that are not finite
    ("inf teacher outputs", lambda t, c: precompute_args(_overflowing_checkpoint(t, c), t / "c"),
     "produced NaN or inf (after float16 conversion) at view 0, rows [0, 1, 2, 3, 4] ..."),
    # corrupt checkpoints to resume from
    ("distill: resume from a corrupt checkpoint.pth", _resume_corrupt_run,
     "run/checkpoint.pth: it is truncated or not a PyTorch file"),
    ("train: resume from a corrupt checkpoint", _resume_corrupt_teacher,
     "x.pth: it is truncated or not a PyTorch file"),
    ("train: resume from a corrupt run checkpoint", _resume_corrupt_teacher_run,
     "x/checkpoint.pth: it is truncated or not a PyTorch file"),
    # out-of-range options
    ("zero chunk rows", lambda t, c: [*precompute_args(c, t / "c"), "--chunk-rows", "0"],
     "--chunk-rows must be at least 1"),
    ("distill: zero epochs", lambda t, c: [*distill_args(t), "--epochs", "0"], "--epochs must lie in [1, 1,000,000]"),
    ("distill: zero batch", lambda t, c: [*distill_args(t), "--batch-size", "0"], "--batch-size must be at least 2 (got 0)"),
    ("distill: negative lr", lambda t, c: [*distill_args(t), "--lr", "-0.1"], "--lr must be a finite positive number"),
    # non-finite numbers (issue 12)
    ("distill: nan lr", lambda t, c: [*distill_args(t), "--lr", "nan"], "--lr must be a finite positive number (got nan)"),
    ("distill: inf lr", lambda t, c: [*distill_args(t), "--lr", "inf"], "--lr must be a finite positive number (got inf)"),
    ("distill: nan weight decay", lambda t, c: [*distill_args(t), "--weight-decay", "nan"],
     "--weight-decay must be a finite number of at least 0 (got nan)"),
    ("distill: nan beta", lambda t, c: [*distill_args(t), "--beta", "nan"],
     "--beta must be a finite number of at least 0 (got nan)"),
    ("train: nan lr", lambda t, c: train_args(t, "--lr", "nan"), "--lr must be a finite positive number (got nan)"),
    ("train: inf weight decay", lambda t, c: train_args(t, "--weight-decay", "inf"),
     "--weight-decay must be a finite number of at least 0 (got inf)"),
    ("train: nan momentum", lambda t, c: train_args(t, "--momentum", "nan"), "--momentum must lie in [0, 1) (got nan)"),
    # nothing overwritten by accident; messages that name the real cause (issue 12)
    ("train: existing --out", lambda t, c: train_args(t, "--out", c), "already exists; pass --resume to continue its "
                                                                   "training, --force to replace it"),
    ("train: negative seed", lambda t, c: train_args(t, "--seed", "-1"), "--seed must lie in [0, 2**63 - 1] (got -1)"),
    ("train: zero batch", lambda t, c: train_args(t, "--batch-size", "0"), "--batch-size must be at least 2 (got 0)"),
    # values that make no sense (issue 27): each refused before any work, naming the option, the value and the range
    ("distill: negative loss weights", lambda t, c: [*distill_args(t), "--gamma", "-1", "--alpha", "-5"],
     "--gamma must be a finite number of at least 0 (got -1)"),
    ("distill: negative alpha", lambda t, c: [*distill_args(t), "--alpha", "-5"],
     "--alpha must be a finite number of at least 0 (got -5)"),
    ("distill: negative beta", lambda t, c: [*distill_args(t), "--beta", "-0.5"],
     "--beta must be a finite number of at least 0 (got -0.5)"),
    ("distill: inf gamma", lambda t, c: [*distill_args(t), "--gamma", "inf"],
     "--gamma must be a finite number of at least 0 (got inf)"),
    ("distill: zero temperature", lambda t, c: [*distill_args(t), "--temperature", "0"],
     "--temperature must be a positive number from 1.08e-19 to 9.22e+18 (got 0)"),
    ("distill: tiny temperature", lambda t, c: [*distill_args(t), "-T", "1e-40"],
     "--temperature must be a positive number from 1.08e-19 to 9.22e+18 (got 1e-40)"),
    ("distill: nan temperature", lambda t, c: [*distill_args(t), "-T", "nan"],
     "--temperature must be a positive number from 1.08e-19 to 9.22e+18 (got nan)"),
    ("distill: camkd batch of one", lambda t, c: [*distill_args(t), "--batch-size", "1"],
     "--batch-size must be at least 2 (got 1): BatchNorm"),
    ("train: batch of one", lambda t, c: train_args(t, "--batch-size", "1"),
     "--batch-size must be at least 2 (got 1): BatchNorm"),
    ("distill: seed beyond int64", lambda t, c: [*distill_args(t), "--seed", str(2**64)],
     f"--seed must lie in [0, 2**63 - 1] (got {2**64})"),
    ("train: seed beyond int64", lambda t, c: train_args(t, "--seed", str(2**64)),
     f"--seed must lie in [0, 2**63 - 1] (got {2**64})"),
    ("precompute: plan seed beyond int64", lambda t, c: [*precompute_args(c, t / "c"), "--plan-seed", str(2**64)],
     f"--plan-seed must lie in [0, 2**63 - 1] (got {2**64})"),
    ("train: too many epochs", lambda t, c: train_args(t, "--epochs", "10000000"),
     "--epochs must lie in [1, 1,000,000] (got 10,000,000)"),
    ("precompute: views no plan can index", lambda t, c: [*precompute_args(c, t / "c"), "--views", str(10**12)],
     "--views must lie in [1, 536,870,911] (got 1,000,000,000,000): a plan of more views could not be indexed"),
    ("precompute: more than the disk holds", lambda t, c: [*precompute_args(c, t / "c"), "--views", "536870911"],
     "free: free space, give fewer --views or a --cache with room, or pass --force to write anyway"),
    ("precompute: tiny logits temperature",
     lambda t, c: [*precompute_args(c, t / "c"), "--logits", "topk:3", "--logits-temperature", "1e-40"],
     "--logits-temperature must be a positive number from 1.08e-19 to 9.22e+18 (got 1e-40)"),
    ("precompute: huge logits temperature",
     lambda t, c: [*precompute_args(c, t / "c"), "--logits", "topk:3", "--logits-temperature", "1e30"],
     "--logits-temperature must be a positive number from 1.08e-19 to 9.22e+18 (got 1e+30)"),
    ("precompute: chunks beyond the byte budget", lambda t, c: [*precompute_args(c, t / "c"), "--chunk-rows", "100000000"],
     "--chunk-rows 100,000,000 makes chunks of 11.9 GiB (128 B a row): give 1 to 8,388,608"),
    ("precompute: a batch of views beyond memory", lambda t, c: [*precompute_args(c, t / "c"), "--batch-size", "10000000"],
     "--batch-size 10,000,000 makes batches of 114.4 GiB of views (12,288 B each at 32 px): give 1 to 699,050"),
    ("precompute: zero workers", lambda t, c: [*precompute_args(c, t / "c"), "--workers", "0"],
     "Invalid value for '--workers': 0 is not in the range x>=1"),
    ("distill: nan resident share", lambda t, c: [*distill_args(t), "--resident-share", "nan"],
     "Invalid value for '--resident-share': nan is not in the range 0<=x<=1"),
    ("distill: zero eval-every", lambda t, c: [*distill_args(t), "--eval-every", "0"],
     "Invalid value for '--eval-every': 0 is not in the range x>=1"),
    ("distill: eval-every not a number", lambda t, c: [*distill_args(t), "--eval-every", "abc"],
     "Invalid value for '--eval-every': 'abc' is not a valid integer. (`"),
    ("precompute: image size not a number", lambda t, c: [*precompute_args(c, t / "c"), "--image-size", "1.5"],
     "Invalid value for '--image-size': '1.5' is not a valid integer. (`"),
    ("distill: resident share not a number", lambda t, c: [*distill_args(t), "--resident-share", "half"],
     "Invalid value for '--resident-share': 'half' is not a valid float. (`"),
    ("distill: zero prefetch", lambda t, c: [*distill_args(t), "--prefetch", "0"],
     "Invalid value for '--prefetch': 0 is not in the range 1<=x<=64"),
    ("distill: read threads beyond", lambda t, c: [*distill_args(t), "--read-threads", "100000"],
     "Invalid value for '--read-threads': 100000 is not in the range 1<=x<=1024"),
    ("distill: lr milestone at epoch 0", lambda t, c: [*distill_args(t), "--lr-milestones", "0,1"],
     "Invalid value for '--lr-milestones': epochs count from 1, got 0 in '0,1'"),
    ("eval: zero batch", lambda t, c: ["eval", "--arch", "resnet8", "--checkpoint", c, "--dataset", "digits",
                                       "--batch-size", "0"], "Invalid value for '--batch-size': 0 is not in the range x>=1"),
]


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def _complete(node: Path) -> bool:
    return (node / "zarr.json").is_file() and zarr.open_group(node, mode="r").attrs.get("complete") is True


def assert_nothing_half_written(root: Path, before: dict[str, str]) -> None:
    """A refused command leaves every file it found as it was (lock files aside, which record their last
    holder) and adds nothing that could pass for a result: no checkpoint, run or data file, no completion
    marker; a plan only whole and marked complete; a teacher store only marked incomplete."""
    after = _files(root)
    assert before.keys() <= after.keys(), sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k] and "/locks/" not in f"/{k}")
    assert not changed, changed
    for new in sorted(after.keys() - before.keys()):
        parts = new.split("/")
        if "locks" in parts[:-1]:
            continue
        for kind, ok in (("plans", _complete), ("teachers", lambda node: not _complete(node))):
            if kind in parts[:-2]:
                node = root.joinpath(*parts[:parts.index(kind) + 2])
                assert ok(node) and "/done/c/" not in f"/{new}", new
                break
        else:
            raise AssertionError(f"a refused command wrote {new}")


# Cases also run as a real `python -m kdcache.cli` process (each costs the imports, about 5 s on CI): one of each
# kind of refusal (a missing file, a store the teacher cannot fill, a non-finite option, a file kept safe).
IN_A_PROCESS = {"missing checkpoint", "inf teacher outputs", "distill: nan lr", "train: existing --out"}


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_user_errors_are_one_clear_line(case, tmp_path: Path, digits_teacher: Path, prebuilt: Path) -> None:
    name, make_args, expected = case
    shutil.copytree(prebuilt, tmp_path / "c")
    args = [str(a) for a in make_args(tmp_path, digits_teacher)]
    before = _files(tmp_path)
    home = {"KDCACHE_HOME": str(tmp_path / "home")}
    if name in IN_A_PROCESS:
        done = subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True,
                              env={**os.environ, **home})
        code, stderr = done.returncode, done.stderr
    else:  # in this process: the same command line, the same one line, without the cost of the imports
        result = CliRunner().invoke(main, args, env=home)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        code, stderr = result.exit_code, result.stderr
    assert code != 0
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert expected in lines[0], lines[0]
    assert_nothing_half_written(tmp_path, before)


def test_progress_in_a_log_is_plain_lines(digits_teacher: Path, tmp_path: Path) -> None:
    """With stderr a pipe (a log file, a batch job), precompute prints progress lines, not a terminal bar:
    the plan's views and the store's rows, from the start to the end."""
    result = subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, precompute_args(digits_teacher,
                                                                                           tmp_path / "c"))],
                            capture_output=True, text=True, env={**os.environ, "KDCACHE_PROGRESS_INTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    plan = [line for line in lines if line.startswith("drawing plan ")]
    rows = [line for line in lines if line.startswith("precompute resnet8: ")]
    assert plan[0].endswith(": 0 of 2 views (0%)") and plan[-1].split(": ")[1].startswith("2 of 2 views (100%)")
    assert len(plan) == 2  # the start, then the chunk of both views once written (the interval is 0 here)
    assert rows[0].endswith(": 0 of 2,874 rows (0%)") and rows[-1].split(": ")[1].startswith("2,874 of 2,874 rows (100%)")
    assert len(rows) == 1 + 6  # the start, then each of the 2 x 3 chunks


def test_shards_beyond_the_byte_budget_are_refused(digits_teacher: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard is held whole in memory by the writer: --shard-rows beyond MAX_SHARD_BYTES of the widest array (here
    lowered to 64 KiB: digits' 1,437-row view of 128 B rows is 180 KiB) is one line before any work."""
    from kdcache.pipelines import precompute_engine

    monkeypatch.setattr(precompute_engine, "MAX_SHARD_BYTES", 64 * 2**10)
    result = run_cli(*precompute_args(digits_teacher, tmp_path / "c"), "--shard-rows", 1024)
    lines = error_lines(result.stderr)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0] == ("Error: --shard-rows 1,024 makes shards of 128.0 KiB (128 B a row): give at most 512 (at most "
                        "64.0 KiB a shard, which the writer holds whole, 3 at a time)")
    assert not (tmp_path / "c").exists()


def test_the_temperature_bounds_keep_t_squared_and_a_top_k_stores_scalars_finite() -> None:
    """The derivation of MIN_TEMPERATURE and MAX_TEMPERATURE: at either bound T² is a normal float32 and a top-K
    store's scalars of the most extreme float16 logits are finite; just outside, they are not (1e-40 made lse_t inf,
    a store `cache verify` called damaged)."""
    import numpy as np

    from kdcache.store.form import MAX_TEMPERATURE, MIN_TEMPERATURE, temperature_problem
    from kdcache.topk import summarise_logits

    extreme = np.array([[65504.0, -65504.0, 0.0], [-65504.0, -65504.0, -65504.0]], dtype=np.float16)
    for t in (MIN_TEMPERATURE, MAX_TEMPERATURE):
        assert temperature_problem(t) is None
        squared = np.float32(t) * np.float32(t)
        assert np.isfinite(squared) and squared >= np.finfo(np.float32).tiny
        assert np.isfinite(summarise_logits(extreme, np.array([0, 1]), 1, t)[2]).all()
    with np.errstate(over="ignore"):
        assert not np.isfinite(summarise_logits(extreme, np.array([0, 1]), 1, 1e-40)[2]).all()
    # below the bound T² turns subnormal (its precision going), then 0: the KD term would vanish
    assert 0 < np.float32(1e-20) ** 2 < np.finfo(np.float32).tiny and np.float32(1e-23) ** 2 == 0
    for t in (MIN_TEMPERATURE / 2, MAX_TEMPERATURE * 2, 0.0, -1.0, float("nan"), float("inf")):
        assert temperature_problem(t) is not None


def _no_free_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every file system reports 0 bytes free (its size and use as they are)."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=0))


def test_precompute_refuses_more_than_the_free_space_before_any_work_and_force_goes_on(
        digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27: precompute states what it will write (plan and store, before compression) and refuses, before
    drawing a plan or making a store, when the cache's file system (here, its nearest existing folder) has less
    free; --force writes anyway."""
    _no_free_space(monkeypatch)
    cache = tmp_path / "new" / "c"  # not there yet: the free space is its nearest existing folder's
    dry = run_cli(*precompute_args(digits_teacher, cache), "--dry-run")
    assert dry.exit_code == 0, dry.output
    space = [line for line in dry.stdout.splitlines() if line.startswith("space ")]
    assert space and "0 B free at" in space[0] and "precompute would refuse without --force" in space[0], dry.stdout
    refused = run_cli(*precompute_args(digits_teacher, cache))
    lines = error_lines(refused.stderr)
    assert refused.exit_code == 1 and len(lines) == 1, refused.output
    assert lines[0].startswith("Error: precompute would write ") and f"but {tmp_path} has 0 B (0 B) free" in lines[0]
    assert "pass --force to write anyway" in lines[0]
    assert not (tmp_path / "new").exists()  # no plan, no store, not even the cache folder
    forced = run_cli(*precompute_args(digits_teacher, cache), "--force")
    assert forced.exit_code == 0, forced.output
    store = Cache.at(cache).open_teacher(forced.stdout.strip().splitlines()[-1])
    assert store.attrs.get("complete") is True


def test_precompute_progress_stops_below_100_percent_when_the_last_write_fails(
        digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27: the rows are counted once written; a write the disk refuses (ENOSPC) is not progress, so the last
    progress line of a run whose last shard fails stays below 100 %."""
    import errno

    from kdcache.store.teacher import TeacherStore

    real = TeacherStore._write

    def full_at_the_end(self: TeacherStore, v: int, s: int, *args: object, **kwargs: object) -> None:
        if (v, s) == (1, 2):  # the last of 2 views x 3 shards
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, v, s, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TeacherStore, "_write", full_at_the_end)
    result = CliRunner().invoke(main, [str(a) for a in precompute_args(digits_teacher, tmp_path / "c")],
                                env={"KDCACHE_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 1 and "No space left on device" in result.stderr, result.output
    rows = [line for line in result.stderr.splitlines() if line.startswith("precompute resnet8: ")]
    assert rows[-1].split(": ")[1].startswith("2,461 of 2,874 rows (86%)"), rows  # 5 of 6 shards written
    assert not any("(100%)" in line for line in rows), rows


def test_log_progress_speaks_at_the_start_every_interval_and_at_the_end(capsys: pytest.CaptureFixture) -> None:
    from kdcache.cli.common import LogProgress

    now = [0.0]
    progress = LogProgress("work", 1000, 0, "row", 30.0, clock=lambda: now[0])
    for _ in range(9):  # 100 rows every 10 s
        now[0] += 10
        progress.update(100)
    now[0] += 10
    progress.update(100)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["work: 0 of 1,000 rows (0%)",
                     "work: 300 of 1,000 rows (30%), 10 rows/s, about 1 min 10 s left",
                     "work: 600 of 1,000 rows (60%), 10 rows/s, about 40 s left",
                     "work: 900 of 1,000 rows (90%), 10 rows/s, about 10 s left",
                     "work: 1,000 of 1,000 rows (100%), 10 rows/s"]


def _every_command(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name in group.list_commands(click.Context(group)):
        command = group.get_command(click.Context(group), name)
        out.append(((*path, name), command))
        if isinstance(command, click.Group):
            out += _every_command(command, (*path, name))
    return out


def test_every_command_and_option_has_help_text() -> None:
    """`kdcache X --help` answers for every command and subcommand, each with a summary and every option explained."""
    commands = _every_command(main)
    assert {" ".join(p) for p, _ in commands} >= {"train-teacher", "precompute", "distill", "eval", "cache ls",
                                                  "cache verify", "experiment run", "demo", "report"}
    for path, command in commands:
        assert (command.help or "").strip(), f"kdcache {' '.join(path)} has no help text"
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert (param.help or "").strip(), f"kdcache {' '.join(path)} {param.opts[0]} has no help text"
        result = run_cli(*path, "--help")
        assert result.exit_code == 0 and "Usage: " in result.output, (path, result.output)
