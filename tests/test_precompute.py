"""`kdcache precompute` end to end on real files: what it stores, that it reuses, resumes and dry-runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import zarr

from conftest import run_cli
from fakes import completion_markers, kill_after_markers, write_fake_cifar
from kdcache.data import load_dataset
from kdcache.evaluate import evaluate
from kdcache.models import build_model, load_checkpoint
from kdcache.store import Cache

ROWS = 256  # 1437 digits rows -> 6 chunks a view


def precompute(ckpt: Path, cache: Path, *extra: str, arch: str = "resnet8", views: int = 3) -> str:
    result = run_cli("precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", "digits",
                     "--cache", cache, "--views", views, "--chunk-rows", ROWS, "--batch-size", 256, "--device", "cpu",
                     *extra)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def teacher(ckpt: Path, arch: str = "resnet8", classes: int = 10) -> torch.nn.Module:
    model = build_model(arch, classes)
    load_checkpoint(model, ckpt)
    return model.eval()


def torchvision_view(image: torch.Tensor, top: int, left: int, flip: int, mean, std) -> torch.Tensor:
    """The view built with torchvision's own transforms, independently of kdcache's replay."""
    img = TF.crop(TF.pad(image, [4]), top, left, 32, 32)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(img.float().div(255), mean, std)


def test_rows_are_the_teachers_outputs_on_the_plans_views(digits_teacher: Path, tmp_path: Path) -> None:
    tid = precompute(digits_teacher, tmp_path / "c")
    cache = Cache.at(tmp_path / "c")
    store = cache.open_teacher(tid)
    plan = cache.open_plan(store.plan_id)
    data = load_dataset("digits")
    model = teacher(digits_teacher)
    assert (store.n_views, store.n_samples, store.num_classes, store.feature_dim) == (3, 1437, 10, 64)
    assert store.group["logits"].chunks == (1, ROWS, 10) and store.group["features"].chunks == (1, ROWS, 64)
    for v, c in [(0, 0), (2, 5), (1, 3)]:
        order, params = plan.view(v)
        rows = store.rows(c)
        idx = order[rows]
        x = torch.stack([torchvision_view(data.train.images[i], *params[r].tolist(), data.mean, data.std)
                         for r, i in zip(range(rows.start, rows.stop), idx)])
        with torch.inference_mode():
            h, z = model(x)
        logits, features = store.read_chunk(v, c)
        torch.testing.assert_close(torch.from_numpy(logits).float(), z.half().float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(features).float(), h.half().float(), atol=2e-3, rtol=2e-3)
    assert np.array_equal(plan.labels, data.train.labels)
    for v in range(3):
        assert np.array_equal(np.sort(plan.view(v)[0]), np.arange(1437))
    w, b = store.head()
    assert torch.equal(w, model.head.weight.detach()) and torch.equal(b, model.head.bias.detach())


def test_accuracies_are_recorded(digits_teacher: Path, tmp_path: Path) -> None:
    tid = precompute(digits_teacher, tmp_path / "c")
    cache = Cache.at(tmp_path / "c")
    store = cache.open_teacher(tid)
    plan = cache.open_plan(store.plan_id)
    top1, top5 = evaluate(teacher(digits_teacher), load_dataset("digits"), "crop-flip", torch.device("cpu"))
    assert store.attrs["test_accuracy"] == pytest.approx(top1) and store.attrs["test_top5"] == pytest.approx(top5)
    logits = store.group["logits"][...]
    correct = sum(int((logits[v].astype(np.float32).argmax(1) == plan.labels[plan.view(v)[0]]).sum()) for v in range(3))
    assert store.attrs["view_accuracy"] == pytest.approx(100.0 * correct / (3 * 1437))
    assert store.attrs["checkpoint"]["sha256"] == __import__("hashlib").sha256(digits_teacher.read_bytes()).hexdigest()
    assert store.attrs["complete"] is True and store.attrs["arch"] == "resnet8"


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rerun_finds_the_complete_store_and_writes_nothing(digits_teacher: Path, tmp_path: Path) -> None:
    tid = precompute(digits_teacher, tmp_path / "c")
    before = _files(tmp_path / "c" / "teachers")
    t0 = time.perf_counter()
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                     "--cache", tmp_path / "c", "--views", 3, "--chunk-rows", ROWS)
    assert result.exit_code == 0 and result.stdout.strip().splitlines()[-1] == tid
    assert "already complete" in result.output
    assert time.perf_counter() - t0 < 5
    assert _files(tmp_path / "c" / "teachers") == before


def test_dry_run_says_what_it_would_write_and_writes_nothing(digits_teacher: Path, tmp_path: Path) -> None:
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                     "--cache", tmp_path / "c", "--views", 3, "--chunk-rows", ROWS, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "c").exists()
    out = result.stdout
    assert "3 views x 1437 samples = 4311 rows" in out
    assert "logits     (3, 1437, 10) float16, chunks (1, 256, 10): 84.2 KiB" in out
    assert "features   pooled (3, 1437, 64) float16, chunks (1, 256, 64): 538.9 KiB" in out
    assert "per view   207.7 KiB (148 B a row: logits 20 B + features 128 B)" in out
    assert "4311 teacher forward passes" in out
    # 1437 rows in chunks of 256: 6 chunks a view, each of logits, features and done one file
    assert "files      54 chunk files: 18 a view (6 chunks of each of logits, features, done)" in out
    tid = precompute(digits_teacher, tmp_path / "c")
    assert out.strip().splitlines()[-1] == tid
    store = tmp_path / "c" / "teachers" / tid
    written = [f for a in ("logits", "features", "done") for f in (store / a / "c").rglob("*") if f.is_file()]
    assert len(written) == 54


@pytest.mark.parametrize("form, features_line, row", [
    # resnet8's last-block map on 32-px digits views is 64x8x8: 4096 float16 values, 8192 B a row;
    # 3 x 1437 rows x 8192 B = 35,315,712 B = 33.68 MiB; a view 1437 x (20 + 8192) B = 11.25 MiB.
    ("spatial", "features   spatial (3, 1437, 64, 8, 8) float16, chunks (1, 256, 64, 8, 8): 33.7 MiB",
     "per view   11.3 MiB (8212 B a row: logits 20 B + features 8192 B)"),
    ("none", "features   none (logits only: ce, kd, aver, ebkd, aekd)",
     "per view   28.1 KiB (20 B a row: logits 20 B + features 0 B)"),
])
def test_dry_run_states_the_bytes_of_each_feature_form(digits_teacher: Path, tmp_path: Path, form: str,
                                                       features_line: str, row: str) -> None:
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                     "--cache", tmp_path / "c", "--views", 3, "--chunk-rows", ROWS, "--features", form, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "c").exists()
    assert features_line in result.stdout and row in result.stdout


def test_ids_follow_content(digits_teacher: Path, tmp_path: Path) -> None:
    a = precompute(digits_teacher, tmp_path / "c", views=2)
    b = precompute(digits_teacher, tmp_path / "c", "--plan-seed", "1", views=2)
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(build_model("resnet8", 10).state_dict(), other)  # a bare state_dict
    c = precompute(other, tmp_path / "c", views=2)
    cache = Cache.at(tmp_path / "c")
    plans = {t: cache.open_teacher(t).plan_id for t in (a, b, c)}
    assert len({a, b, c}) == 3
    assert plans[a] == plans[c] != plans[b]  # two teachers share a plan; another seed is another plan
    assert cache.plan_ids() == sorted({plans[a], plans[b]})


def test_cifar_format_data_through_the_real_loader(tmp_path: Path) -> None:
    root = write_fake_cifar(tmp_path / "data", kind="cifar100", n_train=40, n_test=20, seed=0)
    ckpt = tmp_path / "wrn.pth"
    torch.save({"state_dict": build_model("wrn_16_1", 100).state_dict()}, ckpt)
    result = run_cli("precompute", "--teacher", "wrn_16_1", "--checkpoint", ckpt, "--dataset", "cifar100",
                     "--data-root", root, "--cache", tmp_path / "c", "--views", 2, "--chunk-rows", 16)
    assert result.exit_code == 0, result.output
    store = Cache.at(tmp_path / "c").open_teacher(result.stdout.strip().splitlines()[-1])
    assert store.group["logits"].shape == (2, 40, 100) and store.group["features"].shape == (2, 40, 64)
    assert store.chunks_per_view == 3 and store.verify() == []


def test_killed_run_resumes_at_its_last_completed_chunk(digits_teacher: Path, tmp_path: Path) -> None:
    args = ["precompute", "--teacher", "resnet8", "--checkpoint", str(digits_teacher), "--dataset", "digits",
            "--views", "3", "--chunk-rows", "128", "--batch-size", "128", "--device", "cpu"]
    cli = [sys.executable, "-m", "kdcache.cli", *args]
    reference = run_cli(*args, "--cache", tmp_path / "ref")  # in this process: only the killed run needs its own
    assert reference.exit_code == 0, reference.output
    tid = reference.stdout.strip().splitlines()[-1]
    store_path = tmp_path / "c" / "teachers" / tid

    kill_after_markers([*cli, "--cache", str(tmp_path / "c")], store_path, 10)
    total = 3 * 12
    done_before = {m: m.stat().st_ino for m in completion_markers(store_path)}
    assert 10 <= len(done_before) < total, "the run was not killed midway"
    assert not zarr.open_group(store_path, mode="r").attrs["complete"]
    data_before = {}
    for m in done_before:
        v, c = m.parent.name, m.name
        data_before[(v, c)] = [(store_path / a / "c" / v / c / "0").stat().st_ino for a in ("logits", "features")]

    resumed = subprocess.run([*cli, "--cache", str(tmp_path / "c")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == tid
    for (v, c), inodes in data_before.items():  # chunks marked before the kill were not rewritten
        assert [(store_path / a / "c" / v / c / "0").stat().st_ino for a in ("logits", "features")] == inodes
    ref = zarr.open_group(tmp_path / "ref" / "teachers" / tid, mode="r")
    got = zarr.open_group(store_path, mode="r")
    for name in ("logits", "features", "done", "head/weight", "head/bias"):
        assert np.array_equal(ref[name][...], got[name][...]), name
    assert not list(store_path.rglob("*.partial"))
    verify = run_cli("cache", "verify", tid, "--cache", tmp_path / "c")
    assert verify.exit_code == 0 and f"{tid}: ok" in verify.output


def test_imagefolder_with_a_torchvision_teacher(tmp_path: Path) -> None:
    """The ImageNet-style path: files decoded per batch, resized-crop-flip replay, a torchvision model."""
    from fakes import write_fake_imagefolder

    root = write_fake_imagefolder(tmp_path / "data", n_classes=3, n_per_class_train=3, n_per_class_val=1)
    ckpt = tmp_path / "r18.pth"
    torch.save(build_model("resnet18", 3).state_dict(), ckpt)
    result = run_cli("precompute", "--teacher", "resnet18", "--checkpoint", ckpt, "--dataset", "imagefolder",
                     "--data-root", root, "--cache", tmp_path / "c", "--views", 2, "--chunk-rows", 4,
                     "--batch-size", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    cache = Cache.at(tmp_path / "c")
    store = cache.open_teacher(result.stdout.strip().splitlines()[-1])
    plan = cache.open_plan(store.plan_id)
    assert plan.recipe == "resized-crop-flip" and plan.view(0)[1].shape == (9, 5)
    assert store.group["features"].shape == (2, 9, 512) and store.verify() == []
    data = load_dataset("imagefolder", root)
    order, params = plan.view(1)
    views = []
    for r in range(3):  # the first forward batch of chunk 0, built with torchvision's own functions
        i, j, h, w, flip = params[r].tolist()
        img = TF.resized_crop(data.train.load([order[r]])[0], i, j, h, w, [224, 224], antialias=True)
        img = TF.hflip(img) if flip else img
        views.append(TF.normalize(img.float().div(255), data.mean, data.std))
    with torch.inference_mode():
        h_ref, z_ref = teacher(ckpt, "resnet18", classes=3)(torch.stack(views))
    z, feats = store.read_chunk(1, 0)
    # resnet18's float32 sums depend on the CPU's thread split; a wrong view or row would differ by O(1)
    torch.testing.assert_close(torch.from_numpy(z[:3]).float(), z_ref.half().float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(torch.from_numpy(feats[:3]).float(), h_ref.half().float(), atol=1e-2, rtol=1e-2)


def test_a_store_in_shards_has_the_files_the_dry_run_states_and_the_values_of_one_chunk_a_file(
        digits_teacher: Path, tmp_path: Path) -> None:
    """--shard-rows packs chunks into one file a shard; --chunk-rows alone keeps one file a chunk. Same rows."""
    args = ["precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits", "--views", 2,
            "--batch-size", 256, "--device", "cpu", "--chunk-rows", 128]
    dry = run_cli(*args, "--shard-rows", 512, "--cache", tmp_path / "s", "--dry-run")
    assert dry.exit_code == 0, dry.output
    # 1437 rows: 12 chunks of 128 a view, in 3 shards of 512 rows; a file a shard of logits, features and done
    assert "logits     (2, 1437, 10) float16, chunks (1, 128, 10) in shards of 512 rows: " in dry.stdout
    assert "files      18 files: 9 a view (3 shards of each of logits, features, done; 12 chunks a view, 4 a shard)" \
        in dry.stdout
    tid = dry.stdout.strip().splitlines()[-1]
    for cache, extra, n_files in ((tmp_path / "s", ["--shard-rows", 512], 18), (tmp_path / "p", [], 72)):
        result = run_cli(*args, *extra, "--cache", cache)
        assert result.exit_code == 0 and result.stdout.strip().splitlines()[-1] == tid, result.output
        store = cache / "teachers" / tid
        written = [f for a in ("logits", "features", "done") for f in (store / a / "c").rglob("*") if f.is_file()]
        assert len(written) == n_files
        verify = run_cli("cache", "verify", tid, "--cache", cache)
        assert verify.exit_code == 0 and f"{tid}: ok" in verify.stdout, verify.output
    sharded, plain = (zarr.open_group(c / "teachers" / tid, mode="r") for c in (tmp_path / "s", tmp_path / "p"))
    assert (sharded.attrs["chunk_rows"], sharded.attrs["shard_rows"], plain.attrs["shard_rows"]) == (128, 512, 128)
    for name in ("logits", "features", "done"):
        assert np.array_equal(sharded[name][...], plain[name][...]), name
    refused = run_cli(*args, "--shard-rows", 200, "--cache", tmp_path / "x")
    assert refused.exit_code == 1 and "--shard-rows 200 must be a multiple of the chunk rows (128)" in refused.output


def test_uncompressed_features_hold_the_same_values_under_the_same_id(digits_teacher: Path, tmp_path: Path) -> None:
    """--feature-compression none: the features array's codecs are the CRC32C alone, its values and the teacher id
    are the compressed store's, damage is still caught, and a second precompute in the other compression finds
    the store complete and says it keeps its own."""
    zstd = precompute(digits_teacher, tmp_path / "z", "--features", "spatial")
    raw = precompute(digits_teacher, tmp_path / "r", "--features", "spatial", "--feature-compression", "none")
    assert raw == zstd
    a, b = Cache.at(tmp_path / "z").open_teacher(zstd), Cache.at(tmp_path / "r").open_teacher(raw)
    assert (a.feature_compression.value, b.feature_compression.value) == ("zstd", "none")
    codecs = zarr.open_array(Path(b.path) / "features", mode="r").metadata.to_dict()["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "crc32c"]  # --chunk-rows alone: a file a chunk, no shards
    assert b.chunk_readers()["features"].layout.compressed is False
    for v in range(3):
        za, ha = a.read_rows(v, 0, 1437)
        zb, hb = b.read_rows(v, 0, 1437)
        assert np.array_equal(za, zb) and np.array_equal(ha, hb)
    def size(c: Path) -> int:
        return sum(f.stat().st_size for f in (c / "teachers" / raw / "features").rglob("*") if f.is_file())

    assert size(tmp_path / "r") > 1.5 * size(tmp_path / "z")  # the maps compress about 1.9x
    again = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                    "--cache", tmp_path / "r", "--views", 3, "--chunk-rows", ROWS, "--batch-size", 256, "--device",
                    "cpu", "--features", "spatial")
    assert again.exit_code == 0 and "already complete" in again.stderr
    assert "kept with compression none (--feature-compression zstd applies to a new store" in again.stderr
    shard = next((Path(b.path) / "features" / "c" / "1").rglob("*"))
    while shard.is_dir():
        shard = next(shard.iterdir())
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"features chunk \(view 1, chunk \d+\) is damaged \(CRC32C"):
        Cache.at(tmp_path / "r").open_teacher(raw).read_rows(1, 0, 1437)
