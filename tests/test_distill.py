"""`kdcache distill` end to end: every method from the CLI, the run directory, resume, no teacher network,
cached against online, and the refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import poison_views, run_cli
from kdcache.errors import KdcacheError
from kdcache.losses import MethodOptions, method_names
from kdcache.models import build_model
from kdcache.pipelines.distill import DistillRequest, StepRecord, distill
from kdcache.pipelines.evaluate import evaluate_checkpoint
from kdcache.runs import load_run
from kdcache.request import is_how, result_fields


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[Path]]:
    """Two digits teacher stores on one plan (resnet8 and wrn_16_1, different widths), and their checkpoints."""
    root = tmp_path_factory.mktemp("distill")
    cache = root / "cache"
    ids, ckpts = [], []
    for seed, arch in enumerate(("resnet8", "wrn_16_1")):
        torch.manual_seed(seed)
        ckpt = root / f"{arch}.pth"
        torch.save({"model": build_model(arch, 10).state_dict()}, ckpt)
        result = run_cli("precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", "digits",
                         "--cache", cache, "--views", 3, "--chunk-rows", 256, "--device", "cpu")
        assert result.exit_code == 0, result.output
        ids.append(result.stdout.strip().splitlines()[-1])
        ckpts.append(ckpt)
    return cache, ids, ckpts


def request(cache: Path, teachers: list[str] | None = None, out: Path | None = None, method: str = "camkd",
            **kw) -> DistillRequest:
    defaults = dict(student="resnet8", teachers=teachers, method=method, out=out, cache=cache, epochs=2,
                    batch_size=64, milestones=[2], device="cpu", seed=0)
    return DistillRequest(**{**defaults, **kw})


@pytest.mark.parametrize("method", method_names())
def test_every_method_from_the_command_line(method: str, two_teachers, tmp_path: Path) -> None:
    cache, ids, _ = two_teachers
    teachers = ids[:1] if method in ("kd", "fitnet") else ids
    epochs = 2 if method == "camkd" else 1  # camkd's feature term starts in epoch 2
    args = ["distill", "--student", "resnet8", "--method", method, "--cache", cache, "--out", tmp_path / "run",
            "--epochs", epochs, "--device", "cpu"]
    for t in teachers:
        args += ["--teachers", t[:8]]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    extra = ["sample_weights.npz"] if method in ("camkd", "ebkd") else []
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "checkpoint.pth", "best.pth", "last.pth", *extra])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for r in records:
        assert {"train", "teacher_weights", "test_top1", "test_top5", "lr", "seconds", "view"} <= set(r)
        assert "ce" in r["train"] and "total" in r["train"]
        assert all(np.isfinite(v) for v in r["train"].values())
        assert 0 <= r["test_top1"] <= r["test_top5"] <= 100
    if method in ("camkd", "ebkd", "aekd"):
        assert len(records[0]["teacher_weights"]) == 2
    if method == "camkd":
        assert sum(records[0]["teacher_weights"]) == pytest.approx(1.0, abs=1e-5)
        saved = np.load(run / "sample_weights.npz")
        assert int(saved["epoch"]) == epochs and saved["weights"].shape == (1437 // 64 * 64, 2)
        assert np.allclose(saved["weights"].sum(1), 1.0, atol=1e-5)
        assert np.allclose(saved["weights"].mean(0), records[-1]["teacher_weights"], atol=1e-5)
        from kdcache.data import load_dataset
        assert np.array_equal(saved["labels"], load_dataset("digits").train.labels[saved["indices"]])
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["method"] == method and config["args"]["teachers"] == teachers
    assert config["args"]["lr"] == 0.05 and config["plan_id"]
    assert torch.load(run / "last.pth", weights_only=False)["model"].keys() == build_model("resnet8", 10).state_dict().keys()


def test_the_cached_path_builds_no_teacher_network(two_teachers, tmp_path: Path) -> None:
    cache, ids, ckpts = two_teachers
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for c in ckpts:  # the teachers' checkpoints are gone for the whole run
        shutil.move(c, hidden / c.name)
    attempts: list[str] = []

    def try_to_build(_metrics) -> None:
        try:
            build_model("resnet8", 10)
            attempts.append("built")
        except KdcacheError as exc:
            attempts.append(str(exc))

    try:
        distill(request(cache, ids, tmp_path / "run", epochs=1), on_epoch=try_to_build)
    finally:
        for c in ckpts:
            shutil.move(hidden / c.name, c)
    assert attempts == ["refusing to build a network: the cached distill path runs no teacher network"]
    build_model("resnet8", 10)  # allowed again after the run


class Interrupt(Exception):
    pass


def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(two_teachers, tmp_path: Path) -> None:
    """The split run also evaluates less often (eval_every 2, then 5 after --resume: a how-it-runs option), so
    its equal weights show that evaluation changes nothing; the epochs it skipped record no test accuracy."""
    cache, ids, _ = two_teachers
    straight = distill(request(cache, ids, tmp_path / "straight", epochs=3))

    def stop_after_two(m) -> None:
        if m.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(request(cache, ids, tmp_path / "split", epochs=3, eval_every=2), on_epoch=stop_after_two)
    assert torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)["epoch"] == 2
    assert torch.load(tmp_path / "split" / "best.pth", weights_only=False)["epoch"] == 2  # the first evaluated
    split = distill(request(cache, ids, tmp_path / "split", epochs=3, resume=True, eval_every=5))
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    top1 = [m.test_top1 for m in straight.history]
    assert [r["test_top1"] for r in records] == [None, top1[1], top1[2]]  # epoch 2 (every 2nd), 3 (the last)
    assert records[0]["test_top5"] is None and split.best_top1 == max(top1[1:])
    assert load_run(tmp_path / "split").best_top1 == max(top1[1:])
    assert load_run(tmp_path / "split").final_top1 == top1[2]


def _lrs(run: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_may_grow_epochs(two_teachers, tmp_path: Path) -> None:
    """2 epochs, then --resume to 4. With the milestones given, the weights equal a straight 4-epoch run's.
    With the default milestones (scaled to --epochs: [1] for 2 epochs, [2, 3] for 4), the epochs still to
    train follow the 4-epoch schedule and the epochs already trained keep the lr they had."""
    cache, ids, _ = two_teachers
    quick = dict(method="kd", teachers=ids[:1], batch_size=512)
    for name, milestones in (("given", [3]), ("scaled", None)):
        straight, split = tmp_path / f"{name}-straight", tmp_path / f"{name}-split"
        distill(request(cache, out=straight, epochs=4, milestones=milestones, **quick))
        distill(request(cache, out=split, epochs=2, milestones=milestones, **quick))
        distill(request(cache, out=split, epochs=4, milestones=milestones, resume=True, **quick))
        a, b = (torch.load(p / "checkpoint.pth", weights_only=False) for p in (straight, split))
        assert b["epoch"] == 4 and [json.loads(x)["epoch"] for x in (split / "metrics.jsonl").read_text().splitlines()] \
            == [1, 2, 3, 4]
        same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        if milestones:
            assert same and _lrs(split) == _lrs(straight) == pytest.approx([0.05, 0.05, 0.05, 0.005])
        else:
            assert _lrs(straight) == pytest.approx([0.05, 0.05, 0.005, 0.0005])
            assert _lrs(split) == pytest.approx([0.05, 0.005, 0.005, 0.0005])  # epoch 2 ran under the 2-epoch one
            assert not same
    with pytest.raises(KdcacheError, match="has trained 4 epochs already, more than --epochs 3"):
        distill(request(cache, out=tmp_path / "given-split", epochs=3, milestones=[3], resume=True, **quick))


def test_resume_compares_what_the_result_depends_on_not_how_it_runs(two_teachers, tmp_path: Path) -> None:
    """DistillRequest declares its split once (kdcache.request.how): the result arguments are what config.json
    records under "args" and what --resume compares; a changed one is refused by name, while every how-it-runs
    field may change and the resumed run still ends with the weights of a run never interrupted."""
    cache, ids, _ = two_teachers
    assert set(result_fields(DistillRequest)) == {
        "student", "teachers", "method", "dataset", "epochs", "batch_size", "lr", "momentum", "weight_decay",
        "milestones", "seed", "online", "amp", "options"}
    quick = dict(method="camkd", teachers=ids, batch_size=512, milestones=None)
    distill(request(cache, out=tmp_path / "straight", epochs=3, **quick))
    split = tmp_path / "split"
    distill(request(cache, out=split, epochs=1, **quick))
    config = json.loads((split / "config.json").read_text())
    assert set(config["args"]) == {*result_fields(DistillRequest), "lr_milestones"} and config["kind"] == "distill"
    assert set(config["how"]) == {f.name for f in dataclasses.fields(DistillRequest) if is_how(f)}
    for change, named in ((dict(seed=1), "seed"), (dict(lr=0.1), "lr"), (dict(milestones=[3]), "lr_milestones"),
                          (dict(options=MethodOptions(beta=1.0)), "options")):
        with pytest.raises(KdcacheError, match=rf"^--resume: {named} differ from the run in "):
            distill(request(cache, out=split, epochs=3, resume=True, **{**quick, **change}))
    elsewhere = tmp_path / "cache-link"
    elsewhere.symlink_to(cache)
    how_else = dict(device=None, prefetch=1, read_threads=1, resident_share=0.0, data_root=tmp_path,
                    tensorboard=tmp_path / "tb")
    distill(request(elsewhere, out=split, epochs=3, resume=True, **{**quick, **how_else}))
    assert json.loads((split / "config.json").read_text())["how"]["read_threads"] == 1
    a, b = (torch.load(p / "last.pth", weights_only=False)["model"] for p in (tmp_path / "straight", split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
        two_teachers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images that turn to NaN at epoch 2, step 3 (a fault a finite lr can also cause): the run stops there with
    one line naming the epoch, the step and the term, and nothing of epoch 2 is evaluated or saved."""
    import kdcache.cached as pipeline  # where distill's batches are made

    cache, ids, _ = two_teachers
    poison_views(monkeypatch, pipeline, 1437 // 256 + 4)  # epoch 2, step 3 (5 steps an epoch)
    run = tmp_path / "run"
    result = run_cli("distill", "--student", "resnet8", "--method", "kd", "--teachers", ids[0], "--cache", cache,
                     "--out", run, "--epochs", 3, "--batch-size", 256, "--device", "cpu")
    assert result.exit_code == 1
    epoch_lines, error = result.output.strip().splitlines()[:-1], result.output.strip().splitlines()[-1:]
    assert len(epoch_lines) == 1 and epoch_lines[0].startswith("epoch   1/3"), result.output
    assert error == [
        f"Error: epoch 2, step 3: the loss term 'ce' became nan and training stopped; {run / 'checkpoint.pth'} and "
        "best.pth keep epoch 1, the last good one (start again in a new --out with a lower --lr). Lower --lr (or "
        "check the data and the stores) and run again"], result.output
    ckpt = torch.load(run / "checkpoint.pth", weights_only=False)
    best = torch.load(run / "best.pth", weights_only=False)
    assert ckpt["epoch"] == best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "last.pth").exists()


