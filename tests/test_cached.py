"""kdcache.CachedTeachers: cached teachers in your own training loop (issue 13, point 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from kdcache import CachedTeachers
from kdcache.batches import view_batch
from kdcache.errors import KdcacheError
from kdcache.models import build_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_loop.py"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two digits teachers (resnet8, wrn_16_1) on one plan of 3 views, and a third on another plan."""
    root = tmp_path_factory.mktemp("cached")
    ids = []
    for seed, (arch, views) in enumerate((("resnet8", 3), ("wrn_16_1", 3), ("resnet8", 2))):
        torch.manual_seed(seed)
        ckpt = root / f"{arch}-{seed}.pth"
        torch.save({"model": build_model(arch, 10).state_dict()}, ckpt)
        result = run_cli("precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", "digits",
                         "--cache", root / "cache", "--views", views, "--chunk-rows", 256, "--device", "cpu")
        assert result.exit_code == 0, result.output
        ids.append(result.stdout.strip().splitlines()[-1])
    return root / "cache", ids


def test_batches_hold_the_views_and_the_stored_rows_of_each_teacher(stores) -> None:
    cache, ids = stores
    teachers = CachedTeachers([i[:6] for i in ids[:2]], cache, batch_size=100, seed=3, device="cpu")
    assert teachers.num_classes == 10 and teachers.n_views == 3 and teachers.steps_per_epoch == 1437 // 100
    assert [w.shape for w, _ in teachers.heads()] == [(10, 64), (10, 64)]
    batches = list(teachers.epoch(2))
    assert len(batches) == 14 and [b.step for b in batches] == list(range(14))
    seen = np.concatenate([b.indices for b in batches])
    assert len(np.unique(seen)) == len(seen) == 1400  # each sample at most once an epoch
    b = batches[5]
    order, params = teachers.plan.view(b.view)
    rows = np.array([int(np.nonzero(order == i)[0][0]) for i in b.indices])
    expected_views = view_batch(teachers.dataset, teachers.dataset.train, teachers.plan.recipe, b.indices,
                                params[rows], torch.device("cpu"))
    assert torch.equal(b.views, expected_views)  # the views the teachers saw, bit for bit
    assert torch.equal(b.labels, torch.as_tensor(teachers.plan.labels[b.indices]))
    for k, store in enumerate(teachers.stores):
        stored = torch.from_numpy(store.group["logits"].get_orthogonal_selection((b.view, rows))).float()
        features = torch.from_numpy(store.group["features"].get_orthogonal_selection((b.view, rows))).float()
        assert b.teacher_logits[k].dtype == torch.float32 and torch.equal(b.teacher_logits[k], stored)
        assert torch.equal(b.teacher_features[k], features)
    again = [x.indices for x in CachedTeachers(ids[:2], cache, batch_size=100, seed=3, device="cpu").epoch(2)]
    assert all(np.array_equal(x, y.indices) for x, y in zip(again, batches))  # a pure function of seed, epoch


def test_ranks_get_their_slice_of_each_global_batch_and_the_dataset_form_matches(stores) -> None:
    cache, ids = stores
    whole = list(CachedTeachers(ids[:2], cache, batch_size=100, seed=1, device="cpu").epoch(1))
    for rank in (0, 1):
        part = list(CachedTeachers(ids[:2], cache, batch_size=100, seed=1, device="cpu", rank=rank, world=2).epoch(1))
        assert len(part) == len(whole)
        for p, w in zip(part, whole):
            assert np.array_equal(p.indices, w.indices[rank * 50:(rank + 1) * 50])
            assert torch.equal(p.teacher_logits[1], w.teacher_logits[1][rank * 50:(rank + 1) * 50])
    teachers = CachedTeachers(ids[:2], cache, batch_size=100, seed=1, device="cpu")
    loader = torch.utils.data.DataLoader(teachers.as_dataset(epochs=2), batch_size=None)
    assert len(loader) == 28
    from_loader = list(loader)
    assert [b.epoch for b in from_loader] == [1] * 14 + [2] * 14
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(from_loader, whole))


def test_every_check_of_distill_is_made(stores) -> None:
    cache, ids = stores
    with pytest.raises(KdcacheError, match=r"with different --views \("):
        CachedTeachers([ids[0], ids[2]], cache)
    with pytest.raises(KdcacheError, match="no teacher store matches 'ffff'"):
        CachedTeachers(["ffff"], cache)
    with pytest.raises(KdcacheError, match="no teacher stores given"):
        CachedTeachers([], cache)
    with pytest.raises(KdcacheError, match="--batch-size 2000 exceeds the 1437 training samples"):
        CachedTeachers(ids[:1], cache, batch_size=2000)
    with pytest.raises(KdcacheError, match="does not split evenly over 2 ranks"):
        CachedTeachers(ids[:1], cache, batch_size=99, rank=0, world=2)
    with pytest.raises(KdcacheError, match="unknown data set 'svhn'"):
        CachedTeachers(ids[:1], cache, dataset="svhn")


def test_the_example_trains_a_student_with_its_own_loss(stores) -> None:
    cache, ids = stores
    result = subprocess.run([sys.executable, str(EXAMPLE), "--teachers", *ids[:2], "--cache", str(cache),
                             "--epochs", "2", "--batch-size", "128", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"], result.stdout
    assert all("mean loss" in line and "test top-1" in line for line in lines)
