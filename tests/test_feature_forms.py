"""Teacher stores in the three feature forms: pooled, spatial (the last-block map) and none (logits only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import run_cli
from fakes import completion_markers, flip_byte, kill_after_markers
from kdcache.data import load_dataset
from kdcache.models import build_model, forward_with_map, load_checkpoint
from kdcache.store import Cache
from kdcache.store.form import FeatureForm, StoreForm
from kdcache.store.ids import content_id, teacher_id
from test_precompute import torchvision_view

ROWS = 256  # 1437 digits rows -> 6 chunks a view


def precompute(ckpt: Path, cache: Path, form: str, *extra: str, views: int = 2, rows: int | None = ROWS) -> str:
    chunk = ["--chunk-rows", rows] if rows else []
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits",
                     "--cache", cache, "--views", views, *chunk, "--batch-size", 256, "--device", "cpu",
                     "--features", form, *extra)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def test_spatial_rows_are_the_teachers_last_block_maps(digits_teacher: Path, tmp_path: Path) -> None:
    tid = precompute(digits_teacher, tmp_path / "c", "spatial")
    cache = Cache.at(tmp_path / "c")
    store = cache.open_teacher(tid)
    plan = cache.open_plan(store.plan_id)
    data = load_dataset("digits")
    model = build_model("resnet8", 10)
    load_checkpoint(model, digits_teacher)
    model.eval()
    assert store.form.features is FeatureForm.SPATIAL and store.feature_shape == (64, 8, 8)
    assert store.group["features"].shape == (2, 1437, 64, 8, 8)
    assert store.group["features"].chunks == (1, ROWS, 64, 8, 8)
    for v, c in [(0, 0), (1, 5)]:
        order, params = plan.view(v)
        rows = store.rows(c)
        x = torch.stack([torchvision_view(data.train.images[i], *params[r].tolist(), data.mean, data.std)
                         for r, i in zip(range(rows.start, rows.stop), order[rows])])
        with torch.inference_mode():
            m, _, z = forward_with_map(model, x)
        logits, maps = store.read_chunk(v, c)
        torch.testing.assert_close(torch.from_numpy(logits).float(), z.half().float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(maps).float(), m.half().float(), atol=2e-3, rtol=2e-3)
    assert store.verify() == []
    # maps are stored with zstd and no shuffle (their zeros compress as byte runs), logits with bit shuffle
    shuffles = {}
    for name in ("logits", "features"):
        codecs = json.loads((Path(store.path) / name / "zarr.json").read_text())["codecs"]
        blosc = next(c for c in codecs if c["name"] == "blosc")["configuration"]
        shuffles[name] = (blosc["cname"], blosc["clevel"], blosc["shuffle"], codecs[-1]["name"])
    assert shuffles == {"logits": ("zstd", 1, "bitshuffle", "crc32c"), "features": ("zstd", 1, "noshuffle", "crc32c")}


def test_pooling_a_stored_map_gives_the_pooled_store_and_logits_agree(digits_teacher: Path, tmp_path: Path) -> None:
    cache = Cache.at(tmp_path / "c")
    stores = {form: cache.open_teacher(precompute(digits_teacher, tmp_path / "c", form))
              for form in ("pooled", "spatial", "none")}
    assert len({s.id for s in stores.values()}) == 3 and len({s.plan_id for s in stores.values()}) == 1
    pooled = stores["pooled"].group["features"][...].astype(np.float32)
    maps = stores["spatial"].group["features"][...].astype(np.float32)
    derived = maps.mean(axis=(-2, -1))
    # each stored map value is within float16 rounding (2^-11 relative) of the true one, and so is the pooled vector
    np.testing.assert_allclose(derived, pooled, rtol=2e-3, atol=2e-3)
    assert np.abs(derived - pooled).max() > 0  # not the same numbers by construction: derived from the map
    logits = [s.group["logits"][...] for s in stores.values()]
    assert np.array_equal(logits[0], logits[1]) and np.array_equal(logits[0], logits[2])
    assert "features" not in stores["none"].group and stores["none"].feature_shape == ()
    assert stores["none"].read_chunk(0, 0)[1] is None and stores["none"].verify() == []


def test_the_form_is_part_of_the_id_and_pooled_ids_are_unchanged() -> None:
    plan, sha = "p" * 16, "a" * 64
    legacy = content_id({"format": 1, "kind": "teacher", "plan_id": plan, "arch": "resnet8",
                         "checkpoint_sha256": sha, "dtype": "float16"})
    assert teacher_id(plan, "resnet8", sha) == legacy == teacher_id(plan, "resnet8", sha, StoreForm(features="pooled"),
                                                                    "float16")
    ids = {teacher_id(plan, "resnet8", sha, StoreForm(features=form), "float16") for form in FeatureForm}
    assert len(ids) == 3


def test_default_spatial_chunks_hold_one_to_four_megabytes(digits_teacher: Path, tmp_path: Path) -> None:
    store = Cache.at(tmp_path / "c").open_teacher(precompute(digits_teacher, tmp_path / "c", "spatial", views=1,
                                                             rows=None))
    chunk_bytes = store.chunk_rows * 64 * 8 * 8 * 2
    assert 2**20 <= chunk_bytes <= 4 * 2**20, chunk_bytes


def test_verify_names_a_damaged_spatial_chunk(digits_teacher: Path, tmp_path: Path) -> None:
    tid = precompute(digits_teacher, tmp_path / "c", "spatial")
    flip_byte(tmp_path / "c" / "teachers" / tid / "features" / "c" / "1" / "2" / "0" / "0" / "0")
    result = run_cli("cache", "verify", tid, "--cache", tmp_path / "c")
    assert result.exit_code == 1
    assert "features: chunk (view 1, chunk 2) is damaged" in result.output
    (tmp_path / "c" / "teachers" / tid / "features" / "c" / "0" / "4" / "0" / "0" / "0").unlink()
    result = run_cli("cache", "verify", tid, "--cache", tmp_path / "c")
    assert "features: chunk (view 0, chunk 4) is missing" in result.output


def test_cache_ls_and_info_show_the_form(digits_teacher: Path, tmp_path: Path) -> None:
    tid = precompute(digits_teacher, tmp_path / "c", "none")
    listing = run_cli("cache", "ls", "--cache", tmp_path / "c")
    assert listing.exit_code == 0
    assert [line.split()[3] for line in listing.output.splitlines() if line.startswith(tid)] == ["none"]
    info = json.loads(run_cli("cache", "info", tid, "--cache", tmp_path / "c").output)
    assert info["features"] == "none" and info["feature_shape"] == [] and set(info["arrays"]) == {
        "logits", "head/weight", "head/bias"}


def test_an_unknown_form_is_one_line(digits_teacher: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kdcache.cli", "precompute", "--teacher", "resnet8", "--checkpoint",
                             str(digits_teacher), "--dataset", "digits", "--cache", str(tmp_path / "c"),
                             "--features", "maps"], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "'maps' is not one of 'pooled', 'spatial', 'none'" in result.stderr
    assert not (tmp_path / "c").exists()


def test_killed_spatial_run_resumes_bit_identical(digits_teacher: Path, tmp_path: Path) -> None:
    args = ["precompute", "--teacher", "resnet8", "--checkpoint", str(digits_teacher), "--dataset", "digits",
            "--views", "4", "--chunk-rows", "64", "--batch-size", "64", "--device", "cpu", "--features", "spatial"]
    cli = [sys.executable, "-m", "kdcache.cli", *args]
    reference = subprocess.run([*cli, "--cache", str(tmp_path / "ref")], capture_output=True, text=True, check=True)
    tid = reference.stdout.strip().splitlines()[-1]
    store_path = tmp_path / "c" / "teachers" / tid

    kill_after_markers([*cli, "--cache", str(tmp_path / "c")], store_path, 10)
    done_before = completion_markers(store_path)
    assert 10 <= len(done_before) < 4 * 23, "the run was not killed midway"
    chunk = "0/0/0"  # the features chunk spans every dimension after (view, row)
    inodes = {(m.parent.name, m.name): (store_path / "features" / "c" / m.parent.name / m.name / chunk).stat().st_ino
              for m in done_before}

    resumed = subprocess.run([*cli, "--cache", str(tmp_path / "c")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for (v, c), ino in inodes.items():  # chunks marked before the kill were not rewritten
        assert (store_path / "features" / "c" / v / c / chunk).stat().st_ino == ino
    ref = zarr.open_group(tmp_path / "ref" / "teachers" / tid, mode="r")
    got = zarr.open_group(store_path, mode="r")
    for name in ("logits", "features", "done", "head/weight", "head/bias"):
        assert np.array_equal(ref[name][...], got[name][...]), name
    assert not list(store_path.rglob("*.partial"))


def test_consecutive_chunks_are_forwarded_as_whole_batches(digits_teacher: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A spatial store's chunks hold few rows; precompute still feeds the teacher --batch-size rows at a time,
    and the bytes are those of one forward per chunk."""
    from kdcache.pipelines import precompute_engine as pc

    assert list(pc.chunk_groups([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 3), (1, 4)], 2)) == [
        (0, [0, 1]), (0, [2]), (1, [0, 1]), (1, [3, 4])]
    seen: list[int] = []
    real = pc.forward_with_map

    def counting(model: torch.nn.Module, x: torch.Tensor):
        seen.append(x.shape[0])
        return real(model, x)

    monkeypatch.setattr(pc, "forward_with_map", counting)
    grouped = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                      "--cache", tmp_path / "a", "--views", 1, "--chunk-rows", 100, "--batch-size", 300,
                      "--device", "cpu", "--features", "spatial")
    assert grouped.exit_code == 0, grouped.output
    assert seen == [300] * 4 + [237]   # 15 chunks of 100 rows (the last 37), three to a forward
    seen.clear()
    single = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                     "--cache", tmp_path / "b", "--views", 1, "--chunk-rows", 100, "--batch-size", 100,
                     "--device", "cpu", "--features", "spatial")
    assert single.exit_code == 0 and seen == [100] * 14 + [37]
    tid = grouped.stdout.strip().splitlines()[-1]
    a, b = Cache.at(tmp_path / "a").open_teacher(tid), Cache.at(tmp_path / "b").open_teacher(tid)
    for name in (*a.data_arrays, "done"):  # done: each chunk's count of correct rows
        assert np.array_equal(a.group[name][...], b.group[name][...]), name
