"""The data-set registry: names to loaders, and the one entry point `load_dataset`.

Nothing here ever downloads: a data set that is not on disk is a DatasetError
that says where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from kdcache.data import cifar, digits, imagefolder
from kdcache.data.base import DataSet, FileSource, ImageSource, TensorSource
from kdcache.errors import UnknownNameError

__all__ = [
    "DataSet",
    "FileSource",
    "ImageSource",
    "TensorSource",
    "dataset_description",
    "dataset_names",
    "load_dataset",
]


@dataclass(frozen=True)
class _Entry:
    load: Callable[[str | os.PathLike | None], DataSet]
    describe: Callable[[], str]


_REGISTRY: dict[str, _Entry] = {
    "cifar10": _Entry(lambda root: cifar.load_cifar("cifar10", root), lambda: cifar.describe("cifar10")),
    "cifar100": _Entry(lambda root: cifar.load_cifar("cifar100", root), lambda: cifar.describe("cifar100")),
    "imagefolder": _Entry(imagefolder.load_imagefolder, imagefolder.describe),
    # digits ships with scikit-learn: any root is ignored
    "digits": _Entry(lambda root: digits.load_digits_dataset(), digits.describe),
}


def dataset_names() -> list[str]:
    """Registered data-set names, in the order `kdcache datasets` lists them."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown data set {name!r}; known data sets: {', '.join(_REGISTRY)}"
        ) from None


def dataset_description(name: str) -> str:
    """One line describing data set `name`, including whether it needs --data-root."""
    return _entry(name).describe()


def load_dataset(name: str, root: str | os.PathLike | None = None) -> DataSet:
    """Load data set `name` from `root` (its --data-root; ignored by `digits`).

    Raises UnknownNameError for an unregistered name and DatasetError for a
    missing or malformed data set, each with a one-line message saying what to do.
    """
    return _entry(name).load(root)
