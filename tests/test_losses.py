"""Tests of the distillation methods against METHODS.md.

Golden numbers come from reference functions written here straight from
METHODS.md's formulas: plain Python loops over samples i and teachers k with
``math.exp``/``math.log`` on float64 lists, never calling the implementation.
Aligners use the method's actual (randomised) weights, and BatchNorm in train
mode is recomputed in the loop from batch statistics (biased variance, eps 1e-5).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError, UnknownNameError
from kdcache.losses import Batch, MethodOptions, build_method, method_info, method_names
from kdcache.losses.aekd import aekd_cap, solve_capped_simplex_qp

B, C, DS, DIMS = 5, 4, 6, [3, 5, 7]
BN_EPS = 1e-5
# METHODS.md's default (alpha, beta) per method and its teacher count, written out independently.
DEFAULTS = {"ce": (0.0, 0.0), "kd": (1.0, 0.0), "fitnet": (0.0, 100.0), "aver": (1.0, 0.0),
            "fitnet-mkd": (1.0, 100.0), "ebkd": (1.0, 0.0), "aekd": (1.0, 0.0), "camkd": (1.0, 50.0)}
N_TEACHERS = {"ce": 0, "kd": 1, "fitnet": 1, "aver": 3, "fitnet-mkd": 3, "ebkd": 3, "aekd": 3, "camkd": 3}
FEATURE_METHODS = {"fitnet", "fitnet-mkd", "camkd"}


# -- reference formulas (pure Python, float64) ----------------------------------------------


def log_softmax(xs: list[float], t: float = 1.0) -> list[float]:
    zs = [x / t for x in xs]
    m = max(zs)
    lse = m + math.log(sum(math.exp(z - m) for z in zs))
    return [z - lse for z in zs]


def softmax(xs: list[float], t: float = 1.0) -> list[float]:
    return [math.exp(v) for v in log_softmax(xs, t)]


def ce_ref(z: list[float], y: int) -> float:
    return -log_softmax(z)[y]


def kl_ref(s: list[float], z: list[float], t: float) -> float:
    """T² Σ_c p(c) (log p(c) − log q(c)), p = σ(z/T), q = σ(s/T)."""
    lp, lq = log_softmax(z, t), log_softmax(s, t)
    return t * t * sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def entropy_ref(z: list[float]) -> float:
    return -sum(math.exp(a) * a for a in log_softmax(z))


def confidence_ref(losses: list[float]) -> list[float]:
    """(1 − softmax_k(losses)[k]) / (K − 1); 1 for K = 1."""
    if len(losses) == 1:
        return [1.0]
    return [(1.0 - p) / (len(losses) - 1) for p in softmax(losses)]


def aligner_ref(params: list, rows: list[list[float]]) -> list[list[float]]:
    """ReLU(BN(A g + c)) over a batch, BN in train mode: batch mean, biased variance, eps 1e-5."""
    a, c, gam, bet = params
    n = len(rows)
    lin = [[sum(a[d][j] * g[j] for j in range(len(g))) + c[d] for d in range(len(c))] for g in rows]
    out = [[0.0] * len(c) for _ in rows]
    for d in range(len(c)):
        mean = sum(lin[i][d] for i in range(n)) / n
        var = sum((lin[i][d] - mean) ** 2 for i in range(n)) / n
        for i in range(n):
            out[i][d] = max(0.0, gam[d] * (lin[i][d] - mean) / math.sqrt(var + BN_EPS) + bet[d])
    return out


def dist_ref(h: list[float], r: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(h, r)) / len(h)


def ref_terms(name: str, d: dict, t: float, camkd_weights: str = "confidence", feature_weights: str = "v",
              lam: list[float] | None = None) -> tuple[dict[str, float], list[list[float]] | None]:
    """The unweighted terms of METHODS.md for method ``name`` and, for camkd/ebkd, the weights w[k][i]."""
    s, g, y, z, h = d["s"], d["g"], d["y"], d["z"], d["h"]
    n, k_ = len(y), len(z)
    terms = {"ce": sum(ce_ref(s[i], y[i]) for i in range(n)) / n}
    if name == "ce":
        return terms, None
    kl = [[kl_ref(s[i], z[k][i], t) for i in range(n)] for k in range(k_)]
    weights = None
    if name in ("kd", "fitnet"):
        terms["kd"] = sum(kl[0]) / n
    elif name in ("aver", "fitnet-mkd"):
        terms["kd"] = sum(sum(kl[k]) / n for k in range(k_)) / k_
    elif name == "ebkd":
        ent = [[entropy_ref(z[k][i]) for i in range(n)] for k in range(k_)]
        weights = [[1.0 - ent[k][i] / sum(ent[j][i] for j in range(k_)) for i in range(n)] for k in range(k_)]
        terms["kd"] = sum(weights[k][i] * kl[k][i] for k in range(k_) for i in range(n)) / (n * k_)
    elif name == "aekd":
        terms["kd"] = sum(lam[k] * sum(kl[k]) / n for k in range(k_))
    elif name == "camkd":
        if camkd_weights == "uniform":
            weights = [[1.0 / k_] * n for _ in range(k_)]
        else:
            per_sample = [confidence_ref([ce_ref(z[k][i], y[i]) for k in range(k_)]) for i in range(n)]
            weights = [[per_sample[i][k] for i in range(n)] for k in range(k_)]
        terms["kd"] = sum(weights[k][i] * kl[k][i] for k in range(k_) for i in range(n)) / (n * k_)
    if name in FEATURE_METHODS:
        r = [aligner_ref(d["al"][k], g) for k in range(k_)]
        dist = [[dist_ref(h[k][i], r[k][i]) for i in range(n)] for k in range(k_)]
        if name == "camkd":
            if camkd_weights == "uniform" or feature_weights == "w":
                v = weights
            else:
                per_sample = []
                for i in range(n):
                    losses = []
                    for k in range(k_):
                        w_k, b_k = d["heads"][k]
                        zhat = [sum(w_k[c][j] * r[k][i][j] for j in range(len(r[k][i]))) + b_k[c]
                                for c in range(len(b_k))]
                        losses.append(ce_ref(zhat, y[i]))
                    per_sample.append(confidence_ref(losses))
                v = [[per_sample[i][k] for i in range(n)] for k in range(k_)]
            terms["feat"] = sum(v[k][i] * dist[k][i] for k in range(k_) for i in range(n)) / (n * k_)
        else:
            terms["feat"] = sum(sum(dist[k]) / n for k in range(k_)) / k_
    return terms, weights


def ref_total(name: str, terms: dict[str, float], gamma: float, alpha: float, beta: float, epoch: int) -> float:
    total = gamma * terms["ce"]
    if "kd" in terms:
        total += alpha * terms["kd"]
    if "feat" in terms and epoch > 1:  # the official loop: CE and KD only in epoch 1, for every feature method
        total += beta * terms["feat"]
    return total


def kkt_ok(lam: list[float], q: list[list[float]], u: float, tol: float = 1e-7) -> bool:
    """KKT conditions of min λᵀQλ on {Σλ = 1, 0 ≤ λ ≤ u}: one μ with ∇_k = μ where free,
    ∇_k ≥ μ at 0 and ∇_k ≤ μ at u (sufficient for the convex problem)."""
    grad = [2.0 * sum(q[k][j] * lam[j] for j in range(len(lam))) for k in range(len(lam))]
    scale = max([abs(x) for x in grad] + [abs(x) for row in q for x in row] + [1e-300])
    lo, hi = -math.inf, math.inf
    for k, value in enumerate(lam):
        if value <= 1e-9:
            hi = min(hi, grad[k])
        elif value >= u - 1e-9:
            lo = max(lo, grad[k])
        else:
            lo, hi = max(lo, grad[k]), min(hi, grad[k])
    return lo <= hi + tol * scale


def in_capped_simplex(lam: list[float], u: float, tol: float = 1e-9) -> bool:
    return abs(sum(lam) - 1.0) <= tol and all(-tol <= x <= u + tol for x in lam)


def gram_ref(d: dict, t: float) -> list[list[float]]:
    """Q = G Gᵀ with G_k = (1/B) Σ_i T (q_i − p_k,i), from the reference data."""
    s, z = d["s"], d["z"]
    n = len(s)
    q = [softmax(s[i], t) for i in range(n)]
    g = [[sum(t * (q[i][c] - softmax(z[k][i], t)[c]) for i in range(n)) / n for c in range(len(s[0]))]
         for k in range(len(z))]
    return [[sum(a * b for a, b in zip(g[k], g[j])) for j in range(len(g))] for k in range(len(g))]


def num(t: torch.Tensor) -> float:
    return float(t.detach())


# -- cases ------------------------------------------------------------------------------------


def make_case(name: str, options: MethodOptions = MethodOptions(), seed: int = 0, dtype=torch.float64,
              epoch: int = 2, n_teachers: int | None = None, dims: list[int] | None = None):
    """A built method with randomised aligners, a batch, and the same data as float64 lists."""
    gen = torch.Generator().manual_seed(seed)
    k_ = N_TEACHERS[name] if n_teachers is None else n_teachers
    dims = (dims or DIMS)[:max(k_, 1)] if k_ else []
    s = (2.0 * torch.randn(B, C, generator=gen, dtype=torch.float64))
    g = torch.randn(B, DS, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=gen)
    z = [3.0 * torch.randn(B, C, generator=gen, dtype=torch.float64) for _ in dims]
    h = [torch.rand(B, dk, generator=gen, dtype=torch.float64) for dk in dims]
    heads = [(torch.randn(C, dk, generator=gen, dtype=torch.float64),
              torch.randn(C, generator=gen, dtype=torch.float64)) for dk in dims]
    method = build_method(name, num_classes=C, student_dim=DS, teacher_dims=dims,
                          teacher_heads=heads if method_info(name).uses_heads else None, options=options)
    method.to(dtype)
    aligners = getattr(method, "aligners", [])
    with torch.no_grad():
        for al in aligners:
            al.linear.weight.copy_(torch.randn(al.linear.weight.shape, generator=gen, dtype=torch.float64))
            al.linear.bias.copy_(0.5 * torch.randn(al.linear.bias.shape, generator=gen, dtype=torch.float64))
            al.bn.weight.copy_(0.5 + torch.rand(al.bn.weight.shape, generator=gen, dtype=torch.float64))
            al.bn.bias.copy_(0.3 * torch.randn(al.bn.bias.shape, generator=gen, dtype=torch.float64))
    data = {"s": s.tolist(), "g": g.tolist(), "y": y.tolist(), "z": [t.tolist() for t in z],
            "h": [t.tolist() for t in h], "heads": [(w.tolist(), b.tolist()) for w, b in heads],
            "al": [[al.linear.weight.double().tolist(), al.linear.bias.double().tolist(),
                    al.bn.weight.double().tolist(), al.bn.bias.double().tolist()] for al in aligners]}
    s_t = s.to(dtype).requires_grad_(True)
    g_t = g.to(dtype).requires_grad_(True)
    batch = Batch(s_t, g_t, y, [t.to(dtype) for t in z], [t.to(dtype) for t in h], epoch)
    return method, batch, data


def resolved(name: str, options: MethodOptions) -> tuple[float, float, float]:
    alpha, beta = DEFAULTS[name]
    return (options.gamma, alpha if options.alpha is None else options.alpha,
            beta if options.beta is None else options.beta)


CUSTOM = {name: MethodOptions(temperature=2.5, gamma=0.7, alpha=None if name == "ce" else 1.3,
                              beta=3.0 if name in FEATURE_METHODS else None) for name in DEFAULTS}
GOLDEN = ([(n, MethodOptions(), 2) for n in DEFAULTS] + [(n, CUSTOM[n], 2) for n in DEFAULTS] + [
    ("camkd", MethodOptions(), 1),
    ("camkd", CUSTOM["camkd"], 1),
    ("camkd", MethodOptions(params={"camkd_weights": "uniform"}), 2),
    ("camkd", MethodOptions(temperature=3.0, params={"camkd_feature_weights": "w"}), 2),
    ("camkd", MethodOptions(params={"camkd_weights": "uniform", "camkd_feature_weights": "w"}), 2),
    ("camkd", MethodOptions(beta=0.0), 2),
    ("fitnet", MethodOptions(alpha=0.5), 2),
    ("fitnet", MethodOptions(alpha=0.5), 1),
    ("fitnet-mkd", MethodOptions(), 1),
    ("fitnet-mkd", CUSTOM["fitnet-mkd"], 1),
])


def check_against_reference(name, options, epoch, dtype, rel, abs_):
    method, batch, data = make_case(name, options, seed=3, dtype=dtype, epoch=epoch)
    out = method(batch)
    lam = None
    if name == "aekd":
        lam = out.teacher_weights.double().tolist()
        u = min(max(options.params.get("aekd_cap", 0.6), 1 / 3), 1.0)
        assert in_capped_simplex(lam, u, tol=1e-6)
        assert kkt_ok(lam, gram_ref(data, options.temperature), u, tol=1e-4 if dtype == torch.float32 else 1e-7)
    terms, weights = ref_terms(name, data, options.temperature, options.params.get("camkd_weights", "confidence"),
                               options.params.get("camkd_feature_weights", "v"), lam)
    assert set(out.terms) == set(terms)
    for key, value in terms.items():
        assert num(out.terms[key]) == pytest.approx(value, rel=rel, abs=abs_), key
    gamma, alpha, beta = resolved(name, options)
    assert num(out.total) == pytest.approx(ref_total(name, terms, gamma, alpha, beta, epoch), rel=rel, abs=abs_)
    if weights is not None:
        assert out.sample_weights is not None
        assert out.sample_weights.shape == (B, len(weights))
        for k, row in enumerate(weights):
            assert out.sample_weights[:, k].double().tolist() == pytest.approx(row, rel=rel, abs=abs_)
            assert float(out.teacher_weights[k]) == pytest.approx(sum(row) / len(row), rel=rel, abs=abs_)


@pytest.mark.parametrize("name,options,epoch", GOLDEN)
def test_terms_and_total_match_reference_float64(name, options, epoch):
    check_against_reference(name, options, epoch, torch.float64, 1e-9, 1e-12)


@pytest.mark.parametrize("name,options,epoch", GOLDEN)
def test_terms_and_total_match_reference_float32(name, options, epoch):
    check_against_reference(name, options, epoch, torch.float32, 2e-5, 1e-6)


@pytest.mark.parametrize("name", ["kd", "fitnet", "aver", "fitnet-mkd"])
def test_constant_teacher_weights(name):
    method, batch, _ = make_case(name)
    out = method(batch)
    k_ = N_TEACHERS[name]
    assert out.teacher_weights.tolist() == pytest.approx([1.0 / k_] * k_)
    assert out.sample_weights is None


def test_ce_has_no_teacher_weights_and_ignores_teachers():
    method, batch, data = make_case("ce")
    out = method(Batch(batch.student_logits, batch.student_feature, batch.labels, [torch.randn(B, C)] * 2,
                       [torch.randn(B, 3)] * 2, 1))
    assert out.teacher_weights is None and out.sample_weights is None
    assert num(out.total) == pytest.approx(ref_terms("ce", data, 4.0)[0]["ce"], rel=1e-12)


# -- gradients: autograd against finite differences of the reference --------------------------


def slots(data: dict) -> list[tuple]:
    """Every input the student side controls: logits, feature, aligner parameters (in module order)."""
    out = [("s", i, c) for i in range(B) for c in range(C)] + [("g", i, j) for i in range(B) for j in range(DS)]
    for k, params in enumerate(data["al"]):
        for p, tensor in enumerate(params):
            arr = np.array(tensor)
            out += [("al", k, p) + tuple(int(x) for x in idx) for idx in np.ndindex(arr.shape)]
    return out


def nudged(data: dict, slot: tuple, delta: float) -> dict:
    d = copy.deepcopy(data)
    ref = d[slot[0]]
    for index in slot[1:-1]:
        ref = ref[index]
    ref[slot[-1]] += delta
    return d


def autograd_of(slot: tuple, batch: Batch, method) -> float:
    if slot[0] == "s":
        grad = batch.student_logits.grad
        return 0.0 if grad is None else float(grad[slot[1], slot[2]])
    if slot[0] == "g":
        grad = batch.student_feature.grad
        return 0.0 if grad is None else float(grad[slot[1], slot[2]])
    al = method.aligners[slot[1]]
    param = [al.linear.weight, al.linear.bias, al.bn.weight, al.bn.bias][slot[2]]
    return 0.0 if param.grad is None else float(param.grad[slot[3:]])


GRAD_CASES = [(n, CUSTOM[n], 2) for n in DEFAULTS] + [
    ("camkd", MethodOptions(), 2), ("camkd", MethodOptions(), 1),
    ("camkd", MethodOptions(params={"camkd_feature_weights": "w"}), 2),
    ("camkd", MethodOptions(params={"camkd_weights": "uniform"}), 2),
    ("fitnet-mkd", MethodOptions(), 2), ("aekd", MethodOptions(temperature=1.5), 2)]


@pytest.mark.parametrize("name,options,epoch", GRAD_CASES)
def test_gradients_match_finite_differences_of_reference(name, options, epoch):
    """Student logits, student feature and aligners get exactly the gradient of METHODS.md's total
    (through camkd's v, not through its w, nor through aekd's λ, which are constants of the step)."""
    method, batch, data = make_case(name, options, seed=5, epoch=epoch)
    out = method(batch)
    out.total.backward()
    lam = out.teacher_weights.tolist() if name == "aekd" else None
    gamma, alpha, beta = resolved(name, options)

    def total(d):
        terms, _ = ref_terms(name, d, options.temperature, options.params.get("camkd_weights", "confidence"),
                             options.params.get("camkd_feature_weights", "v"), lam)
        return ref_total(name, terms, gamma, alpha, beta, epoch)

    step = 1e-6
    for slot in slots(data):
        numeric = (total(nudged(data, slot, step)) - total(nudged(data, slot, -step))) / (2 * step)
        assert autograd_of(slot, batch, method) == pytest.approx(numeric, rel=1e-5, abs=1e-6), slot


def test_aekd_weights_carry_no_gradient():
    method, batch, data = make_case("aekd", MethodOptions(temperature=2.0))
    out = method(batch)
    assert not out.teacher_weights.requires_grad
    out.terms["kd"].backward()
    lam, t = out.teacher_weights.tolist(), 2.0
    for i in range(B):
        q = softmax(data["s"][i], t)
        expected = [sum(lam[k] * t * (q[c] - softmax(data["z"][k][i], t)[c]) for k in range(3)) / B for c in range(C)]
        assert batch.student_logits.grad[i].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fitnet_mkd_feature_term_trains_the_aligners():
    """kdcache's deliberate fix: unlike the official script, the hint carries gradient."""
    method, batch, _ = make_case("fitnet-mkd", MethodOptions(gamma=0.0, alpha=0.0))
    out = method(batch)
    out.total.backward()
    for al in method.aligners:
        assert al.linear.weight.grad is not None and al.linear.weight.grad.abs().sum() > 0
        assert al.bn.weight.grad.abs().sum() > 0
    assert batch.student_feature.grad.abs().sum() > 0
    assert out.terms["feat"].requires_grad


