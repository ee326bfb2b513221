"""``kdcache recipe list`` and ``kdcache recipe run``: the CA-MKD paper's settings, one command each."""

from __future__ import annotations

from pathlib import Path

import click

from kdcache.cli.common import cache_option, device_option, row_progress
from kdcache.pipelines.recipes import Recipe, custom_recipe, find_recipe, recipe_names, run_recipe


@click.group("recipe")
def recipe() -> None:
    """The CA-MKD paper's settings (Tables 1 and 3): teachers, stores, every method over seeds, the table."""


@recipe.command("list")
def list_cmd() -> None:
    """List the recipes: name, teachers → student, data set, the paper's table."""
    for name in recipe_names():
        r = find_recipe(name)
        click.echo(f"{name:<36} {r.title:<40} {r.dataset:<9} {r.table}")
    click.echo(f"{'custom':<36} {'--teacher A [--teacher B ...] --student S':<40} {'--dataset':<9} any")


@recipe.command("run")
@click.argument("name")
@click.option("--teacher", "teachers", multiple=True,
              help="With NAME custom: a teacher architecture, once per teacher (e.g. three times resnet32x4).")
@click.option("--student", default=None, help="With NAME custom: the student architecture.")
@click.option("--dataset", default=None, help="With NAME custom: the data set [default: cifar100].")
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="Where the data set lies on disk (e.g. the folder holding cifar-100-python/).")
@cache_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the teachers, the runs (<out>/<method>/seed<k>/) and table.md go.")
@click.option("--teachers-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Teacher checkpoints <arch>-<i>.pth: used when present, trained there otherwise "
                   "[default: OUT/teachers].")
@click.option("--seeds", type=int, default=None, help="Student seeds per method [default: the recipe's, 3].")
@click.option("--epochs", type=int, default=None, help="Student epochs [default: the recipe's, 240].")
@click.option("--views", type=int, default=None,
              help="Stored views [default: the recipe's 240, or --epochs when that is smaller].")
@click.option("--teacher-epochs", type=int, default=None,
              help="Epochs of the teachers trained here [default: the student epochs].")
@device_option
@click.option("--dry-run", is_flag=True,
              help="Print each store's shape and disk, and the teacher forward passes saved; write nothing.")
def run_cmd(name: str, teachers: tuple[str, ...], student: str | None, dataset: str | None, data_root: Path,
            cache: Path | None, out: Path, teachers_dir: Path | None, seeds: int | None, epochs: int | None,
            views: int | None, teacher_epochs: int | None, device: str | None, dry_run: bool) -> None:
    """Run recipe NAME end to end; a second run reuses teachers, stores and finished runs.

    NAME is one of `kdcache recipe list`, or `custom` with --teacher (repeated) and
    --student for any other setting. The table (also in OUT/table.md) is printed to standard output.
    """
    result = run_recipe(_recipe(name, teachers, student, dataset), data_root, cache, out, teachers_dir=teachers_dir, seeds=seeds,
                        epochs=epochs, views=views, device=device, dry_run=dry_run, teacher_epochs=teacher_epochs,
                        say=lambda msg: click.echo(msg, err=True),
                        precompute_progress=row_progress("precompute"))
    if dry_run:
        for line in result.lines:
            click.echo(line)
        return
    click.echo(result.table)
    reused = ", ".join(f"{n} {k}" for k, n in result.reused.items() if n)
    click.echo(f"table in {out / 'table.md'}{'; reused ' + reused if reused else ''}", err=True)


def _recipe(name: str, teachers: tuple[str, ...], student: str | None, dataset: str | None) -> Recipe:
    if name != "custom":
        if teachers or student or dataset:
            raise click.UsageError("--teacher, --student and --dataset go with NAME custom only")
        return find_recipe(name)
    if not teachers or not student:
        raise click.UsageError("recipe custom needs --teacher (once per teacher) and --student")
    return custom_recipe(teachers, student, dataset or "cifar100")


COMMANDS = (recipe,)
