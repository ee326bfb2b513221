"""Parallel decoding of image files: the decode pool, read-ahead in precompute, and the GPU decoder."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fakes import write_fake_imagefolder
from kdcache.batches import read_ahead, view_batch
from kdcache.data import load_dataset
from kdcache.data import base
from kdcache.errors import DatasetError
from kdcache.models import build_model
from kdcache.pipelines import precompute as pc
from kdcache.pipelines import precompute_engine as engine

SIZES = ((24, 32), (40, 28), (33, 33), (17, 50), (64, 48), (375, 500))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 10 training images: RGB PNG, RGB JPEG and grayscale PNG files of six sizes."""
    return write_fake_imagefolder(tmp_path_factory.mktemp("tree") / "data", n_classes=3, n_per_class_train=10,
                                  n_per_class_val=2, sizes=SIZES)


def test_parallel_load_is_the_sequential_decode_in_order(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = load_dataset("imagefolder", tree).train
    indices = np.random.default_rng(0).permutation(len(source))
    expected = [base.decode_rgb(source.paths[i]) for i in indices]
    threads: set[str] = set()
    decode = base.decode_rgb

    def spy(path: str) -> torch.Tensor:
        threads.add(threading.current_thread().name)
        return decode(path)

    monkeypatch.setattr(base, "decode_rgb", spy)
    monkeypatch.setenv("KDCACHE_DECODE_WORKERS", "4")
    got = source.load(indices)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert threads and all(name.startswith("kdcache-decode") for name in threads)

    threads.clear()
    monkeypatch.setenv("KDCACHE_DECODE_WORKERS", "1")
    assert all(torch.equal(a, b) for a, b in zip(source.load(indices), expected))
    assert threads == {threading.current_thread().name}


def test_a_corrupt_file_among_many_is_named_in_one_line(tree: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    source = load_dataset("imagefolder", tree).train
    paths = list(source.paths)
    bad = [tmp_path / "bad_1.JPEG", tmp_path / "bad_2.png"]
    bad[0].write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 20)
    bad[1].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    files = paths[:13] + [str(bad[0])] + paths[13:20] + [str(bad[1])] + paths[20:]
    monkeypatch.setenv("KDCACHE_DECODE_WORKERS", "4")
    with pytest.raises(DatasetError) as err:
        base.FileSource(files, [0] * len(files)).load(range(len(files)))
    message = str(err.value)
    assert "\n" not in message and str(bad[0]) in message and str(bad[1]) not in message  # the first in order
    assert message.startswith(f"cannot decode image {bad[0]} (") and message.endswith("replace or remove the file")


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_worker_count_is_one_line(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDCACHE_DECODE_WORKERS", value)
    with pytest.raises(DatasetError, match=r"^KDCACHE_DECODE_WORKERS must be a whole number of at least 1 \(got"):
        base.decode_workers()


def test_the_default_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDCACHE_DECODE_WORKERS", raising=False)
    monkeypatch.setattr(base.os, "cpu_count", lambda: 32)
    assert base.decode_workers() == 8
    monkeypatch.setattr(base.os, "cpu_count", lambda: 2)
    assert base.decode_workers() == 2
    monkeypatch.setenv("KDCACHE_DECODE_WORKERS", " 3 ")
    assert base.decode_workers() == 3


def _load_in_child(paths: list[str], out: multiprocessing.Queue) -> None:
    images = base.FileSource(paths, [0] * len(paths)).load(range(len(paths)))
    out.put([tuple(im.shape) for im in images])


def test_a_forked_child_decodes_with_a_pool_of_its_own(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader and dask workers fork after the parent has used its pool; the child must not wait on dead threads."""
    monkeypatch.setenv("KDCACHE_DECODE_WORKERS", "3")
    source = load_dataset("imagefolder", tree).train
    shapes = [tuple(im.shape) for im in source.load(range(8))]  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_load_in_child, args=(source.paths[:8], out))
    child.start()
    try:
        assert out.get(timeout=60) == shapes
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_read_ahead_keeps_order_and_its_bound() -> None:
    made: list[int] = []
    lead: list[int] = []

    def make(i: int) -> int:
        made.append(i)
        return i * i

    for ahead in (1, 2):
        made.clear()
        lead.clear()
        got = []
        for k, value in enumerate(read_ahead(make, range(12), ahead)):
            time.sleep(0.01)  # a slow consumer: the background thread runs as far ahead as it may
            lead.append(len(made) - (k + 1))
            got.append(value)
        assert got == [i * i for i in range(12)]
        assert max(lead) == ahead  # it did run ahead, and never further than asked


def test_read_ahead_stops_early_and_passes_errors_on() -> None:
    made: list[int] = []

    def make(i: int) -> int:
        made.append(i)
        if i == 3:
            raise DatasetError("item 3 is broken")
        return i

    stream = read_ahead(make, range(100), 2)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # stops; what had not started is cancelled
    assert len(made) <= 5
    with pytest.raises(DatasetError, match="item 3 is broken"):
        list(read_ahead(make, range(100), 2))


def _precompute(root: Path, cache: Path, ckpt: Path) -> Path:
    req = pc.PrecomputeRequest(teacher="resnet8", checkpoint=ckpt, dataset="imagefolder", data_root=root,
                               cache=cache, views=2, recipe="resized-crop-flip:32", batch_size=3, chunk_rows=7,
                               device="cpu")
    result = pc.precompute(req)
    assert result.status == "written"
    return Path(result.path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pth"
    torch.save(build_model("resnet8", 3).state_dict(), path)
    return path


def test_precompute_stores_are_identical_with_one_and_several_decode_workers(
        tree: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stores = []
    for workers in ("1", "4"):
        monkeypatch.setenv("KDCACHE_DECODE_WORKERS", workers)
        stores.append(_precompute(tree, tmp_path / f"cache{workers}", teacher))
    assert stores[0].name == stores[1].name  # the same teacher id: the same plan, checkpoint and form
    one, several = (zarr.open_group(s, mode="r") for s in stores)
    for name in ("logits", "features", "done", "head/weight", "head/bias"):
        a, b = one[name][...], several[name][...]
        assert a.shape == b.shape and np.array_equal(a, b), name
    assert one["logits"].shape == (2, 30, 3)


@pytest.mark.parametrize("overlap", [True, False], ids=["gpu-overlapped", "cpu-in-turn"])
def test_precompute_decodes_at_most_the_read_ahead_batches_ahead_of_the_teacher(
        tree: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap: bool) -> None:
    """Beside a GPU's forward (forced here on the CPU) the views are made READ_AHEAD_BATCHES ahead; with the
    teacher on the CPU they are made in turn with it, none ahead."""
    built: list[int] = []
    lead: list[int] = []
    real_view_batch, real_forward = engine.view_batch, engine.forward_batch

    def counting_view_batch(*args, **kwargs) -> torch.Tensor:
        built.append(1)
        return real_view_batch(*args, **kwargs)

    def slow_forward(model, x, features="pooled", *rest):
        time.sleep(0.02)
        out = real_forward(model, x, features, *rest)
        lead.append(len(built) - (len(lead) + 1))  # batches built beyond the one now forwarded
        return out

    monkeypatch.setattr(engine, "view_batch", counting_view_batch)
    monkeypatch.setattr(engine, "forward_batch", slow_forward)
    monkeypatch.setattr(engine, "overlaps_forward", lambda device: overlap)
    store = zarr.open_group(_precompute(tree, tmp_path / "cache", teacher), mode="r")
    assert len(lead) == len(built) == 2 * (4 * 3 + 1)  # per view: chunks of 7, 7, 7, 7, 2 rows in batches of 3
    assert max(lead) == (engine.READ_AHEAD_BATCHES if overlap else 0)
    assert store.attrs["complete"] is True


def test_view_batch_is_the_same_after_a_parallel_load(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_dataset("imagefolder", tree, recipe="resized-crop-flip:48")
    from kdcache.views import draw_plan

    order, params = draw_plan(data.recipe, 1, len(data.train), seed=3, sizes=data.train.sizes)
    outs = []
    for workers in ("1", "3"):
        monkeypatch.setenv("KDCACHE_DECODE_WORKERS", workers)
        outs.append(view_batch(data, data.train, data.recipe, order[0], params[0], torch.device("cpu")))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_jpegs_are_decoded_on_the_gpu(tree: Path, tmp_path: Path) -> None:
    source = load_dataset("imagefolder", tree).train
    device = torch.device("cuda")
    got = source.load_on(range(len(source)), device)
    cpu = source.load(range(len(source)))
    for path, g, c in zip(source.paths, got, cpu):
        assert g.device.type == "cuda" and g.dtype == torch.uint8 and g.shape == c.shape
        if path.lower().endswith(".png"):
            assert torch.equal(g.cpu(), c)
        else:  # nvjpeg and libjpeg-turbo may round differently
            assert (g.cpu().int() - c.int()).abs().float().mean() < 2
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 20)
    files = source.paths[:5] + [str(bad)]
    with pytest.raises(DatasetError, match=f"cannot decode image {bad}"):
        base.FileSource(files, [0] * len(files)).load_on(range(len(files)), device)
