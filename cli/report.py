"""``kdcache report``: figures of distill runs."""

from __future__ import annotations

from pathlib import Path

import click

from kdcache.errors import KdcacheError


@click.command("report")
@click.argument("runs", metavar="RUN...", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for accuracy.png and one weights-RUN.png per camkd/ebkd run.")
def report(runs: tuple[Path, ...], out: Path) -> None:
    """Plot the test accuracy of distill runs and the per-sample teacher weights of camkd/ebkd runs."""
    from kdcache.pipelines.report import report as write_report

    try:
        written = write_report(list(runs), out)
    except KdcacheError as exc:  # also one line when the command runs outside the kdcache group
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(str(path))


COMMANDS = (report,)
