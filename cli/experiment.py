"""``kdcache experiment list`` and ``kdcache experiment run``: the CA-MKD paper's settings, one command each."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from kdcache.cli.common import (EnumChoice, cache_option, cluster_choice, device_option, exit_if_failed,
                                grid_cluster_options, row_progress)
from kdcache.store.form import FeatureForm

if TYPE_CHECKING:
    from kdcache.pipelines.experiment_spec import Experiment

# The choices of --setup and --features, kept here so that importing the command imports no torch
# (tests/test_grid.py checks they match kdcache.pipelines.grid.SETUPS and the store's forms).
SETUP_NAMES = ["official", "paper", "cs-kd"]
FEATURE_FORMS = [FeatureForm.SPATIAL, FeatureForm.POOLED]


@click.group("experiment")
def experiment() -> None:
    """The CA-MKD paper's settings (Tables 1-4, Figure 4, the appendix): teachers, stores, every row over seeds,
    the table beside the paper's figures."""


@experiment.command("list")
def list_cmd() -> None:
    """List the experiments grouped by the paper's table: name, teachers → student, data, rows."""
    from kdcache.pipelines.experiment_spec import rows_summary
    from kdcache.pipelines.experiments import experiment_names, find_experiment
    from kdcache.pipelines.paper_settings import TABLES

    groups: dict[str, list[Experiment]] = {}
    for name in experiment_names():
        e = find_experiment(name)
        groups.setdefault(e.table, []).append(e)
    for table, experiments in groups.items():
        click.echo(f"{table}: {TABLES.get(table, '')}")
        for e in experiments:
            click.echo(f"  {e.name:<46} {e.title:<42} {e.data_label:<14} {rows_summary(e.variants)}")
    click.echo("custom: any other setting")
    click.echo(f"  {'custom':<46} {'--teacher A [--teacher B ...] --student S':<42} {'--dataset':<14} "
               "Table 1's rows")


@experiment.command("run")
@click.argument("name")
@click.option("--teacher", "teachers", multiple=True,
              help="With NAME custom: a teacher architecture, once per teacher (e.g. three times resnet32x4).")
@click.option("--student", default=None, help="With NAME custom: the student architecture.")
@click.option("--dataset", default=None, help="With NAME custom: the data set [default: cifar100].")
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="Where the data set lies on disk (e.g. the folder holding cifar-100-python/).")
@cache_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the teachers, the runs (<out>/<row>/seed<k>/), table.md and experiment.json go.")
@click.option("--teachers-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Teacher checkpoints <arch>-<i>.pth (<data>/<arch>-<i>.pth off CIFAR-100): used when present, "
                   "trained there otherwise [default: OUT/teachers].")
@click.option("--features", type=EnumChoice(FEATURE_FORMS), default=None,
              help="Feature form of the stores: spatial (the official code's last-block map, the paper's numbers) "
                   "or pooled (about 46x less disk; beta does not carry over) [default: the experiment's, spatial].")
@click.option("--setup", type=click.Choice(SETUP_NAMES), default=None,
              help="Training set-up: official (the scripts: lr 0.05/0.01, wd 5e-4), paper (its text: lr 0.1/0.05, "
                   "wd 1e-4) or cs-kd [default: the experiment's].")
@click.option("--seeds", type=int, default=None, help="Student seeds per row [default: the experiment's, 3].")
@click.option("--epochs", type=int, default=None, help="Student epochs [default: the set-up's, 240 or 200].")
@click.option("--views", type=int, default=None,
              help="Stored views [default: one per epoch, or --epochs when that is smaller].")
@click.option("--teacher-epochs", type=int, default=None,
              help="Epochs of the teachers trained here [default: the student epochs].")
@device_option
@grid_cluster_options
@click.option("--dry-run", is_flag=True,
              help="Print each store's shape and disk in both forms, and the teacher forward passes saved; "
                   "write nothing.")
def run_cmd(name: str, teachers: tuple[str, ...], student: str | None, dataset: str | None, data_root: Path,
            cache: Path | None, out: Path, teachers_dir: Path | None, features: FeatureForm | None,
            setup: str | None,
            seeds: int | None, epochs: int | None, views: int | None, teacher_epochs: int | None,
            device: str | None, workers: int | None, scheduler: str | None, runs_per_device: int,
            dry_run: bool) -> None:
    """Run experiment NAME end to end; a second run reuses teachers, stores and finished runs, resumes started
    ones and retries failed ones.

    NAME is one of `kdcache experiment list`, or `custom` with --teacher (repeated) and
    --student for any other setting. The table (also in OUT/table.md, rewritten as each run ends) is printed to
    standard output. A run that fails is reported there with its reason and the others go on; the command then
    exits with status 1.
    """
    from kdcache.pipelines.experiments import run_experiment
    from kdcache.pipelines.grid import summary_line

    result = run_experiment(_experiment(name, teachers, student, dataset), data_root, cache, out,
                            teachers_dir=teachers_dir, seeds=seeds, epochs=epochs, views=views, device=device,
                            dry_run=dry_run, teacher_epochs=teacher_epochs, features=features, setup=setup,
                            say=lambda msg: click.echo(msg, err=True),
                            precompute_progress=row_progress("precompute"),
                            cluster=cluster_choice(workers, scheduler, runs_per_device))
    if result.grid is None:
        for line in result.lines:
            click.echo(line)
        return
    click.echo(result.table, nl=False)
    click.echo(summary_line(result.grid, out / "table.md"), err=True)
    exit_if_failed(result.grid.n_failed, len(result.grid.spec.ran) * result.grid.spec.seeds)


def _experiment(name: str, teachers: tuple[str, ...], student: str | None, dataset: str | None) -> Experiment:
    from kdcache.pipelines.experiments import custom_experiment, find_experiment

    if name != "custom":
        if teachers or student or dataset:
            raise click.UsageError("--teacher, --student and --dataset go with NAME custom only")
        return find_experiment(name)
    if not teachers or not student:
        raise click.UsageError("experiment custom needs --teacher (once per teacher) and --student")
    return custom_experiment(teachers, student, dataset or "cifar100")


COMMANDS = (experiment,)
