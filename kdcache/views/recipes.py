"""Augmentation recipes and the drawing of view plans.

A recipe names a training-time augmentation whose randomness is reduced to a
few integers per image (the replay parameters). A view plan draws those
integers once, from a seed, for every view and every training sample, so that
teachers and students replay exactly the same augmented images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kdcache.errors import KdcacheError, UnknownNameError


@dataclass(frozen=True)
class Recipe:
    """An augmentation recipe: its name, how many replay parameters it has per
    image, its settings (stored in the plan's attrs and hashed into the plan id)
    and whether drawing a plan needs each image's (height, width)."""

    name: str
    n_params: int
    config: dict[str, Any]
    needs_sizes: bool

    @property
    def description(self) -> dict[str, Any]:
        """Name and settings together, as the plan stores them and its id hashes them."""
        return {"name": self.name, **self.config}

    @property
    def size(self) -> int:
        """The side of a replayed view."""
        return int(self.config["size"])

    @property
    def spec(self) -> str:
        """The name, or ``name:size`` when the view side is not the recipe's registered default
        (``crop-flip:64``): what commands and plans pass around to name a recipe."""
        default = _RECIPES[self.name].config["size"]
        return self.name if self.size == default else f"{self.name}:{self.size}"


_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip():
        # params (top, left, flip), top/left in padded coordinates.
        Recipe("crop-flip", 3, {"pad": 4, "size": 32}, needs_sizes=False),
        # torchvision RandomResizedCrop(224) + RandomHorizontalFlip():
        # params (i, j, h, w, flip), the box in the original image.
        Recipe(
            "resized-crop-flip",
            5,
            {"size": 224, "scale": [0.08, 1.0], "ratio": [0.75, 4.0 / 3.0]},
            needs_sizes=True,
        ),
    )
}

# int16 is the stored parameter type; image sides must fit in it.
_INT16_MAX = int(np.iinfo(np.int16).max)


def recipe_names() -> list[str]:
    """The names of all registered recipes, sorted."""
    return sorted(_RECIPES)


# Smallest and largest view side a recipe may be given.
MIN_SIZE, MAX_SIZE = 1, 1024


def get_recipe(name: str, size: int | None = None) -> Recipe:
    """The recipe called `name`, a spec ``name:size`` or ``name`` with ``size``: its views are ``size`` pixels
    square (default: the registered size, 32 for crop-flip, 224 for resized-crop-flip). A copy: its config may
    be mutated freely.

    Raises UnknownNameError listing the known names, so a typo on the command
    line is one clear line, and KdcacheError for a size out of range.
    """
    base, _, given = str(name).partition(":") if isinstance(name, str) else (name, "", "")
    try:
        recipe = _RECIPES[base]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown augmentation recipe {name!r}; known recipes: {', '.join(recipe_names())}"
        ) from None
    config = copy.deepcopy(recipe.config)
    if given:
        if not given.isdigit():
            raise KdcacheError(f"recipe {name!r}: the size after ':' must be a whole number of pixels")
        if size is not None and int(given) != size:
            raise KdcacheError(f"recipe {name!r} and image size {size} disagree")
        size = int(given)
    if size is not None:
        if isinstance(size, bool) or not MIN_SIZE <= int(size) <= MAX_SIZE:
            raise KdcacheError(f"image size must lie in {MIN_SIZE}..{MAX_SIZE} pixels, got {size!r}")
        config["size"] = int(size)
    return Recipe(recipe.name, recipe.n_params, config, recipe.needs_sizes)


def recipe_spec(description: dict[str, Any]) -> str:
    """The spec (``name`` or ``name:size``) of a recipe description as a plan stores it; a description
    without a size (plans written before sizes were recorded) means the recipe's registered size."""
    size = description.get("size")
    return get_recipe(str(description["name"]), None if size is None else int(size)).spec


