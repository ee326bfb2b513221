"""Top-K logit stores: the scalars by hand, the weights of camkd and ebkd equal to a dense store's on the same
teacher and rows, KL and its gradient equal to the dense ones when K = C and within the documented bound when
K < C, every method trains from them, and bad input is one line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cached import CachedTeachers
from kdcache.errors import StoreError
from kdcache.losses import Batch, MethodOptions, build_method
from kdcache.losses.base import ce_per_sample, entropy_per_sample, kl_per_sample, teachers_ce, teachers_entropy
from kdcache.models import build_model
from kdcache.store import Cache
from kdcache.topk import SUMMARY_BLOCK_ROWS, TopKLogits, kl_error_bound, summarise_logits

from conftest import error_lines, run_cli

ROWS = 256   # 1437 digits rows: 6 chunks a view


def test_the_stored_scalars_by_hand() -> None:
    z = [2.0, 0.0, 1.0, -1.0]       # exact in float16
    t, label = 2.0, 2
    values, indices, stats = summarise_logits(np.array([z], np.float16), np.array([label]), 2, t)
    assert values.dtype == np.float16 and values.tolist() == [[2.0, 1.0]]
    assert indices.dtype == np.uint8 and indices.tolist() == [[0, 2]]
    exps = [math.exp(v) for v in z]
    lse = math.log(sum(exps))
    entropy = -sum(e / sum(exps) * math.log(e / sum(exps)) for e in exps)
    exps_t = [math.exp(v / t) for v in z]
    lse_t = math.log(sum(exps_t))
    rest_t = (exps_t[1] + exps_t[3]) / sum(exps_t)
    assert stats.dtype == np.float32
    assert stats[0].tolist() == pytest.approx([lse, 1.0, entropy, lse_t, rest_t], rel=1e-7)
    # ties go to the lower class; a K of C keeps every logit and leaves no mass outside
    values, indices, stats = summarise_logits(np.array([[1.0, 3.0, 1.0]], np.float16), np.array([0]), 3, 4.0)
    assert indices.tolist() == [[1, 0, 2]] and values.tolist() == [[3.0, 1.0, 1.0]] and stats[0, 4] == 0.0
    # with many ties (float16 values of a few levels) the K are what a stable descending sort picks
    z = np.random.default_rng(0).integers(-3, 4, size=(50, 40)).astype(np.float16)
    for k in (1, 5, 17, 40):
        assert np.array_equal(summarise_logits(z, np.zeros(50, int), k, 4.0)[1],
                              np.argsort(-z.astype(np.float64), axis=1, kind="stable")[:, :k])
    # a long block is summarised in parts, with the same result as row by row
    big = (np.random.default_rng(2).standard_normal((SUMMARY_BLOCK_ROWS + 7, 30)) * 3).astype(np.float16)
    labels = np.arange(len(big)) % 30
    whole = summarise_logits(big, labels, 4, 2.0)
    for rows in (slice(0, 5), slice(SUMMARY_BLOCK_ROWS - 2, SUMMARY_BLOCK_ROWS + 7)):
        for a, b in zip(whole, summarise_logits(big[rows], labels[rows], 4, 2.0)):
            assert np.array_equal(a[rows], b)
    # 255 classes fit uint8 (255 marks an unwritten chunk); 256 need uint16
    assert summarise_logits(np.zeros((1, 255), np.float16), np.array([0]), 1, 1.0)[1].dtype == np.uint8
    assert summarise_logits(np.zeros((1, 256), np.float16), np.array([0]), 1, 1.0)[1].dtype == np.uint16


def test_the_spread_logits_give_the_top_k_probabilities_and_share_the_rest() -> None:
    torch.manual_seed(0)
    z = torch.randn(6, 10) * 3
    labels = torch.arange(6) % 10
    for k, t in ((1, 1.0), (3, 4.0), (9, 2.0)):
        top = TopKLogits.from_logits(z, labels, k, t)
        p = torch.softmax(z.half().double() / t, dim=1)
        p_hat = torch.softmax(top.dense().double() / t, dim=1)
        inside = ~top.outside()
        assert torch.allclose(p_hat[inside], p[inside], rtol=1e-5, atol=1e-7)
        share = (p * top.outside()).sum(1) / (10 - k)
        assert torch.allclose(p_hat[top.outside()], share.repeat_interleave(10 - k), rtol=1e-5, atol=1e-8)
        assert torch.allclose(top.ce().double(), ce_per_sample(z.half().double(), labels), atol=1e-5)
        assert torch.allclose(top.entropy().double(), entropy_per_sample(z.half().double()), atol=1e-5)
    every = TopKLogits.from_logits(z, labels, 10, 4.0)
    assert torch.equal(every.dense(), z.half().float())     # K = C: the logits themselves


def test_kl_and_its_gradient_stay_within_the_documented_bound() -> None:
    gen = torch.Generator().manual_seed(1)
    for c, k, t in ((100, 1, 4.0), (100, 5, 4.0), (100, 20, 1.0), (1000, 10, 4.0), (10, 3, 2.0)):
        z = (torch.randn(64, c, generator=gen) * 2).half().float()
        s = torch.randn(64, c, generator=gen) * 2
        labels = torch.randint(0, c, (64,), generator=gen)
        top = TopKLogits.from_logits(z, labels, k, t)
        exact_s, approx_s = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        exact = kl_per_sample(exact_s, z, t)
        approx = kl_per_sample(approx_s, top.dense(), t)
        exact.sum().backward()
        approx.sum().backward()
        bound = kl_error_bound(s, top)
        assert torch.all((approx - exact).abs() <= bound * (1 + 1e-4) + 1e-5), (c, k, t)
        grad_l1 = (approx_s.grad - exact_s.grad).abs().sum(1)
        assert torch.all(grad_l1 <= 2 * t * top.rest_mass() * (1 + 1e-4) + 1e-5), (c, k, t)
        assert float(bound.max()) > 0                     # the bound is not vacuous: something was spread


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Two resnet8 digits teachers in a dense and a top-3 store each on one plan; the first also in a top-10
    (= C) store and a dense one with int8 features."""
    where = tmp_path_factory.mktemp("topk")
    cache = where / "cache"
    ids = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpt = where / f"t{seed}.pth"
        torch.save({"model": build_model("resnet8", 10).state_dict()}, ckpt)
        for form in ("dense", "topk:3", "topk:10", "int8"):
            how = ["--feature-dtype", "int8"] if form == "int8" else ["--logits", form]
            result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", ckpt, "--dataset", "digits",
                             "--cache", cache, "--views", 2, "--chunk-rows", ROWS, "--batch-size", 512, "--device",
                             "cpu", *how)
            assert result.exit_code == 0, result.output
            ids[f"{form}/{seed}"] = result.stdout.strip().splitlines()[-1]
            if seed == 1 and form != "dense":
                break
    return cache, ids


