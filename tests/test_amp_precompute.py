"""`precompute --amp`: the teacher under autocast, its precision part of the teacher id and of the store's
attributes, its logits close to float32's, its stores read and distilled from like any other, and never mixed
with a float32 store's chunks.

Tolerance of the logits (bfloat16 autocast on the CPU against float32, both rounded to float16 as stored):
benchmarks/amp_agreement.py measured the largest difference at 0.6-1.4% of the largest |logit| and the mean
difference at 0.35-0.6% of the mean |logit| (random resnet8 and resnet8x4, trained Fashion-MNIST resnet20s;
benchmarks/RESULTS.md, "AMP for precompute"); the test allows 3% and 1.5%, over twice the worst seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import error_lines, run_cli
from kdcache.errors import KdcacheError, StoreError
from kdcache.pipelines import precompute_engine as pc
from kdcache.pipelines import precompute_cluster as pcc
from kdcache.store import Cache, TeacherStore
from kdcache.store.form import Forward, StoreForm
from kdcache.store.ids import teacher_id

ROWS = 256      # 1437 digits rows: 6 chunks a view
MAX_REL = 0.03  # largest |amp - float32| over the largest |float32 logit|
MEAN_REL = 0.015  # mean |amp - float32| over the mean |float32 logit|


def _args(ckpt: Path, cache: Path, *extra: object) -> list[object]:
    return ["precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits", "--cache", cache,
            "--views", 1, "--chunk-rows", ROWS, "--batch-size", 512, "--device", "cpu", *extra]


def _precompute(ckpt: Path, cache: Path, *extra: object) -> str:
    result = run_cli(*_args(ckpt, cache, *extra))
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def stores(digits_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One cache holding the digits teacher's float32 store and its --amp (bfloat16 on the CPU) store."""
    cache = tmp_path_factory.mktemp("amp") / "c"
    return cache, _precompute(digits_teacher, cache), _precompute(digits_teacher, cache, "--amp")


def test_the_precision_is_part_of_the_id_and_only_when_amp() -> None:
    args = ("p" * 16, "resnet8", "0" * 64)
    assert teacher_id(*args) == teacher_id(*args, StoreForm(forward="float32"))  # float32 stores keep the ids they had
    assert len({teacher_id(*args), teacher_id(*args, StoreForm(forward="amp-bfloat16")),
                teacher_id(*args, StoreForm(forward="amp-float16"))}) == 3


def test_dry_run_names_the_precision_and_its_id(digits_teacher: Path, tmp_path: Path,
                                                stores: tuple[Path, str, str]) -> None:
    _, f32, amp = stores
    runs = {name: run_cli(*_args(digits_teacher, tmp_path / "c", *extra, "--dry-run")) for name, extra in
            (("f32", ()), ("bf16", ("--amp",)), ("fp16", ("--amp", "--amp-dtype", "float16")))}
    ids = {name: r.stdout.strip().splitlines()[-1] for name, r in runs.items()}
    assert ids["f32"] == f32 and ids["bf16"] == amp and len(set(ids.values())) == 3
    assert "forward    float32 on cpu" in runs["f32"].stdout
    assert "forward    autocast bfloat16 on cpu (--amp; amp-bfloat16 is part of the teacher id)" in runs["bf16"].stdout
    assert "forward    autocast float16 on cpu" in runs["fp16"].stdout


