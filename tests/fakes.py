"""Small stand-ins for real data sets, written in their real on-disk formats.

`write_fake_cifar` writes CIFAR-10/100 in exactly the layout of the "python
version" from https://www.cs.toronto.edu/~kriz/cifar.html, which torchvision
reads: Python-2 pickles whose strings are Python 2 `str` (so they load as
b'data', b'labels' with encoding="bytes" and as 'data', 'labels' with
encoding="latin1", like the originals) and whose arrays reference
numpy.core.multiarray._reconstruct. `write_fake_imagefolder` writes a
train/<class>/, val/<class>/ tree of small PNG and JPEG files of varied sizes.

The `fake_*` functions return the exact arrays the writers put on disk, so a
test can compare what a loader returns with what was written.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((24, 32), (40, 28), (33, 33), (17, 50), (64, 48))


# ---------------------------------------------------------------- CIFAR pickles


class Py2Str(bytes):
    """A Python 2 `str`: pickled with the STRING opcodes, decoded by the reader's `encoding`."""


class _Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 with numpy 1.x did (protocol 2, py2 strings, numpy.core names)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))

    dispatch[Py2Str] = save_py2str

    def save_ndarray(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in (np.uint8, np.int64):
            raise TypeError(f"fake CIFAR pickles hold uint8 or int64 arrays, not {arr.dtype}")
        code = b"u1" if arr.dtype == np.uint8 else b"i8"
        endian = b"|" if arr.dtype == np.uint8 else b"<"
        # numpy.core.multiarray._reconstruct(ndarray, (0,), 'b'), then __setstate__
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.write(pickle.GLOBAL + b"numpy\nndarray\n")
        self.save((0,))
        self.save(Py2Str(b"b"))
        self.write(pickle.TUPLE3 + pickle.REDUCE)
        self.write(pickle.MARK)
        self.save(1)
        self.save(arr.shape)
        # the dtype: numpy.dtype('u1', 0, 1) with its own state
        self.write(pickle.GLOBAL + b"numpy\ndtype\n")
        self.save(Py2Str(code))
        self.save(0)
        self.save(1)
        self.write(pickle.TUPLE3 + pickle.REDUCE)
        self.write(pickle.MARK)
        for v in (3, Py2Str(endian), None, None, None, -1, -1, 0):
            self.save(v)
        self.write(pickle.TUPLE + pickle.BUILD)
        self.save(False)
        self.save(Py2Str(arr.tobytes()))
        self.write(pickle.TUPLE + pickle.BUILD)

    dispatch[np.ndarray] = save_ndarray


def py2_pickle_bytes(obj: object) -> bytes:
    """`obj` pickled the way the CIFAR files were (Python 2, protocol 2); use Py2Str for str."""
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_py2_pickle(path: str | Path, obj: object) -> None:
    """Write `obj` to `path` as a Python-2 protocol-2 pickle (see `py2_pickle_bytes`)."""
    Path(path).write_bytes(py2_pickle_bytes(obj))


@dataclass(frozen=True)
class FakeCifar:
    """The content of a fake CIFAR set: rows (n, 3072) uint8 in CIFAR order, labels, names."""

    kind: str
    train_rows: np.ndarray
    train_labels: np.ndarray
    test_rows: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    coarse_train: np.ndarray | None = None
    coarse_test: np.ndarray | None = None

    @property
    def folder(self) -> str:
        """The folder under the root that holds the files."""
        return "cifar-10-batches-py" if self.kind == "cifar10" else "cifar-100-python"


def fake_cifar(kind: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0) -> FakeCifar:
    """The deterministic content `write_fake_cifar` writes for these arguments."""
    if kind not in ("cifar10", "cifar100"):
        raise ValueError(f"kind must be cifar10 or cifar100, not {kind!r}")
    rng = np.random.default_rng(seed)
    n_classes = 10 if kind == "cifar10" else 100
    classes = CIFAR10_NAMES if kind == "cifar10" else [f"fine_{i:02d}" for i in range(100)]
    train_rows = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    test_rows = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    train_labels = rng.integers(0, n_classes, size=n_train).astype(np.int64)
    test_labels = rng.integers(0, n_classes, size=n_test).astype(np.int64)
    if kind == "cifar10":
        return FakeCifar(kind, train_rows, train_labels, test_rows, test_labels, list(classes))
    return FakeCifar(
        kind, train_rows, train_labels, test_rows, test_labels, list(classes),
        coarse_train=train_labels // 5, coarse_test=test_labels // 5,
    )


def cifar_batch(
    kind: str, rows: np.ndarray, labels: Sequence[int], batch_label: str, coarse: Sequence[int] | None = None
) -> dict:
    """A batch dict with the keys the real files have (b'data', b'labels' or b'fine_labels', ...)."""
    d = {
        Py2Str(b"batch_label"): Py2Str(batch_label.encode()),
        Py2Str(b"filenames"): [Py2Str(f"fake_image_{i:06d}.png".encode()) for i in range(len(rows))],
        Py2Str(b"data"): np.ascontiguousarray(rows, dtype=np.uint8),
    }
    if kind == "cifar10":
        d[Py2Str(b"labels")] = [int(x) for x in labels]
    else:
        d[Py2Str(b"fine_labels")] = [int(x) for x in labels]
        d[Py2Str(b"coarse_labels")] = [int(x) for x in (coarse if coarse is not None else [0] * len(rows))]
    return d


def write_fake_cifar(
    root: str | Path, kind: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0
) -> Path:
    """Write a fake CIFAR-10 or CIFAR-100 under `root` in torchvision's layout; return `root`.

    CIFAR-10: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta};
    CIFAR-100: root/cifar-100-python/{train, test, meta}. The content is
    `fake_cifar(kind, n_train, n_test, seed)`; CIFAR-10's train rows are split
    over the five batches in order.
    """
    root = Path(root)
    fake = fake_cifar(kind, n_train, n_test, seed)
    folder = root / fake.folder
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        bounds = np.linspace(0, n_train, 6).astype(int)
        for b in range(5):
            sl = slice(bounds[b], bounds[b + 1])
            batch = cifar_batch(kind, fake.train_rows[sl], fake.train_labels[sl], f"training batch {b + 1} of 5")
            write_py2_pickle(folder / f"data_batch_{b + 1}", batch)
        test = cifar_batch(kind, fake.test_rows, fake.test_labels, "testing batch 1 of 1")
        write_py2_pickle(folder / "test_batch", test)
        meta = {
            Py2Str(b"num_cases_per_batch"): int(bounds[1] - bounds[0]),
            Py2Str(b"label_names"): [Py2Str(n.encode()) for n in fake.classes],
            Py2Str(b"num_vis"): 3072,
        }
        write_py2_pickle(folder / "batches.meta", meta)
    else:
        write_py2_pickle(
            folder / "train",
            cifar_batch(kind, fake.train_rows, fake.train_labels, "training batch 1 of 1", fake.coarse_train),
        )
        write_py2_pickle(
            folder / "test",
            cifar_batch(kind, fake.test_rows, fake.test_labels, "testing batch 1 of 1", fake.coarse_test),
        )
        meta = {
            Py2Str(b"fine_label_names"): [Py2Str(n.encode()) for n in fake.classes],
            Py2Str(b"coarse_label_names"): [Py2Str(f"coarse_{i:02d}".encode()) for i in range(20)],
        }
        write_py2_pickle(folder / "meta", meta)
    return root


# ---------------------------------------------------------------- ImageFolder trees


def fake_imagefolder(
    n_classes: int = 3,
    n_per_class_train: int = 4,
    n_per_class_val: int = 2,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The images `write_fake_imagefolder` writes: relative path -> uint8 array.

    Arrays are (H, W, 3) for RGB files and (H, W) for grayscale ones. Files
    cycle through RGB PNG, RGB JPEG (".JPEG", as in ImageNet) and grayscale PNG,
    and through `sizes` ((height, width) pairs). Images are smooth gradients
    with mild noise, so JPEG stays close to the array it was written from.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    k = 0
    for split, n_per_class in (("train", n_per_class_train), ("val", n_per_class_val)):
        for c in range(n_classes):
            for i in range(n_per_class):
                h, w = sizes[k % len(sizes)]
                fmt = k % 3
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack(
                    [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 255 // max(h + w - 2, 1))],
                    axis=-1,
                )
                base = base + rng.integers(-8, 9, size=base.shape) + 16 * c
                img = np.clip(base, 0, 255).astype(np.uint8)
                ext = (".png", ".JPEG", ".png")[fmt]
                if fmt == 2:
                    img = img[..., 0].copy()
                out[f"{split}/class_{c:02d}/{split}_{i:03d}_{k:03d}{ext}"] = img
                k += 1
    return out


def write_fake_imagefolder(
    root: str | Path,
    n_classes: int = 3,
    n_per_class_train: int = 4,
    n_per_class_val: int = 2,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    seed: int = 0,
) -> Path:
    """Write root/train/<class>/*, root/val/<class>/* small PNG/JPEG files; return `root`.

    The content is `fake_imagefolder(...)` with the same arguments; class
    folders are class_00, class_01, ...
    """
    from PIL import Image

    root = Path(root)
    for rel, arr in fake_imagefolder(n_classes, n_per_class_train, n_per_class_val, sizes, seed).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".JPEG"):
            Image.fromarray(arr).save(path, format="JPEG", quality=95)
        else:
            Image.fromarray(arr).save(path, format="PNG")
    return root


def flip_byte(path: Path, mask: int = 0xFF) -> None:
    """Damage a file on disk: XOR its middle byte with ``mask``, as a bad sector or a stray write would."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= mask
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- killing a precompute midway


def completion_markers(store_path: Path) -> list[Path]:
    """The completion-marker files of a teacher store written so far, sorted."""
    root = Path(store_path) / "done" / "c"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def kill_after_markers(cmd: list[str], store_path: Path, n: int, timeout: float = 120.0) -> None:
    """Start ``cmd`` and SIGKILL it once the store at ``store_path`` holds ``n`` completion markers."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while len(completion_markers(store_path)) < n and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) as an IDX file: magic 0 0 8 ndim, the dimensions as big-endian int32, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.tobytes()


def write_fake_mnist(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0, gz: bool = False,
                     classes: int = 10) -> tuple[dict[str, np.ndarray], Path]:
    """Random 28x28 images and labels written as the four IDX files in ``folder`` (gzipped with ``gz``).
    Returns the arrays written (train_images, train_labels, test_images, test_labels) and the folder."""
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(n_train) % classes).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(n_test) % classes).astype(np.uint8)}
    names = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / (names[key] + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / names[key]).write_bytes(data)
    return arrays, folder
