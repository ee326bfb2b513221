"""Issue 27: the library API refuses wrong arguments with one line naming them, and a plug-in's failure (an exit
on import, a refused registration, a loader that raises) is that plug-in's, named with its distribution: never a
silent exit 0, never "kdcache failed unexpectedly"."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache import CachedTeachers, registry
from kdcache.cli.main import UNEXPECTED
from kdcache.data import dataset_names, load_dataset
from kdcache.errors import ArgumentTypeError, ArgumentValueError, KdcacheError
from kdcache.models import build_model, model_names

from conftest import error_lines, run_cli

KDCACHE = [sys.executable, "-m", "kdcache.cli"]


# -- the API's arguments ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One digits teacher's store of one view: (cache, id)."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet8", 10).state_dict()}, root / "t.pth")
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", root / "t.pth", "--dataset", "digits",
                     "--cache", root / "cache", "--views", 1, "--features", "none", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root / "cache", result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(teachers="a0a1"), ArgumentTypeError,
     "teachers takes a list of store ids or unique prefixes, not one str: pass a list of ids, e.g. ['a0a1'] "
     "(got 'a0a1')"),
    (dict(teachers=("a0a1", 7)), ArgumentTypeError, "each a str; item 1 is 7, an int"),
    (dict(teachers=5), ArgumentTypeError, "teachers takes a list of store ids or unique prefixes, e.g. [\"a0a1\"] "
                                          "(got 5, an int)"),
    (dict(batch_size=True), ArgumentTypeError, "batch_size must be an integer of at least 1 (got True, a bool)"),
    (dict(batch_size=64.0), ArgumentTypeError, "batch_size must be an integer of at least 1 (got 64.0, a float)"),
    (dict(batch_size=0), ArgumentValueError, "batch_size must be at least 1 (got 0)"),
    (dict(seed=-1), ArgumentValueError, "seed must be at least 0 (got -1)"),
    (dict(prefetch=np.float32(2)), ArgumentTypeError, "prefetch must be an integer of at least 1"),
    (dict(read_threads=0), ArgumentValueError, "read_threads must be at least 1 (got 0)"),
    (dict(resident_share=1.5), ArgumentValueError, "resident_share must be between 0 and 1 (got 1.5)"),
    (dict(resident_share=False), ArgumentTypeError, "resident_share must be a number between 0 and 1 (got False"),
    (dict(read_teachers=1), ArgumentTypeError, "read_teachers must be True or False (got 1, an int)"),
    (dict(world=0), ArgumentValueError, "world must be at least 1 (got 0)"),
    (dict(dataset=["digits"]), ArgumentTypeError, "dataset must be a str or None (got ['digits'], a list)"),
])
def test_cached_teachers_refuses_each_wrong_argument_before_any_work(kwargs: dict[str, object], error: type,
                                                                      message: str) -> None:
    kwargs = {"teachers": ["a0a1"], **kwargs}
    with pytest.raises(error, match=re.escape(message)) as caught:
        CachedTeachers(**kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, KdcacheError) and "\n" not in str(caught.value)


def test_cached_teachers_takes_numpy_integers_and_refuses_bad_epochs_at_the_call(store: tuple[Path, str]) -> None:
    cache, store_id = store
    teachers = CachedTeachers((store_id[:8],), cache, batch_size=np.int64(500), seed=np.int32(1), device="cpu")
    assert teachers.batch_size == 500 and type(teachers.batch_size) is int
    assert len(list(teachers.epoch(np.int64(2)))) == 1437 // 500  # any epoch from 1 up (views come round again)
    for epoch, error, message in [
            (1.5, ArgumentTypeError, "epoch must be an integer of at least 1 (got 1.5, a float); epochs count from 1"),
            (True, ArgumentTypeError, "epoch must be an integer of at least 1 (got True, a bool)"),
            ("1", ArgumentTypeError, "epoch must be an integer of at least 1 (got '1', a str)"),
            (0, ArgumentValueError, "epoch must be at least 1 (got 0); epochs count from 1 (the first epoch is 1)")]:
        with pytest.raises(error, match=re.escape(message)):
            teachers.epoch(epoch)  # type: ignore[arg-type]  # refused at the call, before the first batch
    for args, kwargs, error, message in [
            ((2,), dict(start=5), ArgumentValueError, "start must be between 1 and 2 (got 5); the first epoch served, "
                                                      "counted from 1, up to epochs=2"),
            ((2,), dict(start=0), ArgumentValueError, "start must be between 1 and 2 (got 0)"),
            ((0,), {}, ArgumentValueError, "epochs must be at least 1 (got 0)"),
            ((2.0,), {}, ArgumentTypeError, "epochs must be an integer of at least 1 (got 2.0, a float)"),
            ((2,), dict(start=False), ArgumentTypeError, "start must be an integer between 1 and 2 (got False, a bool)")]:
        with pytest.raises(error, match=re.escape(message)):
            teachers.as_dataset(*args, **kwargs)
    served = teachers.as_dataset(np.int64(3), start=np.int64(3))
    assert len(served) == 1437 // 500 and [b.epoch for b in served] == [3, 3]
    with pytest.raises(ArgumentTypeError, match="teachers must be a kdcache.CachedTeachers"):
        kdcache.CachedTeacherDataset("a0a1", 2)  # type: ignore[arg-type]


def test_distill_refuses_one_str_of_teachers(tmp_path: Path) -> None:
    """distill's request goes through the same check (one id as a str is not read as its characters)."""
    req = kdcache.DistillRequest(student="resnet8", teachers="a0a1", method="kd", out=tmp_path / "run",  # type: ignore[arg-type]
                                 epochs=1, device="cpu")
    with pytest.raises(ArgumentTypeError, match=re.escape("pass a list of ids, e.g. ['a0a1']")):
        kdcache.distill(req)
    assert not (tmp_path / "run").exists()


