"""CIFAR-10 and CIFAR-100 from torchvision's on-disk layout (the "python version").

Why the pickles are read here rather than through torchvision.datasets.CIFAR10:
torchvision checks the md5 of every file (so no test fixture can pass it), turns
every problem into one generic RuntimeError that names no file, and converts the
rows to HWC, which we would only convert back. Reading the pickles directly lets
each file be validated on its own (row count, row size, label range) and named
in the error. File names, folder names and the meta key are torchvision's (kept here rather than read
from its classes, whose import costs a distill run two seconds; tests/test_datasets.py checks that they
equal torchvision's), so the expected layout is exactly torchvision's, and a
restricted unpickler admits only what these files contain (numpy arrays and
plain Python values), so a hostile file under --data-root cannot run code.

A CIFAR row is 3072 bytes: 1024 red, then 1024 green, then 1024 blue, each a
32x32 plane in row-major order, so a reshape to (3, 32, 32) is already CHW.
"""

from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.data.base import DataSet, TensorSource, tensor_fingerprint
from kdcache.errors import DatasetError

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
ROW_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class _Kind:
    name: str
    title: str
    base_folder: str               # torchvision's CIFAR10/CIFAR100.base_folder
    train_files: tuple[str, ...]   # .train_list's names
    test_files: tuple[str, ...]    # .test_list's names
    meta_file: str                 # .meta["filename"]
    meta_key: str                  # .meta["key"]
    num_classes: int
    label_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


KINDS = {
    "cifar10": _Kind(
        "cifar10", "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "label_names", 10, "labels",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _Kind(
        "cifar100", "CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_label_names", 100,
        "fine_labels",
        (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
    ),
}

# (module, name) pairs a CIFAR pickle may reference; numpy.core is numpy 1's
# name for numpy._core and is what the original files (and numpy < 2) write.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals a CIFAR file needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)


def _str_keys(d: dict[str | bytes, Any]) -> dict[str, Any]:
    """Keys as str whether the file was written by Python 2 (str) or re-pickled with bytes keys."""
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_pickle(path: Path, kind: _Kind) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise DatasetError(
            f"cannot read {kind.title} file {path}: truncated or not a CIFAR pickle ({reason}); "
            f"replace it with the python version from {URL}"
        ) from exc
    if not isinstance(obj, dict):
        raise _malformed(path, kind, f"holds a {type(obj).__name__}, not a dict")
    return _str_keys(obj)


def _malformed(path: Path, kind: _Kind, what: str) -> DatasetError:
    return DatasetError(f"{kind.title} file {path} is malformed: {what}; replace it with the python version from {URL}")


def _read_batch(path: Path, kind: _Kind) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, 3072) uint8, labels (n,) int64) of one batch file, validated."""
    entry = _read_pickle(path, kind)
    for key in ("data", kind.label_key):
        if key not in entry:
            raise _malformed(path, kind, f"no '{key}' entry (has {sorted(entry)})")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _malformed(path, kind, f"'data' is a {desc}, expected uint8 rows of {ROW_BYTES} bytes")
    try:
        labels = np.asarray(entry[kind.label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise _malformed(path, kind, f"'{kind.label_key}' is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise _malformed(path, kind, f"{data.shape[0]} data rows but {labels.size} labels in '{kind.label_key}'")
    if labels.size and (labels.min() < 0 or labels.max() >= kind.num_classes):
        raise _malformed(
            path, kind, f"labels range {labels.min()}..{labels.max()}, expected 0..{kind.num_classes - 1}"
        )
    return data, labels


def _read_classes(path: Path, kind: _Kind) -> list[str]:
    meta = _read_pickle(path, kind)
    key = kind.meta_key
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != kind.num_classes:
        got = f"{len(names)} names" if isinstance(names, (list, tuple)) else "none"
        raise _malformed(path, kind, f"'{key}' should list {kind.num_classes} class names, got {got}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _find_folder(root: Path, kind: _Kind, files: list[str]) -> Path:
    """The folder holding the CIFAR files: ROOT/<base_folder>, or ROOT itself if it is that folder."""
    base = kind.base_folder
    folder = root / base
    if not folder.is_dir() and root.name == base and root.is_dir():
        folder = root
    if not folder.is_dir():
        raise DatasetError(
            f"{kind.title} not found: expected folder {folder} with {', '.join(files)}; kdcache never downloads: "
            f"put the python version of {kind.title} from {URL} under {root}"
        )
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"{kind.title} incomplete: {folder} lacks {', '.join(missing)}; kdcache never downloads: "
            f"put the python version of {kind.title} from {URL} under {root}"
        )
    return folder


def load_cifar(name: str, root: str | os.PathLike[str] | None) -> DataSet:
    """Load `cifar10` or `cifar100` from ROOT (torchvision layout) as resident uint8 tensors.

    Every file is checked for structure; the md5 sums torchvision knows are not,
    which is what lets small fixtures stand in for the real files.
    """
    kind = KINDS[name]
    if root is None:
        raise DatasetError(
            f"data set {name} needs --data-root: the folder that holds {kind.base_folder} "
            f"(kdcache never downloads; get the python version of {kind.title} from {URL})"
        )
    root = Path(root).expanduser()
    train_files, test_files, meta_file = list(kind.train_files), list(kind.test_files), kind.meta_file
    folder = _find_folder(root, kind, train_files + test_files + [meta_file])

    classes = _read_classes(folder / meta_file, kind)

    def split(files: list[str]) -> TensorSource:
        batches = [_read_batch(folder / f, kind) for f in files]
        data = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        return TensorSource(torch.from_numpy(data.reshape(-1, 3, 32, 32)), labels)

    train = split(train_files)
    test = split(test_files)
    return DataSet(
        name=name,
        num_classes=kind.num_classes,
        classes=classes,
        mean=kind.mean,
        std=kind.std,
        recipe="crop-flip",
        image_size=32,
        train=train,
        test=test,
        fingerprint=tensor_fingerprint(name, train.images, train.labels),
    )


def describe(name: str) -> str:
    """One line for `kdcache datasets`."""
    kind = KINDS[name]
    return (
        f"{kind.title}, 50000 train / 10000 test 32x32 RGB images, {kind.num_classes} classes; "
        f"needs --data-root (the folder holding {kind.base_folder}, torchvision's layout; never downloaded)"
    )
