"""Open registries: the contract every registered entry keeps, and a plug-in distribution that adds an
architecture, a method (with its own options) and a data set to the command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdcache
from kdcache import contract, registry
from kdcache.data import dataset_names
from kdcache.errors import KdcacheError
from kdcache.losses import Method, MethodInfo, MethodOptions, MethodParam, method_class, method_names
from kdcache.models import build_model, model_names

from conftest import error_lines, run_cli
from fakes import write_fake_cifar, write_fake_imagefolder, write_fake_mnist

PLUGIN = Path(__file__).parent / "plugin" / "kdcache_toy_plugin.py"
KDCACHE = [sys.executable, "-m", "kdcache.cli"]


# -- the contract, over every registry ----------------------------------------------------------


@pytest.mark.parametrize("name", model_names())
def test_every_architecture_keeps_the_contract(name: str) -> None:
    contract.check_model(name, batch=2 if kdcache.models.model_info(name).family == "cifar" else 1)


@pytest.mark.parametrize("name", method_names())
def test_every_method_keeps_the_contract(name: str) -> None:
    contract.check_method(name)


def _data_root(name: str, tmp: Path) -> Path | None:
    """A tiny copy of data set ``name`` on disk, in the layout its loader reads."""
    if name in ("cifar10", "cifar100"):
        return write_fake_cifar(tmp, name, n_train=6, n_test=3)
    if name in ("mnist", "fashion-mnist"):
        write_fake_mnist(tmp, n_train=6, n_test=3)
        return tmp
    if name == "imagefolder":
        return write_fake_imagefolder(tmp, n_classes=2, n_per_class_train=2, n_per_class_val=1)
    return None


@pytest.mark.parametrize("name", dataset_names())
def test_every_data_set_keeps_the_contract(name: str, tmp_path: Path) -> None:
    contract.check_dataset(name, _data_root(name, tmp_path))


def test_the_contract_catches_a_broken_entry() -> None:
    """Each check fails, naming the promise, on an entry that breaks it."""

    class NoHeadProperty(torch.nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.body = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, num_classes)   # a child module: adds state_dict keys

        def feature_map(self, x):
            return self.body(x)

        def pool_map(self, m):
            return m.mean((2, 3))

        def forward(self, x):
            h = self.pool_map(self.feature_map(x))
            return h, self.head(h)

    class WrongWeights(Method):
        info = MethodInfo("broken-weights", "teacher weights of the wrong shape", "K", False, False)

        def forward(self, batch):
            ce = torch.nn.functional.cross_entropy(batch.student_logits, batch.labels)
            return kdcache.LossTerms(ce, {"ce": ce}, torch.ones(self.n_teachers + 1), None)

    kdcache.register_model("broken-net")(NoHeadProperty)
    kdcache.register_method(WrongWeights)
    try:
        with pytest.raises(contract.ContractError, match="architecture broken-net: model.head must be a property"):
            contract.check_model("broken-net")
        with pytest.raises(contract.ContractError, match=r"method broken-weights .*teacher_weights must be \(K,\)"):
            contract.check_method("broken-weights")
    finally:
        kdcache.models._MODELS.remove("broken-net")
        kdcache.losses._METHODS.remove("broken-weights")


# -- registering --------------------------------------------------------------------------------


def test_registration_refuses_clashes_and_malformed_entries() -> None:
    class Clash(Method):
        info = MethodInfo("aver", "a second aver", "K", False, False)

    class SharedKnob(Method):
        info = MethodInfo("shared-knob", "declares beta again", "K", False, False)
        params = (MethodParam("beta", 1.0, "clashes with the shared β"),)

    class BadDefault(Method):
        info = MethodInfo("bad-default", "a default outside its choices", "K", False, False)
        params = (MethodParam("mode", "c", "a mode", choices=("a", "b")),)

    cases = [(lambda: kdcache.register_method(Clash), "method 'aver' is registered already"),
             (lambda: kdcache.register_method(SharedKnob), "shared temperature, gamma, alpha, beta"),
             (lambda: kdcache.register_method(BadDefault), "the default of --mode is invalid"),
             (lambda: kdcache.register_method(int), "takes a kdcache.losses.Method subclass"),
             (lambda: kdcache.register_model("resnet8")(lambda c: None), "architecture 'resnet8' is registered"),
             (lambda: kdcache.register_model("two words")(lambda c: None), "a name is letters, digits"),
             (lambda: kdcache.register_model("odd-size", input_size=32.7)(lambda c: None), "got 32.7, a float"),  # type: ignore[arg-type]
             (lambda: kdcache.register_model("odd-size", input_size=True)(lambda c: None), "got True, a bool"),
             (lambda: kdcache.register_model("odd-size", input_size=0)(lambda c: None), "between 1 and 65536 (got 0)"),
             (lambda: kdcache.register_dataset("digits")(lambda root: None), "data set 'digits' is registered")]
    for register, message in cases:
        with pytest.raises(KdcacheError, match=re.escape(message)):
            register()
    assert method_class("aver").info.description != "a second aver"
    assert "shared-knob" not in method_names() and "bad-default" not in method_names()
    assert "odd-size" not in model_names()


def test_method_options_are_checked_against_what_the_method_declares() -> None:
    from kdcache.losses import resolve_options

    assert resolve_options("camkd").params == {"camkd_weights": "confidence", "camkd_feature_weights": "v"}
    assert resolve_options("aekd", MethodOptions(params={"aekd_cap": 1})).params == {"aekd_cap": 1.0}
    assert resolve_options("aver").params == {}
    for name, params, message in [
            ("aver", {"camkd_weights": "uniform"}, "aver has no option --camkd-weights (it takes no options"),
            ("camkd", {"camkd_weights": "equal"}, "--camkd-weights must be one of confidence, uniform"),
            ("aekd", {"aekd_cap": -1.0}, "aekd: --aekd-cap must be positive"),
            ("aekd", {"aekd_cap": "big"}, "--aekd-cap takes a float")]:
        with pytest.raises(KdcacheError, match=re.escape(message)):
            resolve_options(name, MethodOptions(params=params))


# -- a plug-in distribution ---------------------------------------------------------------------


def _install(site: Path, module: Path | str, dist: str = "kdcache-toy-plugin") -> Path:
    """What `pip install` leaves in site-packages: the module and a dist-info whose entry_points.txt declares
    it in the ``kdcache.plugins`` group."""
    site.mkdir(parents=True, exist_ok=True)
    if isinstance(module, Path):
        shutil.copy(module, site / module.name)
        name = module.stem
    else:
        name = "kdcache_broken_plugin"
        (site / f"{name}.py").write_text(module)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdcache.plugins]\n{dist.split('-')[-2]} = {name}\n")
    (info / "RECORD").write_text("")
    return site


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The toy plug-in installed on this process's path, its entries removed again afterwards."""
    site = _install(tmp_path / "site", PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    registry.reset_plugins()
    yield site
    kdcache.models._MODELS.remove("toy-net")
    kdcache.losses._METHODS.remove("toy-maxkd")
    kdcache.data._DATASETS.remove("toy-digits")
    sys.modules.pop("kdcache_toy_plugin", None)
    registry.reset_plugins()


def test_an_installed_plug_in_is_listed_and_keeps_the_contract(installed: Path) -> None:
    methods = run_cli("methods")
    assert methods.exit_code == 0
    assert "toy-maxkd    teachers K  KD from each sample's most confident teacher" in methods.stdout
    assert "--toy-scale FLOAT  Factor on the KD term. (default: 1.0)" in methods.stdout
    assert "--toy-pick [max|min]" in methods.stdout
    assert "    --camkd-weights [confidence|uniform]" in methods.stdout   # the built-ins list theirs too
    assert "toy-net" in run_cli("models").stdout.splitlines()[-1]
    assert run_cli("datasets").stdout.splitlines()[-1].startswith("toy-digits")
    contract.check_model("toy-net")
    contract.check_method("toy-maxkd", MethodOptions(params={"toy_pick": "min"}))
    contract.check_dataset("toy-digits")


def test_a_method_takes_its_own_options_after_method_and_no_others(installed: Path, tmp_path: Path) -> None:
    base = ["distill", "--student", "toy-net", "--teachers", "abc", "--method", "toy-maxkd", "--out", tmp_path / "run"]
    for extra, message in [
            (["--toy-pick", "first"], "Invalid value for '--toy-pick': 'first' is not one of 'max', 'min'"),
            (["--toy-scale", "big"], "Invalid value for '--toy-scale': 'big' is not a valid float"),
            (["--camkd-weights", "uniform"], "no such option: --camkd-weights (distill's options are in `kdcache "
                                             "distill --help`; method toy-maxkd takes --toy-scale, --toy-pick)"),
            (["--toy-scale", "2", "stray"], "Got unexpected extra argument (stray) (method toy-maxkd takes --toy-scale")]:
        result = run_cli(*base, *extra)
        assert result.exit_code == 2 and error_lines(result.stderr) == [
            line for line in result.stderr.splitlines() if message in line], (extra, result.stderr)
    assert not (tmp_path / "run").exists()


def test_a_plug_in_that_fails_to_load_is_named_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _install(tmp_path / "site", "raise ImportError('needs a package that is not installed')",
                    dist="kdcache-broken-plugin")
    monkeypatch.syspath_prepend(str(site))
    registry.reset_plugins()
    try:
        with pytest.warns(registry.PluginWarning, match=re.escape(
                "kdcache plug-in 'broken' (kdcache_broken_plugin) from distribution kdcache-broken-plugin 0.1 failed "
                "to load: ImportError: needs a package that is not installed; it is skipped, none of its "
                "registrations kept")):
            names = method_names()
        assert "camkd" in names
    finally:
        sys.modules.pop("kdcache_broken_plugin", None)
        registry.reset_plugins()


def _kdcache(site: Path, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*KDCACHE, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def test_a_plug_in_distribution_trains_through_the_command_line(installed: Path, tmp_path: Path) -> None:
    """Installed as a distribution, the plug-in's architecture is precomputed on its data set and a student
    is distilled with its method and the method's own options, all through `kdcache` in fresh processes."""
    site = installed
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(tmp_path / f"toy{seed}.pth")
        torch.save({"model": build_model("toy-net", 10).state_dict()}, ckpts[-1])
    cache = tmp_path / "cache"
    pre = _kdcache(site, "precompute", "--teacher", "toy-net", "--checkpoint", ckpts[0], "--teacher", "toy-net",
                   "--checkpoint", ckpts[1], "--dataset", "toy-digits", "--views", 1, "--features", "none",
                   "--cache", cache, "--device", "cpu")
    assert pre.returncode == 0, pre.stderr
    ids = pre.stdout.split()[-2:]
    run = tmp_path / "run"
    base = ["distill", "--student", "toy-net", "--teachers", ids[0], "--teachers", ids[1], "--method", "toy-maxkd",
            "--cache", cache, "--epochs", 1, "--batch-size", 128, "--device", "cpu"]
    done = _kdcache(site, *base, "--out", run, "--toy-scale", "0.5", "--toy-pick", "min")
    assert done.returncode == 0, done.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["method"] == "toy-maxkd"
    assert config["args"]["options"]["params"] == {"toy_scale": 0.5, "toy_pick": "min"}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and set(metrics[0]["train"]) == {"ce", "kd", "total"}
    assert len(metrics[0]["teacher_weights"]) == 2 and sum(metrics[0]["teacher_weights"]) == pytest.approx(1.0)
    assert (run / "last.pth").is_file()


def test_an_exception_from_a_plug_ins_code_in_training_names_the_plug_in_and_kdcaches_own_is_a_bug(
        installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where kdcache calls a plug-in's objects in training, the one error line says whose code raised: the
    plug-in's (its network's forward) names its distribution, function, file and line; kdcache's own code
    raising under a plug-in's method is still kdcache's bug."""
    torch.manual_seed(0)
    ckpt = tmp_path / "toy.pth"
    torch.save({"model": build_model("toy-net", 10).state_dict()}, ckpt)
    cache = tmp_path / "cache"
    pre = run_cli("precompute", "--teacher", "toy-net", "--checkpoint", ckpt, "--dataset", "toy-digits", "--views", 1,
                  "--features", "none", "--cache", cache, "--device", "cpu")
    assert pre.exit_code == 0, pre.output
    teacher = pre.stdout.split()[-1]
    plugin_file = str(installed / "kdcache_toy_plugin.py")
    for fail, student, method, expected in (
            ("forward", "toy-net", "kd", f"Error: plug-in distribution kdcache-toy-plugin 0.1 raised in forward "
                                         f"({plugin_file}, line "),
            ("kdcache", "resnet8", "toy-maxkd", "Error: kdcache failed unexpectedly: RuntimeError: ")):
        monkeypatch.setenv("KDCACHE_TOY_FAIL", fail)
        done = run_cli("distill", "--student", student, "--teachers", teacher, "--method", method, "--cache", cache,
                       "--epochs", 1, "--batch-size", 128, "--device", "cpu", "--out", tmp_path / fail)
        assert done.exit_code == 1
        lines = error_lines(done.stderr)
        assert len(lines) == 1 and lines[0].startswith(expected), (fail, done.stderr)
        if fail == "forward":
            line = int(lines[0][len(expected):].split(")")[0])
            assert "fails on purpose" in PLUGIN.read_text().splitlines()[line - 1]
            assert lines[0].endswith("ValueError: toy-net's forward fails on purpose (not a kdcache bug: report it "
                                     "to the plug-in's authors; KDCACHE_DEBUG=1 shows the traceback)")
        else:
            assert "(a bug: please report it; KDCACHE_DEBUG=1 shows the traceback)" in lines[0]
