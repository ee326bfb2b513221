"""``kdcache demo``: the whole pipeline on the built-in digits data."""

from __future__ import annotations

from pathlib import Path

import click

from kdcache.cli.common import EnumChoice, IntRange, cluster_choice, device_option, exit_if_failed, grid_cluster_options
from kdcache.store.form import FeatureForm

# The choices and default of --features, kept here so that importing the command imports no torch
# (tests/test_demo.py checks they match kdcache.pipelines.demo.FEATURES).
FEATURE_FORMS = [FeatureForm.SPATIAL, FeatureForm.POOLED]
FEATURES = FeatureForm.SPATIAL
SEEDS = 2


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("kdcache-demo"),
              help="Where the teachers, stores, runs and the table go.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache for the teacher stores [default: OUT/cache].")
@click.option("--seeds", type=IntRange(min=1), default=SEEDS, show_default=True,
              help="Student seeds per method (two or more give every method a mean ± std).")
@click.option("--epochs", type=IntRange(min=1), default=10,
              help="Student epochs (and stored views: one fresh view per epoch).")
@click.option("--features", type=EnumChoice(FEATURE_FORMS), default=FEATURES.value, show_default=True,
              help="Feature form of the stores: the teachers' last-block maps (the official CA-MKD) or their pooled "
                   "vectors (kdcache's compact form).")
@device_option
@grid_cluster_options
def demo(out: Path, cache: Path | None, seeds: int, epochs: int, features: FeatureForm, device: str | None,
         workers: int | None, scheduler: str | None, runs_per_device: int) -> None:
    """Train three digits teachers of different quality, cache them, and compare six methods on one student.

    A second run reuses the teachers, the stores and every finished run, and retries failed ones.
    """
    from kdcache.pipelines.demo import run_demo
    from kdcache.pipelines.grid import summary_line

    result = run_demo(out, cache, seeds, epochs, device, say=lambda m: click.echo(m, err=True), features=features,
                      cluster=cluster_choice(workers, scheduler, runs_per_device))
    click.echo(result.table, nl=False)
    click.echo(summary_line(result.grid, result.table_path))
    exit_if_failed(result.grid.n_failed, len(result.grid.spec.ran) * result.grid.spec.seeds)


COMMANDS = (demo,)
