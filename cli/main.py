"""The ``kdcache`` command: a click group whose commands parse, call a pipeline and print."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from typing import Any

import click

from kdcache import __version__
from kdcache.errors import KdcacheError
from kdcache.registry import PluginWarning, plugin_failure


class OneLineUsageError(click.ClickException):
    """A usage error (bad option, value or argument) as one line, keeping click's exit status 2."""

    exit_code = 2


# Set to show the traceback of an unexpected failure instead of its one line.
DEBUG_ENV = "KDCACHE_DEBUG"
UNEXPECTED = "kdcache failed unexpectedly"


class KdcacheGroup(click.Group):
    """Turns every failure into one line: the library's user errors and file-system failures with exit status 1,
    click's usage errors with 2, an exception from a plug-in's code with 1 naming the plug-in, and anything
    unexpected (a bug) with 1 and a pointer to its traceback."""

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
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # the reader went away (`kdcache methods | head`): nothing left to say
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush must not fail
            except (OSError, ValueError):
                pass
            raise click.exceptions.Exit(1) from None
        except OSError as exc:
            raise click.ClickException(os_error_line(exc)) from None
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            culprit = plugin_failure(exc)
            if culprit is not None:
                raise click.ClickException(f"{culprit} (not a kdcache bug: report it to the plug-in's authors; "
                                           f"{DEBUG_ENV}=1 shows the traceback)") from None
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise click.ClickException(f"{UNEXPECTED}: {type(exc).__name__}{': ' + text if text else ''} "
                                       f"(a bug: please report it; {DEBUG_ENV}=1 shows the traceback)") from None


def os_error_line(exc: OSError) -> str:
    """A file-system failure as one line naming the path, why, and what usually helps."""
    path = exc.filename if exc.filename is not None else "a file"
    why = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.ENOSPC: "free space there", errno.EACCES: "check its permissions",
            errno.EPERM: "check its permissions", errno.EROFS: "the file system is read-only",
            errno.ENOENT: "check the path", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EISDIR: "it is a folder; give a file", errno.EEXIST: "it exists already"}.get(exc.errno or 0)
    return f"{path}: {why}{'; ' + hint if hint else ''}"


def _one_line_plugin_warnings() -> None:
    """Print a plug-in's load failure (:class:`kdcache.registry.PluginWarning`) as one ``Warning: ...`` line, not
    Python's two lines of file, line number and source; every other warning keeps Python's format."""
    plain = warnings.formatwarning
    if getattr(plain, "kdcache_one_line", False):
        return

    def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 line: str | None = None) -> str:
        if issubclass(category, PluginWarning):
            return f"Warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    setattr(one_line, "kdcache_one_line", True)
    warnings.formatwarning = one_line


_one_line_plugin_warnings()


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
    from kdcache.cli import cache, demo, experiment, listing, report, student, teacher

    for command in (*demo.COMMANDS, *listing.COMMANDS, *teacher.COMMANDS, *student.COMMANDS, *report.COMMANDS,
                    *experiment.COMMANDS, cache.cache):
        main.add_command(command)


_register()
