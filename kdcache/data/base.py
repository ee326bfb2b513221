"""The types every data set is made of: image sources and the DataSet record.

An image source hands out uint8 RGB images in CHW layout by index. Two kinds
exist because data sets come in two shapes: small sets of equal-sized images
that fit in one tensor (CIFAR, digits: `TensorSource`, which can also live on
the GPU), and large sets of variable-sized image files decoded on demand
(ImageFolder: `FileSource`, a batch's files decoded in parallel on a thread
pool, or JPEGs on the GPU). View replay works on either.
"""

from __future__ import annotations

import functools
import os
import warnings
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

import numpy as np
import torch

from kdcache.errors import DatasetError

Indices = np.ndarray | Sequence[int] | torch.Tensor
_T = TypeVar("_T")


def _as_index_array(indices: Indices) -> np.ndarray:
    """Indices as a 1-D int64 numpy array (accepts arrays, lists, tensors)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    return np.asarray(indices, dtype=np.int64).reshape(-1)


class ImageSource(ABC):
    """N labelled uint8 RGB images, handed out in CHW layout by index.

    Attributes every source has: `labels` ((N,) int64), `sizes` ((N, 2) int64,
    (height, width) of each image) and `resident` (True when every image sits in
    one uint8 tensor `images` of shape (N, 3, H, W)).
    """

    labels: np.ndarray
    resident: bool

    if TYPE_CHECKING:  # declarations for the type checker; each source provides these its own way
        @property
        def sizes(self) -> np.ndarray:
            """(N, 2) int64: (height, width) of each image."""

        def to(self, device: torch.device | str) -> ImageSource:
            """Resident sources only: a source with the same labels whose images live on `device`."""

    def __len__(self) -> int:
        """Number of images."""
        return int(self.labels.shape[0])

    @abstractmethod
    def load(self, indices: Indices) -> torch.Tensor | list[torch.Tensor]:
        """uint8 CHW RGB images for these indices, in this order.

        In-memory sources return one stacked (B, 3, H, W) tensor; file-backed
        sources return a list of (3, H_i, W_i) tensors.
        """

    def load_on(self, indices: Indices, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
        """`load(indices)` on `device`; a source that can decode there (FileSource on a GPU) overrides this."""
        images = self.load(indices)
        if isinstance(images, torch.Tensor):
            return images.to(device, non_blocking=True)
        return [im.to(device, non_blocking=True) for im in images]


class TensorSource(ImageSource):
    """Equal-sized images held in one (N, 3, H, W) uint8 tensor, on CPU or GPU."""

    resident = True

    def __init__(self, images: torch.Tensor, labels: np.ndarray | Sequence[int]) -> None:
        """Wrap `images` ((N, 3, H, W) uint8) and their `labels` ((N,) ints)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a (N, 3, H, W) uint8 tensor, got {tuple(images.shape)} {images.dtype}"
            )
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) int64: every row is (H, W) of the shared image shape."""
        h, w = self.images.shape[2], self.images.shape[3]
        return np.tile(np.array([[h, w]], dtype=np.int64), (len(self), 1))

    def load(self, indices: Indices) -> torch.Tensor:
        """The (B, 3, H, W) uint8 images at `indices`, on the tensor's device.

        Indices given as a tensor on that device are used where they are: no round trip through the
        host (which on a GPU would wait for the device), so a training step can gather its batch from
        a set resident on the GPU without a host sync.
        """
        if isinstance(indices, torch.Tensor) and indices.device == self.images.device:
            idx = indices.reshape(-1).long()
        else:
            idx = torch.from_numpy(_as_index_array(indices)).to(self.images.device)
        return self.images[idx]

    def to(self, device: torch.device | str) -> TensorSource:
        """A source with the same labels whose images live on `device` (GPU residency)."""
        return TensorSource(self.images.to(device), self.labels)

    def __repr__(self) -> str:
        return f"TensorSource(n={len(self)}, shape={tuple(self.images.shape[1:])}, device={self.images.device})"


# torchvision 0.29 marks its image decoders deprecated in favour of torchcodec
# (not a dependency); the pinned release decodes correctly, so the per-call
# warning is only noise.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

# torchvision.io decodes these formats; the rest of ImageFolder's extensions
# (bmp, ppm, pgm, tif) go through PIL.
_TORCHVISION_DECODES = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def decode_rgb(path: str) -> torch.Tensor:
    """Decode one image file to a (3, H, W) uint8 RGB tensor.

    EXIF orientation is deliberately not applied, so the decoded shape always
    equals the header size that `FileSource.sizes` reports and that view plans
    are drawn from.
    """
    from torchvision.io import ImageReadMode, decode_image

    try:
        if path.lower().endswith(_TORCHVISION_DECODES):
            img: torch.Tensor = decode_image(path, mode=ImageReadMode.RGB)
            if img.dim() == 4:  # animated GIF: first frame
                img = img[0]
            return img
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except Exception as exc:
        raise _undecodable(path, exc) from exc


def _undecodable(path: str, exc: Exception) -> DatasetError:
    reason = " ".join(str(exc).split())
    return DatasetError(f"cannot decode image {path} ({reason}); replace or remove the file")


DECODE_WORKERS_ENV = "KDCACHE_DECODE_WORKERS"
GPU_DECODE_ENV = "KDCACHE_GPU_DECODE"


def decode_workers() -> int:
    """Threads that decode the files of one batch: $KDCACHE_DECODE_WORKERS, else min(8, CPU count).

    Threads suffice: torchvision's and PIL's decoders release the GIL while they decode.
    """
    value = os.environ.get(DECODE_WORKERS_ENV, "").strip()
    if not value:
        return min(8, os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise DatasetError(f"{DECODE_WORKERS_ENV} must be a whole number of at least 1 (got {value!r})")
    return int(value)


def gpu_decode() -> bool:
    """Whether JPEGs bound for a CUDA device are decoded there (nvjpeg); $KDCACHE_GPU_DECODE=0 keeps them on the CPU."""
    return os.environ.get(GPU_DECODE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# One pool per process, shared by every source; remade when the worker count changes.
_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _decode_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            # a replaced pool is not shut down: a batch may still be using it, and its idle threads end with it
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="kdcache-decode"))
        return _pool[1]


def _forget_pool_in_child() -> None:
    global _pool, _pool_lock
    # a forked child (a DataLoader or dask worker) inherits the pool but none of its threads
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def map_decoded(fn: Callable[[str], _T], paths: Sequence[str]) -> list[_T]:
    """``[fn(p) for p in paths]``, in order, run on the decode pool; the first error (in order) is raised.

    Memory stays bounded by the batch: the pool holds nothing beyond the results returned.
    """
    workers = decode_workers()
    if workers == 1 or len(paths) <= 1:
        return [fn(p) for p in paths]
    return list(_decode_pool(workers).map(fn, paths))


_JPEG_MAGIC = b"\xff\xd8\xff"


def _read_bytes(path: str) -> torch.Tensor:
    from torchvision.io import read_file

    try:
        return cast(torch.Tensor, read_file(path))
    except Exception as exc:
        raise _undecodable(path, exc) from exc


def decode_rgb_on(paths: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """The files at `paths` as (3, H, W) uint8 RGB tensors on the CUDA `device`, in order.

    JPEGs are decoded there by nvjpeg in one batched call (their pixels may differ
    from the CPU decoder's by rounding); other formats, and a JPEG nvjpeg refuses,
    are decoded on the CPU as `decode_rgb` does and moved.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    data = map_decoded(_read_bytes, paths)
    out: list[torch.Tensor | None] = [None] * len(paths)
    jpegs = [i for i, d in enumerate(data) if d[:3].numpy().tobytes() == _JPEG_MAGIC]
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file spoils the batched call: find it
            decoded = [_decode_jpeg_on(paths[i], data[i], device) for i in jpegs]
        for i, img in zip(jpegs, decoded):
            out[i] = img
    others = [i for i, img in enumerate(out) if img is None]
    for i, img in zip(others, map_decoded(decode_rgb, [paths[i] for i in others])):
        out[i] = img.to(device, non_blocking=True)
    return [img for img in out if img is not None]


def _decode_jpeg_on(path: str, data: torch.Tensor, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return cast(torch.Tensor, decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        return decode_rgb(path).to(device)  # a DatasetError naming the file when the CPU cannot decode it either


def read_image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header without decoding."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:
        raise DatasetError(
            f"cannot read the header of image {path} ({' '.join(str(exc).split())}); replace or remove the file"
        ) from exc
    return h, w


class FileSource(ImageSource):
    """Image files of any size, decoded on demand with torchvision.io."""

    resident = False

    def __init__(self, paths: Sequence[str | os.PathLike[str]], labels: np.ndarray | Sequence[int]) -> None:
        """Wrap image `paths` and their `labels`; nothing is read yet."""
        self.paths = [os.fspath(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != self.labels.shape[0]:
            raise ValueError(f"{len(self.paths)} paths but {self.labels.shape[0]} labels")

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """(N, 2) int64 (height, width) from the image headers.

        Read on first use and kept: listing a data set stays cheap, and only
        drawing a view plan (which needs every size) pays for opening every file.
        """
        out = np.empty((len(self.paths), 2), dtype=np.int64)
        for i, p in enumerate(self.paths):
            out[i] = read_image_size(p)
        return out

    def load(self, indices: Indices) -> list[torch.Tensor]:
        """The (3, H_i, W_i) uint8 images at `indices`, in order, decoded from disk on the decode pool."""
        return map_decoded(decode_rgb, [self.paths[i] for i in _as_index_array(indices)])

    def load_on(self, indices: Indices, device: torch.device) -> list[torch.Tensor]:
        """`load(indices)` on `device`; on a CUDA device JPEGs are decoded there (see `decode_rgb_on`)."""
        device = torch.device(device)
        if device.type == "cuda" and gpu_decode():
            return decode_rgb_on([self.paths[i] for i in _as_index_array(indices)], device)
        return [im.to(device, non_blocking=True) for im in self.load(indices)]

    def __repr__(self) -> str:
        return f"FileSource(n={len(self)})"


@dataclass(frozen=True)
class DataSet:
    """A named data set: train and test images plus what training needs to know.

    `recipe` names the default view recipe ("crop-flip" or "resized-crop-flip"),
    `image_size` the side of a replayed view, `mean`/`std` the per-channel
    normalisation (on 0..1 pixels), and `fingerprint` a hex digest of the
    training content, which feeds the plan id so that a changed data set never
    reuses a stale plan.
    """

    name: str
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: str
    image_size: int
    train: ImageSource
    test: ImageSource
    fingerprint: str


def tensor_fingerprint(name: str, images: np.ndarray | torch.Tensor, labels: np.ndarray) -> str:
    """sha256 hex digest of a resident training set: its name, shape, pixel bytes and labels.

    The name and shape go in first so that two sets with the same bytes but a
    different meaning never share a fingerprint.
    """
    import hashlib

    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype="<i8")
    h = hashlib.sha256()
    h.update(f"kdcache-tensor-set-v1\0{name}\0{images.shape}\0".encode())
    # ndarray.data is memoryview(array); numpy declares ndarray a Buffer only for Python >= 3.12
    h.update(images.data.cast("B"))
    h.update(labels.data.cast("B"))
    return h.hexdigest()
