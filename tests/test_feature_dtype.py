"""int8 features: per-row symmetric quantisation, exact to half a scale step, part of the teacher id, and a
deleted chunk of either the values or the scales is found, as NaN finds one in a float16 store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdcache.errors import StoreError
from kdcache.store import Cache
from kdcache.store.form import FeatureDtype
from kdcache.store.int8 import dequantize_rows, quantize_rows

from conftest import error_lines, run_cli

ROWS = 256   # 1437 digits rows: 6 chunks a view


def test_quantize_rows_by_hand() -> None:
    x = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-2.0, 0.01, 2.0]], np.float32)
    q, scale = quantize_rows(x)
    # row 0: s = 1/127, x/s = 127, -63.5, 31.75 -> 127, -64 (half to even), 32; row 1: zeros keep s = 1;
    # row 2: s = 2/127, x/s = -127, 0.635, 127 -> -127, 1, 127
    assert q.dtype == np.int8 and q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 1, 127]]
    assert scale.dtype == np.float32 and scale.tolist() == pytest.approx([1 / 127, 1.0, 2 / 127], rel=1e-7)
    back = dequantize_rows(q, scale)
    assert np.all(np.abs(back - x) <= scale[:, None] / 2 + 1e-7)
    assert back[1].tolist() == [0.0, 0.0, 0.0]
    maps = np.random.default_rng(0).standard_normal((5, 4, 3, 3)).astype(np.float32)   # spatial rows
    q, scale = quantize_rows(maps)
    assert q.shape == maps.shape and np.abs(q).max() == 127 and q.min() > -128
    assert np.all(np.abs(dequantize_rows(q, scale) - maps) <= scale[:, None, None, None] / 2 + 1e-6)


def _precompute(ckpt: Path, cache: Path, *extra: object) -> str:
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits", "--cache",
                     cache, "--views", 2, "--chunk-rows", ROWS, "--batch-size", 512, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def test_an_int8_store_holds_its_teacher_within_half_a_step(digits_teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    dry = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                  "--cache", cache, "--views", 2, "--chunk-rows", ROWS, "--feature-dtype", "int8", "--dry-run")
    # 20 B of float16 logits + 64 int8 values + a 4-byte scale; 4 arrays of 6 chunks a view
    assert "per view   123.5 KiB (88 B a row: logits 20 B + features 68 B)" in dry.stdout
    assert "features   pooled (2, 1437, 64) int8 (+ a float32 scale a row)" in dry.stdout
    assert "files      48 chunk files: 24 a view (6 chunks of each of logits, features, feature_scale, done)" \
        in dry.stdout
    half, int8 = _precompute(digits_teacher, cache), _precompute(digits_teacher, cache, "--feature-dtype", "int8")
    assert half != int8 and dry.stdout.strip().splitlines()[-1] == int8
    listing = run_cli("cache", "ls", "--cache", cache).stdout
    assert any(line.startswith(int8) and " pooled:int8 " in line for line in listing.splitlines())
    store = tmp_path / "c" / "teachers" / int8
    assert sum(1 for a in ("logits", "features", "feature_scale", "done")
               for f in (store / a / "c").rglob("*") if f.is_file()) == 48
    a, b = (Cache.at(cache).open_teacher(t) for t in (half, int8))
    assert b.form.feature_dtype is FeatureDtype.INT8 and a.form.feature_dtype is FeatureDtype.FLOAT16
    for v in range(2):
        za, ha = a.read_rows(v, 0, 1437)
        zb, hb = b.read_rows(v, 0, 1437)
        assert np.array_equal(za, zb) and hb.dtype == np.float32
        step = np.abs(ha.astype(np.float32)).max(1) / 127       # each row's scale, from the float16 values
        assert np.all(np.abs(hb - ha.astype(np.float32)) <= step[:, None] / 2 * (1 + 1e-5))
        rows = np.array([1400, 3, 700, 3])
        _, picked = b.read_selected(v, rows)
        assert np.array_equal(picked, hb[rows])
    run = run_cli("distill", "--student", "resnet8", "--teachers", int8, "--method", "camkd", "--cache", cache,
                  "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 256, "--device", "cpu")
    assert run.exit_code == 0, run.output


def test_a_deleted_chunk_of_values_or_scales_is_found(digits_teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    tid = _precompute(digits_teacher, cache, "--feature-dtype", "int8")
    store = tmp_path / "c" / "teachers" / tid
    (store / "features" / "c" / "0" / "1" / "0").unlink()
    (store / "feature_scale" / "c" / "1" / "2").unlink()
    opened = Cache.at(cache).open_teacher(tid)
    with pytest.raises(StoreError, match=r"features chunk \(view 0, chunk 1\) is missing"):
        opened.read_chunk(0, 1)
    with pytest.raises(StoreError, match=r"feature_scale chunk \(view 1, chunk 2\) is missing"):
        opened.read_rows(1, 0, 1437)
    verify = run_cli("cache", "verify", tid, "--cache", cache)
    assert verify.exit_code == 1
    assert "features: chunk (view 0, chunk 1) is missing" in verify.stdout
    assert "feature_scale: chunk (view 1, chunk 2) is missing" in verify.stdout


@pytest.mark.parametrize("extra, code, message", [
    (["--features", "none", "--feature-dtype", "int8"], 1,
     "--feature-dtype int8 needs features to store: give --features pooled or spatial"),
    (["--feature-dtype", "int4"], 2, "Invalid value for '--feature-dtype': 'int4' is not one of 'float16', 'int8'"),
])
def test_bad_feature_dtypes_are_one_line(digits_teacher: Path, tmp_path: Path, extra: list[str], code: int,
                                         message: str) -> None:
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                     "--cache", tmp_path / "c", *extra)
    assert result.exit_code == code and len(error_lines(result.stderr)) == 1 and message in result.stderr, \
        result.output
    assert not (tmp_path / "c" / "teachers").exists()
