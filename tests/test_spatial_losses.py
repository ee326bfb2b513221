"""The feature methods on last-block maps (the official CA-MKD form), against a plain loop and the official formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.losses import Batch, MapAligner, MethodOptions, build_method

B, C = 4, 3
STUDENT = (3, 4, 4)                     # (C_s, H_s, W_s)
TEACHERS = [(2, 2, 2), (3, 4, 4)]       # one pooled down from 4x4 to 2x2, one at the student's size
BN_EPS = 1e-5


def make_case(name: str, options: MethodOptions = MethodOptions(), seed: int = 0, epoch: int = 2,
              teachers: list[tuple[int, int, int]] = TEACHERS):
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    s = (2.0 * torch.randn(B, C, generator=gen, dtype=d)).requires_grad_(True)
    g = torch.randn(B, *STUDENT, generator=gen, dtype=d).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=gen)
    z = [3.0 * torch.randn(B, C, generator=gen, dtype=d) for _ in teachers]
    h = [torch.rand(B, *t, generator=gen, dtype=d) for t in teachers]
    heads = [(torch.randn(C, t[0], generator=gen, dtype=d), torch.randn(C, generator=gen, dtype=d)) for t in teachers]
    method = build_method(name, num_classes=C, student_dim=STUDENT, teacher_dims=teachers,
                          teacher_heads=heads if name == "camkd" else None, options=options).to(d)
    with torch.no_grad():
        for al in method.aligners:
            al.conv.weight.copy_(torch.randn(al.conv.weight.shape, generator=gen, dtype=d))
            al.conv.bias.copy_(0.5 * torch.randn(al.conv.bias.shape, generator=gen, dtype=d))
            al.bn.weight.copy_(0.5 + torch.rand(al.bn.weight.shape, generator=gen, dtype=d))
            al.bn.bias.copy_(0.3 * torch.randn(al.bn.bias.shape, generator=gen, dtype=d))
    return method, Batch(s, g, y, z, h, epoch), heads


# -- an independent plain loop over (sample, teacher, channel, position) ----------------------------


def loop_aligned(al: MapAligner, g: list, teacher: tuple[int, int, int]) -> list:
    """Block-average the student map to the teacher's H×W, 1x1 conv, BN (train: batch statistics), ReLU."""
    c_t, h_t, w_t = teacher
    c_s, h_s, w_s = STUDENT
    assert h_s % h_t == 0 and w_s % w_t == 0  # adaptive pooling of an exact multiple: plain block means
    fy, fx = h_s // h_t, w_s // w_t
    w, b = al.conv.weight.detach().tolist(), al.conv.bias.detach().tolist()
    gam, bet = al.bn.weight.detach().tolist(), al.bn.bias.detach().tolist()
    pooled = [[[[sum(g[i][c][y * fy + a][x * fx + e] for a in range(fy) for e in range(fx)) / (fy * fx)
                 for x in range(w_t)] for y in range(h_t)] for c in range(c_s)] for i in range(B)]
    lin = [[[[sum(w[o][c][0][0] * pooled[i][c][y][x] for c in range(c_s)) + b[o]
              for x in range(w_t)] for y in range(h_t)] for o in range(c_t)] for i in range(B)]
    out = [[[[0.0] * w_t for _ in range(h_t)] for _ in range(c_t)] for _ in range(B)]
    n = B * h_t * w_t
    for o in range(c_t):
        vals = [lin[i][o][y][x] for i in range(B) for y in range(h_t) for x in range(w_t)]
        mean = sum(vals) / n
        var = sum((v - mean) ** 2 for v in vals) / n
        for i in range(B):
            for y in range(h_t):
                for x in range(w_t):
                    norm = (lin[i][o][y][x] - mean) / math.sqrt(var + BN_EPS)
                    out[i][o][y][x] = max(0.0, gam[o] * norm + bet[o])
    return out


def loop_distance(h: list, r: list, teacher: tuple[int, int, int]) -> float:
    c_t, h_t, w_t = teacher
    return sum((h[o][y][x] - r[o][y][x]) ** 2 for o in range(c_t) for y in range(h_t) for x in range(w_t)) / (
        c_t * h_t * w_t)


def loop_ce(z: list, label: int) -> float:
    m = max(z)
    return -(z[label] - m - math.log(sum(math.exp(v - m) for v in z)))


def loop_confidence(losses: list) -> list:
    m = max(losses)
    e = [math.exp(v - m) for v in losses]
    return [(1.0 - v / sum(e)) / (len(losses) - 1) for v in e]


def loop_feature_term(name: str, method, batch: Batch, heads) -> float:
    g = batch.student_feature.detach().tolist()
    y = batch.labels.tolist()
    k_ = len(TEACHERS)
    r = [loop_aligned(al, g, t) for al, t in zip(method.aligners, TEACHERS)]
    h = [t.tolist() for t in batch.teacher_features]
    dist = [[loop_distance(h[k][i], r[k][i], TEACHERS[k]) for i in range(B)] for k in range(k_)]
    if name == "fitnet-mkd":
        return sum(sum(dist[k]) / B for k in range(k_)) / k_
    v = [[0.0] * B for _ in range(k_)]
    for i in range(B):
        losses = []
        for k, (c_t, h_t, w_t) in enumerate(TEACHERS):
            pooled = [sum(r[k][i][o][a][e] for a in range(h_t) for e in range(w_t)) / (h_t * w_t) for o in range(c_t)]
            w_k, b_k = heads[k][0].tolist(), heads[k][1].tolist()
            losses.append(loop_ce([sum(w_k[c][o] * pooled[o] for o in range(c_t)) + b_k[c] for c in range(C)], y[i]))
        for k, weight in enumerate(loop_confidence(losses)):
            v[k][i] = weight
    return sum(v[k][i] * dist[k][i] for k in range(k_) for i in range(B)) / (B * k_)


