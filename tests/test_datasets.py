"""The data-set registry: CIFAR pickles, ImageFolder trees and digits through the real loaders."""

from __future__ import annotations

import os
import subprocess
import sys
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import (
    Py2Str,
    cifar_batch,
    fake_cifar,
    fake_imagefolder,
    write_fake_cifar,
    write_fake_imagefolder,
    write_py2_pickle,
)
from kdcache.data import dataset_description, dataset_names, load_dataset
from kdcache.data.base import FileSource, TensorSource
from kdcache.data.digits import load_digits_dataset
from kdcache.errors import DatasetError, UnknownNameError

# torchvision 0.29 deprecates its image decoders on every call; pytest re-enables
# the warning that kdcache.data.base silences.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


# ---------------------------------------------------------------- registry


def test_names_and_descriptions():
    assert dataset_names() == ["cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "digits"]
    for name in ("cifar10", "cifar100", "imagefolder"):
        assert "needs --data-root" in dataset_description(name)
    assert "no --data-root needed" in dataset_description("digits")
    for name in dataset_names():
        assert "\n" not in dataset_description(name)


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("imagenet", "/nowhere")
    msg = str(err.value)
    assert "'imagenet'" in msg
    for name in dataset_names():
        assert name in msg
    with pytest.raises(UnknownNameError, match="cifar10, cifar100, mnist, fashion-mnist, imagefolder, digits"):
        dataset_description("svhn")


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("kind, n_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pixels_labels_classes_exact(tmp_path, kind, n_classes):
    root = write_fake_cifar(tmp_path, kind, n_train=23, n_test=7, seed=3)
    fake = fake_cifar(kind, 23, 7, seed=3)
    ds = load_dataset(kind, root)

    assert ds.name == kind and ds.num_classes == n_classes
    assert ds.classes == fake.classes
    assert ds.recipe == "crop-flip" and ds.image_size == 32
    splits = ((ds.train, fake.train_rows, fake.train_labels), (ds.test, fake.test_rows, fake.test_labels))
    for src, rows, labels in splits:
        assert isinstance(src, TensorSource) and src.resident
        assert src.images.dtype == torch.uint8 and tuple(src.images.shape) == (len(rows), 3, 32, 32)
        assert len(src) == len(rows)
        assert src.labels.dtype == np.int64 and np.array_equal(src.labels, labels)
        assert src.sizes.dtype == np.int64 and np.array_equal(src.sizes, np.tile([32, 32], (len(rows), 1)))
        # CHW from first principles: row = 1024 red, 1024 green, 1024 blue, each 32x32 row-major
        imgs = src.images.numpy()
        rng = np.random.default_rng(0)
        for _ in range(200):
            i, c, y, x = rng.integers(len(rows)), rng.integers(3), rng.integers(32), rng.integers(32)
            assert imgs[i, c, y, x] == rows[i, c * 1024 + y * 32 + x]
        assert np.array_equal(imgs.reshape(len(rows), -1), rows)


def test_cifar_normalisation_constants(tmp_path):
    c100 = load_dataset("cifar100", write_fake_cifar(tmp_path, "cifar100", 4, 2))
    assert c100.mean == (0.5071, 0.4867, 0.4408) and c100.std == (0.2675, 0.2565, 0.2761)
    c10 = load_dataset("cifar10", write_fake_cifar(tmp_path, "cifar10", 5, 2))
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2470, 0.2435, 0.2616)


def test_fake_cifar_matches_the_real_layout(tmp_path, monkeypatch):
    """The fakes load as the originals do: bytes keys with encoding='bytes', and through torchvision itself."""
    import torchvision.datasets.cifar as tv_cifar

    root = write_fake_cifar(tmp_path, "cifar10", 12, 4, seed=1)
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape[1] == 3072
    with open(root / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        assert set(pickle.load(f, encoding="bytes")) == {b"num_cases_per_batch", b"label_names", b"num_vis"}

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # md5 of the real files
    ours = load_dataset("cifar10", root)
    theirs = tv_cifar.CIFAR10(str(root), train=True, download=False)
    assert np.array_equal(ours.train.images.permute(0, 2, 3, 1).numpy(), theirs.data)
    assert list(ours.train.labels) == theirs.targets and ours.classes == theirs.classes

    write_fake_cifar(tmp_path, "cifar100", 9, 3, seed=1)
    ours = load_dataset("cifar100", root)
    theirs = tv_cifar.CIFAR100(str(root), train=False, download=False)
    assert np.array_equal(ours.test.images.permute(0, 2, 3, 1).numpy(), theirs.data)
    assert list(ours.test.labels) == theirs.targets and ours.classes == theirs.classes


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    root = write_fake_cifar(tmp_path, "cifar10", 10, 3)
    a = load_dataset("cifar10", root)
    b = load_dataset("cifar10", root / "cifar-10-batches-py")
    assert a.fingerprint == b.fingerprint and torch.equal(a.train.images, b.train.images)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_without_root_says_data_root_is_required(kind):
    with pytest.raises(DatasetError, match="needs --data-root") as err:
        load_dataset(kind)
    assert "never downloads" in str(err.value)


def test_cifar_missing_root_names_folder_files_and_source(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", missing)
    msg = str(err.value)
    assert str(missing / "cifar-10-batches-py") in msg
    for f in CIFAR10_FILES + ["batches.meta"]:
        assert f in msg
    assert "never downloads" in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert "\n" not in msg

    with pytest.raises(DatasetError) as err:
        load_dataset("cifar100", missing)
    assert str(missing / "cifar-100-python") in str(err.value) and "train, test, meta" in str(err.value)


@pytest.mark.parametrize(
    "kind, victim", [("cifar10", "data_batch_3"), ("cifar10", "batches.meta"), ("cifar100", "test")]
)
def test_cifar_missing_file_is_named(tmp_path, kind, victim):
    root = write_fake_cifar(tmp_path, kind, 10, 3)
    folder = root / fake_cifar(kind).folder
    (folder / victim).unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(kind, root)
    msg = str(err.value)
    assert f"lacks {victim}" in msg and str(folder) in msg and "never downloads" in msg


@pytest.mark.parametrize("victim", ["data_batch_2", "test_batch", "batches.meta"])
def test_cifar_truncated_pickle_is_named(tmp_path, victim):
    root = write_fake_cifar(tmp_path, "cifar10", 10, 3)
    path = root / "cifar-10-batches-py" / victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


def test_cifar_refuses_pickles_that_call_arbitrary_code(tmp_path):
    root = write_fake_cifar(tmp_path, "cifar10", 10, 3)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps(Path("/etc"), protocol=2))  # a harmless non-numpy global
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root)
    assert str(path) in str(err.value) and "refusing global" in str(err.value)


def _rewrite_batch(root: Path, name: str, rows: np.ndarray, labels, kind: str = "cifar10") -> Path:
    folder = root / fake_cifar(kind).folder
    write_py2_pickle(folder / name, cifar_batch(kind, rows, labels, "rewritten"))
    return folder / name


def test_cifar_rows_labels_mismatch_is_named(tmp_path):
    root = write_fake_cifar(tmp_path, "cifar10", 10, 3)
    fake = fake_cifar("cifar10", 10, 3)
    path = _rewrite_batch(root, "test_batch", fake.test_rows, list(fake.test_labels) + [1])
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root)
    assert str(path) in str(err.value) and "3 data rows but 4 labels" in str(err.value)


