"""``kdcache models`` and ``kdcache datasets``: what is registered."""

from __future__ import annotations

import click


@click.command("models")
def models() -> None:
    """List the architectures of the model zoo (plug-ins' included)."""
    from kdcache.models import model_info, model_names

    for name in model_names():
        info = model_info(name)
        click.echo(f"{name:<20} {info.family:<9} {info.input_size:>3}px  {info.description}")


@click.command("datasets")
def datasets() -> None:
    """List the data sets kdcache can read (plug-ins' included)."""
    from kdcache.data import dataset_description, dataset_names

    for name in dataset_names():
        click.echo(f"{name:<13} {dataset_description(name)}")


COMMANDS = (models, datasets)
