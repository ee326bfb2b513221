"""Choosing the device: the GPU when present, the same code on CPU."""

from __future__ import annotations

import torch

from kdcache.errors import KdcacheError


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` if given (``cpu``, ``cuda``, ``cuda:1``), else CUDA when available, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdcacheError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    return device


def default_batch_size(device: torch.device, cpu: int, gpu: int) -> int:
    """A batch size suited to the device: large on a GPU, cache-friendly on a CPU."""
    return gpu if device.type == "cuda" else cpu