# -- plug-ins that fail -------------------------------------------------------------------------

EXITS = "import sys\nsys.exit(0)\n"

# Two entries of its own, then a name kdcache has: the refusal withdraws the two.
CLASHES = '''
import kdcache

@kdcache.register_model("clash-net", description="the plug-in's own architecture")
def clash_net(num_classes):
    raise AssertionError("never built")

@kdcache.register_dataset("clash-data", describe="the plug-in's own data set")
def clash_data(root=None):
    raise AssertionError("never loaded")

@kdcache.register_model("resnet8")
def resnet8(num_classes):
    raise AssertionError("never built")
'''

# The same, but the plug-in swallows the refusal: still none of its entries stays.
CLASHES_QUIETLY = '''
import kdcache
from kdcache.errors import KdcacheError

kdcache.register_model("quiet-net")(lambda num_classes: None)
try:
    kdcache.register_dataset("digits")(lambda root=None: None)
except KdcacheError:
    pass
'''

RAISES = '''
import kdcache

@kdcache.register_dataset("failing-data", describe="a data set whose loader fails")
def failing_data(root=None):
    raise RuntimeError("the archive is corrupt\\nsecond line")
'''


def _install(site: Path, dist: str, source: str) -> Path:
    """What `pip install` of distribution ``dist`` 0.1 leaves in site-packages: its module ``source`` and a
    dist-info whose entry_points.txt declares it in the ``kdcache.plugins`` group (entry point ``dist``'s last
    word)."""
    site.mkdir(parents=True, exist_ok=True)
    module = dist.replace("-", "_")
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdcache.plugins]\n{dist.split('-')[-1]} = {module}\n")
    return site


