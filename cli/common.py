"""Options and helpers several commands share."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from kdcache.text import duration

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
tensorboard_option = click.option(
    "--tensorboard", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
    help="Also write the per-epoch scalars (loss terms, test top-1/top-5, lr, teacher weights) as TensorBoard "
         "logs in DIR (needs the tensorboard extra: pip install 'kdcache[tensorboard]').")
device_option = click.option(
    "--device", default=None, metavar="DEVICE", help="cpu, cuda or cuda:N [default: cuda when available, else cpu].")


def grid_cluster_options(command: Callable[..., None]) -> Callable[..., None]:
    """--workers, --scheduler and --runs-per-device: where a grid's teachers, stores and runs are trained."""
    command = click.option(
        "--runs-per-device", type=click.IntRange(min=1), default=1, show_default=True,
        help="Student runs sharing one device on a local cluster: that many worker processes a GPU (on the CPU, "
             "the cores are divided among all runs). Implies --workers 1 when given alone.")(command)
    command = click.option(
        "--scheduler", default=None, metavar="ADDRESS",
        help="Run the grid on an existing dask cluster (e.g. tcp://host:8786); its workers must import kdcache and "
             "see the cache, the data and --out at the same paths.")(command)
    command = click.option(
        "--workers", type=click.IntRange(min=1), default=None, metavar="N",
        help="Run the grid on a local dask cluster of N devices: teachers, stores' chunks and every (row, seed) "
             "run as tasks side by side (one worker per GPU on a GPU machine, else N processes sharing the "
             "cores) [default: every run in this process, one after another].")(command)
    return command


def exit_if_failed(failed: int, total: int) -> None:
    """End a grid's command with status 1 and one line when any of its runs failed (the table is printed already)."""
    if failed:
        raise click.ClickException(f"{failed} of {total} run{'s' if total != 1 else ''} failed (the reasons are in the "
                                   "table); run the same command again to retry them")


def cluster_choice(workers: int | None, scheduler: str | None, runs_per_device: int) -> Any:
    """The :class:`~kdcache.pipelines.precompute_cluster.ClusterOptions` the options ask for; None: in this process."""
    if workers is None and scheduler is None and runs_per_device == 1:
        return None
    from kdcache.pipelines.precompute_cluster import ClusterOptions

    if workers is None and scheduler is None:
        workers = 1
    return ClusterOptions(workers, scheduler, runs_per_device)


# Seconds between progress lines when stderr is not a terminal (a log file, a batch job's output).
LOG_INTERVAL_S = 30.0


def row_progress(description: str, log_interval: float | None = None) -> Callable[..., Callable[[int], None]]:
    """A progress factory for long work: ``start(total, done, unit="row", what=description)`` returns the
    callback told each amount done. A tqdm bar on a terminal; elsewhere one line when the work starts, one
    at most every ``log_interval`` seconds ($KDCACHE_PROGRESS_INTERVAL, else 30) and one when it ends, so a
    log shows that a long precompute is alive."""

    def start(total: int, done: int, unit: str = "row", what: str | None = None) -> Callable[[int], None]:
        label = what or description
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=done, desc=label, unit=unit, unit_scale=True, file=sys.stderr,
                       dynamic_ncols=True)
            return bar.update
        interval = log_interval if log_interval is not None else float(
            os.environ.get("KDCACHE_PROGRESS_INTERVAL", LOG_INTERVAL_S))
        return LogProgress(label, total, done, unit, interval).update

    return start


class LogProgress:
    """Progress as plain lines on stderr: ``label: done of total units (p%), rate/s, about T left``."""

    def __init__(self, label: str, total: int, done: int, unit: str, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.done, self.unit, self.interval, self.clock = label, total, done, unit, interval, clock
        self.started = self.last = clock()
        self.first = done
        self._say()

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.done >= self.total or now - self.last >= self.interval:
            self.last = now
            self._say()

    def _say(self) -> None:
        elapsed = self.clock() - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = f", about {duration((self.total - self.done) / rate)} left" if 0 < rate and self.done < self.total else ""
        speed = f", {rate:,.0f} {self.unit}s/s" if rate > 0 else ""
        click.echo(f"{self.label}: {self.done:,} of {self.total:,} {self.unit}s ({pct:.0f}%){speed}{left}", err=True)

