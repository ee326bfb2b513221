"""No traceback anywhere a user can reach (issue 12): every command, driven with generated bad values, paths
and ids, ends in one ``Error:`` line and a non-zero exit, never an exception and never the catch-all line of
an unexpected failure (which would mean a check is missing).

Each example changes one option of a command whose other options are valid, to a value drawn from
values that option can never take (so no example starts real work). The data set is digits, which needs no
--data-root (bad data roots of the other sets are in test_cli.py's table). The file system is real: files where
folders are expected, folders where files are, paths below a file, unwritable and missing places.
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import error_lines, run_cli
from kdcache.cli.main import UNEXPECTED, main
from kdcache.models import build_model

EXAMPLES = 15  # per command; each example is one in-process invocation


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A digits teacher, its store (2 views), a finished run and a plain file. (Unwritable places are under
    /proc, which refuses even root, as the tests may run as root.)"""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    ckpt = root / "t.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict()}, ckpt)
    cache = root / "cache"
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits",
                     "--views", 2, "--cache", cache, "--device", "cpu")
    assert result.exit_code == 0, result.output
    tid = result.stdout.strip().splitlines()[-1]
    run = root / "run"
    result = run_cli("distill", "--student", "resnet8", "--teachers", tid, "--method", "kd", "--cache", cache,
                     "--out", run, "--epochs", 1, "--batch-size", 512, "--device", "cpu")
    assert result.exit_code == 0, result.output
    plain = root / "plain.txt"
    plain.write_text("not a folder, not a checkpoint")
    return {"root": root, "ckpt": ckpt, "cache": cache, "tid": tid, "run": run, "plain": plain}


# -- values an option can never take ------------------------------------------------------------

NAMES = {"resnet8", "resnet20", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder",
         "crop-flip", "resized-crop-flip", "pooled", "spatial", "none", "cpu", "cuda", "kd", "ce", "aver", "camkd",
         "ebkd", "aekd", "fitnet", "fitnet-mkd", "official", "paper", "cs-kd", "confidence", "uniform", "v", "w"}
words = st.text(string.ascii_letters + string.digits + "-_:./ é", min_size=1, max_size=12).filter(
    lambda s: s.strip() and s not in NAMES and not s.startswith("-") and not s.startswith(("crop-flip:", "resized-"))
    and any(c.isalpha() for c in s))
not_positive = st.integers(max_value=0).map(str)
negative = st.integers(max_value=-1).map(str)
not_a_number = st.sampled_from(["nan", "inf", "-inf", "", "1e", "0x10", "one"])
bad_float = st.one_of(st.sampled_from(["nan", "inf", "-inf"]), not_a_number)
bad_positive_float = st.one_of(bad_float, st.floats(max_value=0, allow_nan=False).map(repr))
bad_int = st.one_of(not_a_number, st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: f != int(f)).map(repr))


def bad_paths(world: dict, *, want: str) -> st.SearchStrategy[str]:
    """Paths that cannot serve as ``want``: "file" to read, "dir" to read, "out" to write (a file or folder)."""
    root, plain = world["root"], world["plain"]
    common = [str(plain / "below-a-file"), "/proc/kdcache-nowhere/x", "/proc/self/kdcache"]
    if want == "file":
        return st.sampled_from([*common, str(root / "missing.pth"), str(root), str(plain), "/dev/null"])
    if want == "dir":
        return st.sampled_from([*common, str(plain), str(root / "missing-dir")])
    return st.sampled_from([*common, "/proc/kdcache-out"])


def bad_ids(world: dict) -> st.SearchStrategy[str]:
    tid = world["tid"]
    return st.one_of(st.text("0123456789abcdef", min_size=1, max_size=16).filter(lambda s: not tid.startswith(s)),
                     words, st.just(""))


# -- the commands, each with valid options and the bad values for each -------------------------------


