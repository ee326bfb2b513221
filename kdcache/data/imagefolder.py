"""ImageFolder-style data sets: ROOT/train/<class>/*, ROOT/val/<class>/*.

This fits Tiny-ImageNet (once its val images are sorted into class folders) and
Stanford Dogs. Samples are listed with torchvision's own `find_classes` and
`make_dataset`, so class order (sorted folder names) and accepted extensions
are exactly torchvision.datasets.ImageFolder's. Images stay on disk and are
decoded on demand (FileSource).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


from kdcache.data.base import DataSet, FileSource, read_image_size
from kdcache.errors import DatasetError
from kdcache.views import Recipe, get_recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Image folders whose images are all square and at most this side (Tiny-ImageNet: 64 px) are viewed by
# default with the CIFAR recipe (pad 4, crop, flip) at their own size, as the paper trains Tiny-ImageNet;
# larger or varied images with RandomResizedCrop(224) + flip.
SMALL_SIDE = 96
_SIZE_PROBES = 32  # image headers read, evenly spaced over the training list, to choose that default


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _list_split(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    try:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # torchvision's import costs 2 s

        samples: list[tuple[str, int]] = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        return samples
    except FileNotFoundError as exc:
        raise DatasetError(f"{folder}: {str(exc).strip()}; every class folder needs at least one image") from exc


def _fingerprint(train_dir: Path, samples: list[tuple[str, int]]) -> str:
    """sha256 over sorted (path relative to train/, file size, label).

    Cheap on 100k files (a stat each, no reads); it catches added, removed,
    renamed, relabelled and resized files, but not an edit that keeps a file's
    byte size.
    """
    rows = []
    for path, label in samples:
        rel = Path(path).relative_to(train_dir).as_posix()
        rows.append((rel, os.stat(path).st_size, label))
    h = hashlib.sha256(b"kdcache-imagefolder-v1\n")
    for rel, size, label in sorted(rows):
        h.update(f"{rel}\0{size}\0{label}\n".encode())
    return h.hexdigest()


def load_imagefolder(root: str | os.PathLike[str] | None) -> DataSet:
    """List ROOT/train and ROOT/val (same class folders in both) as file-backed sources."""
    if root is None:
        raise DatasetError(
            "data set imagefolder needs --data-root: a folder with train/<class>/<image> and val/<class>/<image>"
        )
    # absolute, so the listed paths survive a change of working directory
    root = Path(os.path.abspath(Path(root).expanduser()))
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DatasetError(
                f"ImageFolder data not found: expected folder {d} with one sub-folder of images per class "
                f"(train/ and val/ alike); kdcache never downloads: put the images under {root}"
            )
    from torchvision.datasets.folder import find_classes  # imported here: torchvision's import costs 2 s

    try:
        classes, class_to_idx = find_classes(str(train_dir))
        val_classes, _ = find_classes(str(val_dir))
    except FileNotFoundError as exc:
        raise DatasetError(f"{str(exc).strip()} ImageFolder expects <split>/<class>/<image> under {root}") from exc
    if val_classes != classes:
        missing = sorted(set(classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(classes))
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has extra {_names(extra)}"] if extra else [])
        raise DatasetError(
            f"class folders of {val_dir} differ from {train_dir}: it {' and '.join(parts)}; lay val/ out like train/, "
            "one folder per class (Tiny-ImageNet's val/images + val_annotations.txt must be sorted into class folders)"
        )
    train_samples = _list_split(train_dir, class_to_idx)
    val_samples = _list_split(val_dir, class_to_idx)

    def source(samples: list[tuple[str, int]]) -> FileSource:
        return FileSource([p for p, _ in samples], [c for _, c in samples])

    recipe = default_recipe([p for p, _ in train_samples])
    return DataSet(
        name="imagefolder",
        num_classes=len(classes),
        classes=list(classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        recipe=recipe.spec,
        image_size=recipe.size,
        train=source(train_samples),
        test=source(val_samples),
        fingerprint=_fingerprint(train_dir, train_samples),
    )


def default_recipe(paths: list[str]) -> Recipe:
    """crop-flip at the images' side when every probed image is one square side of at most SMALL_SIDE pixels;
    resized-crop-flip at 224 otherwise."""
    step = max(1, len(paths) // _SIZE_PROBES)
    sides = {read_image_size(p) for p in paths[::step][:_SIZE_PROBES]}
    if len(sides) == 1:
        (h, w), = sides
        if h == w <= SMALL_SIDE:
            return get_recipe("crop-flip", h)
    return get_recipe("resized-crop-flip")


def describe() -> str:
    """One line for `kdcache datasets`."""
    return (
        "ROOT/train/<class>/* and ROOT/val/<class>/* images (Tiny-ImageNet, Stanford Dogs); viewed with the CIFAR "
        f"recipe at their own size when all are one square side <= {SMALL_SIDE} px, else RandomResizedCrop(224); "
        "--recipe and --image-size choose; needs --data-root"
    )
