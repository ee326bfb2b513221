"""``kdcache demo``: the whole pipeline on the built-in digits data."""

from __future__ import annotations

from pathlib import Path

import click

from kdcache.cli.common import device_option
from kdcache.pipelines.demo import FEATURES, format_table, run_demo


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("kdcache-demo"),
              help="Where the teachers, stores and runs go.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache for the teacher stores [default: OUT/cache].")
@click.option("--seeds", type=click.IntRange(min=1), default=1, help="Student seeds per method.")
@click.option("--epochs", type=click.IntRange(min=1), default=10,
              help="Student epochs (and stored views: one fresh view per epoch).")
@click.option("--features", type=click.Choice(["spatial", "pooled"]), default=FEATURES, show_default=True,
              help="Feature form of the stores: the teachers' last-block maps (the official CA-MKD) or their pooled "
                   "vectors (kdcache's compact form).")
@device_option
def demo(out: Path, cache: Path | None, seeds: int, epochs: int, features: str, device: str | None) -> None:
    """Train three digits teachers of different quality, cache them, and compare six methods on one student.

    A second run reuses the teachers, the stores and every finished run.
    """
    result = run_demo(out, cache, seeds, epochs, device, say=lambda m: click.echo(m, err=True), features=features)
    for line in format_table(result):
        click.echo(line)
    reused = ", ".join(f"{n} {k}" for k, n in result.reused.items() if n)
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    click.echo(f"runs in {out / 'runs'}, stores in {result.cache} ({timing}{'; reused ' + reused if reused else ''})")


COMMANDS = (demo,)