def test_cifar_bad_row_size_is_named(tmp_path):
    root = write_fake_cifar(tmp_path, "cifar10", 10, 3)
    path = _rewrite_batch(root, "data_batch_1", np.zeros((2, 3000), np.uint8), [0, 1])
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root)
    assert str(path) in str(err.value) and "3072" in str(err.value)


@pytest.mark.parametrize("kind, bad", [("cifar10", 10), ("cifar10", -1), ("cifar100", 100)])
def test_cifar_label_out_of_range_is_named(tmp_path, kind, bad):
    root = write_fake_cifar(tmp_path, kind, 10, 3)
    fake = fake_cifar(kind, 10, 3)
    name = "test_batch" if kind == "cifar10" else "test"
    path = _rewrite_batch(root, name, fake.test_rows, [0, bad, 1], kind)
    with pytest.raises(DatasetError) as err:
        load_dataset(kind, root)
    n = 10 if kind == "cifar10" else 100
    assert str(path) in str(err.value) and f"expected 0..{n - 1}" in str(err.value)


def test_cifar_meta_with_wrong_class_count_is_named(tmp_path):
    root = write_fake_cifar(tmp_path, "cifar100", 10, 3)
    path = root / "cifar-100-python" / "meta"
    write_py2_pickle(path, {Py2Str(b"fine_label_names"): [Py2Str(b"a"), Py2Str(b"b")]})
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar100", root)
    assert str(path) in str(err.value) and "100 class names, got 2" in str(err.value)


