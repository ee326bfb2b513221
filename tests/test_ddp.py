"""`kdcache distill` under torchrun with two CPU ranks (gloo): slices, gradient averaging, rank 0's files, resume.

Three torchrun jobs on one pair of digits stores: a 1-epoch run through tests/ddp_probe.py
(which records each rank's steps, writes and weights), its --resume to 2 epochs through
the console script, and a --resume with another method that both ranks must refuse.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from kdcache import training
from kdcache.batches import view_batch
from kdcache.data import load_dataset
from kdcache.distributed import split_batch
from kdcache.errors import KdcacheError
from kdcache.losses import Batch, MethodOptions, build_method
from kdcache.models import build_model, feature_dim
from kdcache.store import Cache
from kdcache.stream import TeacherStream

BATCH, RANKS = 128, 2
PROBE = Path(__file__).with_name("ddp_probe.py")
TOLERANCE = 1e-5   # on any weight; a step on one half alone, or on the whole batch, moves weights by ~1e-2
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint.pth", "best.pth", "last.pth", "sample_weights.npz"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two resnet8 teacher stores on one 1-view digits plan, 6 chunks a view (the last one partly past the
    last complete batch of 128)."""
    root = tmp_path_factory.mktemp("ddp")
    ids = []
    for seed in range(2):
        torch.manual_seed(seed)
        ckpt = root / f"t{seed}.pth"
        torch.save({"model": build_model("resnet8", 10).state_dict()}, ckpt)
        result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits",
                         "--cache", root / "cache", "--views", 1, "--chunk-rows", 256, "--device", "cpu")
        assert result.exit_code == 0, result.output
        ids.append(result.stdout.strip().splitlines()[-1])
    return root / "cache", ids


