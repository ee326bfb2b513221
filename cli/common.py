"""Options and helpers several commands share."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from kdcache.defaults import AMP_DTYPES, TEMPERATURE
from kdcache.store.form import (MAX_TEMPERATURE, MIN_TEMPERATURE, FeatureDtype, FeatureForm, FormError, Forward, StoreForm,
                                parse_logits, temperature_problem)
from kdcache.text import duration


class EnumChoice(click.Choice[str]):
    """One of an Enum's members, given by its value (``--features spatial``): the option's value is the member,
    parsed once here."""

    def __init__(self, members: Sequence[Enum]) -> None:
        super().__init__([str(m.value) for m in members])
        self.members = {str(m.value): m for m in members}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Enum):
            return value
        return self.members[str(super().convert(value, param, ctx))]


class LogitsType(click.ParamType[str]):
    """``--logits``: ``dense`` or ``topk:K``, checked as it is parsed (one line, status 1, as every refused form)."""

    name = "dense|topk:K"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            parse_logits(str(value))
        except FormError as exc:
            raise click.ClickException(f"--logits: {exc}") from None
        return str(value)


# Chunk blocks distill reads ahead (each held in memory with the K teachers' rows), and threads one pool may start:
# beyond these a value only costs memory (and, for threads, may fail to start at all).
MAX_PREFETCH = 64
MAX_THREADS = 1024


class TemperatureType(click.ParamType[float]):
    """A KD temperature (``--logits-temperature``, distill's ``--temperature``): a number in
    [MIN_TEMPERATURE, MAX_TEMPERATURE] (:func:`kdcache.store.form.temperature_problem` says why), refused as it is
    parsed with one line naming the option (status 1, as every refused form)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        flag = param.opts[0] if param is not None and getattr(param, "opts", None) else "the temperature"
        try:
            t = float(value)
        except (TypeError, ValueError):
            raise click.ClickException(f"{flag} takes a number (got {value!r})") from None
        problem = temperature_problem(t)
        if problem is not None:
            raise click.ClickException(f"{flag} {problem}")
        return t


class IntRange(click.IntRange):
    """click's IntRange, whose refusal of what is not a number says "is not a valid integer" and whose help shows
    INTEGER (click's own say "integer range", as if a range were asked for)."""

    name = "integer"


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange that also refuses nan (which compares false with either bound, so FloatRange lets it
    through), and says "float" where click's says "float range"."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not in the range {self._describe_range()}.", param, ctx)
        return rv


def store_form_options(command: Callable[..., None]) -> Callable[..., None]:
    """--features, --feature-dtype, --logits, --logits-temperature, --amp and --amp-dtype, given to the command as
    one ``form`` (a :class:`~kdcache.store.form.StoreForm`), or one line of error (status 1) for a form no store can
    have."""
    @functools.wraps(command)  # keeps the options given below this decorator (click's __click_params__)
    def with_form(*args: Any, features: FeatureForm, feature_dtype: FeatureDtype, logits: str,
                  logits_temperature: float, amp: bool, amp_dtype: str | None, **kwargs: Any) -> None:
        if amp_dtype is not None and not amp:
            raise click.ClickException(f"--amp-dtype {amp_dtype} needs --amp: give --amp too, or drop --amp-dtype")
        try:
            form = StoreForm(logits, features, feature_dtype,
                             Forward.autocast(amp_dtype) if amp else Forward.FLOAT32,
                             None if parse_logits(logits) is None else logits_temperature)
        except FormError as exc:  # int8 without features: the one refusal the options' own types let through
            raise click.ClickException(
                f"--feature-dtype {feature_dtype.value} needs features to store: give --features pooled or spatial, "
                "or drop --feature-dtype" if exc.option == "feature_dtype" else str(exc)) from None
        command(*args, form=form, **kwargs)

    options = [
        click.option("--features", type=EnumChoice(list(FeatureForm)), default=FeatureForm.POOLED.value,
                     show_default=True,
                     help="What to store besides the logits: pooled, the penultimate vector (D values a row); spatial, "
                          "the last-block map the official CA-MKD code matches (C'xHxW a row, e.g. 46x the bytes for "
                          "resnet32x4); none, logits only (ce, kd, aver, ebkd, aekd). The form is part of the "
                          "teacher id."),
        click.option("--feature-dtype", type=EnumChoice(list(FeatureDtype)), default=FeatureDtype.FLOAT16.value,
                     show_default=True,
                     help="How features are stored: float16, or int8 with a float32 scale a row (about half the "
                          "bytes; each value within half a scale step of its float16). Part of the teacher id."),
        click.option("--logits", "logits", type=LogitsType(), default="dense", show_default=True, metavar="dense|topk:K",
                     help="Which logits to store: every class's (dense), or the K largest with their classes and five "
                          "scalars that keep the teachers' cross-entropy and entropy exact (topk:K, e.g. topk:10 for "
                          "1000 classes: 60 B a row instead of 2,000). Part of the teacher id."),
        click.option("--logits-temperature", type=TemperatureType(), default=TEMPERATURE, show_default=True,
                     help="The KD temperature a top-K store serves: distill's --temperature must equal it. Dense "
                          f"stores serve every temperature. From {MIN_TEMPERATURE:.3g} to {MAX_TEMPERATURE:.3g} "
                          "(T² and the stored scalars stay finite float32)."),
        click.option("--amp", is_flag=True,
                     help="Run the teachers under autocast (mixed precision), for GPUs with tensor cores. bfloat16 on "
                          "a CPU: stored logits off float32's by about 0.5% of their magnitude on average, at most "
                          "1.4% of the largest (benchmarks/RESULTS.md, \"AMP for precompute\"). Part of the teacher "
                          "id; the test accuracy is measured the same way."),
        click.option("--amp-dtype", type=click.Choice(AMP_DTYPES), default=None,
                     help="The autocast dtype of --amp [default: float16 on CUDA, as distill's --amp; bfloat16 on "
                          "CPU, where autocast is usually slower than float32]. bfloat16 keeps float32's range where "
                          "float16 could overflow."),
    ]
    for option in reversed(options):
        with_form = option(with_form)
    return with_form


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
        epochs = sorted(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("give epochs separated by commas, e.g. 150,180,210") from None
    if epochs and epochs[0] < 1:  # epochs count from 1: an lr decay at epoch 0 or before would never happen
        raise click.BadParameter(f"epochs count from 1, got {epochs[0]} in {value!r}")
    return epochs


milestones_option = click.option(
    "--lr-milestones", callback=_milestones, default=None, metavar="E1,E2,...",
    help="Epochs at which the lr is divided by 10 [default: 150,180,210 scaled to --epochs].")
recipe_option = click.option(
    "--recipe", default=None, metavar="NAME[:SIZE]",
    help="View recipe: crop-flip (pad 4, crop, flip) or resized-crop-flip (RandomResizedCrop + flip), optionally "
         "with the view side, e.g. crop-flip:64 [default: the data set's; for imagefolder the CIFAR recipe at the "
         "images' side when all are one square side of at most 96 px, else resized-crop-flip at 224].")
image_size_option = click.option(
    "--image-size", type=IntRange(1, 1024), default=None, metavar="PX",
    help="Side of the square views (imagefolder data only) [default: the recipe's, see --recipe].")
tensorboard_option = click.option(
    "--tensorboard", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
    help="Also write the per-epoch scalars (loss terms, test top-1/top-5, lr, teacher weights) as TensorBoard "
         "logs in DIR (needs the tensorboard extra: pip install 'kdcache[tensorboard]').")
eval_every_option = click.option(
    "--eval-every", type=IntRange(1), default=1, show_default=True, metavar="N",
    help="Evaluate the test split after every N-th epoch and after the last (the others record no test "
         "accuracy; the weights are the same either way, and it may change on --resume).")
device_option = click.option(
    "--device", default=None, metavar="DEVICE", help="cpu, cuda or cuda:N [default: cuda when available, else cpu].")


def grid_cluster_options(command: Callable[..., None]) -> Callable[..., None]:
    """--workers, --scheduler and --runs-per-device: where a grid's teachers, stores and runs are trained."""
    command = click.option(
        "--runs-per-device", type=IntRange(min=1), default=1, show_default=True,
        help="Student runs sharing one device on a local cluster: that many worker processes a GPU (on the CPU, "
             "the cores are divided among all runs). Implies --workers 1 when given alone.")(command)
    command = click.option(
        "--scheduler", default=None, metavar="ADDRESS",
        help="Run the grid on an existing dask cluster (e.g. tcp://host:8786); its workers must import kdcache and "
             "see the cache, the data and --out at the same paths.")(command)
    command = click.option(
        "--workers", type=IntRange(min=1), default=None, metavar="N",
        help="Run the grid on a local dask cluster of N devices: teachers, stores' chunks and every (row, seed) "
             "run as tasks side by side (one worker per GPU on a GPU machine, else N processes sharing the "
             "cores) [default: every run in this process, one after another].")(command)
    return command


def best_text(best_top1: float | None) -> str:
    """A finished run's best test top-1 as its last progress line says it."""
    return "no epoch evaluated" if best_top1 is None else f"best test top-1 {best_top1:.2f}%"


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
            update: Callable[[int], None] = bar.update  # tqdm has no type information
            return update
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

