"""scikit-learn's bundled handwritten digits, shown as 32x32 RGB.

Always available (the data ships inside scikit-learn), so it is the data set
for the demo and for tests that need real images without a --data-root. The
8x8 images (gray levels 0..16) are scaled to 0..255, upsampled to 32x32 with
bilinear interpolation, rounded to uint8 and copied to three channels: a fixed
transform, so the same scikit-learn data always gives the same bytes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data.base import DataSet, TensorSource, tensor_fingerprint

N_TRAIN, N_TEST = 1437, 360


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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.shape[0]), test_size=0.2, random_state=0, stratify=labels
    )
    # sorted: each split keeps scikit-learn's order, which makes it easy to inspect
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    images = _to_rgb32(bunch.images)
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