def torchrun(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(RANKS), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def distill_args(cache: Path, ids: list[str], out: Path, *extra: object) -> list[object]:
    args = ["distill", "--student", "resnet8", "--method", "camkd", "--cache", cache, "--out", out,
            "--batch-size", BATCH, "--lr-milestones", 2, "--device", "cpu", "--seed", 0, *extra]
    for t in ids:
        args += ["--teachers", t]
    return args


def simulate(cache: Path, ids: list[str], epochs: int) -> list[dict[str, torch.Tensor]]:
    """What two data-parallel ranks must compute, in one process: for every global batch, each half's loss (its
    own batch-norm statistics), the mean of the two halves' gradients, one SGD step. The student's parameters
    after each epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs
    try:
        c = Cache.at(cache)
        teachers = [c.open_teacher(t) for t in ids]
        plan = c.open_plan(teachers[0].plan_id)
        dataset = load_dataset("digits")
        torch.manual_seed(0)
        student = build_model("resnet8", 10)
        method = build_method("camkd", num_classes=10, student_dim=feature_dim(student),
                              teacher_dims=[t.feature_dim for t in teachers],
                              teacher_heads=[t.head() for t in teachers], options=MethodOptions())
        optimizer, scheduler, _, _ = training.build_sgd([*student.parameters(), *method.parameters()], "resnet8",
                                                        epochs, None, training.MOMENTUM, training.WEIGHT_DECAY, [2])
        stream = TeacherStream(plan, teachers, seed=0)
        after = []
        for epoch in range(1, epochs + 1):
            student.train()
            method.train()
            for b in stream.epoch(epoch, BATCH):
                x = view_batch(dataset, dataset.train, plan.recipe, b.indices, b.params, torch.device("cpu"))
                y = torch.as_tensor(b.labels)
                halves = []
                for r in range(RANKS):
                    h = slice(r * BATCH // RANKS, (r + 1) * BATCH // RANKS)
                    g, s = student(x[h])
                    halves.append(method(Batch(s.float(), g.float(), y[h], [z[h].float() for z in b.teacher_logits],
                                               [f[h].float() for f in b.teacher_features], epoch)).total)
                optimizer.zero_grad(set_to_none=True)
                (sum(halves) / RANKS).backward()
                optimizer.step()
            scheduler.step()
            after.append({k: v.detach().clone() for k, v in student.named_parameters()})
        return after
    finally:
        torch.set_num_threads(threads)


def max_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def test_two_ranks_train_on_slices_of_the_single_process_batches_and_resume(stores, tmp_path: Path) -> None:
    cache, ids = stores
    run, records = tmp_path / "run", tmp_path / "records"

    first = torchrun(PROBE, records, *distill_args(cache, ids, run, "--epochs", 1))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("distributed: 2 ranks, backend gloo") == 1
    assert first.stderr.count("epoch   1/1") == 1 and first.stdout.strip() == str(run)
    rank = [torch.load(records / f"rank{r}.pt") for r in range(RANKS)]

    # Every step, the ranks' samples side by side are exactly the single-process global batch.
    c = Cache.at(cache)
    teachers = [c.open_teacher(t) for t in ids]
    single = [b.indices.tolist() for b in TeacherStream(c.open_plan(teachers[0].plan_id), teachers, 0).epoch(1, BATCH)]
    assert len(single) == 1437 // BATCH
    for r in rank:
        assert [(e, s) for e, s, _ in r["steps"]] == [(1, s) for s in range(len(single))]
    assert [a + b for (_, _, a), (_, _, b) in zip(rank[0]["steps"], rank[1]["steps"])] == single

    # Rank 0 alone wrote the run directory; the per-sample weights cover the global batches in order.
    assert rank[0]["writes"] and rank[1]["writes"] == []
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert np.load(run / "sample_weights.npz")["indices"].tolist() == sum(single, [])

    # Gradients were averaged: both ranks hold the weights of the averaged-halves step, and agree exactly.
    assert all(torch.equal(rank[0]["params"][k], rank[1]["params"][k]) for k in rank[0]["params"])
    want = simulate(cache, ids, epochs=2)
    assert max_difference(rank[0]["params"], want[0]) < TOLERANCE

    # --resume under torchrun through the console script: epoch 2 continues from rank 0's checkpoint.
    kdcache = shutil.which("kdcache", path=os.path.dirname(sys.executable)) or shutil.which("kdcache")
    assert kdcache, "the kdcache console script is not installed"
    second = torchrun(kdcache, *distill_args(cache, ids, run, "--epochs", 2, "--resume"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("epoch   2/2") == 1 and "epoch   1/2" not in second.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    last = torch.load(run / "last.pth", weights_only=False)["model"]
    assert max_difference({k: last[k] for k in want[1]}, want[1]) < TOLERANCE

    # A refusal on rank 0 stops both ranks with its one line, instead of leaving rank 1 waiting.
    third = torchrun(kdcache, *distill_args(cache, ids, run, "--epochs", 3, "--resume", "--gamma", 2))
    assert third.returncode != 0
    assert third.stderr.count("Error: --resume: options differ from the run in") == RANKS
    assert torch.load(run / "checkpoint.pth", weights_only=False)["epoch"] == 2


def test_the_global_batch_must_split_evenly_over_the_ranks() -> None:
    assert split_batch(128, 2) == 64 and split_batch(64, 1) == 64
    with pytest.raises(KdcacheError, match="--batch-size 130 does not split evenly over 4 ranks; use a multiple of 4"):
        split_batch(130, 4)


def test_a_training_batch_leaves_each_rank_at_least_two_rows() -> None:
    """BatchNorm cannot train on one sample: distill refuses a global batch that leaves a rank one row."""
    assert split_batch(4, 2, minimum=2) == 2 and split_batch(2, 2) == 1
    with pytest.raises(KdcacheError, match=r"^--batch-size 2 over 2 ranks leaves 1 a rank, and training needs at "
                                           r"least 2 \(BatchNorm\); use at least 4$"):
        split_batch(2, 2, minimum=2)