def _kdcache(site: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*KDCACHE, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a plug-in on this process's path (call it with dist and source); its module and the loaded state are
    dropped afterwards."""
    modules: list[str] = []

    def install(dist: str, source: str) -> Path:
        site = _install(tmp_path / "site", dist, source)
        monkeypatch.syspath_prepend(str(site))
        modules.append(dist.replace("-", "_"))
        registry.reset_plugins()
        return site

    yield install
    for module in modules:
        sys.modules.pop(module, None)
    registry.reset_plugins()


def test_a_plug_in_that_exits_on_import_is_skipped_with_one_warning_and_the_command_runs(tmp_path: Path) -> None:
    site = _install(tmp_path / "site", "kdcache-exiting", EXITS)
    warning = ("Warning: kdcache plug-in 'exiting' (kdcache_exiting) from distribution kdcache-exiting 0.1 failed to "
               "load: it called sys.exit(0); it is skipped, none of its registrations kept")
    listed = _kdcache(site, "methods")
    assert listed.returncode == 0 and "camkd" in listed.stdout
    assert error_lines(listed.stderr) == [warning]
    run = _kdcache(site, "distill", "--student", "resnet8", "--teachers", "ffff", "--method", "kd",
                   "--cache", tmp_path / "cache", "--out", tmp_path / "run", "--device", "cpu")
    assert run.returncode == 1  # not a silent exit 0: distill went on, to its own refusal
    assert error_lines(run.stderr) == [warning, f"Error: no teacher store matches 'ffff' in {tmp_path / 'cache'}; "
                                                "`kdcache cache ls` lists them"]
    assert UNEXPECTED not in run.stderr


def test_a_plug_in_with_a_refused_registration_keeps_none_of_its_entries(tmp_path: Path) -> None:
    site = _install(tmp_path / "site", "kdcache-clashing", CLASHES)
    models, datasets = _kdcache(site, "models"), _kdcache(site, "datasets")
    warning = ("Warning: kdcache plug-in 'clashing' (kdcache_clashing) from distribution kdcache-clashing 0.1 failed "
               "to load: architecture 'resnet8' is registered already; choose another name (or pass replace=True to "
               "override it on purpose); it is skipped, none of its registrations kept (withdrawn: architecture "
               "'clash-net', data set 'clash-data')")
    for result in (models, datasets):
        assert result.returncode == 0 and error_lines(result.stderr) == [warning], result.stderr
    assert "resnet8" in models.stdout and "clash-net" not in models.stdout
    assert "digits" in datasets.stdout and "clash-data" not in datasets.stdout


def test_a_refusal_the_plug_in_catches_still_withdraws_it(on_path) -> None:
    on_path("kdcache-quiet", CLASHES_QUIETLY)
    with pytest.warns(registry.PluginWarning, match=re.escape(
            "from distribution kdcache-quiet 0.1 failed to load: data set 'digits' is registered already; "
            "choose another name (or pass replace=True to override it on purpose); it is skipped, none of its "
            "registrations kept (withdrawn: architecture 'quiet-net')")):
        assert "quiet-net" not in model_names()
    assert "digits" in dataset_names() and load_dataset("digits").name == "digits"  # kdcache's own untouched


def test_a_plug_in_registering_an_experiment_then_failing_keeps_the_papers(on_path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's experiments, added at the registry's first use inside the plug-in's load, stay when the plug-in
    is withdrawn; the experiment it registered goes."""
    from kdcache.pipelines import experiments
    from kdcache.pipelines.paper_settings import PAPER_EXPERIMENTS

    monkeypatch.setattr(experiments, "_EXPERIMENTS", registry.Registry("experiment"))
    monkeypatch.setattr(experiments, "_paper_added", False)  # the plug-in's call fills the registry first
    on_path("kdcache-exper", "import dataclasses, kdcache\n"
                             "from kdcache.pipelines.paper_settings import PAPER_EXPERIMENTS\n"
                             "kdcache.register_experiment(dataclasses.replace(PAPER_EXPERIMENTS[0], name='plugin-exp'))\n"
                             "raise ImportError('a missing package')\n")
    with pytest.warns(registry.PluginWarning, match=re.escape(
            "failed to load: ImportError: a missing package; it is skipped, none of its registrations kept "
            "(withdrawn: experiment 'plugin-exp')")):
        model_names()
    assert experiments.experiment_names() == [e.name for e in PAPER_EXPERIMENTS]


def test_kdcache_s_own_entries_stay_when_a_failing_plug_in_imports_their_module_first(tmp_path: Path) -> None:
    """kdcache.data's data sets, registered while a plug-in's load imports kdcache.data for the first time, are
    kdcache's own: withdrawing the plug-in keeps them."""
    site = _install(tmp_path / "site", "kdcache-late", "import kdcache\n"
                    "kdcache.register_dataset('late-data')(lambda root=None: None)\nraise ImportError('late')\n")
    probe = ("import sys, warnings\nfrom kdcache.models import model_names\nassert 'kdcache.data' not in sys.modules\n"
             "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
             "    model_names()\nfrom kdcache.data import dataset_names\n"
             "print(dataset_names())\nprint(*[w.message for w in caught])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names, warning = result.stdout.splitlines()
    assert names == "['cifar10', 'cifar100', 'mnist', 'fashion-mnist', 'imagefolder', 'digits']"
    assert warning.endswith("failed to load: ImportError: late; it is skipped, none of its registrations kept "
                            "(withdrawn: data set 'late-data')")


def test_a_plug_in_data_set_whose_loader_raises_is_that_plug_in_s_failure(tmp_path: Path) -> None:
    site = _install(tmp_path / "site", "kdcache-failing", RAISES)
    result = _kdcache(site, "train-teacher", "--arch", "resnet8", "--dataset", "failing-data",
                      "--out", tmp_path / "t.pth", "--epochs", 1, "--device", "cpu")
    assert result.returncode == 1 and UNEXPECTED not in result.stderr
    assert error_lines(result.stderr) == ["Error: the data set 'failing-data' from plug-in distribution "
                                          "kdcache-failing 0.1 raised: RuntimeError: the archive is corrupt"]
    assert not (tmp_path / "t.pth").exists()


def test_code_registered_by_the_caller_raises_as_it_is(on_path) -> None:
    """Only a plug-in's entries are wrapped: the caller's own loader (and kdcache's) raise their own exception."""
    kdcache.register_dataset("callers-data")(lambda root=None: (_ for _ in ()).throw(RuntimeError("mine")))
    try:
        with pytest.raises(RuntimeError, match="^mine$"):
            load_dataset("callers-data")
    finally:
        kdcache.data._DATASETS.remove("callers-data")


RAISING_BUILDER = '''
import kdcache


@kdcache.register_model("failing-net", description="an architecture whose builder fails")
def failing_net(num_classes):
    raise RuntimeError("the weights layout is unknown")
'''


def test_a_plug_in_model_whose_builder_raises_is_that_plug_in_s_failure(on_path) -> None:
    """The same for an architecture: its builder's exception is one PluginError naming the distribution."""
    on_path("kdcache-failnet", RAISING_BUILDER)
    try:
        assert "failing-net" in model_names()
        with pytest.raises(registry.PluginError, match="^the architecture 'failing-net' from plug-in distribution "
                                                       "kdcache-failnet 0.1 raised: RuntimeError: the weights layout "
                                                       "is unknown$"):
            build_model("failing-net", 10)
    finally:  # the zoo's listings (tests/test_models.py) in this worker must not see it
        kdcache.models._MODELS.remove("failing-net")
