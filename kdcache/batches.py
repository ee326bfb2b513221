"""Turning stored images and view parameters into normalised model inputs on a device."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from kdcache.data import DataSet
from kdcache.data.base import ImageSource
from kdcache.views import eval_view, normalize, replay
from kdcache.views.replay import replays_on_device

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def view_batch(dataset: DataSet, source: ImageSource, recipe: str, indices: np.ndarray | torch.Tensor,
               params: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The augmented, normalised views of ``indices`` under ``params``: float32 (B, 3, S, S) on ``device``.

    The same function serves teachers at precompute and students at distill, so
    both see bit-identical tensors for the same (view, row).

    ``indices`` and ``params`` may be host arrays or tensors already on ``device``
    (distill stages them there). Parameters are used where the recipe's replay reads
    them (``kdcache.views.replay.replays_on_device``): host parameters of a recipe
    replayed on the device are copied there without waiting, and device parameters of
    a recipe that reads host ints would cost a device-to-host copy, so callers keep
    those on the host.
    """
    images = source.load_on(indices, device)
    params_t = torch.as_tensor(params)
    if replays_on_device(recipe) or len(params_t) == 0:
        params_t = params_t.to(device, non_blocking=True)
    return normalize(replay(recipe, images, params_t), dataset.mean, dataset.std)


def test_batches(dataset: DataSet, recipe: str, device: torch.device,
                 batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test split in order, as deterministic evaluation views with their labels."""
    source = dataset.test
    labels = torch.as_tensor(source.labels)
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)))
        images = source.load_on(idx, device)
        x = normalize(eval_view(recipe, images), dataset.mean, dataset.std)
        yield x, labels[idx].to(device, non_blocking=True)


def read_ahead(make: Callable[[_In], _Out], items: Iterable[_In], ahead: int = 1) -> Iterator[_Out]:
    """``make(item)`` for each item, in order, computed on one background thread at most ``ahead`` items
    before the consumer asks for them.

    Lets the next batch be decoded and replayed while the current one runs through a model,
    with memory bounded by ``ahead`` batches beyond the one in use. ``items`` is iterated on the
    consumer's thread. Stopping early (or an error) cancels what has not started.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1 (got {ahead})")
    pending: deque[Future[_Out]] = deque()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-read-ahead")
    try:
        for item in items:
            if len(pending) > ahead:
                yield pending.popleft().result()
            pending.append(pool.submit(make, item))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
