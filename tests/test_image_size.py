"""Views of any size: recipes with a view side, image folders of small images, CIFAR models at 64 px."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import run_cli
from kdcache.data import load_dataset
from kdcache.errors import DatasetError, KdcacheError
from kdcache.store import Cache
from kdcache.store.ids import plan_id
from kdcache.views import eval_view, get_recipe, replay


def test_default_plan_ids_are_unchanged() -> None:
    """Ids recorded with the code before recipes had a size (commit 986d31c): existing caches stay valid."""
    digits = load_dataset("digits")
    assert plan_id(digits.fingerprint, get_recipe("crop-flip").description, 3, 0) == "ba2734f31aa11f72"
    assert plan_id(digits.fingerprint, get_recipe("resized-crop-flip").description, 2, 7) == "803d280f2b489014"
    assert get_recipe("crop-flip:32").description == get_recipe("crop-flip").description
    assert get_recipe("crop-flip", 64).description == {"name": "crop-flip", "pad": 4, "size": 64}
    assert get_recipe("crop-flip", 64).spec == "crop-flip:64" and get_recipe("crop-flip", 32).spec == "crop-flip"


@pytest.mark.parametrize("spec", ["crop-flip:0", "crop-flip:x", "crop-flip:2048"])
def test_bad_sizes_are_refused(spec: str) -> None:
    with pytest.raises(KdcacheError):
        get_recipe(spec)


def test_crop_flip_at_64px_is_torchvisions_pad_crop_flip() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=gen)
    params = torch.tensor([[0, 0, 0], [8, 8, 1], [3, 5, 0], [7, 1, 1], [4, 4, 0]], dtype=torch.int16)
    out = replay("crop-flip:64", images, params)
    for img, (top, left, flip), got in zip(images, params.tolist(), out):
        ref = TF.crop(TF.pad(img, [4]), top, left, 64, 64)
        assert torch.equal(got, TF.horizontal_flip(ref) if flip else ref)


def test_crop_flip_resizes_decoded_images_of_another_size_first() -> None:
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in ((40, 40), (50, 30))]
    params = torch.tensor([[2, 6, 1], [0, 8, 0]], dtype=torch.int16)
    out = replay("crop-flip:48", images, params)
    for img, (top, left, flip), got in zip(images, params.tolist(), out):
        ref = TF.crop(TF.pad(TF.resize(img, [48, 48], antialias=True), [4]), top, left, 48, 48)
        assert torch.equal(got, TF.horizontal_flip(ref) if flip else ref)
    assert torch.equal(eval_view("crop-flip:48", images),
                       torch.stack([TF.resize(i, [48, 48], antialias=True) for i in images]))


def test_resized_crop_flip_eval_view_keeps_the_256_to_224_proportion() -> None:
    img = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    got = eval_view("resized-crop-flip:112", [img])[0]
    assert torch.equal(got, TF.center_crop(TF.resize(img, [128], antialias=True), [112, 112]))


def write_tree(root: Path, side: int, n_classes: int = 2, n_train: int = 8, n_val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(n_classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(rng.integers(0, 60, (side, side, 3)) + 90 * c, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


def test_small_square_images_default_to_the_cifar_recipe_at_their_side(tmp_path: Path) -> None:
    data = load_dataset("imagefolder", write_tree(tmp_path / "small", 64))
    assert (data.recipe, data.image_size) == ("crop-flip:64", 64)
    big = load_dataset("imagefolder", write_tree(tmp_path / "big", 128, n_train=1, n_val=1))
    assert (big.recipe, big.image_size) == ("resized-crop-flip", 224)
    assert load_dataset("imagefolder", tmp_path / "big", image_size=96).recipe == "resized-crop-flip:96"
    assert load_dataset("imagefolder", tmp_path / "small", "resized-crop-flip").recipe == "resized-crop-flip:64"
    with pytest.raises(DatasetError, match="digits images are 32x32: an image size of 64 applies to imagefolder"):
        load_dataset("digits", image_size=64)


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, args)], capture_output=True, text=True)


def test_cifar_models_train_precompute_distill_and_eval_on_64px_folders(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "data", 64)
    cache, ckpt = tmp_path / "cache", tmp_path / "t.pth"
    common = ["--dataset", "imagefolder", "--data-root", root, "--device", "cpu"]
    trained = _cli("train-teacher", "--arch", "resnet8", *common, "--epochs", 1, "--batch-size", 4, "--out", ckpt)
    assert trained.returncode == 0, trained.stderr
    pre = _cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, *common, "--cache", cache, "--views", 1,
               "--features", "spatial")
    assert pre.returncode == 0, pre.stderr
    tid = pre.stdout.strip().splitlines()[-1]
    store = Cache.at(cache).open_teacher(tid)
    plan = Cache.at(cache).open_plan(store.plan_id)
    assert plan.attrs["recipe"] == {"name": "crop-flip", "pad": 4, "size": 64} and plan.recipe == "crop-flip:64"
    assert store.feature_shape == (64, 16, 16)  # resnet8's last block at 64 px
    run = tmp_path / "run"
    dist = _cli("distill", "--student", "resnet8", "--teachers", tid, "--method", "camkd", "--cache", cache,
                "--data-root", root, "--out", run, "--epochs", 1, "--batch-size", 4, "--device", "cpu")
    assert dist.returncode == 0, dist.stderr
    ev = _cli("eval", "--arch", "resnet8", "--checkpoint", run / "last.pth", *common)
    assert ev.returncode == 0 and ev.stdout.startswith("top-1 "), ev.stderr


def test_a_model_that_cannot_take_the_size_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "data", 16, n_train=2, n_val=1)
    cache, ckpt = tmp_path / "cache", tmp_path / "vgg.pth"
    torch.save({"model": __import__("kdcache.models", fromlist=["build_model"]).build_model("vgg8", 2).state_dict()},
               ckpt)
    common = ["--dataset", "imagefolder", "--data-root", root, "--image-size", 4, "--device", "cpu"]
    for args in (["precompute", "--teacher", "vgg8", "--checkpoint", ckpt, "--cache", cache],
                 ["train-teacher", "--arch", "vgg8", "--out", tmp_path / "out.pth", "--epochs", 1],
                 ["eval", "--arch", "vgg8", "--checkpoint", ckpt]):
        proc = _cli(*args, *common)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith("Error: vgg8 cannot take 4x4 images")
    assert not cache.exists() and not (tmp_path / "out.pth").exists()


def test_image_size_on_an_in_memory_data_set_is_one_line(digits_teacher: Path, tmp_path: Path) -> None:
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                     "--cache", tmp_path / "c", "--image-size", 64)
    assert result.exit_code == 1 or result.exit_code == 2
    assert "applies to imagefolder data only" in result.output and not (tmp_path / "c").exists()
