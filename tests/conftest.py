"""Fixtures shared by the end-to-end tests: a digits teacher checkpoint and a private cache."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from kdcache.cli.main import main
from kdcache.models import build_model

@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with torch on ``n`` intra-op threads, then restore the count it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one pytest-xdist worker per core: one thread each, not two competing for a core


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test ever touches the user's ~/.cache/kdcache."""
    home = tmp_path / "kdcache-home"
    monkeypatch.setenv("KDCACHE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet8 checkpoint for digits (seeded random weights: its outputs are what matters, not its skill)."""
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    path = tmp_path_factory.mktemp("teachers") / "resnet8.pth"
    torch.save({"model": model.state_dict(), "arch": "resnet8"}, path)
    return path


def run_cli(*args: str) -> Result:
    """Invoke ``kdcache`` in-process, as a user would from a shell."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# The lines kdcache's progress prints on a stderr that is not a terminal (cli.common.LogProgress).
PROGRESS_LINE = re.compile(r"^.+: [\d,]+ of [\d,]+ \w+s \(\d+%\)")


def error_lines(stderr: str) -> list[str]:
    """The non-blank lines of ``stderr`` that are not progress lines."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


def spy_on_format_table(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, every table the grid's one formatter (``kdcache.pipelines.grid.format_table``) returns, in order:
    the demo's and the experiments' tables both come from it."""
    from kdcache.pipelines import grid

    tables: list[str] = []
    real = grid.format_table

    def spy(*args, **kwargs) -> str:
        tables.append(real(*args, **kwargs))
        return tables[-1]

    monkeypatch.setattr(grid, "format_table", spy)
    return tables


def poison_views(monkeypatch: pytest.MonkeyPatch, module: Any, call: int) -> None:
    """From now on, the batch of views ``module.view_batch`` makes at its ``call``-th call (counted from 1) is NaN:
    a loss that turns non-finite mid-run, as a too-large lr can make it."""
    real, calls = module.view_batch, [0]

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        x = real(*args, **kwargs)
        return x * float("nan") if calls[0] == call else x

    monkeypatch.setattr(module, "view_batch", poisoned)
