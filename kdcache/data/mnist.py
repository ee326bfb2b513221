"""MNIST and Fashion-MNIST from their IDX files, shown as 32x32 RGB like digits.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``)
are looked for in torchvision's layout, ``ROOT/MNIST/raw/`` or
``ROOT/FashionMNIST/raw/``, then in ROOT itself (Debian's
``dataset-fashion-mnist`` package installs them flat in
``/usr/share/datasets/fashion-mnist/``, the default root of ``fashion-mnist``).

Why the files are parsed here rather than through torchvision.datasets.MNIST:
torchvision wants its processed layout or downloads, reads no gzip in place,
and turns a short or foreign file into an assertion with no file name. An IDX
file is a 4-byte magic (0, 0, type 0x08 = uint8, number of dimensions), the
dimensions as big-endian int32, then the bytes; each file is checked against
its header and named in the error.

The 28x28 gray images are zero-padded by 2 pixels on each side to 32x32 (the
border is the background of both sets, so nothing is resampled) and copied to
three channels, so every CIFAR-family model and the CIFAR augmentation apply
unchanged. Normalisation is the exact per-channel mean and std of the padded
training images, from a histogram of their bytes.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.data.base import DataSet, TensorSource, tensor_fingerprint
from kdcache.errors import DatasetError

SIDE, PAD = 28, 2
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08


@dataclass(frozen=True)
class _Kind:
    name: str
    title: str
    folder: str                     # torchvision's folder under ROOT
    classes: tuple[str, ...]
    n_train: int
    n_test: int
    default_root: str | None
    source: str


KINDS = {
    "mnist": _Kind("mnist", "MNIST", "MNIST", tuple(str(d) for d in range(10)), 60000, 10000, None,
                   "http://yann.lecun.com/exdb/mnist/"),
    # torchvision's FashionMNIST.__name__ and .classes (kept here: importing torchvision costs a run two seconds;
    # tests/test_mnist.py checks they equal torchvision's)
    "fashion-mnist": _Kind("fashion-mnist", "Fashion-MNIST", "FashionMNIST",
                           ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                            "Bag", "Ankle boot"),
                           60000, 10000, "/usr/share/datasets/fashion-mnist",
                           "Debian's dataset-fashion-mnist package or github.com/zalandoresearch/fashion-mnist"),
}


def _layouts(kind: _Kind, root: Path) -> str:
    return (f"put {', '.join(f for pair in FILES.values() for f in pair)} (plain or .gz) in "
            f"{root / kind.folder / 'raw'} (torchvision's layout) or directly in {root}; kdcache never downloads "
            f"(get them from {kind.source})")


def _find(kind: _Kind, root: Path, stem: str) -> Path | None:
    for folder in (root / kind.folder / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx(path: Path, ndim: int, count: int | None = None) -> np.ndarray:
    """The uint8 array of IDX file ``path`` with ``ndim`` dimensions (gzip read transparently), checked
    against its header and, where given, holding ``count`` items. DatasetError names the file otherwise."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read {path}: {exc}; replace the file") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != bytes([0, 0, _UBYTE]) or raw[3] != ndim:
        raise DatasetError(f"{path} is not an IDX file of {ndim}-dimensional uint8 data (its header is "
                           f"{raw[:4].hex() or 'empty'}); replace it")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, 4))
    need = int(np.prod(shape))
    if len(raw) - header < need:
        raise DatasetError(f"{path} is short: its header promises {'x'.join(map(str, shape))} bytes of data "
                           f"({need:,}) but it holds {len(raw) - header:,}; replace the file")
    if count is not None and shape[0] != count:
        raise DatasetError(f"{path} holds {shape[0]} items where its other file holds {count}; the pair do "
                           "not belong together")
    return np.frombuffer(raw, np.uint8, need, header).reshape(shape)


def _split(kind: _Kind, root: Path, split: str) -> TensorSource:
    paths = []
    for stem in FILES[split]:
        path = _find(kind, root, stem)
        if path is None:
            raise DatasetError(f"{kind.title} incomplete: no {stem} under {root}; {_layouts(kind, root)}")
        paths.append(path)
    images = read_idx(paths[0], 3)
    if images.shape[1:] != (SIDE, SIDE):
        raise DatasetError(f"{paths[0]} holds {images.shape[1]}x{images.shape[2]} images, not {SIDE}x{SIDE}; "
                           "replace the file")
    labels = read_idx(paths[1], 1, count=images.shape[0]).astype(np.int64)
    if labels.size and labels.max() >= len(kind.classes):
        raise DatasetError(f"{paths[1]} has label {labels.max()} outside 0..{len(kind.classes) - 1}; replace it")
    padded = np.zeros((images.shape[0], 1, SIDE + 2 * PAD, SIDE + 2 * PAD), np.uint8)
    padded[:, 0, PAD:PAD + SIDE, PAD:PAD + SIDE] = images
    return TensorSource(torch.from_numpy(padded).expand(-1, 3, -1, -1).contiguous(), labels)


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact mean and std of 0..1 pixels from a histogram of the first channel (all three are equal)."""
    hist = np.bincount(images[:, 0].numpy().ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256) / 255.0
    n = hist.sum()
    mean = float((hist * levels).sum() / n)
    std = float(np.sqrt(max((hist * (levels - mean) ** 2).sum() / n, 0.0)))
    return (mean,) * 3, (std or 1.0,) * 3


def load_mnist(name: str, root: str | os.PathLike[str] | None) -> DataSet:
    """Load ``mnist`` or ``fashion-mnist`` from ROOT (or Fashion-MNIST's Debian folder) as resident tensors."""
    kind = KINDS[name]
    if root is None:
        if kind.default_root is None:
            raise DatasetError(f"data set {name} needs --data-root: the folder that holds {kind.folder}/raw/ or "
                               f"the four IDX files (kdcache never downloads; get them from {kind.source})")
        root = kind.default_root
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{kind.title} not found: {root} is not a folder; {_layouts(kind, root)}")
    train, test = _split(kind, root, "train"), _split(kind, root, "test")
    mean, std = _mean_std(train.images)
    return DataSet(
        name=name,
        num_classes=len(kind.classes),
        classes=list(kind.classes),
        mean=mean,
        std=std,
        recipe="crop-flip",
        image_size=SIDE + 2 * PAD,
        train=train,
        test=test,
        fingerprint=tensor_fingerprint(name, train.images, train.labels),
    )


def describe(name: str) -> str:
    """One line for `kdcache datasets`."""
    kind = KINDS[name]
    where = (f"--data-root defaults to {kind.default_root}" if kind.default_root else "needs --data-root")
    return (f"{kind.title}, {kind.n_train} train / {kind.n_test} test 28x28 gray images shown as 32x32 RGB "
            f"(zero-padded), 10 classes; {where} (the four IDX files, plain or .gz, in {kind.folder}/raw/ or "
            "flat; never downloaded)")
