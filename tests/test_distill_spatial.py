"""`kdcache distill` from spatial stores (the official last-block form) and logits-only stores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from kdcache.errors import KdcacheError
from kdcache.models import build_model
from kdcache.pipelines.distill import DistillRequest, StepRecord, distill


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """Two digits teachers (resnet8, wrn_16_1) on one plan, each in the three forms."""
    root = tmp_path_factory.mktemp("spatial")
    cache = root / "cache"
    ids: dict[str, list[str]] = {"pooled": [], "spatial": [], "none": []}
    for seed, arch in enumerate(("resnet8", "wrn_16_1")):
        torch.manual_seed(seed)
        ckpt = root / f"{arch}.pth"
        torch.save({"model": build_model(arch, 10).state_dict()}, ckpt)
        for form in ids:
            result = run_cli("precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", "digits",
                             "--cache", cache, "--views", 2, "--device", "cpu", "--features", form)
            assert result.exit_code == 0, result.output
            ids[form].append(result.stdout.strip().splitlines()[-1])
    return cache, ids


def request(cache: Path, teachers: list[str], out: Path, method: str = "camkd", **kw) -> DistillRequest:
    defaults = dict(student="resnet8", teachers=teachers, method=method, out=out, cache=cache, epochs=2,
                    batch_size=64, milestones=[2], device="cpu", seed=0)
    return DistillRequest(**{**defaults, **kw})


# the channels of each student's official feat[-2], which its aligners take (MobileNetV2's before its conv2 to 1280)
STUDENT_CHANNELS = {"resnet8": 64, "vgg8": 512, "MobileNetV2": 160}


@pytest.mark.parametrize("method, student", [("camkd", "resnet8"), ("fitnet-mkd", "resnet8"), ("fitnet", "vgg8"),
                                             ("camkd", "MobileNetV2")])
def test_feature_methods_train_from_spatial_stores(forms, tmp_path: Path, method: str, student: str) -> None:
    cache, ids = forms
    teachers = ids["spatial"][:1] if method == "fitnet" else ids["spatial"]
    args = ["distill", "--student", student, "--method", method, "--cache", cache, "--out", tmp_path / "run",
            "--epochs", 2, "--device", "cpu"]
    for t in teachers:
        args += ["--teachers", t]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["train"]["feat"] > 0 for r in records)
    # the official epoch-1 rule: no feature term in the first epoch's total, beta times it from epoch 2 on
    beta = 50.0 if method == "camkd" else 100.0
    first, second = records[0]["train"], records[1]["train"]
    alpha = 0.0 if method == "fitnet" else 1.0
    assert first["total"] == pytest.approx(first["ce"] + alpha * first["kd"], rel=1e-5)
    assert second["total"] == pytest.approx(second["ce"] + alpha * second["kd"] + beta * second["feat"], rel=1e-4)
    aligners = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["method"]
    convs = [v for k, v in aligners.items() if k.endswith("conv.weight")]
    assert len(convs) == len(teachers) and all(w.dim() == 4 and w.shape[-2:] == (1, 1) for w in convs)
    assert all(w.shape[1] == STUDENT_CHANNELS[student] for w in convs)


def test_spatial_cached_and_online_runs_agree_step_by_step(forms, tmp_path: Path) -> None:
    """As for pooled stores: at a negligible learning rate each batch's terms differ only by float16 storage."""
    cache, ids = forms
    runs: dict[str, list[StepRecord]] = {"cached": [], "online": []}
    for name in runs:
        distill(request(cache, ids["spatial"], tmp_path / name, epochs=1, lr=1e-12, online=name == "online"),
                on_step=runs[name].append)
    assert len(runs["cached"]) == len(runs["online"]) == 1437 // 64
    for c, o in zip(runs["cached"], runs["online"]):
        assert torch.equal(c.indices, o.indices)
        for term in ("kd", "feat"):
            assert c.terms[term] == pytest.approx(o.terms[term], rel=2e-3, abs=1e-6), (c.step, term)


