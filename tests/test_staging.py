"""The GPU path by construction (issue 15, point 2): batches staged through reused (pinned) buffers and copied on
a side stream, the next batch's copies started before the step on the current one, a resident set on the device
where it fits, and no host sync in a distill step.

On the CPU these test the logic (the ring of staging buffers, the bit-identity of every batch with the path
without staging, the absence of scalar reads and host copies in the step); the tests marked ``cuda`` run the
pinned, side-stream path and compare it with the CPU's, and are skipped without a GPU.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_cli
from kdcache import cached
from kdcache.batches import view_batch
from kdcache.cached import CachedBatch, CachedTeachers
from kdcache.data.base import TensorSource
from kdcache.losses import method_names
from kdcache.models import build_model
from kdcache.staging import Staging, fits_on_device
from kdcache.topk import TopKLogits

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- the ring of staging buffers ------------------------------------------------------------------------


def _arrays(rng: np.random.Generator, rows: int = 8) -> dict[str, np.ndarray]:
    return {"logits0": rng.standard_normal((rows, 10)).astype(np.float16),
            "features0": rng.standard_normal((rows, 4, 3, 3)).astype(np.float32),
            "labels": rng.integers(0, 10, rows).astype(np.int64),
            "params": rng.integers(-5, 5, (rows, 3)).astype(np.int16)}


def _storages(staging: Staging) -> set[int]:
    return {b.untyped_storage().data_ptr() for s in staging._slots for b in s.buffers.values()}


def _check_ring(device: torch.device, slow_consumer: Callable[[], None] = lambda: None) -> None:
    """Many batches through a two-slot ring, every one kept: each stays what was put, none is a staging
    buffer, and the buffers are allocated once per slot and array."""
    staging = Staging(device)
    rng = np.random.default_rng(0)
    given, kept = [], []
    ahead = staging.put(given_arrays := _arrays(rng))
    given.append(given_arrays)
    for _ in range(7):
        nxt = staging.put(a := _arrays(rng))   # the next batch's copies start before this one is used
        given.append(a)
        batch = ahead.ready()
        slow_consumer()
        kept.append(batch)
        ahead = nxt
    kept.append(ahead.ready())
    assert staging.allocations == 2 * 4   # two slots of four arrays, reused for the other six batches
    buffers = _storages(staging)
    for a, t in zip(given, kept):
        for name, array in a.items():
            assert t[name].device.type == device.type and t[name].dtype == torch.from_numpy(array).dtype
            assert t[name].untyped_storage().data_ptr() not in buffers
            assert torch.equal(t[name].cpu(), torch.from_numpy(array)), name   # not overwritten by a later batch
    # fewer rows fit the buffers; more rows, or another row shape or dtype, take new ones
    staging.put(_arrays(rng, rows=5))
    assert staging.allocations == 8
    staging.put(_arrays(rng, rows=9))
    assert staging.allocations == 12
    t = staging.put({"labels": np.arange(3, dtype=np.int32)}).ready()["labels"]
    assert staging.allocations == 13 and t.dtype == torch.int32 and t.tolist() == [0, 1, 2]


def test_the_ring_hands_out_tensors_of_their_own_and_reuses_its_buffers() -> None:
    _check_ring(torch.device("cpu"))
    with pytest.raises(ValueError, match="at least 1"):
        Staging(torch.device("cpu"), slots=0)


def test_a_resident_set_goes_to_the_device_where_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = torch.device("cuda")  # naming a device needs no GPU; with free memory given, nothing is asked of it
    assert fits_on_device(50, gpu, free=100) and not fits_on_device(51, gpu, free=100)
    assert fits_on_device(10**15, torch.device("cpu"))
    train = TensorSource(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), [0, 1, 2, 3])
    assert cached.resident_source(train, torch.device("cpu")).images.device.type == "cpu"
    sizes: list[int] = []
    monkeypatch.setattr(cached, "fits_on_device", lambda n, device: sizes.append(n) or False)
    assert cached.resident_source(train, torch.device("cpu")) is train   # left where it is
    assert sizes == [4 * 3 * 2 * 2]


# -- CachedTeachers: the same batches as without staging ---------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Digits teachers on one plan of 2 views: two dense pooled stores, and a top-3 store of int8 spatial
    features."""
    root = tmp_path_factory.mktemp("staging")
    ids = {}
    for name, arch, extra in (("dense0", "resnet8", []), ("dense1", "wrn_16_1", []),
                              ("compact", "resnet8", ["--logits", "topk:3", "--features", "spatial",
                                                      "--feature-dtype", "int8"])):
        torch.manual_seed(len(ids))
        ckpt = root / f"{name}.pth"
        torch.save({"model": build_model(arch, 10).state_dict()}, ckpt)
        result = run_cli("precompute", "--teacher", arch, "--checkpoint", ckpt, "--dataset", "digits",
                         "--cache", root / "cache", "--views", 2, "--chunk-rows", 256, "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
        ids[name] = result.stdout.strip().splitlines()[-1]
    return root / "cache", ids


def _unstaged(teachers: CachedTeachers, epoch: int) -> Iterator[CachedBatch]:
    """The batches as CachedTeachers made them before staging: straight from the stream, each tensor moved."""
    device = teachers.device
    view = teachers.stream.schedule.view(epoch)
    for step, b in enumerate(teachers.stream.epoch(epoch, teachers.batch_size)):
        views = view_batch(teachers.dataset, teachers.dataset.train, teachers.plan.recipe, b.indices, b.params,
                           device)
        topk = [None if s.form.temperature is None else
                TopKLogits.unpack(z.to(device), s.num_classes, s.form.temperature)
                for s, z in zip(teachers.stores, b.teacher_logits)]
        logits = [z.to(device).float() if t is None else t.dense() for t, z in zip(topk, b.teacher_logits)]
        yield CachedBatch(epoch, step, view, views, torch.as_tensor(b.labels, device=device), logits,
                          [h.to(device).float() for h in b.teacher_features], b.indices, topk)


def _same_batch(a: CachedBatch, b: CachedBatch) -> None:
    assert (a.epoch, a.step, a.view) == (b.epoch, b.step, b.view) and np.array_equal(a.indices, b.indices)
    pairs = [(a.views, b.views), (a.labels, b.labels), *zip(a.teacher_logits, b.teacher_logits),
             *zip(a.teacher_features, b.teacher_features)]
    assert len(a.teacher_logits) == len(b.teacher_logits) and len(a.teacher_features) == len(b.teacher_features)
    for x, y in pairs:
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())  # bit for bit
    assert len(a.teacher_topk) == len(b.teacher_topk)
    for s, t in zip(a.teacher_topk, b.teacher_topk):
        assert (s is None) == (t is None)
        if s is not None and t is not None:
            assert all(torch.equal(u.cpu(), v.cpu()) for u, v in ((s.values, t.values), (s.indices, t.indices),
                                                                 (s.stats, t.stats)))


