"""scikit-learn's bundled handwritten digits, shown as 32x32 RGB.

Always available (the data ships inside scikit-learn), so it is the data set
for the demo and for tests that need real images without a --data-root. The
8x8 images (gray levels 0..16) are scaled to 0..255, upsampled to 32x32 with
bilinear interpolation, rounded to uint8 and copied to three channels: a fixed
transform, so the same scikit-learn data always gives the same bytes.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data.base import DataSet, TensorSource, tensor_fingerprint

N_TRAIN, N_TEST = 1437, 360

# The fixed stratified split, scikit-learn's train_test_split(test_size=0.2, random_state=0, stratify=labels) of its
# 1,797 digits (tests/test_datasets.py checks it against scikit-learn), as a bit mask of the training rows, packed
# and zlib-compressed. Kept here so that loading the digits imports no scikit-learn (0.85 s of the start-up of
# every run on them), and so that no scikit-learn release that draws its split otherwise can change the data set.
TRAIN_MASK = (
    "eNoVyrFKw0AYB/DRR/EZpGAeo5QONzooFKeAae6eQtz0ERwEg4T0Gzq0iOBQsMNhb7LFQjiCjZ/J+d1f/M0/IKTP1hO6GS6qHh/gCIt1t6rhcd5"
    "isq2DO1KivQK3qSv39rEi1QKgcAxo41D0A3hi5dFTgVcPaQbfEJthOoxzNzr73wcmDmpXiNDsFCbQU7a81vKJ0oAqNd6198gOV7cn7A3jwSQudJ"
    "eInENjwb8JbwHfRGRebfCyfgtJmZibJsoUOdL3Ea1s2PDwzky0+pJcqjouxvufP4sIr/4="
)


def train_mask(n: int = N_TRAIN + N_TEST) -> np.ndarray:
    """(1797,) bool: the rows of scikit-learn's digits in the training split."""
    bits = np.frombuffer(zlib.decompress(base64.b64decode(TRAIN_MASK)), dtype=np.uint8)
    return np.unpackbits(bits)[:n].astype(bool)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (1797, 8, 8) float64 gray levels 0..16 and (1797,) labels, as ``load_digits`` gives
    them, read from the file scikit-learn ships (found without importing scikit-learn); through ``load_digits``
    where that file is not where scikit-learn keeps it today."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target)
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _to_rgb32(images8: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) gray levels 0..16 to (N, 3, 32, 32) uint8."""
    x = torch.from_numpy(images8.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of 0..1 pixels, from exact integer sums (the same on every machine)."""
    x = images.permute(1, 0, 2, 3).reshape(3, -1).to(torch.int64)
    n = x.shape[1]
    s = x.sum(dim=1).tolist()
    ss = (x * x).sum(dim=1).tolist()
    mean = tuple(si / n / 255.0 for si in s)
    std = tuple(((ssi * n - si * si) ** 0.5) / n / 255.0 for si, ssi in zip(s, ss))
    return mean, std


@functools.lru_cache(maxsize=1)
def load_digits_dataset() -> DataSet:
    """The digits DataSet: fixed stratified 1437/360 split, cached for the process.

    Callers share the cached tensors, so they must not modify them in place.
    """
    images8, labels = sklearn_digits()
    labels = labels.astype(np.int64)
    # each split keeps scikit-learn's order, which makes it easy to inspect
    mask = train_mask(len(labels))
    train_idx, test_idx = np.flatnonzero(mask), np.flatnonzero(~mask)
    images = _to_rgb32(images8)
    train = TensorSource(images[torch.from_numpy(train_idx)].contiguous(), labels[train_idx])
    test = TensorSource(images[torch.from_numpy(test_idx)].contiguous(), labels[test_idx])
    mean, std = _mean_std(train.images)
    return DataSet(
        name="digits",
        num_classes=10,
        classes=[str(d) for d in range(10)],
        mean=mean,
        std=std,
        recipe="crop-flip",
        image_size=32,
        train=train,
        test=test,
        fingerprint=tensor_fingerprint("digits", train.images, train.labels),
    )


def describe() -> str:
    """One line for `kdcache datasets`."""
    return (
        f"scikit-learn's bundled handwritten digits as 32x32 RGB, {N_TRAIN} train / {N_TEST} test, "
        "10 classes; always available, no --data-root needed"
    )
