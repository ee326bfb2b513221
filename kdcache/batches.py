"""Turning stored images and view parameters into normalised model inputs on a device."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from kdcache.data import DataSet
from kdcache.data.base import ImageSource
from kdcache.views import eval_view, normalize, replay


def _on(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [im.to(device, non_blocking=True) for im in images]


def view_batch(dataset: DataSet, source: ImageSource, recipe: str, indices: np.ndarray,
               params: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The augmented, normalised views of ``indices`` under ``params``: float32 (B, 3, S, S) on ``device``.

    The same function serves teachers at precompute and students at distill, so
    both see bit-identical tensors for the same (view, row).
    """
    images = _on(source.load(indices), device)
    params_t = torch.as_tensor(params).to(device, non_blocking=True)
    return normalize(replay(recipe, images, params_t), dataset.mean, dataset.std)


def test_batches(dataset: DataSet, recipe: str, device: torch.device,
                 batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test split in order, as deterministic evaluation views with their labels."""
    source = dataset.test
    labels = torch.as_tensor(source.labels)
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)))
        images = _on(source.load(idx), device)
        x = normalize(eval_view(recipe, images), dataset.mean, dataset.std)
        yield x, labels[idx].to(device, non_blocking=True)