def test_logits_only_stores_serve_the_logit_methods(forms, tmp_path: Path) -> None:
    cache, ids = forms
    for method in ("aver", "ebkd", "aekd"):
        result = distill(request(cache, ids["none"], tmp_path / method, method=method, epochs=1))
        assert result.history and result.history[0].train["kd"] > 0


def test_forms_that_do_not_fit_are_one_line(forms, tmp_path: Path) -> None:
    cache, ids = forms
    with pytest.raises(KdcacheError, match="different feature forms"):
        distill(request(cache, [ids["spatial"][0], ids["pooled"][1]], tmp_path / "a"))
    for method in ("camkd", "fitnet-mkd"):
        with pytest.raises(KdcacheError, match=f"{method} needs the teachers' features but store .* holds logits "
                                               "only"):
            distill(request(cache, ids["none"], tmp_path / method, method=method))
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "distill", "--student", "resnet8", "--method", "fitnet",
                           "--teachers", ids["none"][0], "--cache", str(cache), "--out", str(tmp_path / "cli"),
                           "--epochs", "1"], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("Error: fitnet needs the teachers' features")
    assert not (tmp_path / "a").exists() and not (tmp_path / "cli").exists()


def test_an_online_run_with_its_teachers_outputs_rounded_to_float16_is_the_cached_run(
        forms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What separates a cached run from its online twin is the float16 the stores keep, and nothing else: with the
    live teachers' logits and maps rounded to float16, the online run trains the cached run's weights bit for bit."""
    from kdcache.pipelines import distill as d

    cache, ids = forms
    distill(request(cache, ids["spatial"], tmp_path / "cached"))
    live = d._teacher_outputs

    def rounded(batch, teachers, spatial=False):  # type: ignore[no-untyped-def]
        logits, feats = live(batch, teachers, spatial)
        return [z.half().float() for z in logits], [f.half().float() for f in feats]

    monkeypatch.setattr(d, "_teacher_outputs", rounded)
    distill(request(cache, ids["spatial"], tmp_path / "online", online=True))
    a = torch.load(tmp_path / "cached" / "last.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "online" / "last.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_method_at_a_seed_starts_from_one_student_and_reads_one_batch_order(forms, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """Paired comparisons (docs/EVIDENCE.md) rest on this: at one seed, runs of different methods from stores of
    one layout start from the same student weights, read the same batches in the same order, and find the
    random generator where the student alone left it (a method's aligners draw their initial weights without
    shifting any later draw of the student's)."""
    cache, ids = forms
    import kdcache.pipelines.distill as pipeline
    real_build = pipeline.build_model
    seen: dict[str, tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = {}
    for method in ("aver", "camkd", "fitnet-mkd", "kd"):
        start: dict[str, torch.Tensor] = {}
        batches: list[torch.Tensor] = []
        states: list[torch.Tensor] = []

        def build(*args, _start=start, **kw):
            model = real_build(*args, **kw)
            _start.update({k: v.clone() for k, v in model.state_dict().items()})
            return model

        monkeypatch.setattr(pipeline, "build_model", build)
        teachers = ids["spatial"][:1] if method == "kd" else ids["spatial"]

        def step(record: StepRecord, _batches=batches, _states=states) -> None:
            _batches.append(record.indices.clone())
            _states.append(torch.get_rng_state())

        distill(request(cache, teachers, tmp_path / method, method, epochs=1, milestones=[1]), on_step=step)
        seen[method] = (start, batches, states)
    start, batches, states = seen["aver"]
    assert len(batches) > 4
    for method, (s, b, g) in seen.items():
        assert s.keys() == start.keys() and all(torch.equal(s[k], start[k]) for k in start), method
        assert len(b) == len(batches) and all(torch.equal(x, y) for x, y in zip(b, batches)), method
        assert all(torch.equal(x, y) for x, y in zip(g, states)), method