def test_the_store_records_the_precision_and_cache_ls_and_info_show_it(stores: tuple[Path, str, str]) -> None:
    cache, f32, amp = stores
    a, b = (Cache.at(cache).open_teacher(t) for t in (f32, amp))
    assert (a.form.forward.value, b.form.forward.value) == ("float32", "amp-bfloat16")
    listing = run_cli("cache", "ls", "--cache", cache).stdout.splitlines()
    assert listing[0].split()[-2:] == ["forward", "state"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert rows[amp][-2:] == ["amp-bfloat16", "complete"] and rows[f32][-2:] == ["float32", "complete"]
    assert rows[amp][2:7] == ["resnet8", "pooled", "digits", "1", "1437"]
    info = json.loads(run_cli("cache", "info", amp, "--cache", cache).stdout)
    assert info["forward"] == "amp-bfloat16" and info["arrays"]["logits"]["dtype"] == "float16"


def test_amp_logits_are_close_to_float32_and_features_too(stores: tuple[Path, str, str]) -> None:
    cache, f32, amp = stores
    a, b = (Cache.at(cache).open_teacher(t) for t in (f32, amp))
    za, ha = (x.astype(np.float64) for x in a.read_rows(0, 0, 1437))
    zb, hb = (x.astype(np.float64) for x in b.read_rows(0, 0, 1437))
    assert not np.array_equal(za, zb)  # autocast did run
    dz = np.abs(za - zb)
    assert dz.max() <= MAX_REL * np.abs(za).max() and dz.mean() <= MEAN_REL * np.abs(za).mean(), \
        (dz.max(), np.abs(za).max(), dz.mean(), np.abs(za).mean())
    dh = np.abs(ha - hb)
    assert dh.max() <= MAX_REL * np.abs(ha).max() and dh.mean() <= MEAN_REL * np.abs(ha).mean()
    assert b.attrs["test_accuracy"] == pytest.approx(a.attrs["test_accuracy"], abs=2.0)


def test_distill_runs_from_an_amp_store(stores: tuple[Path, str, str], tmp_path: Path) -> None:
    cache, f32, amp = stores
    run = run_cli("distill", "--student", "resnet8", "--teachers", amp, "--teachers", f32, "--method", "camkd", "--cache",
                  cache, "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 256, "--device", "cpu")
    assert run.exit_code == 0, run.output


def test_a_different_amp_never_resumes_the_other_store(digits_teacher: Path, tmp_path: Path,
                                                       stores: tuple[Path, str, str]) -> None:
    """A float32 store cut short stays as it was when --amp runs: the --amp run is another store, written whole,
    whose values equal the --amp store written in one go; and a store is never reopened under the other
    precision."""
    cache = tmp_path / "c"
    req = pc.PrecomputeRequest(teacher="resnet8", checkpoint=digits_teacher, dataset="digits", cache=cache,
                               views=1, chunk_rows=ROWS, batch_size=512, device="cpu")
    job = pc.prepare(req)
    plan = pc.ensure_plan(job.cache, job.dataset, job.recipe, 1, 0, job.plan_id)
    with job.cache.teacher_lock(job.teacher_id):
        partial = job.open_store()
        pc.write_chunks(job.model, job.dataset, plan, partial, [(0, 0), (0, 1)], job.device, 512)
    assert partial.done_count() == 2
    amp = _precompute(digits_teacher, cache, "--amp")
    ref_cache, _, ref_amp = stores
    assert amp == ref_amp != job.teacher_id
    assert TeacherStore.open(cache / "teachers" / job.teacher_id, job.teacher_id,
                             require_complete=False).done_count() == 2
    got, want = (Cache.at(c).open_teacher(amp).read_rows(0, 0, 1437) for c in (cache, ref_cache))
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    with pytest.raises(StoreError, match="holds forward='float32', expected 'amp-bfloat16'"):
        TeacherStore.create(cache / "teachers" / job.teacher_id, job.teacher_id, StoreForm(forward="amp-bfloat16"),
                            job.shape, job.teacher_attrs(), *pc._head(job.model), chunk_rows=job.layout.chunk_rows,
                            shard_rows=job.layout.shard_rows)


def test_cluster_tasks_run_in_the_stores_precision(digits_teacher: Path, tmp_path: Path,
                                                   stores: tuple[Path, str, str]) -> None:
    """A dask worker's task (run here, in-process) reads the precision from the store it fills: its chunks equal
    the serial --amp run's."""
    req = pc.PrecomputeRequest(teacher="resnet8", checkpoint=digits_teacher, dataset="digits",
                               cache=tmp_path / "c", views=1, chunk_rows=ROWS, batch_size=512, device="cpu",
                               form=StoreForm(forward=Forward.AMP))
    job = pc.prepare(req)
    ref_cache, _, ref_amp = stores
    assert job.teacher_id == ref_amp and job.form.forward.value == "amp-bfloat16"
    pc.ensure_plan(job.cache, job.dataset, job.recipe, 1, 0, job.plan_id)
    with job.cache.teacher_lock(job.teacher_id):
        store = job.open_store()
        for task in pcc.chunk_tasks(job, store, pcc.teacher_spec(job, None)):
            pcc.fill_chunks(task)
    got, want = (Cache.at(c).open_teacher(ref_amp, require_complete=False).read_rows(0, 0, 1437)
                 for c in (tmp_path / "c", ref_cache))
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_the_dtype_rule() -> None:
    amp, fp16 = StoreForm(forward=Forward.AMP), StoreForm(forward=Forward.autocast("float16"))
    assert amp.on("cpu").forward.autocast_dtype == "bfloat16"
    assert fp16.on("cpu").forward.autocast_dtype == "float16"
    assert amp.on("cuda").forward.autocast_dtype == "float16"  # as distill's --amp; needs no GPU to say so
    for device, form in (("cpu", amp), ("cpu", fp16), ("cuda", amp)):  # and each device can run its dtype
        pc.check_autocast(torch.device(device), form.on(device).forward)


def test_bfloat16_on_a_gpu_without_it_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(KdcacheError, match=r"^--amp-dtype bfloat16: GPU Tesla T4 has no bfloat16 arithmetic; use "
                                           r"--amp-dtype float16 \(or drop --amp\)$"):
        pc.check_autocast(torch.device("cuda"), StoreForm(forward=Forward.autocast("bfloat16")).on("cuda").forward)


@pytest.mark.parametrize("extra, code, message", [
    (["--amp-dtype", "float16"], 1, "--amp-dtype float16 needs --amp: give --amp too, or drop --amp-dtype"),
    (["--amp", "--amp-dtype", "float8"], 2,
     "Invalid value for '--amp-dtype': 'float8' is not one of 'bfloat16', 'float16'"),
])
def test_bad_amp_options_are_one_line(digits_teacher: Path, tmp_path: Path, extra: list[str], code: int,
                                      message: str) -> None:
    result = run_cli(*_args(digits_teacher, tmp_path / "c", *extra))
    assert result.exit_code == code and len(error_lines(result.stderr)) == 1 and message in result.stderr, \
        result.output
    assert not (tmp_path / "c" / "teachers").exists()