def draw_plan(
    recipe: str,
    n_views: int,
    n_samples: int,
    seed: int,
    sizes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a view plan: `order` (V, N) int32 and `params` (V, N, P) int16.

    Row `r` of view `v` shows sample `order[v, r]` with replay parameters
    `params[v, r]`. The result is a pure function of the arguments: view `v`
    is drawn from its own PCG64 stream, spawned from `seed` with key `(v,)`, so
    it does not depend on how many views are drawn (a plan with fewer views is
    a prefix of one with more). `sizes` is the (N, 2) array of (height, width)
    per sample, required by recipes with `needs_sizes`.
    """
    rec = get_recipe(recipe)
    n_views = _positive_int(n_views, "number of views")
    draw = view_drawer(rec.spec, n_samples, seed, sizes)
    order = np.empty((n_views, n_samples), dtype=np.int32)
    params = np.empty((n_views, n_samples, rec.n_params), dtype=np.int16)
    for v in range(n_views):
        order[v], params[v] = draw(v)
    return order, params


def view_drawer(recipe: str, n_samples: int, seed: int,
                sizes: np.ndarray | None = None) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """``draw(v)``: view ``v`` of the plan :func:`draw_plan` draws from these arguments, `order` (N,) int32
    and `params` (N, P) int16, equal to that plan's row ``v`` and in memory for one view only (a plan of
    100,000 views is written view by view). The arguments are checked once, here, not at every view."""
    rec = get_recipe(recipe)
    n_samples = _positive_int(n_samples, "number of samples")
    seed = _plan_seed(seed)
    if rec.needs_sizes:
        sizes = _check_sizes(sizes, n_samples, rec.name)

    def draw(view: int) -> tuple[np.ndarray, np.ndarray]:
        # SeedSequence(seed).spawn(V)[v] is the child with spawn key (v,): built directly, it needs no V-long list.
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(int(view),))))
        order = rng.permutation(n_samples).astype(np.int32, copy=False)
        if rec.name == "crop-flip":
            return order, _draw_crop_flip(rng, n_samples, rec.config)
        assert sizes is not None  # checked above: every recipe but crop-flip needs the sizes
        return order, _draw_resized_crop_flip(rng, sizes[order], rec.config)

    return draw


def draw_view(recipe: str, view: int, n_samples: int, seed: int,
              sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """View ``view`` alone of the plan :func:`draw_plan` draws (see :func:`view_drawer`, which serves many)."""
    return view_drawer(recipe, n_samples, seed, sizes)(view)


def _plan_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise KdcacheError(f"plan seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise KdcacheError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_sizes(sizes: np.ndarray | None, n_samples: int, recipe: str) -> np.ndarray:
    if sizes is None:
        raise KdcacheError(f"recipe {recipe!r} needs the (height, width) of every image to draw a plan")
    sizes = np.asarray(sizes)
    if sizes.shape != (n_samples, 2) or not np.issubdtype(sizes.dtype, np.integer):
        raise KdcacheError(
            f"image sizes must be an integer array of shape ({n_samples}, 2), "
            f"got {sizes.dtype} {sizes.shape}"
        )
    if sizes.min() < 1 or sizes.max() > _INT16_MAX:
        raise KdcacheError(f"image sides must lie in 1..{_INT16_MAX}, got {sizes.min()}..{sizes.max()}")
    return sizes.astype(np.int64)


def _draw_crop_flip(rng: np.random.Generator, n: int, config: dict[str, Any]) -> np.ndarray:
    """(n, 3) int16: top and left uniform in 0..2*pad, flip with p=0.5."""
    out = np.empty((n, 3), dtype=np.int16)
    out[:, :2] = rng.integers(0, 2 * config["pad"] + 1, size=(n, 2), dtype=np.int16)
    out[:, 2] = rng.integers(0, 2, size=n, dtype=np.int16)
    return out


def _draw_resized_crop_flip(rng: np.random.Generator, sizes: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """(n, 5) int16 (i, j, h, w, flip) for images of the given (n, 2) sizes.

    torchvision's RandomResizedCrop.get_params, vectorised: up to 10 attempts
    of a uniform area fraction and a log-uniform aspect ratio, the first box
    that fits wins; images with no fitting box fall back to the central crop
    clamped to the ratio range. Later attempts are drawn only for the images
    still without a box.
    """
    n = len(sizes)
    height, width = sizes[:, 0], sizes[:, 1]
    area = (height * width).astype(np.float64)
    s_lo, s_hi = config["scale"]
    r_lo, r_hi = config["ratio"]
    log_r_lo, log_r_hi = np.log(r_lo), np.log(r_hi)

    h = np.zeros(n, dtype=np.int64)
    w = np.zeros(n, dtype=np.int64)
    pending = np.arange(n)
    for _ in range(10):
        if pending.size == 0:
            break
        target_area = area[pending] * rng.uniform(s_lo, s_hi, size=pending.size)
        aspect = np.exp(rng.uniform(log_r_lo, log_r_hi, size=pending.size))
        # np.rint rounds half to even, like Python's round() in torchvision.
        w_try = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
        h_try = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
        fits = (w_try > 0) & (w_try <= width[pending]) & (h_try > 0) & (h_try <= height[pending])
        h[pending[fits]] = h_try[fits]
        w[pending[fits]] = w_try[fits]
        pending = pending[~fits]

    fallback = np.zeros(n, dtype=bool)
    fallback[pending] = True
    if pending.size:
        ph, pw = height[pending], width[pending]
        in_ratio = pw / ph
        too_tall = in_ratio < min(r_lo, r_hi)
        too_wide = in_ratio > max(r_lo, r_hi)
        fh = np.where(too_tall, np.rint(pw / min(r_lo, r_hi)).astype(np.int64), ph)
        fw = np.where(too_wide, np.rint(ph * max(r_lo, r_hi)).astype(np.int64), pw)
        h[pending], w[pending] = fh, fw

    # One uniform draw per image places the box (unused for fallbacks, which
    # are centred); drawing for all keeps the stream simple.
    i = rng.integers(0, height - h + 1)
    j = rng.integers(0, width - w + 1)
    i[fallback] = (height[fallback] - h[fallback]) // 2
    j[fallback] = (width[fallback] - w[fallback]) // 2
    flip = rng.integers(0, 2, size=n)
    return np.stack([i, j, h, w, flip], axis=1).astype(np.int16)