def _batches(cache: Path, ids: list[str], seed: int = 3) -> list:
    teachers = CachedTeachers(ids, cache, batch_size=256, seed=seed, device="cpu")
    return [b for e in (1, 2) for b in teachers.epoch(e)]


def test_weights_from_a_top_k_store_equal_the_dense_stores(stores: tuple[Path, dict[str, str]]) -> None:
    cache, ids = stores
    dense = _batches(cache, [ids["dense/0"], ids["dense/1"]])
    top = _batches(cache, [ids["topk:3/0"], ids["topk:3/1"]])
    assert len(dense) == len(top) == 10
    camkd = build_method("camkd", num_classes=10, student_dim=64, teacher_dims=[64, 64],
                         teacher_heads=[(torch.zeros(10, 64), torch.zeros(10))] * 2, options=MethodOptions())
    ebkd = build_method("ebkd", num_classes=10, student_dim=64, teacher_dims=[64, 64], options=MethodOptions())
    worst = {"ce": 0.0, "entropy": 0.0, "camkd": 0.0, "ebkd": 0.0}
    for d, t in zip(dense, top):
        assert np.array_equal(d.indices, t.indices) and torch.equal(d.labels, t.labels)
        assert all(x is None for x in d.teacher_topk) and all(x is not None for x in t.teacher_topk)
        student = torch.randn(256, 10)
        bd = Batch(student, torch.randn(256, 64), d.labels, d.teacher_logits, d.teacher_features, 2, d.teacher_topk)
        bt = Batch(student, torch.randn(256, 64), t.labels, t.teacher_logits, t.teacher_features, 2, t.teacher_topk)
        zd, zt = torch.stack(d.teacher_logits), torch.stack(t.teacher_logits)
        worst["ce"] = max(worst["ce"], float((teachers_ce(bd, zd) - teachers_ce(bt, zt)).abs().max()))
        worst["entropy"] = max(worst["entropy"],
                               float((teachers_entropy(bd, zd) - teachers_entropy(bt, zt)).abs().max()))
        for name, method in (("camkd", camkd), ("ebkd", ebkd)):
            wd, wt = method(bd).sample_weights, method(bt).sample_weights
            worst[name] = max(worst[name], float((wd - wt).abs().max()))
        # the spread logits are not the teachers' (CE from them would be wrong): the exact rows are used
        assert float((ce_per_sample(zt, t.labels) - teachers_ce(bt, zt)).abs().max()) > 1e-3
    # the dense weights come from float16 logits in float32; the top-K ones from float32 scalars computed in
    # float64 from the same float16 logits: they agree to float32 rounding
    assert worst["ce"] < 2e-6 and worst["entropy"] < 2e-6, worst
    assert worst["camkd"] < 1e-6 and worst["ebkd"] < 1e-6, worst


