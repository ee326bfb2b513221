"""The ``kdcache`` command: a click group whose commands parse, call a pipeline and print."""

from __future__ import annotations

from typing import Any

import click

from kdcache import __version__
from kdcache.errors import KdcacheError


class OneLineUsageError(click.ClickException):
    """A usage error (bad option, value or argument) as one line, keeping click's exit status 2."""

    exit_code = 2


class KdcacheGroup(click.Group):
    """Turns user errors into one line: the library's with exit status 1, click's usage errors with 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise OneLineUsageError(f"{exc.format_message()} (`{where} --help` lists the options)") from None


@click.group(cls=KdcacheGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="kdcache")
def main() -> None:
    """Run each teacher once, distil many students from its stored outputs.

    \b
    Typical use:
      kdcache train-teacher --arch resnet8 --dataset digits --out t.pth --epochs 30
      kdcache precompute --teacher resnet8 --checkpoint t.pth --dataset digits --views 20
      kdcache distill --student resnet8 --teachers ID --teachers ID --method camkd --out run
      kdcache cache ls
    """


def _register() -> None:
    from kdcache.cli import cache, demo, listing, recipe, report, student, teacher

    for command in (*demo.COMMANDS, *listing.COMMANDS, *teacher.COMMANDS, *student.COMMANDS, *report.COMMANDS,
                    *recipe.COMMANDS, cache.cache):
        main.add_command(command)


_register()
