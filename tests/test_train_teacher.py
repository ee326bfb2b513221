"""`kdcache train-teacher` through the training loop distill uses: the run directory, resume that compares what the
trained teacher depends on and nothing else, and a loss that turns non-finite."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.pipelines.train_teacher import TrainTeacherRequest, teacher_run, train_teacher
from kdcache.request import how_args, is_how, result_args, result_fields
from kdcache.runs import RunDir
from kdcache.training import NonFiniteLossError, recorded_args

from conftest import poison_views


def _request(out: Path, **kw) -> TrainTeacherRequest:
    defaults = dict(arch="resnet8", dataset="digits", out=out, epochs=2, batch_size=256, device="cpu", seed=0)
    return TrainTeacherRequest(**{**defaults, **kw})


def test_the_request_declares_what_the_teacher_depends_on() -> None:
    assert set(result_fields(TrainTeacherRequest)) == {
        "arch", "dataset", "epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones", "seed", "recipe",
        "image_size", "label_map"}
    assert {f.name for f in dataclasses.fields(TrainTeacherRequest) if is_how(f)} == {
        "out", "data_root", "device", "resume", "force", "eval_every", "tensorboard"}
    req = _request(Path("t.pth"), label_map={3: 5}, data_root=Path("/data"))
    assert result_args(req)["label_map"] == {"3": 5}  # as config.json reads it back
    assert how_args(req)["data_root"] == "/data"
    assert recorded_args(req, "resnet8") == {**result_args(req), "lr": 0.05, "milestones": [1], "lr_milestones": None}


def test_out_names_a_run_directory_or_the_weights_beside_one(tmp_path: Path) -> None:
    run, weights = teacher_run(tmp_path / "t1.pth")
    assert (run.path, weights) == (tmp_path / "t1", tmp_path / "t1.pth")
    run, weights = teacher_run(tmp_path / "t1")
    assert (run.path, weights) == (tmp_path / "t1", tmp_path / "t1" / "last.pth")


def test_resume_compares_what_the_teacher_depends_on_not_how_it_runs(tmp_path: Path) -> None:
    """A changed result argument is refused by name; changed how-it-runs fields are not, and the resumed teacher
    ends with the weights of a run never interrupted."""
    straight = train_teacher(_request(tmp_path / "straight.pth", epochs=3, label_map={3: 5}))
    split = tmp_path / "split.pth"
    train_teacher(_request(split, epochs=1, label_map={3: 5}))
    run = RunDir(tmp_path / "split")
    config = run.read_config()
    assert config["kind"] == "teacher"
    assert set(config["args"]) == {*result_fields(TrainTeacherRequest), "lr_milestones", "data_fingerprint"}
    assert set(config["how"]) == {f.name for f in dataclasses.fields(TrainTeacherRequest) if is_how(f)}
    assert torch.load(split, weights_only=False)["epoch"] == 1 and run.finished  # a 1-epoch teacher, resumed to 3
    for change, named in ((dict(seed=1), "seed"), (dict(label_map={3: 8}), "label_map"), (dict(lr=0.1), "lr"),
                          (dict(batch_size=128), "batch_size"), (dict(milestones=[1]), "lr_milestones")):
        with pytest.raises(KdcacheError, match=rf"^--resume: {named} differ from the run in "):
            train_teacher(_request(split, epochs=3, resume=True, **{"label_map": {3: 5}, **change}))
    assert run.finished  # a refused resume leaves the run as it was
    ckpt = torch.load(run.file(RunDir.CHECKPOINT), weights_only=False)
    torch.save({**ckpt, "args": {**ckpt["args"], "data_fingerprint": "another copy"}}, run.file(RunDir.CHECKPOINT))
    with pytest.raises(KdcacheError, match=r"^--resume: data_fingerprint differ from the run in "):
        train_teacher(_request(split, epochs=3, resume=True, label_map={3: 5}))
    torch.save(ckpt, run.file(RunDir.CHECKPOINT))
    resumed = train_teacher(_request(split, epochs=3, resume=True, label_map={3: 5}, device=None, data_root=tmp_path,
                                     tensorboard=tmp_path / "tb", eval_every=4))  # epoch 2 not evaluated, 3 the last
    assert [m.epoch for m in resumed.history] == [2, 3] and run.finished
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    assert run.read_config()["how"]["data_root"] == str(tmp_path)
    a, b = (torch.load(p, weights_only=False)["model"] for p in (straight.checkpoint, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    top1 = [m.test_top1 for m in straight.history]
    assert [r["test_top1"] for r in run.read_metrics()] == [top1[0], None, top1[2]]
    assert resumed.history[0].test_text == "test not evaluated this epoch"
    with pytest.raises(KdcacheError, match="has trained 3 epochs already, more than --epochs 2"):
        train_teacher(_request(split, epochs=2, resume=True, label_map={3: 5}))


def test_a_teacher_run_refuses_a_distill_run_directory_and_the_reverse(tmp_path: Path) -> None:
    """Both kinds share the format; --resume reads only its own kind's checkpoint."""
    out = tmp_path / "t"
    train_teacher(_request(out, epochs=1))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    torch.save({**ckpt, "method": {}, "kind": "distill"}, out / "checkpoint.pth")
    with pytest.raises(KdcacheError, match="checkpoint.pth holds a distill run, not a teacher run"):
        train_teacher(_request(out, epochs=2, resume=True))
    torch.save(ckpt, out / "checkpoint.pth")
    with pytest.raises(KdcacheError, match="checkpoint.pth holds a teacher run, not a distill run"):
        RunDir(out).read_checkpoint("distill", ())


def test_force_replaces_a_trained_teacher_and_its_run(tmp_path: Path) -> None:
    out = tmp_path / "t.pth"
    train_teacher(_request(out, epochs=2))
    with pytest.raises(KdcacheError, match="already exists; pass --resume to continue its training, --force"):
        train_teacher(_request(out, epochs=1))
    train_teacher(_request(out, epochs=1, force=True))
    run = RunDir(tmp_path / "t")
    assert [r["epoch"] for r in run.read_metrics()] == [1] and run.finished
    assert torch.load(out, weights_only=False)["epoch"] == 1


def test_a_loss_that_turns_nan_stops_the_teacher_and_keeps_its_last_good_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images that turn to NaN in epoch 2: the same one line and the same rule as distill's (the loop's)."""
    import kdcache.pipelines.train_teacher as stage

    poison_views(monkeypatch, stage, 1437 // 256 + 2)
    out = tmp_path / "t.pth"
    with pytest.raises(NonFiniteLossError) as exc:
        train_teacher(_request(out, epochs=3))
    run = RunDir(tmp_path / "t")
    assert str(exc.value) == (
        f"epoch 2, step 1: the loss term 'ce' became nan and training stopped; {run.file(RunDir.CHECKPOINT)} and "
        "best.pth keep epoch 1, the last good one (start again in a new --out with a lower --lr). Lower --lr (or "
        "check the data and the stores) and run again")
    assert torch.load(run.file(RunDir.CHECKPOINT), weights_only=False)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in run.file(RunDir.METRICS).read_text().splitlines()] == [1]
    assert not out.exists() and not run.finished