def commands(world: dict) -> dict[str, tuple[list[str], dict[str, st.SearchStrategy[str]]]]:
    ckpt, cache, tid, run = str(world["ckpt"]), str(world["cache"]), world["tid"], str(world["run"])
    out = str(world["root"] / "fresh")
    cpu = ["--device", "cpu"]
    return {
        "train-teacher": (["train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", out + ".pth",
                           "--epochs", "1", *cpu],
                          {"--arch": words, "--dataset": words, "--epochs": st.one_of(not_positive, bad_int),
                           "--batch-size": not_positive, "--lr": bad_positive_float, "--momentum": bad_float,
                           "--weight-decay": st.one_of(bad_float, st.floats(max_value=-1e-9).map(repr)),
                           "--seed": negative, "--recipe": words, "--image-size": not_positive,
                           "--device": words, "--lr-milestones": words, "--eval-every": st.one_of(not_positive, bad_int),
                           "--out": st.one_of(bad_paths(world, want="out"), st.just(ckpt))}),
        "precompute": (["precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits",
                        "--views", "2", "--cache", cache, *cpu],
                       {"--teacher": words, "--checkpoint": bad_paths(world, want="file"), "--dataset": words,
                        "--views": st.one_of(not_positive, bad_int), "--plan-seed": negative,
                        "--batch-size": not_positive, "--chunk-rows": not_positive, "--recipe": words,
                        "--image-size": not_positive, "--device": words, "--features": words,
                        "--workers": not_positive,
                        "--cache": st.sampled_from([str(world["plain"]), "/proc/kdcache-cache",
                                                    str(world["plain"] / "cache")])}),
        "distill": (["distill", "--student", "resnet8", "--teachers", tid, "--method", "kd", "--cache", cache,
                     "--out", out + "-run", "--epochs", "1", *cpu],
                    {"--student": words, "--teachers": bad_ids(world), "--method": words,
                     "--epochs": st.one_of(not_positive, bad_int), "--batch-size": not_positive,
                     "--lr": bad_positive_float, "--momentum": bad_float, "--weight-decay": bad_float,
                     "--gamma": bad_float, "--alpha": bad_float, "--beta": bad_float, "--seed": negative,
                     "--prefetch": negative, "--device": words, "--lr-milestones": words, "--dataset": words,
                     "--eval-every": st.one_of(not_positive, bad_int),
                     "--cache": st.sampled_from([str(world["plain"]), str(world["root"] / "empty-cache")]),
                     "--out": st.one_of(bad_paths(world, want="out"), st.just(run), st.just(str(world["plain"])))}),
        "eval": (["eval", "--arch", "resnet8", "--checkpoint", ckpt, "--dataset", "digits", *cpu],
                 {"--arch": words, "--checkpoint": bad_paths(world, want="file"), "--dataset": words,
                  "--batch-size": not_positive, "--device": words, "--recipe": words,
                  "--image-size": not_positive}),
        "cache info": (["cache", "info", tid, "--cache", cache],
                       {"TEACHER_ID": bad_ids(world), "--cache": bad_paths(world, want="dir")}),
        "cache verify": (["cache", "verify", tid, "--cache", cache], {"TEACHER_ID": bad_ids(world)}),
        "cache rm": (["cache", "rm", tid, "--cache", cache], {"TEACHER_ID": bad_ids(world)}),
        "report": (["report", run, "--out", out + "-report"],
                   {"RUN": bad_paths(world, want="dir"), "--out": bad_paths(world, want="out")}),
        "demo": (["demo", "--out", out + "-demo", *cpu],
                 {"--seeds": not_positive, "--epochs": not_positive, "--features": words, "--device": words,
                  "--out": bad_paths(world, want="out")}),
        "experiment run": (["experiment", "run", "t1-resnet32x4-vgg8", "--out", out + "-experiment", "--dry-run",
                            "--data-root", str(world["root"] / "no-cifar-here")],
                           {"NAME": words, "--seeds": not_positive, "--epochs": not_positive,
                            "--views": not_positive, "--teacher-epochs": not_positive, "--setup": words,
                            "--features": words}),
    }


def with_bad_value(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option``'s value (or, for an upper-case name, the positional argument) replaced."""
    args = list(args)
    if option.isupper():
        position = {"TEACHER_ID": 2, "RUN": 1, "NAME": 2}[option]
        args[position] = value
        return args
    if option in args:
        args[args.index(option) + 1] = value
        return args
    return [*args, option, value]


COMMANDS = ["train-teacher", "precompute", "distill", "eval", "cache info", "cache verify", "cache rm", "report",
            "demo", "experiment run"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_with_a_bad_value_ends_in_one_error_line(command: str, world: dict, tmp_path: Path) -> None:
    base, options = commands(world)[command]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        option = data.draw(st.sampled_from(sorted(options)), label="option")
        value = data.draw(options[option], label="value")
        args = with_bad_value(base, option, value)
        result = CliRunner().invoke(main, args, env={"KDCACHE_HOME": str(tmp_path / "home")})
        shown = f"kdcache {' '.join(args)}\n{result.output}"
        assert result.exit_code in (1, 2), shown
        assert result.exception is None or isinstance(result.exception, SystemExit), (shown, result.exception)
        assert "Traceback" not in result.output, shown
        lines = error_lines(result.output)
        assert lines and lines[-1].startswith("Error: ") and len(lines[-1].splitlines()) == 1, shown
        assert UNEXPECTED not in lines[-1], shown
        assert world["tid"] in os.listdir(world["cache"] / "teachers"), "a bad value removed the store"

    check()
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