def test_teacher_heads_are_frozen_buffers():
    method, batch, data = make_case("camkd", dtype=torch.float32)
    buffers = dict(method.named_buffers())
    params = dict(method.named_parameters())
    head_buffers = {n: b for n, b in buffers.items() if "head" in n}
    assert len(head_buffers) == 6 and not any("head" in n for n in params)
    before = {n: b.clone() for n, b in head_buffers.items()}
    for k, (w, b) in enumerate(data["heads"]):
        assert sorted(tuple(t.shape) for n, t in head_buffers.items() if n.endswith(f"_{k}")) == [(C,), (C, DIMS[k])]
    student = [batch.student_logits, batch.student_feature]
    aligner_before = [p.detach().clone() for p in method.parameters()]
    opt = torch.optim.SGD([*student, *method.parameters()], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(3):
        opt.zero_grad()
        out = method(batch)
        out.total.backward()
        assert all(not b.requires_grad and b.grad is None for b in head_buffers.values())
        opt.step()
    for n, b in head_buffers.items():
        assert torch.equal(b, before[n]), n
    assert all(not torch.equal(p, q) for p, q in zip(method.parameters(), aligner_before))
    assert batch.student_feature.grad.abs().sum() > 0


# -- camkd specifics ---------------------------------------------------------------------------


def test_camkd_weights_sum_to_one_and_favour_the_confident_teacher():
    gen = torch.Generator().manual_seed(11)
    method = build_method("camkd", num_classes=C, student_dim=DS, teacher_dims=DIMS,
                          teacher_heads=[(torch.randn(C, d), torch.randn(C)) for d in DIMS])
    for trial in range(60):
        scale = 0.3 + 2.7 * torch.rand(1, generator=gen).item()   # no float32 saturation of the softmax
        z = [scale * torch.randn(8, C, generator=gen) for _ in DIMS]
        y = torch.randint(0, C, (8,), generator=gen)
        out = method(Batch(torch.randn(8, C), torch.randn(8, DS), y, z, [torch.randn(8, d) for d in DIMS], 2))
        w = out.sample_weights
        assert torch.allclose(w.sum(1), torch.ones(8), atol=1e-6)
        assert bool(((w >= 0) & (w <= 0.5 + 1e-6)).all())   # 1/(K − 1) at most
        losses = torch.stack([F.cross_entropy(zk, y, reduction="none") for zk in z], dim=1)   # (B, K)
        for i in range(8):
            for a in range(3):
                for b in range(3):
                    if losses[i, a] < losses[i, b] - 1e-4:
                        assert w[i, a] > w[i, b], (trial, i, a, b)


def test_camkd_uniform_ablation_gives_one_over_k():
    method, batch, _ = make_case("camkd", MethodOptions(params={"camkd_weights": "uniform"}))
    out = method(batch)
    assert torch.allclose(out.sample_weights, torch.full((B, 3), 1 / 3, dtype=out.sample_weights.dtype))


@pytest.mark.parametrize("name", ["camkd", "fitnet-mkd", "fitnet"])
@pytest.mark.parametrize("epoch,beta", [(1, None), (2, 0.0), (1, 0.0)])
def test_feature_term_left_out(name, epoch, beta):
    """First epoch (the official loop's rule for every feature method) or beta = 0: total is γ·ce + α·kd;
    the aligners get no gradient through it, and the term is still reported."""
    method, batch, data = make_case(name, MethodOptions(beta=beta, gamma=0.9, alpha=1.0), epoch=epoch)
    out = method(batch)
    assert num(out.total) == pytest.approx(0.9 * num(out.terms["ce"]) + num(out.terms["kd"]), rel=1e-12)
    assert num(out.terms["feat"]) == pytest.approx(ref_terms(name, data, 4.0)[0]["feat"], rel=1e-9)
    out.total.backward()
    for p in method.parameters():
        assert p.grad is None or not p.grad.any()
    assert batch.student_feature.grad is None or not batch.student_feature.grad.any()


def test_camkd_feature_term_trains_the_aligners_from_epoch_two():
    method, batch, _ = make_case("camkd", epoch=2)
    method(batch).total.backward()
    for al in method.aligners:
        assert al.linear.weight.grad is not None and al.linear.weight.grad.abs().sum() > 0


def test_camkd_hand_calculated():
    """B=1, C=2, K=2, T=1, label 0. Teacher 1 logits (0, 0): CE = ln 2; teacher 2 (ln 3, 0): p = (3/4, 1/4),
    CE = ln(4/3). softmax of (ln 2, ln 4/3) = (2, 4/3)/(10/3) = (0.6, 0.4), so w = 1 − that = (0.4, 0.6).
    Student logits (0, 0): KL_1 = 0, KL_2 = 3/4 ln(3/2) + 1/4 ln(1/2); L_KD = (1/(1·2)) · 0.6 · KL_2."""
    heads = [(torch.ones(2, 1), torch.zeros(2))] * 2
    method = build_method("camkd", num_classes=2, student_dim=1, teacher_dims=[1, 1], teacher_heads=heads,
                          options=MethodOptions(temperature=1.0)).eval()
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    out = method(Batch(torch.zeros(1, 2), torch.zeros(1, 1), torch.tensor([0]), z, [torch.zeros(1, 1)] * 2, 1))
    assert out.sample_weights[0].tolist() == pytest.approx([0.4, 0.6], abs=1e-7)
    kl2 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert num(out.terms["kd"]) == pytest.approx(0.5 * 0.6 * kl2, rel=1e-6)


def test_camkd_single_teacher_weights_are_one():
    method, batch, data = make_case("camkd", n_teachers=1)
    out = method(batch)
    assert out.sample_weights.tolist() == [[1.0]] * B
    kd_method, kd_batch, _ = make_case("kd")
    assert num(out.terms["kd"]) == pytest.approx(num(kd_method(kd_batch).terms["kd"]), rel=1e-12)
    assert math.isfinite(num(out.terms["feat"]))


# -- ebkd specifics ----------------------------------------------------------------------------


def test_ebkd_hand_calculated():
    """K=2, label-free. Teacher 1 (0, 0): H = ln 2; teacher 2 (ln 3, 0): p = (3/4, 1/4),
    H = 2 ln 2 − (3/4) ln 3. w_k = 1 − H_k/(H_1 + H_2); not renormalised, the two sum to K − 1 = 1.
    Student (0, 0), T = 1: L_KD = (1/(1·2)) · w_2 · (3/4 ln(3/2) + 1/4 ln(1/2))."""
    method = build_method("ebkd", num_classes=2, student_dim=1, teacher_dims=[1, 1],
                          options=MethodOptions(temperature=1.0))
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    out = method(Batch(torch.zeros(1, 2), torch.zeros(1, 1), torch.tensor([1]), z, [torch.zeros(1, 1)] * 2, 1))
    h1, h2 = math.log(2), 2 * math.log(2) - 0.75 * math.log(3)
    w1, w2 = 1 - h1 / (h1 + h2), 1 - h2 / (h1 + h2)
    assert out.sample_weights[0].tolist() == pytest.approx([w1, w2], abs=1e-7)
    kl2 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert num(out.terms["kd"]) == pytest.approx(0.5 * w2 * kl2, rel=1e-6)


def test_ebkd_equal_entropies_give_one_minus_one_over_k():
    """Three teachers all uniform on 2 classes: H = ln 2 each, w = 1 − 1/3 = 2/3 each."""
    method = build_method("ebkd", num_classes=2, student_dim=1, teacher_dims=[1, 1, 1])
    z = [torch.zeros(2, 2)] * 3
    out = method(Batch(torch.zeros(2, 2), torch.zeros(2, 1), torch.tensor([0, 1]), z, [torch.zeros(2, 1)] * 3, 1))
    assert torch.allclose(out.sample_weights, torch.full((2, 3), 2 / 3))


def test_ebkd_single_teacher_is_plain_kd():
    method, batch, _ = make_case("ebkd", n_teachers=1)
    kd_method, kd_batch, _ = make_case("kd")
    out = method(batch)
    assert out.sample_weights.tolist() == [[1.0]] * B
    assert num(out.terms["kd"]) == pytest.approx(num(kd_method(kd_batch).terms["kd"]), rel=1e-12)


# -- aekd: the capped-simplex QP ---------------------------------------------------------------


def grid_min(q: np.ndarray, u: float, step: float = 0.005) -> float:
    n = round(1 / step)
    i1, i2 = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    l1, l2 = i1.ravel() * step, i2.ravel() * step
    l3 = 1.0 - l1 - l2
    keep = (l3 >= -1e-12) & (l1 <= u + 1e-12) & (l2 <= u + 1e-12) & (l3 <= u + 1e-12)
    lam = np.stack([l1, l2, l3], axis=1)[keep]
    return float(np.einsum("fi,ij,fj->f", lam, q, lam).min())


def objective(lam: torch.Tensor, q: np.ndarray) -> float:
    x = lam.double().numpy()
    return float(x @ q @ x)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("cap", [0.6, 1.0, 0.45])
def test_aekd_solver_reaches_the_grid_minimum(seed, cap):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(3, 4 if seed % 3 else 2))      # every third case: rank 2 < K
    g -= g.mean(1, keepdims=True) * (seed % 2)           # half the cases zero-sum like real logit gradients
    q = g @ g.T
    lam = solve_capped_simplex_qp(torch.from_numpy(q), cap)
    assert in_capped_simplex(lam.tolist(), cap)
    best, got = grid_min(q, cap), objective(lam, q)
    assert got <= best + 1e-12 * max(1.0, np.abs(q).max())
    assert best - got <= 4 * 0.005 * 3 * np.abs(q).max()
    assert kkt_ok(lam.tolist(), q.tolist(), cap)