@pytest.mark.parametrize("which", [("dense0", "dense1"), ("compact",)])
def test_staged_batches_are_the_unstaged_ones_bit_for_bit_and_stay_so_when_kept(stores, which) -> None:
    cache, ids = stores
    # streamed (the staging path); views held on the device are tests/test_resident.py's
    teachers = CachedTeachers([ids[w] for w in which], cache, batch_size=100, seed=4, device="cpu", resident_share=0)
    assert teachers.stream.pin_memory is False   # staging replaces pinning each batch
    for epoch in (1, 2, 3):
        kept = list(teachers.epoch(epoch))   # every batch held while the ring is reused under it
        reference = list(_unstaged(teachers, epoch))
        assert len(kept) == len(reference) == 1437 // 100
        for a, b in zip(kept, reference):
            _same_batch(a, b)
    b = kept[0]
    assert b.teacher_topk[0] is None if which[0] == "dense0" else b.teacher_topk[0] is not None
    assert b.teacher_features[0].dim() == (2 if which[0] == "dense0" else 4)
    # without teachers: views and labels alone, the same as before
    views_only = CachedTeachers([ids[which[0]]], cache, batch_size=100, seed=4, device="cpu", read_teachers=False)
    for a, b in zip(views_only.epoch(2), _unstaged(views_only, 2)):
        _same_batch(a, b)


def test_an_epoch_stopped_early_leaves_nothing_behind(stores) -> None:
    cache, ids = stores
    teachers = CachedTeachers([ids["dense0"]], cache, batch_size=100, seed=0, device="cpu", resident_share=0)
    it = teachers.epoch(1)
    first = next(it)
    it.close()
    assert first.step == 0
    _same_batch(first, next(_unstaged(teachers, 1)))
    assert not [t for t in threading.enumerate() if t.name == "kdcache-stream"]