@pytest.mark.parametrize("name", ["camkd", "fitnet-mkd"])
def test_feature_term_equals_a_plain_loop(name: str) -> None:
    method, batch, heads = make_case(name, seed=1)
    out = method(batch)
    assert float(out.terms["feat"].detach()) == pytest.approx(loop_feature_term(name, method, batch, heads), rel=1e-10)


# -- the official CAMKD formula (distiller_zoo/CAMKD.py with models/util.py's CalWeight and Embed) -------------


def official_feature_term(method, batch: Batch, heads) -> tuple[torch.Tensor, torch.Tensor]:
    """The official path on the same tensors: CalWeight resizes the student map (adaptive pool when it is at least
    as tall, else bilinear), Embed = Conv1x1 + BN + ReLU, the teacher's last ``distill_seq`` stage (its
    AvgPool2d over the whole map, flatten, fc) gives the logits, and CAMKD weighs the per-sample MSE by
    (1 - softmax of their CE) / (K - 1), summed and divided by B·K."""
    trans, outputs = [], []
    for al, h_t, (w, b) in zip(method.aligners, batch.teacher_features, heads):
        t_h = h_t.shape[2]
        m = batch.student_feature
        m = F.adaptive_avg_pool2d(m, (t_h, t_h)) if m.shape[2] >= t_h else F.interpolate(m, size=(t_h, t_h),
                                                                                             mode="bilinear")
        embed = nn.Sequential(al.conv, al.bn, nn.ReLU())
        r = embed(m)
        fc = nn.Linear(w.shape[1], w.shape[0]).to(w.dtype)
        with torch.no_grad():
            fc.weight.copy_(w)
            fc.bias.copy_(b)
        tail = nn.Sequential(nn.AvgPool2d(t_h), nn.Flatten(), fc)
        trans.append(r)
        outputs.append(tail(r))
    bsz = batch.labels.shape[0]
    loss_t = torch.stack([F.cross_entropy(o, batch.labels, reduction="none") for o in outputs], dim=0)
    weight = (1.0 - F.softmax(loss_t, dim=0)) / (len(trans) - 1)
    loss_st = torch.stack([F.mse_loss(s, t, reduction="none").reshape(bsz, -1).mean(-1)
                           for s, t in zip(trans, batch.teacher_features)], dim=0)
    return torch.mul(weight, loss_st).sum() / (bsz * len(trans)), weight


@pytest.mark.parametrize("teachers", [TEACHERS, [(2, 8, 8), (3, 2, 2)]])  # the second: bilinear upsampling too
def test_camkd_equals_the_official_formula(teachers) -> None:
    method, batch, heads = make_case("camkd", seed=2, teachers=teachers)
    ours = method(batch).terms["feat"]
    official, _ = official_feature_term(method, batch, heads)
    assert float(ours.detach()) == pytest.approx(float(official.detach()), rel=1e-12)
    # and its gradients with respect to the student's map and logits
    g_ours = torch.autograd.grad(ours, batch.student_feature, retain_graph=True)[0]
    g_official = torch.autograd.grad(official_feature_term(method, batch, heads)[0], batch.student_feature)[0]
    torch.testing.assert_close(g_ours, g_official, rtol=1e-10, atol=1e-12)


def test_gradients_reach_the_aligners_and_the_student_never_the_teacher_heads() -> None:
    method, batch, heads = make_case("camkd", seed=3)
    before = {n: b.clone() for n, b in method.named_buffers() if "head" in n}
    opt = torch.optim.SGD([batch.student_feature, *method.parameters()], lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        method(batch).total.backward()
        for al in method.aligners:
            assert al.conv.weight.grad.abs().sum() > 0 and al.bn.weight.grad.abs().sum() > 0
        assert batch.student_feature.grad.abs().sum() > 0
        opt.step()
    assert not any("head" in n for n, _ in method.named_parameters())
    for n, b in method.named_buffers():
        if "head" in n:
            assert torch.equal(b, before[n]) and b.grad is None and not b.requires_grad


def test_fitnet_hint_on_maps_and_the_epoch_one_rule() -> None:
    method, batch, _ = make_case("fitnet", seed=4, teachers=[TEACHERS[0]])
    r = method.aligners[0](batch.student_feature)
    expected = ((r - batch.teacher_features[0]) ** 2).flatten(1).mean(1).mean()
    out = method(batch)
    assert float(out.terms["feat"].detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert float(out.total.detach()) == pytest.approx(float((out.terms["ce"] + 100.0 * out.terms["feat"]).detach()), rel=1e-12)
    first = make_case("fitnet", seed=4, teachers=[TEACHERS[0]], epoch=1)
    out1 = first[0](first[1])
    # α = 0, and no hint in epoch 1
    assert float(out1.total.detach()) == pytest.approx(float(out1.terms["ce"].detach()), rel=1e-12)


def test_vectors_and_maps_do_not_mix() -> None:
    with pytest.raises(KdcacheError, match="both must be pooled vectors or both last-block maps"):
        build_method("fitnet-mkd", num_classes=C, student_dim=64, teacher_dims=[(2, 2, 2)])
    with pytest.raises(KdcacheError, match="camkd: teacher 0's head"):
        build_method("camkd", num_classes=C, student_dim=STUDENT, teacher_dims=[(2, 2, 2), (3, 4, 4)],
                     teacher_heads=[(torch.zeros(C, 3), torch.zeros(C)), (torch.zeros(C, 3), torch.zeros(C))])