def test_aekd_solver_cap_binds():
    """G_1 = 0: the unconstrained minimum is the vertex e_1 (objective 0); the cap 0.6 stops λ_1 there."""
    g = np.array([[0.0, 0.0, 0.0], [1.0, -0.5, 0.2], [-0.3, 1.0, 0.7]])
    q = g @ g.T
    lam = solve_capped_simplex_qp(torch.from_numpy(q), 0.6)
    assert float(lam[0]) == pytest.approx(0.6, abs=1e-9)
    assert in_capped_simplex(lam.tolist(), 0.6)
    assert objective(lam, q) <= grid_min(q, 0.6) + 1e-12
    assert solve_capped_simplex_qp(torch.from_numpy(q), 1.0).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)


def test_aekd_solver_minimum_at_a_vertex():
    """G_1 = (1, 0) is the point of the hull of {(1,0), (2,1), (2,−1)} nearest the origin."""
    g = np.array([[1.0, 0.0], [2.0, 1.0], [2.0, -1.0]])
    q = g @ g.T
    assert solve_capped_simplex_qp(torch.from_numpy(q), 1.0).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)
    capped = solve_capped_simplex_qp(torch.from_numpy(q), 0.6)
    assert float(capped[0]) == pytest.approx(0.6, abs=1e-9)
    assert capped[1:].tolist() == pytest.approx([0.2, 0.2], abs=1e-9)   # symmetric rest


