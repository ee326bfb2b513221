"""The command line: listings, train-teacher, cache admin, and one clear line for every user error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from conftest import run_cli
from kdcache import training
from kdcache.data import dataset_names
from kdcache.models import build_model, model_names
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
    out = tmp_path / "t.pth"
    first = run_cli("train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", out, "--epochs", 4,
                    "--lr-milestones", "3", "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == str(out)
    ckpt = torch.load(out, weights_only=False)
    assert {"model", "optimizer", "epoch", "best_acc", "arch"} <= set(ckpt)
    assert ckpt["epoch"] == 4 and ckpt["arch"] == "resnet8" and ckpt["best_acc"] >= ckpt["test_top1"]
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, True)
    assert group["lr"] == pytest.approx(0.005)  # 0.05 divided by 10 at epoch 3
    assert ckpt["best_acc"] > 20.0  # it learns: 10 classes, chance is 10%

    resumed = run_cli("train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", out, "--epochs", 5,
                      "--lr-milestones", "3", "--device", "cpu", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("epoch ") == 1 and "epoch   5/5" in resumed.output
    assert torch.load(out, weights_only=False)["epoch"] == 5

    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(out, weights_only=False)["model"])  # loads into the zoo model unchanged


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
    assert row[0] == tid and row[2:6] == ["resnet8", "digits", "2", "1437"] and row[-1] == "complete"
    info = run_cli("cache", "info", tid[:6], "--cache", cache)
    assert info.exit_code == 0 and f'"teacher_id": "{tid}"' in info.stdout and '"n_views": 2' in info.stdout
    assert run_cli("cache", "verify", "--cache", cache).exit_code == 0

    chunk = cache / "teachers" / tid / "features" / "c" / "1" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x55
    chunk.write_bytes(bytes(data))
    bad = run_cli("cache", "verify", tid, "--cache", cache)
    assert bad.exit_code == 1
    assert "features: chunk (view 1, chunk 2) is damaged" in bad.stdout

    rm = run_cli("cache", "rm", tid, "--cache", cache)
    assert rm.exit_code == 0 and not (cache / "teachers" / tid).exists()
    assert Cache.at(cache).plan_ids()  # the plan stays for other teachers
    assert "no teacher stores" in run_cli("cache", "ls", "--cache", cache).output


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


# (name, arguments as a function of (tmp_path, teacher checkpoint), what the one line must say)
BAD_INPUT = [
    ("unknown architecture", lambda t, c: precompute_args(c, t / "c", arch="resnet9"), "unknown architecture 'resnet9'"),
    ("unknown data set", lambda t, c: precompute_args(c, t / "c", dataset="mnist"), "unknown data set 'mnist'"),
    ("missing checkpoint", lambda t, c: precompute_args(t / "nope.pth", t / "c"), "nope.pth not found"),
    ("checkpoint of another arch", lambda t, c: precompute_args(_other_arch_checkpoint(t), t / "c"),
     "does not fit architecture 'resnet8' (it was saved from architecture 'wrn_16_1')"),
    ("truncated checkpoint", lambda t, c: precompute_args(_truncated_checkpoint(t, c), t / "c"), "cut.pth"),
    ("missing data root", lambda t, c: precompute_args(c, t / "c", dataset="cifar10"), "--data-root"),
    ("data root without CIFAR files", lambda t, c: [*precompute_args(c, t / "c", dataset="cifar10"), "--data-root", t],
     "cifar-10-batches-py"),
    ("unwritable cache", lambda t, c: precompute_args(c, _unwritable(t)), "cannot create cache directory"),
    ("zero views", lambda t, c: [*precompute_args(c, t / "c"), "--views", "0"], "--views must be at least 1"),
    ("zero batch", lambda t, c: [*precompute_args(c, t / "c"), "--batch-size", "0"], "--batch-size must be at least 1"),
    ("store of a newer format", _info_of_newer_format, "store format 99"),
    ("newer format on precompute", lambda t, c: precompute_args(c, _newer_format_store(t, c)[0]), "store format 99"),
    ("unknown store id", lambda t, c: ["cache", "verify", "ffff", "--cache", t / "c"], "no teacher store matches 'ffff'"),
    ("train: zero epochs", lambda t, c: ["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out",
                                         t / "x.pth", "--epochs", "0"], "--epochs must be at least 1"),
    ("train: negative lr", lambda t, c: ["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out",
                                         t / "x.pth", "--lr", "-0.1"], "--lr must be positive"),
    ("train: resume without checkpoint", lambda t, c: ["train-teacher", "--arch", "resnet8", "--dataset", "digits",
                                                       "--out", t / "x.pth", "--resume"], "does not exist"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_user_errors_are_one_clear_line(case, tmp_path: Path, digits_teacher: Path) -> None:
    _, make_args, expected = case
    args = [str(a) for a in make_args(tmp_path, digits_teacher)]
    result = subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True,
                            env={**os.environ, "KDCACHE_HOME": str(tmp_path / "home")})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert expected in lines[0]
    teachers = tmp_path / "c" / "teachers"
    if args[0] == "precompute" and teachers.exists():  # nothing half-written looks complete
        for store in teachers.iterdir():
            assert zarr.open_group(store, mode="r").attrs.get("format") == 99 or \
                zarr.open_group(store, mode="r").attrs.get("complete") is True
