"""Batched replay of plan views, the test-time view, and normalisation.

Replay is a pure function of (image, parameters): no RNG, and every operation
runs on the images' device, so a teacher and a student replaying the same plan
row get the same uint8 tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from functools import lru_cache

import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError
from kdcache.views.recipes import get_recipe

if TYPE_CHECKING:
    from types import ModuleType


def _tf() -> "ModuleType":
    """torchvision's v2 functional transforms, imported where a recipe resizes (torchvision's import costs a
    crop-flip run, CIFAR's or digits', about 2 s)."""
    from torchvision.transforms.v2 import functional

    module: ModuleType = functional  # torchvision has no type information: its names are Any
    return module

Images = torch.Tensor | list[torch.Tensor]

# The test-time view of resized-crop-flip: shorter side to 256, centre 224 (the same proportion at other sizes).
_EVAL_RESIZE = 256
_EVAL_CROP = 224


def replay(recipe: str, images: Images, params: torch.Tensor) -> torch.Tensor:
    """Replay the augmented views given by `params` (B, P) on `images`.

    `images` is a uint8 (B, 3, H, W) tensor or a list of uint8 (3, H_i, W_i)
    tensors; returns uint8 (B, 3, S, S) on the images' device. Bit-identical to
    torchvision's transforms applied with the same parameters.
    """
    rec = get_recipe(recipe)
    batch = _batch_size(images)
    if params.ndim != 2 or params.shape != (batch, rec.n_params):
        raise KdcacheError(
            f"recipe {rec.name!r} needs params of shape ({batch}, {rec.n_params}), got {tuple(params.shape)}"
        )
    if params.dtype.is_floating_point or params.dtype.is_complex or params.dtype == torch.bool:
        raise KdcacheError(f"replay params must be integers, got {params.dtype}")
    return _REPLAY[rec.name](images, params, rec.config)


def replays_on_device(recipe: str) -> bool:
    """Whether `recipe`'s replay reads its params on the images' device (crop-flip: one batched gather)
    rather than as host ints (resized-crop-flip: a resize per image, sized by Python ints).

    Callers keep the params where the replay reads them, so neither a host-to-device copy that
    waits nor a device-to-host copy (a host sync) happens per batch.
    """
    return get_recipe(recipe).name in _DEVICE_PARAMS


def eval_view(recipe: str, images: Images) -> torch.Tensor:
    """The deterministic test-time view matching `recipe`, uint8 (B, 3, S, S).

    crop-flip: the image itself (resized to S x S first where it is not);
    resized-crop-flip: shorter side resized to round(S * 256 / 224) (256 at S = 224;
    bilinear, antialiased), then the centre S x S.
    """
    rec = get_recipe(recipe)
    return _EVAL[rec.name](images, rec.config)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, per channel.

    Bit-identical to torchvision's ToTensor + Normalize on CPU
    (`x.float().div(255)`, then `sub(mean).div(std)`) on every device, so a
    teacher run on GPU and a student trained on CPU see the same floats.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise KdcacheError(f"normalize expects uint8 (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    n_channels = images.shape[1]
    if len(mean) != n_channels or len(std) != n_channels:
        raise KdcacheError(f"normalize needs {n_channels} means and stds, got {len(mean)} and {len(std)}")
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
    if images.device.type == "cpu":
        return images.float().div(255).sub(mean_t.view(-1, 1, 1)).div(std_t.view(-1, 1, 1))
    # CUDA divides by a scalar as a multiply by its reciprocal, which differs
    # from CPU in the last bit.
    return _normalize_by_table(images, tuple(mean_t.tolist()), tuple(std_t.tolist()))


def _normalize_by_table(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """normalize() on any device: look up the 256 values per channel, computed on CPU."""
    n_channels = images.shape[1]
    table = _normalize_table(mean, std, images.device)
    offsets = torch.arange(0, 256 * n_channels, 256, device=images.device).view(1, n_channels, 1, 1)
    return table[images.long() + offsets]


@lru_cache(maxsize=32)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(C * 256,) float32: entry c * 256 + x is the CPU-normalised value x of channel c."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, len(mean), 1, 256)
    # non_blocking: a copy from pageable host memory is staged before it returns, and nothing waits for it
    return normalize(values.contiguous(), mean, std).reshape(-1).to(device, non_blocking=True)


def _batch_size(images: Images) -> int:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise KdcacheError(f"expected uint8 (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        return images.shape[0]
    for img in images:
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3:
            raise KdcacheError("expected a list of uint8 (C, H, W) image tensors")
    return len(images)


def _stacked(images: Images, size: int, recipe: str) -> torch.Tensor:
    """The batch as one (B, C, size, size) tensor; crop-flip works on S x S images.

    Decoded files (a list) of another size are first resized to S x S (bilinear,
    antialiased: torchvision's ``Resize([S, S])``), so crop-flip serves image folders
    of any size; a resident batch must already be S x S.
    """
    if isinstance(images, list):
        images = [img if tuple(img.shape[-2:]) == (size, size) else _tf().resize(img, [size, size], antialias=True)
                  for img in images]
    batch = torch.stack(images) if isinstance(images, list) else images
    if batch.dtype != torch.uint8 or batch.ndim != 4 or tuple(batch.shape[2:]) != (size, size):
        raise KdcacheError(
            f"recipe {recipe!r} expects uint8 images of {size}x{size}, got {batch.dtype} {tuple(batch.shape)}"
        )
    return batch


def _replay_crop_flip(images: Images, params: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    size, pad = config["size"], config["pad"]
    if isinstance(images, list) and not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=params.device)
    x = _stacked(images, size, "crop-flip")
    batch, channels = x.shape[:2]
    device = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    top, left, flip = params.to(device=device, dtype=torch.long, non_blocking=True).unbind(1)
    ar = torch.arange(size, device=device)
    rows = top[:, None] + ar
    # The flip is folded into the column indices: read the crop right to left.
    cols = torch.where(flip[:, None] != 0, left[:, None] + (size - 1) - ar, left[:, None] + ar)
    picked_rows = padded.gather(2, rows.view(batch, 1, size, 1).expand(batch, channels, size, padded.shape[3]))
    return picked_rows.gather(3, cols.view(batch, 1, 1, size).expand(batch, channels, size, size))


def _replay_resized_crop_flip(images: Images, params: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    size = config["size"]
    if len(images) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=params.device)
    boxes = params.tolist()  # one host sync for the batch: the crop calls need Python ints
    crops = []
    for img, (i, j, h, w, _) in zip(images, boxes):
        height, width = img.shape[-2:]
        if not (h >= 1 and w >= 1 and 0 <= i and 0 <= j and i + h <= height and j + w <= width):
            raise KdcacheError(f"crop box (i={i}, j={j}, h={h}, w={w}) does not fit a {height}x{width} image")
        crops.append(_tf().resized_crop(img, i, j, h, w, size=[size, size], antialias=True))
    out = torch.stack(crops)
    flip = params[:, 4].to(out.device, non_blocking=True) != 0
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)


def _eval_crop_flip(images: Images, config: dict[str, Any]) -> torch.Tensor:
    size = config["size"]
    if isinstance(images, list) and not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    _batch_size(images)
    return _stacked(images, size, "crop-flip")


def _eval_resized_crop_flip(images: Images, config: dict[str, Any]) -> torch.Tensor:
    size = config["size"]
    if _batch_size(images) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    shorter = round(size * _EVAL_RESIZE / _EVAL_CROP)
    return torch.stack([
        _tf().center_crop(_tf().resize(img, [shorter], antialias=True), [size, size]) for img in images
    ])


_REPLAY: dict[str, Callable[[Images, torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "crop-flip": _replay_crop_flip,
    "resized-crop-flip": _replay_resized_crop_flip,
}
# The recipes whose replay reads its params on the images' device (see replays_on_device).
_DEVICE_PARAMS = frozenset({"crop-flip"})
_EVAL: dict[str, Callable[[Images, dict[str, Any]], torch.Tensor]] = {
    "crop-flip": _eval_crop_flip,
    "resized-crop-flip": _eval_resized_crop_flip,
}
