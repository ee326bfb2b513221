"""The data-set registry: names to loaders, and the one entry point `load_dataset`.

Nothing here ever downloads: a data set that is not on disk is a DatasetError
that says where to put it. Plug-ins add their own with :func:`register_dataset`
(``kdcache.contract.check_dataset`` tests one).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from kdcache.data import cifar, digits, imagefolder, mnist
from kdcache.data.base import DataSet, FileSource, ImageSource, TensorSource
from kdcache.errors import DatasetError
from kdcache.registry import PluginError, Registry
from kdcache.views import get_recipe

__all__ = [
    "DataSet",
    "FileSource",
    "ImageSource",
    "TensorSource",
    "dataset_description",
    "dataset_names",
    "load_dataset",
    "register_dataset",
]


@dataclass(frozen=True)
class _Entry:
    load: Callable[[str | os.PathLike[str] | None], DataSet]
    describe: Callable[[], str]


Loader = Callable[[str | os.PathLike[str] | None], DataSet]
_DATASETS: Registry[_Entry] = Registry("data set")


def register_dataset(name: str, *, describe: str | Callable[[], str] = "", replace: bool = False
                     ) -> Callable[[Loader], Loader]:
    """Decorator: register ``load(root) -> DataSet`` as data set ``name``; ``root`` is the user's --data-root
    (None when not given). ``describe`` is the one line `kdcache datasets` shows: a text, or a function
    giving it (default: the loader's docstring's first line). The loader must never download; a missing
    data set is a ``kdcache.errors.DatasetError`` saying where to put it."""
    def add(load: Loader) -> Loader:
        doc = (load.__doc__ or "").strip().splitlines()
        text = describe or (doc[0] if doc else name)
        _DATASETS.add(name, _Entry(load, text if callable(text) else (lambda: text)), replace=replace)
        return load
    return add


for _name, _entry_of in {
    "cifar10": _Entry(lambda root: cifar.load_cifar("cifar10", root), lambda: cifar.describe("cifar10")),
    "cifar100": _Entry(lambda root: cifar.load_cifar("cifar100", root), lambda: cifar.describe("cifar100")),
    "mnist": _Entry(lambda root: mnist.load_mnist("mnist", root), lambda: mnist.describe("mnist")),
    "fashion-mnist": _Entry(lambda root: mnist.load_mnist("fashion-mnist", root),
                            lambda: mnist.describe("fashion-mnist")),
    "imagefolder": _Entry(imagefolder.load_imagefolder, imagefolder.describe),
    # digits ships with scikit-learn: any root is ignored
    "digits": _Entry(lambda root: digits.load_digits_dataset(), digits.describe),
}.items():
    register_dataset(_name, describe=_entry_of.describe)(_entry_of.load)


def dataset_names() -> list[str]:
    """Registered data-set names, in the order `kdcache datasets` lists them (plug-ins' last)."""
    return _DATASETS.names()


def _entry(name: str) -> _Entry:
    return _DATASETS.get(name)


def dataset_description(name: str) -> str:
    """One line describing data set `name`, including whether it needs --data-root."""
    entry = _entry(name)
    with _DATASETS.running(name):  # a plug-in's failure is named as its own
        return entry.describe()


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, recipe: str | None = None,
                 image_size: int | None = None) -> DataSet:
    """Load data set `name` from `root` (its --data-root; ignored by `digits`), viewed with `recipe` at
    `image_size` pixels where given (default: the data set's own, see :func:`with_views`).

    Raises UnknownNameError for an unregistered name and DatasetError for a
    missing or malformed data set, each with a one-line message saying what to do; a plug-in's loader that
    raises anything else is a PluginError naming the plug-in's distribution.
    """
    entry = _entry(name)
    with _DATASETS.running(name):
        data = entry.load(root)
    if not isinstance(data, DataSet):
        origin = _DATASETS.origin(name)
        raise PluginError(f"the data set {name!r}{f' from plug-in distribution {origin}' if origin else ''} "
                          f"returned {type(data).__name__}, not a kdcache.DataSet")
    return with_views(data, recipe, image_size)


def with_views(data: DataSet, recipe: str | None = None, image_size: int | None = None) -> DataSet:
    """`data` with its default view recipe and size replaced by `recipe` (a name or ``name:size``) and
    `image_size`; either may be None to keep the data set's. Images held in memory (CIFAR, digits) have one
    size, so only image folders take another ``image_size``."""
    if recipe is None and image_size is None:
        return data
    current = get_recipe(data.recipe)
    rec = get_recipe(recipe or current.name, image_size if image_size is not None else
                     (None if recipe and ":" in recipe else current.size))
    if data.train.resident and rec.size != data.image_size:
        raise DatasetError(f"{data.name} images are {data.image_size}x{data.image_size}: an image size of {rec.size} "
                           "applies to imagefolder data only")
    return dataclasses.replace(data, recipe=rec.spec, image_size=rec.size)
