"""Shared set-up for the benchmarks: synthetic CIFAR-format data and a trained digits teacher."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fakes

from tests.fakes import write_fake_cifar  # noqa: E402


def random_checkpoint(path: Path, arch: str, classes: int, seed: int) -> Path:
    """A checkpoint of ``arch`` with seeded random weights at ``path``: the benchmarks' stand-in for a trained
    teacher, whose weights do not change what anything costs."""
    from kdcache.models import build_model

    torch.manual_seed(seed)
    torch.save({"model": build_model(arch, classes).state_dict()}, path)
    return path


def machine() -> str:
    """One line naming the machine, for the results page."""
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def fake_cifar100(root: Path, n_train: int, n_test: int = 100) -> Path:
    """CIFAR-100-format pickles of random pixels under ``root``."""
    return write_fake_cifar(root, kind="cifar100", n_train=n_train, n_test=n_test, seed=0)