def test_aekd_solver_two_teachers_closed_form():
    """K = 2: λ_1 = clamp((G_2 − G_1)·G_2 / ‖G_1 − G_2‖², 1 − u, u)."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        g = rng.normal(size=(2, 5))
        q = g @ g.T
        diff = g[1] - g[0]
        for cap in (0.6, 1.0):
            l1 = min(max(float(diff @ g[1] / (diff @ diff)), 1 - cap), cap)
            assert solve_capped_simplex_qp(torch.from_numpy(q), cap).tolist() == pytest.approx([l1, 1 - l1], abs=1e-9)


def test_aekd_solver_degenerate_gradients():
    zero = solve_capped_simplex_qp(torch.zeros(3, 3, dtype=torch.float64), 0.6)
    assert in_capped_simplex(zero.tolist(), 0.6)
    g = np.tile(np.array([[0.3, -0.2, 0.5]]), (3, 1))       # identical teachers: every feasible λ is optimal
    q = g @ g.T
    lam = solve_capped_simplex_qp(torch.from_numpy(q), 0.6)
    assert in_capped_simplex(lam.tolist(), 0.6)
    assert objective(lam, q) == pytest.approx(float(g[0] @ g[0]), rel=1e-9)


@pytest.mark.parametrize("k,seed", [(4, 0), (5, 1), (6, 2), (6, 3)])
def test_aekd_solver_kkt_for_more_teachers(k, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, 4))          # rank 4 <= K: singular Gram matrices included
    q = g @ g.T
    for cap in (0.6, 0.3, 1.0):
        u = aekd_cap(cap, k)
        lam = solve_capped_simplex_qp(torch.from_numpy(q), u)
        assert in_capped_simplex(lam.tolist(), u)
        assert kkt_ok(lam.tolist(), q.tolist(), u)


def test_aekd_refuses_more_teachers_than_its_solver_takes():
    build_method("aekd", num_classes=C, student_dim=DS, teacher_dims=[2] * 9)
    with pytest.raises(KdcacheError) as err:
        build_method("aekd", num_classes=C, student_dim=DS, teacher_dims=[2] * 10)
    assert "\n" not in str(err.value) and "teachers" in str(err.value)


def test_aekd_cap_is_clamped_like_the_official_nu():
    assert aekd_cap(0.6, 3) == pytest.approx(0.6)
    assert aekd_cap(0.1, 3) == pytest.approx(1 / 3)
    assert aekd_cap(2.0, 3) == pytest.approx(1.0)
    assert aekd_cap(0.6, 1) == pytest.approx(1.0)
    method, batch, _ = make_case("aekd", MethodOptions(params={"aekd_cap": 0.2}))
    assert method(batch).teacher_weights.tolist() == pytest.approx([1 / 3] * 3, abs=1e-9)
    single, batch1, _ = make_case("aekd", n_teachers=1)
    assert single(batch1).teacher_weights.tolist() == pytest.approx([1.0])


# -- registry ----------------------------------------------------------------------------------


def test_method_names_and_info():
    assert method_names() == ["ce", "kd", "fitnet", "aver", "fitnet-mkd", "ebkd", "aekd", "camkd"]
    for name in method_names():
        info = method_info(name)
        assert info.name == name and info.description
        assert info.n_teachers == {0: "0", 1: "1", 3: "K"}[N_TEACHERS[name]]
        assert info.uses_features == (name in FEATURE_METHODS)
        assert info.uses_heads == (name == "camkd")


def test_unknown_method_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        method_info("camkdd")
    message = str(err.value)
    assert "camkdd" in message and "\n" not in message
    assert all(name in message for name in method_names())
    with pytest.raises(UnknownNameError):
        build_method("nope", num_classes=C, student_dim=DS, teacher_dims=[3])


@pytest.mark.parametrize("name,dims", [("kd", [3, 5]), ("kd", []), ("fitnet", [3, 5]), ("fitnet", []),
                                       ("aver", []), ("fitnet-mkd", []), ("ebkd", []), ("aekd", []),
                                       ("camkd", [])])
def test_teacher_count_errors(name, dims):
    heads = [(torch.zeros(C, d), torch.zeros(C)) for d in dims]
    with pytest.raises(KdcacheError) as err:
        build_method(name, num_classes=C, student_dim=DS, teacher_dims=dims, teacher_heads=heads)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_build_accepts_fitting_teacher_counts():
    assert build_method("ce", num_classes=C, student_dim=DS, teacher_dims=[3, 5]).n_teachers == 0
    assert build_method("ce", num_classes=C, student_dim=DS, teacher_dims=[]).n_teachers == 0
    assert build_method("kd", num_classes=C, student_dim=DS, teacher_dims=[3]).n_teachers == 1
    for name in ("aver", "fitnet-mkd", "ebkd", "aekd"):
        assert build_method(name, num_classes=C, student_dim=DS, teacher_dims=[3]).n_teachers == 1
        assert build_method(name, num_classes=C, student_dim=DS, teacher_dims=DIMS).n_teachers == 3


def test_camkd_needs_fitting_heads():
    with pytest.raises(KdcacheError, match="camkd"):
        build_method("camkd", num_classes=C, student_dim=DS, teacher_dims=DIMS)
    bad = [(torch.zeros(C, d + 1), torch.zeros(C)) for d in DIMS]
    with pytest.raises(KdcacheError, match="head"):
        build_method("camkd", num_classes=C, student_dim=DS, teacher_dims=DIMS, teacher_heads=bad)
    with pytest.raises(KdcacheError, match="heads"):
        build_method("camkd", num_classes=C, student_dim=DS, teacher_dims=DIMS,
                     teacher_heads=[(torch.zeros(C, 3), torch.zeros(C))])


@pytest.mark.parametrize("name,options", [
    ("kd", MethodOptions(temperature=0.0)), ("aver", MethodOptions(beta=1.0)), ("ce", MethodOptions(alpha=1.0)),
    ("camkd", MethodOptions(params={"camkd_weights": "equal"})), ("camkd", MethodOptions(params={"camkd_feature_weights": "x"})),
    ("aekd", MethodOptions(params={"aekd_cap": 0.0}))])
def test_bad_options_are_one_line_errors(name, options):
    dims = [3] if N_TEACHERS[name] == 1 else DIMS
    with pytest.raises(KdcacheError) as err:
        build_method(name, num_classes=C, student_dim=DS, teacher_dims=dims,
                     teacher_heads=[(torch.zeros(C, d), torch.zeros(C)) for d in dims], options=options)
    assert "\n" not in str(err.value)


def test_batch_with_the_wrong_teacher_count_is_refused():
    method, batch, _ = make_case("aver")
    with pytest.raises(KdcacheError, match="3"):
        method(Batch(batch.student_logits, batch.student_feature, batch.labels, batch.teacher_logits[:2],
                     batch.teacher_features[:2], 2))


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_mixed_precision_autocast(name):
    """The training loop may call a method under CPU autocast (bfloat16): terms stay finite, backward works."""
    method, batch, _ = make_case(name, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch)
    assert all(torch.isfinite(v) for v in out.terms.values())
    out.total.backward()
    assert batch.student_logits.grad is not None