def test_a_seed_makes_a_run_reproducible(two_teachers, tmp_path: Path) -> None:
    cache, ids, _ = two_teachers
    steps: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        distill(request(cache, ids, tmp_path / name, epochs=1, seed=seed),
                on_step=lambda r, n=name: steps[n].append(r.indices))
    assert all(torch.equal(x, y) for x, y in zip(steps["a"], steps["b"]))
    assert not torch.equal(steps["a"][0], steps["c"][0])
    wa = torch.load(tmp_path / "a" / "last.pth", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b" / "last.pth", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cached_and_online_runs_see_the_same_batches_and_losses(two_teachers, tmp_path: Path) -> None:
    """A whole epoch, one seed. The learning rate is made negligible so both students stay the same network
    and each batch's loss differs only by what float16 storage of the teacher outputs explains (float16 keeps
    11 significant bits: a relative rounding of at most 2**-11 = 4.9e-4 per stored number)."""
    cache, ids, _ = two_teachers
    runs: dict[str, list[StepRecord]] = {"cached": [], "online": []}
    for name in runs:
        distill(request(cache, ids, tmp_path / name, epochs=1, lr=1e-12, online=name == "online"),
                on_step=runs[name].append)
    cached, online = runs["cached"], runs["online"]
    assert len(cached) == len(online) == 1437 // 64
    for c, o in zip(cached, online):
        assert torch.equal(c.indices, o.indices)
        assert c.terms.keys() == o.terms.keys() == {"ce", "kd", "feat"}
        assert c.terms["ce"] == pytest.approx(o.terms["ce"], rel=1e-6)  # no teacher in it
        for term in ("kd", "feat"):
            assert c.terms[term] == pytest.approx(o.terms[term], rel=2e-3, abs=1e-6), (c.step, term)
        assert c.total == pytest.approx(o.total, rel=2e-3)


def test_online_refuses_a_changed_checkpoint(two_teachers, tmp_path: Path) -> None:
    cache, ids, ckpts = two_teachers
    original = ckpts[0].read_bytes()
    torch.manual_seed(99)
    torch.save({"model": build_model("resnet8", 10).state_dict()}, ckpts[0])
    try:
        with pytest.raises(KdcacheError, match="changed since teacher store .* was written"):
            distill(request(cache, ids, tmp_path / "run", epochs=1, online=True))
    finally:
        ckpts[0].write_bytes(original)


def test_refusals(two_teachers, tmp_path: Path) -> None:
    cache, ids, ckpts = two_teachers
    other = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpts[0], "--dataset", "digits",
                    "--cache", cache, "--views", 2, "--chunk-rows", 256, "--device", "cpu")
    other_id = other.stdout.strip().splitlines()[-1]
    with pytest.raises(KdcacheError, match=rf"with different --views \({ids[0]} 3, {other_id} 2\); precompute them "
                                           "with the same --views"):
        distill(request(cache, [ids[0], other_id], tmp_path / "a"))
    with pytest.raises(KdcacheError, match="needs exactly 1 teacher|exactly one teacher"):
        distill(request(cache, ids, tmp_path / "b", method="kd"))
    distill(request(cache, ids, tmp_path / "c", epochs=1))
    with pytest.raises(KdcacheError, match="already holds a run; pass --resume"):
        distill(request(cache, ids, tmp_path / "c", epochs=1))
    with pytest.raises(KdcacheError, match="--resume: method, options differ"):
        distill(request(cache, ids, tmp_path / "c", epochs=2, method="aver", resume=True))
    group = zarr.open_group(cache / "teachers" / other_id, mode="r+")
    group.attrs["complete"] = False
    with pytest.raises(KdcacheError, match="is incomplete"):
        distill(request(cache, [other_id], tmp_path / "d"))
    group.attrs.update({"complete": True, "num_classes": 100})
    with pytest.raises(KdcacheError, match="has 100 classes but digits has 10"):
        distill(request(cache, [other_id], tmp_path / "e"))
    group.attrs["num_classes"] = 10