# -- no host sync in a distill step ---------------------------------------------------------------------


class HostSyncs(TorchDispatchMode):
    """Counts, on this thread, what makes the host wait for a GPU: reading a tensor's value (``.item()``,
    ``float()``, ``int()``, ``bool()`` of a tensor: aten's _local_scalar_dense), ops whose output size depends
    on the data (nonzero, masked_select, unique, boolean-mask indexing), copies to the host by ``.cpu()`` and
    ``.tolist()``. On the CPU none of these waits, so counting them is what shows that the same step on a GPU
    would not. What it cannot see on the CPU: ``.to("cpu")`` (the same call as a move to a CPU training device)
    and blocking host-to-device copies; the CUDA test below catches those with torch's sync debug mode."""

    SIZE_FROM_DATA = {"nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim", "is_nonzero",
                      "equal", "repeat_interleave", "_local_scalar_dense"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.thread = threading.get_ident()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.SIZE_FROM_DATA:
            self.calls[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.calls["boolean mask"] += 1
        return func(*args, **kwargs)

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Also count ``Tensor.cpu`` and ``Tensor.tolist`` (no aten op on a CPU tensor)."""
        for method in ("cpu", "tolist"):
            real = getattr(torch.Tensor, method)

            def counted(t: torch.Tensor, *a: Any, _real: Any = real, _name: str = method, **k: Any) -> Any:
                if threading.get_ident() == self.thread and self in _active_modes():
                    self.calls[f".{_name}()"] += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, method, counted)


def _active_modes() -> list[TorchDispatchMode]:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    return list(_get_current_dispatch_mode_stack())


def test_the_sync_counter_sees_what_syncs() -> None:
    x = torch.randn(6)
    for f, what in ((lambda: x.sum().item(), "_local_scalar_dense"), (lambda: float(x[0]), "_local_scalar_dense"),
                    (lambda: bool((x > 0).any()), "_local_scalar_dense"), (lambda: x[x > 0], "boolean mask"),
                    (lambda: torch.nonzero(x), "nonzero"),
                    (lambda: x.cpu(), ".cpu()"), (lambda: x.tolist(), ".tolist()")):
        counter = HostSyncs()
        with pytest.MonkeyPatch.context() as patches:
            counter.patch(patches)
            with counter:
                f()
        assert counter.calls == {what: 1}, what
    with HostSyncs() as counter:
        (x * 2).sum().float().detach()
    assert not counter.calls


def _train_epochs_counted(monkeypatch: pytest.MonkeyPatch, request_: Any) -> list[Counter[str]]:
    """Run distill, counting the host syncs of each epoch's steps (the epoch-end work, evaluation and saving
    are outside ``train_epoch``)."""
    import kdcache.pipelines.distill as pipeline

    real, counts = pipeline.train_epoch, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter = HostSyncs()
        with pytest.MonkeyPatch.context() as patches:
            counter.patch(patches)
            with counter:
                sums = real(*args, **kwargs)
        counts.append(counter.calls)
        assert sums.steps == 1437 // 256
        return sums

    monkeypatch.setattr(pipeline, "train_epoch", counted)
    pipeline.distill(request_)
    return counts


_HOST_SOLVER = {"aekd"}   # solves its teacher weights on the host, in float64, every step: a sync by design


@pytest.mark.parametrize("method", sorted(set(method_names()) - _HOST_SOLVER))
def test_a_distill_step_reads_nothing_back_from_the_device(stores, method: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method's steps (dense pooled stores; kd and fitnet also on a top-K store of int8 spatial features):
    no scalar read, no data-dependent size, no copy to the host, in an epoch of fewer steps than the
    NaN watch's CHECK_EVERY (its one sync every 50 steps, and at the epoch's end, are outside the steps)."""
    from kdcache.pipelines.distill import DistillRequest

    cache, ids = stores
    runs = [[ids["dense0"]] if method in ("kd", "fitnet") else [ids["dense0"], ids["dense1"]]]
    if method in ("kd", "fitnet"):
        runs.append([ids["compact"]])
    for n, teachers in enumerate(runs):
        req = DistillRequest(student="resnet8", teachers=teachers, method=method, out=tmp_path / f"run{n}",
                             cache=cache, epochs=2, batch_size=256, milestones=[2], device="cpu")
        assert _train_epochs_counted(monkeypatch, req) == [Counter(), Counter()], teachers


# -- the CUDA path -----------------------------------------------------------------------------------------


@cuda
def test_the_ring_on_cuda_pins_its_buffers_copies_on_a_side_stream_and_keeps_every_batch() -> None:
    device = torch.device("cuda")
    staging = Staging(device)
    staging.put(_arrays(np.random.default_rng(1))).ready()
    assert all(b.is_pinned() for s in staging._slots for b in s.buffers.values())
    assert staging.stream is not None and staging.stream != torch.cuda.current_stream(device)
    # a consumer whose stream is busy long after each batch's copies were queued: the copies of later batches
    # into the same buffers must neither overtake nor be overtaken
    _check_ring(device, slow_consumer=lambda: torch.cuda._sleep(20_000_000))
    torch.cuda.synchronize()


@cuda
@pytest.mark.parametrize("which", [("dense0", "dense1"), ("compact",)])
def test_cuda_batches_are_the_cpu_ones(stores, which) -> None:
    cache, ids = stores
    on = {d: CachedTeachers([ids[w] for w in which], cache, batch_size=100, seed=4, device=d, resident_share=0)
          for d in ("cpu", "cuda")}
    assert on["cuda"]._ids_on_device and on["cuda"]._source.images.device.type == "cuda"
    for epoch in (1, 2):
        gpu = list(on["cuda"].epoch(epoch))
        torch.cuda._sleep(50_000_000)  # the batches are kept while the device is busy: nothing may change
        for a, b, c in zip(gpu, _unstaged(on["cuda"], epoch), on["cpu"].epoch(epoch), strict=True):
            assert a.views.device.type == "cuda" and a.teacher_logits[0].device.type == "cuda"
            _same_batch(a, b)   # staging changes nothing on the GPU
            # and the GPU's batches are the CPU's: bit for bit but for the spread logits of a top-K store
            # (a log on the GPU may differ from the CPU's in the last bit)
            spread_as_cpu = [z if t is None else y for z, y, t in zip(a.teacher_logits, c.teacher_logits,
                                                                      c.teacher_topk)]
            _same_batch(dataclasses.replace(a, teacher_logits=spread_as_cpu), c)
            for z, y in zip(a.teacher_logits, c.teacher_logits):
                torch.testing.assert_close(z.cpu(), y, rtol=1e-6, atol=1e-6)


@cuda
@pytest.mark.parametrize("method", ["ce", "kd", "camkd", "ebkd", "fitnet"])
def test_a_distill_epoch_on_cuda_never_syncs(stores, method: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda.set_sync_debug_mode("error") turns every synchronising CUDA call (a stream sync, a blocking
    copy, a scalar read) into an error: none may happen in an epoch's steps, data path included."""
    import kdcache.pipelines.distill as pipeline

    cache, ids = stores
    real = pipeline.train_epoch

    def strict(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(pipeline, "train_epoch", strict)
    teachers = [ids["dense0"]] if method in ("kd", "fitnet") else [ids["dense0"], ids["dense1"]]
    pipeline.distill(pipeline.DistillRequest(student="resnet8", teachers=teachers, method=method, out=tmp_path / "run",
                                             cache=cache, epochs=2, batch_size=256, milestones=[2], device="cuda"))


def test_the_counter_sees_a_sync_in_the_steps(stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NaN watch checked every 2 steps instead of 50: its check (one scalar read) is counted in the steps,
    and nothing else is; at the start of epoch 2 the watch does not check again what epoch 1's end checked."""
    from kdcache import training
    from kdcache.pipelines.distill import DistillRequest

    cache, ids = stores
    monkeypatch.setattr(training.NonFiniteWatch, "CHECK_EVERY", 2)
    req = DistillRequest(student="resnet8", teachers=[ids["dense0"]], method="kd", out=tmp_path / "run", cache=cache,
                         epochs=2, batch_size=256, milestones=[2], device="cpu")
    assert _train_epochs_counted(monkeypatch, req) == [Counter({"_local_scalar_dense": 2})] * 2  # steps 1 and 3