def test_cifar_fingerprint_is_stable_and_tracks_train_content(tmp_path):
    root = write_fake_cifar(tmp_path, "cifar10", 20, 5, seed=7)
    fake = fake_cifar("cifar10", 20, 5, seed=7)
    fp = load_dataset("cifar10", root).fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert load_dataset("cifar10", root).fingerprint == fp

    rows = fake.train_rows[4:8].copy()  # data_batch_2 of the 20 rows
    rows[1, 2000] ^= 1
    _rewrite_batch(root, "data_batch_2", rows, fake.train_labels[4:8])
    fp_pixel = load_dataset("cifar10", root).fingerprint
    assert fp_pixel != fp

    labels = fake.train_labels[4:8].copy()
    labels[0] = (labels[0] + 1) % 10
    _rewrite_batch(root, "data_batch_2", fake.train_rows[4:8], labels)
    fp_label = load_dataset("cifar10", root).fingerprint
    assert fp_label not in (fp, fp_pixel)

    _rewrite_batch(root, "data_batch_2", fake.train_rows[4:8], fake.train_labels[4:8])
    assert load_dataset("cifar10", root).fingerprint == fp


# ---------------------------------------------------------------- TensorSource


def test_tensor_source_load_keeps_order_and_accepts_any_index_type():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(5, 3, 2, 2)
    src = TensorSource(images, [4, 3, 2, 1, 0])
    for idx in ([3, 0, 3], np.array([3, 0, 3]), torch.tensor([3, 0, 3])):
        out = src.load(idx)
        assert torch.equal(out, torch.stack([images[3], images[0], images[3]]))
    assert src.load(np.array([], dtype=np.int64)).shape == (0, 3, 2, 2)
    moved = src.to("cpu")
    assert moved is not src and torch.equal(moved.images, images) and np.array_equal(moved.labels, src.labels)
    with pytest.raises(ValueError):
        TensorSource(images.float(), [0] * 5)
    with pytest.raises(ValueError):
        TensorSource(images, [0] * 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tensor_source_on_gpu():
    src = TensorSource(torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8), range(6))
    gpu = src.to("cuda")
    out = gpu.load(np.array([5, 1]))
    assert out.is_cuda and torch.equal(out.cpu(), src.images[[5, 1]])


# ---------------------------------------------------------------- ImageFolder


def _imagefolder(tmp_path: Path, **kw) -> tuple[Path, dict[str, np.ndarray]]:
    return write_fake_imagefolder(tmp_path / "if", **kw), fake_imagefolder(**kw)


def test_imagefolder_lists_classes_labels_sizes_and_decodes(tmp_path):
    sizes = [(24, 32), (40, 28), (33, 33), (17, 50)]
    root, arrays = _imagefolder(tmp_path, n_classes=3, n_per_class_train=4, n_per_class_val=2, sizes=sizes, seed=5)
    ds = load_dataset("imagefolder", root)

    assert ds.classes == ["class_00", "class_01", "class_02"] and ds.num_classes == 3
    assert ds.recipe == "resized-crop-flip" and ds.image_size == 224
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    assert len(ds.train) == 12 and len(ds.test) == 6
    for split, src in (("train", ds.train), ("val", ds.test)):
        assert isinstance(src, FileSource) and not src.resident
        rels = [Path(p).relative_to(root).as_posix() for p in src.paths]
        assert sorted(rels) == sorted(r for r in arrays if r.startswith(split + "/"))
        assert list(src.labels) == [int(r.split("/")[1][-2:]) for r in rels]
        assert src.labels.dtype == np.int64
        assert src.sizes.dtype == np.int64
        assert [tuple(s) for s in src.sizes] == [arrays[r].shape[:2] for r in rels]

        order = np.arange(len(src))[::-1].copy()
        images = src.load(order)
        assert isinstance(images, list) and len(images) == len(src)
        for i, img in zip(order, images):
            ref = arrays[rels[i]]
            assert img.dtype == torch.uint8 and tuple(img.shape) == (3, *ref.shape[:2])
            assert tuple(img.shape[1:]) == tuple(src.sizes[i])
            got = img.permute(1, 2, 0).numpy()
            if rels[i].endswith(".png"):
                want = ref if ref.ndim == 3 else np.repeat(ref[..., None], 3, axis=2)
                assert np.array_equal(got, want), rels[i]
            else:  # JPEG is lossy: compare with an independent decoder, and loosely with the source
                pil = np.asarray(Image.open(src.paths[i]).convert("RGB"))
                assert np.abs(got.astype(int) - pil.astype(int)).max() <= 4
                assert np.abs(got.astype(float) - ref.astype(float)).mean() < 6


