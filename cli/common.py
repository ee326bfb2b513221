"""Options and helpers several commands share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click
from tqdm.auto import tqdm

cache_option = click.option(
    "--cache", type=str, default=None, metavar="DIR|URL",
    help="Cache of plans and teacher stores: a directory, or an fsspec URL (file://, s3://... with the "
         "file system's package installed) [default: $KDCACHE_HOME, else ~/.cache/kdcache].")
data_root_option = click.option(
    "--data-root", type=click.Path(path_type=Path), default=None,
    help="Where the data set lies on disk (not needed for digits). Nothing is ever downloaded.")
def _milestones(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return sorted(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("give epochs separated by commas, e.g. 150,180,210") from None


milestones_option = click.option(
    "--lr-milestones", callback=_milestones, default=None, metavar="E1,E2,...",
    help="Epochs at which the lr is divided by 10 [default: 150,180,210 scaled to --epochs].")
recipe_option = click.option(
    "--recipe", default=None, metavar="NAME[:SIZE]",
    help="View recipe: crop-flip (pad 4, crop, flip) or resized-crop-flip (RandomResizedCrop + flip), optionally "
         "with the view side, e.g. crop-flip:64 [default: the data set's; for imagefolder the CIFAR recipe at the "
         "images' side when all are one square side of at most 96 px, else resized-crop-flip at 224].")
image_size_option = click.option(
    "--image-size", type=click.IntRange(1, 1024), default=None, metavar="PX",
    help="Side of the square views (imagefolder data only) [default: the recipe's, see --recipe].")
device_option = click.option(
    "--device", default=None, metavar="DEVICE", help="cpu, cuda or cuda:N [default: cuda when available, else cpu].")


def row_progress(description: str) -> Callable[[int, int], Callable[[int], None]]:
    """A progress factory for row-counting work: a bar on a terminal, quiet in logs."""

    def start(total: int, done: int) -> Callable[[int], None]:
        bar = tqdm(total=total, initial=done, desc=description, unit="row", unit_scale=True,
                   disable=None, file=sys.stderr, dynamic_ncols=True)
        return bar.update

    return start