def test_a_top_k_store_of_every_class_gives_the_dense_kl_and_gradient(stores: tuple[Path, dict[str, str]]) -> None:
    cache, ids = stores
    for d, t in zip(_batches(cache, [ids["dense/0"]]), _batches(cache, [ids["topk:10/0"]])):
        assert torch.equal(d.teacher_logits[0], t.teacher_logits[0])
        s = torch.randn(256, 10, requires_grad=True)
        for z in (d.teacher_logits[0], t.teacher_logits[0]):
            kl = kl_per_sample(s, z, 4.0).mean()
            grad, = torch.autograd.grad(kl, s)
            if z is d.teacher_logits[0]:
                want_kl, want_grad = kl, grad
        assert torch.equal(kl, want_kl) and torch.equal(grad, want_grad)


@pytest.mark.parametrize("method", ["kd", "aver", "ebkd", "aekd", "fitnet", "fitnet-mkd", "camkd"])
def test_every_method_trains_from_top_k_stores(stores: tuple[Path, dict[str, str]], method: str,
                                               tmp_path: Path) -> None:
    cache, ids = stores
    teachers = [ids["topk:3/0"]] if method in ("kd", "fitnet") else [ids["topk:3/0"], ids["dense/1"]]
    args = [a for t in teachers for a in ("--teachers", t)]
    result = run_cli("distill", "--student", "resnet8", *args, "--method", method, "--cache", cache,
                     "--out", tmp_path / "run", "--epochs", 2, "--batch-size", 256, "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[-1]


def test_top_k_is_part_of_the_id_and_listed(stores: tuple[Path, dict[str, str]], digits_teacher: Path,
                                            tmp_path: Path) -> None:
    cache, ids = stores
    assert len(set(ids.values())) == 6 == len(ids)
    listing = run_cli("cache", "ls", "--cache", cache).stdout.splitlines()
    assert any(line.startswith(ids["topk:3/0"]) and " topk:3@T4 " in line for line in listing)
    assert any(line.startswith(ids["dense/0"]) and " dense " in line for line in listing)
    base = ["precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits", "--cache",
            tmp_path / "c", "--views", 2, "--chunk-rows", ROWS, "--dry-run"]
    at4, at2 = (run_cli(*base, "--logits", "topk:3", "--logits-temperature", t) for t in (4, 2))
    dense = run_cli(*base)
    assert len({r.stdout.strip().splitlines()[-1] for r in (at4, at2, dense)}) == 3
    # 3 float16 values + 3 uint8 classes + 5 float32 scalars = 29 B; 4 arrays + the markers, 6 chunks each
    assert "logits     top-3 of 10 at T=4: values (2, 1437, 3) float16, classes uint8, 5 float32 scalars a row" \
        in at4.stdout
    assert "per view   220.3 KiB (157 B a row: logits 29 B + features 128 B)" in at4.stdout
    assert ("files      60 chunk files: 30 a view (6 chunks of each of topk_values, topk_indices, logit_stats, "
            "features, done)") in at4.stdout


def test_a_deleted_chunk_of_classes_or_scalars_is_found(digits_teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    result = run_cli("precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits",
                     "--cache", cache, "--views", 2, "--chunk-rows", ROWS, "--batch-size", 512, "--device", "cpu",
                     "--logits", "topk:2")
    tid = result.stdout.strip().splitlines()[-1]
    store = cache / "teachers" / tid
    (store / "topk_indices" / "c" / "0" / "1" / "0").unlink()
    (store / "logit_stats" / "c" / "1" / "2" / "0").unlink()
    opened = Cache.at(cache).open_teacher(tid)
    with pytest.raises(StoreError, match=r"topk_indices chunk \(view 0, chunk 1\) is missing"):
        opened.read_chunk(0, 1)
    with pytest.raises(StoreError, match=r"logit_stats chunk \(view 1, chunk 2\) is missing"):
        opened.read_chunk(1, 2)
    problems = opened.verify()
    assert "topk_indices: chunk (view 0, chunk 1) is missing" in problems
    assert "logit_stats: chunk (view 1, chunk 2) is missing" in problems


def test_bad_top_k_input_is_one_line(stores: tuple[Path, dict[str, str]], digits_teacher: Path,
                                     tmp_path: Path) -> None:
    cache, ids = stores
    base = ["precompute", "--teacher", "resnet8", "--checkpoint", digits_teacher, "--dataset", "digits", "--cache",
            tmp_path / "c", "--views", 2]
    distill = ["distill", "--student", "resnet8", "--cache", cache, "--out", tmp_path / "run", "--epochs", 1,
               "--batch-size", 256, "--device", "cpu"]
    cases = [
        (base + ["--logits", "topk:0"], "K of 'topk:0' must be a whole number of at least 1"),
        (base + ["--logits", "topk:11"], "K exceeds the 10 classes of digits"),
        (base + ["--logits", "top5"], "the logits form must be dense or topk:K"),
        (base + ["--logits", "topk:3", "--logits-temperature", "0"], "--logits-temperature must be a positive"),
        (distill + ["--teachers", ids["topk:3/0"], "--method", "kd", "--online"], "--online runs the teachers live"),
        (distill + ["--teachers", ids["topk:3/0"], "--method", "kd", "-T", "2"],
         "serve that temperature only: distil with --temperature 4"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        lines = error_lines(result.stderr)
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "c" / "teachers").exists()


def test_a_method_needing_every_logit_or_float16_features_is_refused(stores: tuple[Path, dict[str, str]],
                                                                     tmp_path: Path) -> None:
    import kdcache
    from kdcache.losses import LossTerms, Method, MethodInfo

    class Exacting(Method):
        info = MethodInfo("exacting", "needs every logit and float16 features", "K", uses_features=True,
                          uses_heads=False, dense_logits=True, float_features=True)

        def forward(self, batch: Batch) -> LossTerms:
            ce = torch.nn.functional.cross_entropy(batch.student_logits, batch.labels)
            return LossTerms(ce, {"ce": ce}, None, None)

    cache, ids = stores
    kdcache.register_method(Exacting)
    try:
        distill = ["distill", "--student", "resnet8", "--cache", cache, "--out", tmp_path / "run", "--epochs", 1,
                   "--batch-size", 256, "--device", "cpu", "--method", "exacting"]
        result = run_cli(*distill, "--teachers", ids["topk:3/0"])
        assert result.exit_code == 1 and error_lines(result.stderr) == [
            f"Error: exacting needs every class's logit, but store {ids['topk:3/0']} keeps the top 3 only: "
            "precompute the teacher with --logits dense"]
        result = run_cli(*distill, "--teachers", ids["int8/0"])
        assert result.exit_code == 1 and error_lines(result.stderr) == [
            f"Error: exacting needs float16 features, but store {ids['int8/0']} keeps them as int8: precompute "
            "the teacher with --feature-dtype float16"]
        assert run_cli(*distill, "--teachers", ids["dense/0"]).exit_code == 0
    finally:
        kdcache.losses._METHODS.remove("exacting")
