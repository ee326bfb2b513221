"""MNIST and Fashion-MNIST from tiny IDX files: exact pixels in both layouts, plain and gzipped, one-line
errors for missing, short and foreign files, and a teacher trained, precomputed and distilled from them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from fakes import idx_bytes, write_fake_mnist
from kdcache.data import dataset_description, load_dataset
from kdcache.data.mnist import KINDS, read_idx
from kdcache.errors import DatasetError


def _padded(images: np.ndarray) -> np.ndarray:
    """The expected 32x32 view of 28x28 images: a 2-pixel zero border, the image untouched inside."""
    out = np.zeros((len(images), 32, 32), np.uint8)
    out[:, 2:30, 2:30] = images
    return out


@pytest.mark.parametrize("name, folder, gz", [("mnist", "MNIST/raw", False), ("fashion-mnist", "FashionMNIST/raw", True),
                                              ("fashion-mnist", ".", False), ("mnist", ".", True)])
def test_pixels_labels_and_normalisation_are_exact(tmp_path: Path, name: str, folder: str, gz: bool) -> None:
    arrays, _ = write_fake_mnist(tmp_path / folder, n_train=12, n_test=5, seed=1, gz=gz)
    data = load_dataset(name, tmp_path)
    assert (data.num_classes, data.image_size, data.recipe) == (10, 32, "crop-flip")
    assert data.classes == list(KINDS[name].classes)
    for split, source in (("train", data.train), ("test", data.test)):
        images = source.images.numpy()
        assert images.shape == (len(arrays[f"{split}_images"]), 3, 32, 32) and images.dtype == np.uint8
        for c in range(3):
            assert np.array_equal(images[:, c], _padded(arrays[f"{split}_images"]))
        assert np.array_equal(np.asarray(source.labels), arrays[f"{split}_labels"].astype(np.int64))
    pixels = _padded(arrays["train_images"]).astype(np.float64) / 255.0
    assert data.mean == pytest.approx((pixels.mean(),) * 3, abs=1e-12)
    assert data.std == pytest.approx((pixels.std(),) * 3, abs=1e-12)


def test_fashion_classes_and_description() -> None:
    assert KINDS["fashion-mnist"].classes[0] == "T-shirt/top" and KINDS["fashion-mnist"].classes[9] == "Ankle boot"
    assert "/usr/share/datasets/fashion-mnist" in dataset_description("fashion-mnist")
    assert "needs --data-root" in dataset_description("mnist")


def test_torchvision_layout_wins_over_flat_files(tmp_path: Path) -> None:
    layout, _ = write_fake_mnist(tmp_path / "MNIST" / "raw", seed=2)
    flat, _ = write_fake_mnist(tmp_path / "flat", seed=3)
    for path in (tmp_path / "flat").iterdir():
        path.rename(tmp_path / path.name)
    data = load_dataset("mnist", tmp_path)
    assert np.array_equal(data.train.images[:, 0].numpy(), _padded(layout["train_images"]))
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").unlink()
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()
    mixed = load_dataset("mnist", tmp_path)  # each file is looked for in both places
    assert np.array_equal(mixed.train.images[:, 0].numpy(), _padded(flat["train_images"]))
    assert mixed.fingerprint != data.fingerprint


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_files_name_them_and_both_layouts(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", tmp_path)
    message = _one_line(exc)
    assert "no t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message and f"directly in {tmp_path}" in message
    with pytest.raises(DatasetError, match="needs --data-root"):
        load_dataset("mnist", None)
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_short_foreign_and_mismatched_files_are_refused(tmp_path: Path) -> None:
    arrays, folder = write_fake_mnist(tmp_path, n_train=6, n_test=3)
    images = folder / "train-images-idx3-ubyte"
    full = images.read_bytes()

    images.write_bytes(full[:-10])
    with pytest.raises(DatasetError) as exc:
        load_dataset("mnist", tmp_path)
    assert f"{images} is short" in _one_line(exc) and "4,704" in str(exc.value)

    images.write_bytes(b"\x89PNG" + full[4:])
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_dataset("mnist", tmp_path)

    images.write_bytes(gzip.compress(full)[:40])
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("mnist", tmp_path)

    images.write_bytes(idx_bytes(arrays["train_images"][:5]))
    with pytest.raises(DatasetError, match="holds 6 items where its other file holds 5"):
        load_dataset("mnist", tmp_path)

    images.write_bytes(full)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(6, 10, np.uint8)))
    with pytest.raises(DatasetError, match="label 10 outside 0..9"):
        load_dataset("mnist", tmp_path)


def test_read_idx_reads_what_idx_bytes_writes(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(path, 3), array)
    path.write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx(path, 3), array)


def test_train_precompute_and_distill_on_fashion_mnist(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "data" / "FashionMNIST" / "raw", n_train=40, n_test=10, gz=True)
    data = ["--dataset", "fashion-mnist", "--data-root", tmp_path / "data"]
    ckpt = tmp_path / "t.pth"
    trained = run_cli("train-teacher", "--arch", "resnet8", *data, "--out", ckpt, "--epochs", 1,
                      "--batch-size", 8, "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    cache = tmp_path / "cache"
    ids = []
    for form in ("pooled", "spatial"):
        pre = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, *data, "--views", 1,
                      "--features", form, "--cache", cache, "--device", "cpu")
        assert pre.exit_code == 0, pre.output
        ids.append(pre.stdout.strip().splitlines()[-1])
    for teacher_id, method in zip(ids, ("camkd", "fitnet")):
        run = tmp_path / f"run-{method}"
        out = run_cli("distill", "--student", "resnet8", "--method", method, "--teachers", teacher_id, "--cache", cache,
                      "--data-root", tmp_path / "data", "--out", run, "--epochs", 1, "--batch-size", 8,
                      "--device", "cpu")
        assert out.exit_code == 0, out.output
        assert (run / "last.pth").is_file()
        assert torch.load(run / "last.pth", weights_only=False)["epoch"] == 1


def test_the_layout_is_torchvisions() -> None:
    """kdcache keeps torchvision's folder names and Fashion-MNIST's class names itself (importing torchvision
    costs a run 2 s); they must stay what torchvision's classes say."""
    from torchvision.datasets import MNIST, FashionMNIST

    assert KINDS["mnist"].folder == MNIST.__name__
    assert KINDS["fashion-mnist"].folder == FashionMNIST.__name__
    assert list(KINDS["fashion-mnist"].classes) == list(FashionMNIST.classes)