def test_imagefolder_has_png_jpeg_and_grayscale_and_relative_root(tmp_path, monkeypatch):
    root, arrays = _imagefolder(tmp_path)
    assert {Path(r).suffix for r in arrays} == {".png", ".JPEG"}
    assert any(a.ndim == 2 for a in arrays.values())
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("imagefolder", "if")
    monkeypatch.chdir("/")
    assert all(os.path.isabs(p) for p in ds.train.paths)
    assert len(ds.train.load([0, 1])) == 2


def test_imagefolder_val_classes_must_match_train(tmp_path):
    root, _ = _imagefolder(tmp_path, n_classes=3)
    (root / "val" / "class_01").rename(root / "val" / "class_99")
    with pytest.raises(DatasetError) as err:
        load_dataset("imagefolder", root)
    msg = str(err.value)
    assert str(root / "val") in msg and "lacks class_01" in msg and "extra class_99" in msg
    assert "\n" not in msg


def test_imagefolder_missing_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match="needs --data-root"):
        load_dataset("imagefolder")
    root, _ = _imagefolder(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset("imagefolder", tmp_path / "absent")
    assert str(tmp_path / "absent" / "train") in str(err.value) and "never downloads" in str(err.value)

    for f in (root / "val").rglob("*"):
        if f.is_file():
            f.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("imagefolder", root)
    assert str(root / "val") in str(err.value) and "class_00" in str(err.value)

    for d in (root / "val").iterdir():
        d.rmdir()
    with pytest.raises(DatasetError) as err:
        load_dataset("imagefolder", root)
    assert "class folder" in str(err.value) and str(root / "val") in str(err.value)


def test_imagefolder_corrupt_image_is_named(tmp_path):
    root, _ = _imagefolder(tmp_path)
    ds = load_dataset("imagefolder", root)
    bad = ds.train.paths[1]
    Path(bad).write_bytes(b"not an image at all")
    with pytest.raises(DatasetError) as err:
        ds.train.load([0, 1])
    assert bad in str(err.value)
    with pytest.raises(DatasetError) as err:  # loading reads a few headers to choose the default view
        load_dataset("imagefolder", root).train.sizes
    assert bad in str(err.value)


def test_imagefolder_fingerprint_tracks_listing_not_location(tmp_path):
    root, _ = _imagefolder(tmp_path, seed=2)
    fp = load_dataset("imagefolder", root).fingerprint
    assert load_dataset("imagefolder", root).fingerprint == fp
    moved = root.rename(tmp_path / "elsewhere")
    assert load_dataset("imagefolder", moved).fingerprint == fp

    # val does not count: the fingerprint identifies the training content
    (moved / "val" / "class_00" / sorted(os.listdir(moved / "val" / "class_00"))[0]).unlink()
    assert load_dataset("imagefolder", moved).fingerprint == fp

    victim = sorted((moved / "train" / "class_00").iterdir())[0]
    arr = np.asarray(Image.open(victim).convert("RGB")).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(np.concatenate([arr, arr[:1]])).save(victim, format="PNG")  # a changed image
    fp_changed = load_dataset("imagefolder", moved).fingerprint
    assert fp_changed != fp

    victim.rename(moved / "train" / "class_01" / victim.name)  # relabelled
    assert load_dataset("imagefolder", moved).fingerprint not in (fp, fp_changed)


# ---------------------------------------------------------------- digits


def test_digits_shape_split_classes():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.classes == [str(d) for d in range(10)]
    assert ds.recipe == "crop-flip" and ds.image_size == 32
    assert len(ds.train) == 1437 and len(ds.test) == 360
    for src in (ds.train, ds.test):
        assert src.images.dtype == torch.uint8 and tuple(src.images.shape[1:]) == (3, 32, 32)
        assert src.labels.dtype == np.int64 and set(src.labels.tolist()) == set(range(10))
        assert torch.equal(src.images[:, 0], src.images[:, 1]) and torch.equal(src.images[:, 0], src.images[:, 2])
    assert int(ds.train.images.max()) == 255 and int(ds.train.images.min()) == 0
    # stratified: each class is about 20% test
    counts_test = np.bincount(ds.test.labels, minlength=10)
    counts_all = counts_test + np.bincount(ds.train.labels, minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)


def test_digits_images_match_their_labels():
    """Every image is its sklearn digit scaled to 0..255, bilinearly upsampled, rounded; train+test is a partition."""
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255 / 16)).unsqueeze(1)
    up = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    up = up.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    by_bytes = {img.tobytes(): i for i, img in enumerate(up)}
    assert len(by_bytes) == len(up)

    images = torch.cat([ds.train.images, ds.test.images])[:, 0].numpy()
    source = [by_bytes[img.tobytes()] for img in images]  # KeyError if an image is not an exact upsample
    assert sorted(source) == list(range(len(up)))
    assert np.array_equal(bunch.target[source], np.concatenate([ds.train.labels, ds.test.labels]))