def test_eval_prints_top1_and_top5(two_teachers, tmp_path: Path) -> None:
    cache, ids, _ = two_teachers
    distill(request(cache, ids, tmp_path / "run", epochs=1))
    result = run_cli("eval", "--arch", "resnet8", "--checkpoint", tmp_path / "run" / "best.pth", "--dataset", "digits",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    top1, top5 = evaluate_checkpoint("resnet8", tmp_path / "run" / "best.pth", "digits", device="cpu")
    assert result.stdout.strip() == f"top-1 {top1:.2f}%  top-5 {top5:.2f}%"
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert top1 == pytest.approx(metrics["test_top1"])


def test_mixed_precision_runs_on_cpu(two_teachers, tmp_path: Path) -> None:
    cache, ids, _ = two_teachers
    steps: list[StepRecord] = []
    result = distill(request(cache, ids, tmp_path / "amp", epochs=1, amp=True), on_step=steps.append)
    assert len(steps) == 1437 // 64 and all(np.isfinite(s.total) for s in steps)
    assert json.loads((tmp_path / "amp" / "config.json").read_text())["args"]["amp"] is True
    assert result.history[0].test_top1 >= 0


def test_tensorboard_logs_hold_what_metrics_jsonl_records(two_teachers, tmp_path: Path) -> None:
    """--tensorboard on distill and train-teacher: the per-epoch scalars equal the run's own records."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cache, ids, _ = two_teachers
    run, board = tmp_path / "run", tmp_path / "tb"
    result = run_cli("distill", "--student", "resnet8", "--method", "camkd", "--teachers", ids[0], "--teachers", ids[1],
                     "--cache", cache, "--out", run, "--epochs", 2, "--batch-size", 256, "--device", "cpu",
                     "--tensorboard", board)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(board))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tags = set(events.Tags()["scalars"])
    assert {"test/top1", "test/top5", "lr", "train/ce", "train/kd", "train/total", "teacher_weight/T1",
            "teacher_weight/T2"} <= tags
    assert [e.step for e in events.Scalars("test/top1")] == [1, 2]
    assert [e.value for e in events.Scalars("test/top1")] == pytest.approx([r["test_top1"] for r in records])
    assert [e.value for e in events.Scalars("teacher_weight/T2")] == pytest.approx(
        [r["teacher_weights"][1] for r in records])

    teacher_board = tmp_path / "tb-teacher"
    trained = run_cli("train-teacher", "--arch", "resnet8", "--dataset", "digits", "--out", tmp_path / "t.pth",
                      "--epochs", 1, "--batch-size", 256, "--device", "cpu", "--tensorboard", teacher_board)
    assert trained.exit_code == 0, trained.output
    events = EventAccumulator(str(teacher_board))
    events.Reload()
    top1 = torch.load(tmp_path / "t.pth", weights_only=False)["test_top1"]
    assert [e.value for e in events.Scalars("test/top1")] == pytest.approx([top1])
    assert {"train/loss", "train/accuracy", "lr"} <= set(events.Tags()["scalars"])


def test_tensorboard_without_the_package_is_one_line_before_any_work(two_teachers, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    cache, ids, _ = two_teachers
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it raises ImportError
    result = run_cli("distill", "--student", "resnet8", "--method", "kd", "--teachers", ids[0], "--cache", cache,
                     "--out", tmp_path / "run", "--epochs", 1, "--device", "cpu", "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --tensorboard needs the tensorboard package: "
                                     "pip install 'kdcache[tensorboard]'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
