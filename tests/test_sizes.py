"""``kdcache sizes``: bytes and files of every store option before any work, by hand at ImageNet size and equal
to what a real store of the same option holds and what its dry run states."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcache.store.form import StoreForm, every_form
from kdcache.store.layout import StoreShape
from kdcache.store.sizes import store_size

from conftest import error_lines, run_cli

IMAGENET = StoreShape(views=100, samples=1_281_167, classes=1000, feature_dim=2048, map_shape=(2048, 7, 7))


def test_imagenet_sizes_by_hand() -> None:
    pooled = store_size(StoreForm("dense", "pooled", "float16"), IMAGENET)
    # 1000 float16 logits + 2048 float16 features; 2 MiB / 4,096 B = 512 rows a chunk, 64 chunks (128 MiB) a shard
    # = 32,768 rows, 40 shards a view, each a file of logits, features and markers
    assert (pooled.row_bytes, pooled.layout.chunk_rows, pooled.layout.shard_rows, pooled.files_per_view) == \
        (6096, 512, 32768, 120)
    assert pooled.store_bytes == 6096 * 1_281_167 * 100
    top = store_size(StoreForm("topk:10", "none"), IMAGENET)
    # 10 float16 values + 10 uint16 classes + 5 float32 scalars = 60 B; 2 MiB / 60 B -> 32,768 rows a chunk,
    # shards capped at 2^16 rows: 20 shards of 3 arrays and the markers
    assert (top.row_bytes, top.layout.chunk_rows, top.layout.shard_rows, top.files_per_view) == (60, 32768, 65536, 80)
    spatial = store_size(StoreForm("topk:100", "spatial", "int8"), IMAGENET)
    # 100 x (2 + 2) + 20 = 420 B of logits; 2048x7x7 int8 values and a float32 scale
    assert spatial.row_bytes == 420 + 2048 * 49 + 4
    assert len(every_form((10, 100))) == 15
    with pytest.raises(ValueError, match="K exceeds the 1000 classes"):
        store_size(StoreForm("topk:1001"), IMAGENET)


def test_sizes_equal_a_real_store_and_its_dry_run(digits_teacher: Path, tmp_path: Path) -> None:
    listing = run_cli("sizes", "--teacher", "resnet8", "--classes", 10, "--samples", 1437, "--views", 2,
                      "--image-size", 32, "--topk", 3)
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.stdout.splitlines() if line.startswith("| --logits topk:3, pooled int8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # 3 float16 (6 B) + 3 uint8 + 20 B of scalars = 29 B, 64 int8 features and a 4-byte scale
    assert cells[1] == "97 B" and "TinyViT, ImageNet-1k" in listing.stdout
    cache = tmp_path / "c"
    args = ["precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits", "--cache",
            cache, "--views", 2, "--batch-size", 512, "--device", "cpu", "--logits", "topk:3", "--feature-dtype", "int8"]
    dry = run_cli(*args, "--dry-run")
    assert f"per view   {cells[2]} (97 B a row" in dry.stdout
    tid = run_cli(*args).stdout.strip().splitlines()[-1]
    store = cache / "teachers" / tid
    files = [f for a in ("topk_values", "topk_indices", "logit_stats", "features", "feature_scale", "done")
             for f in (store / a / "c").rglob("*") if f.is_file()]
    assert len(files) == 2 * int(cells[6])


def test_an_unknown_teacher_is_one_line() -> None:
    result = run_cli("sizes", "--teacher", "resnet9000")
    assert result.exit_code == 1 and len(error_lines(result.stderr)) == 1 and "resnet9000" in result.stderr