def test_digits_split_is_scikit_learns_and_loading_imports_no_scikit_learn():
    """The kept split mask is scikit-learn's stratified train_test_split(test_size=0.2, random_state=0), the
    images and labels read from scikit-learn's file are load_digits()'s, and loading the digits in a fresh
    process imports no scikit-learn (0.85 s of every digits run's start-up)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from kdcache.data.digits import sklearn_digits, train_mask

    bunch = load_digits()
    train_idx, _ = train_test_split(np.arange(len(bunch.target)), test_size=0.2, random_state=0,
                                    stratify=bunch.target)
    assert np.array_equal(np.flatnonzero(train_mask()), np.sort(train_idx))
    images, labels = sklearn_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    probe = ("import sys; from kdcache.data import load_dataset; ds = load_dataset('digits'); "
             "print(len(ds.train), len(ds.test), any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1437", "360", "False"]


def test_digits_deterministic_and_root_ignored():
    a = load_dataset("digits")
    assert load_dataset("digits", "/no/such/root") is a  # cached per process
    load_digits_dataset.cache_clear()
    b = load_dataset("digits")
    assert b is not a
    assert b.fingerprint == a.fingerprint and len(a.fingerprint) == 64
    assert torch.equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert a.mean == b.mean and a.std == b.std

    x = a.train.images.double() / 255
    assert a.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()), abs=1e-12)
    assert a.std == pytest.approx(tuple(x.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-9)
    assert 0.1 < a.mean[0] < 0.5 and 0.1 < a.std[0] < 0.5


def test_digits_fingerprint_changes_with_a_pixel():
    from kdcache.data.base import tensor_fingerprint

    ds = load_dataset("digits")
    assert tensor_fingerprint("digits", ds.train.images, ds.train.labels) == ds.fingerprint
    images = ds.train.images.clone()
    images[100, :, 7, 9] ^= 1
    assert tensor_fingerprint("digits", images, ds.train.labels) != ds.fingerprint
    labels = ds.train.labels.copy()
    labels[3] = (labels[3] + 1) % 10
    assert tensor_fingerprint("digits", ds.train.images, labels) != ds.fingerprint


def test_cifar_layout_is_torchvisions():
    """kdcache keeps torchvision's CIFAR file and folder names itself (importing torchvision costs a run 2 s);
    they must stay what torchvision's classes say."""
    from torchvision.datasets import CIFAR10, CIFAR100

    from kdcache.data.cifar import KINDS

    for name, tv in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        kind = KINDS[name]
        assert kind.base_folder == tv.base_folder
        assert list(kind.train_files) == [f for f, _ in tv.train_list]
        assert list(kind.test_files) == [f for f, _ in tv.test_list]
        assert (kind.meta_file, kind.meta_key) == (tv.meta["filename"], tv.meta["key"])


def test_reading_cifar_or_digits_does_not_import_torchvision(tmp_path):
    """The distill path loads its data without torchvision (whose import takes about 2 s)."""
    import subprocess
    import sys

    root = write_fake_cifar(tmp_path, kind="cifar10", n_train=20, n_test=10, seed=0)
    code = ("import sys; from kdcache.data import load_dataset; import kdcache.pipelines.distill; "
            f"load_dataset('cifar10', {str(root)!r}); load_dataset('digits', None); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
