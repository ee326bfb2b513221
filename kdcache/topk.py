"""A top-K teacher store's rows on the device: exact per-sample scalars, and the distribution they approximate.

A top-K store keeps, per row, the K largest logits ``z_j`` (j in S, the top-K classes), and
scalars computed from all C logits (``kdcache.store.form.LOGIT_STATS``): the log-sum-exp at
T = 1 and the label's logit, so that each teacher's cross-entropy is exact (camkd's weights);
the entropy at T = 1 (ebkd's weights); the log-sum-exp ``L_T`` at the store's temperature T and
the mass ``m`` outside S at T. At T the top-K probabilities are exact, ``p_j = exp(z_j/T − L_T)``;
the classes outside S share ``m`` equally, ``p̂_c = m / (C − K)``: the maximum-entropy choice,
which needs nothing that was not stored. :meth:`TopKLogits.dense` gives logits whose softmax at T
is exactly that distribution, so every method (and a plug-in's) runs on them unchanged.

What the spreading costs (docs/LOSSES.md, "Top-K stores"): per sample, with the student's logits
``s`` and ``q = σ(s/T)``, the KD term ``T² KL(p̂‖q)`` differs from ``T² KL(p‖q)`` by at most
``T² m (log(C − K) + (max_{c∉S} s_c − min_{c∉S} s_c)/T)`` (:func:`kl_error_bound`), and its gradient
in ``s``, ``T (q − p̂)``, from the exact one by at most ``2 T m`` in L1 norm. With K = C nothing is spread
and both are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdcache.store.form import LOGIT_STATS, index_itemsize

# Rows summarised at a time: a shard of 2^16 rows of 1,000 classes then needs tens of MB of float64, not GBs.
SUMMARY_BLOCK_ROWS = 4096

_LSE, _LABEL, _ENTROPY, _LSE_T, _REST_T = (LOGIT_STATS.index(n) for n in
                                           ("lse", "label_logit", "entropy", "lse_t", "rest_t"))


@dataclass
class TopKLogits:
    """One teacher's top-K rows of a batch, float32 on the device."""

    values: Tensor       # (B, K) the K largest logits, largest first
    indices: Tensor      # (B, K) int64, their classes
    stats: Tensor        # (B, 5) the scalars of LOGIT_STATS
    num_classes: int     # C
    temperature: float   # T of the store: the temperature of lse_t and rest_t

    @classmethod
    def unpack(cls, packed: Tensor, num_classes: int, temperature: float) -> "TopKLogits":
        """From a store's packed rows ``(B, 2K + 5)`` (:func:`pack_topk`), on their device."""
        k = (packed.shape[1] - len(LOGIT_STATS)) // 2
        packed = packed.float()
        return cls(packed[:, :k], packed[:, k:2 * k].long(), packed[:, 2 * k:], int(num_classes), float(temperature))

    @classmethod
    def from_logits(cls, logits: Tensor, labels: Tensor, k: int, temperature: float) -> "TopKLogits":
        """What a top-K store at ``temperature`` would hold of these logits (rounded to float16, as stored), on
        their device: for tests, studies and plug-in authors' checks."""
        values, indices, stats = summarise_logits(logits.detach().to(torch.float16).cpu().numpy(),
                                                  labels.detach().cpu().numpy(), k, temperature)
        packed = torch.from_numpy(pack_topk(values, indices, stats)).to(logits.device)
        return cls.unpack(packed, logits.shape[1], temperature)

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def ce(self) -> Tensor:
        """``CE(z, y) = lse(z) − z_y`` per sample, ``(B,)``: exact, whatever K."""
        return self.stats[:, _LSE] - self.stats[:, _LABEL]

    def entropy(self) -> Tensor:
        """The entropy of ``σ(z)`` (T = 1) per sample, ``(B,)``: exact, whatever K."""
        return self.stats[:, _ENTROPY]

    def rest_mass(self) -> Tensor:
        """``m``: the probability at the store's T outside the top K, per sample, ``(B,)``."""
        return self.stats[:, _REST_T]

    def dense(self) -> Tensor:
        """Logits ``(B, C)`` whose softmax at T is the top-K probabilities with ``m`` spread equally over the
        other classes: the top K as stored, every other class ``T (L_T + log(m / (C − K)))`` (``m`` floored at
        the smallest float32, so that a log stays finite where nothing was left outside the K)."""
        b, c, k, t = self.values.shape[0], self.num_classes, self.k, self.temperature
        out = self.values.new_empty((b, c))
        if k < c:
            rest = self.rest_mass().clamp_min(torch.finfo(torch.float32).tiny)
            out[:] = (t * (self.stats[:, _LSE_T] + torch.log(rest) - math.log(c - k))).unsqueeze(1)
        return out.scatter_(1, self.indices, self.values)

    def outside(self) -> Tensor:
        """``(B, C)`` bool: the classes outside each row's top K."""
        mask = torch.ones((self.values.shape[0], self.num_classes), dtype=torch.bool, device=self.values.device)
        return mask.scatter_(1, self.indices, False)


def kl_error_bound(student_logits: Tensor, teacher: TopKLogits) -> Tensor:
    """Per sample, the most by which ``T² KL(p̂‖q)`` on the spread distribution can differ from the exact
    ``T² KL(p‖q)``: ``T² m (log(C − K) + (max − min of the student's logits outside the top K)/T)``; 0 when
    K = C. (Outside S, p and p̂ both sum to m; the entropy part differs by at most ``m log(C − K)`` and the
    cross part by at most ``m`` times the spread of ``log q`` there.)"""
    t, c, k = teacher.temperature, teacher.num_classes, teacher.k
    if k >= c:
        return torch.zeros(student_logits.shape[0], device=student_logits.device)
    s = student_logits.detach().float()
    outside = teacher.outside()
    top = torch.where(outside, s, torch.full_like(s, -math.inf)).amax(1)
    low = torch.where(outside, s, torch.full_like(s, math.inf)).amin(1)
    return t * t * teacher.rest_mass() * (math.log(c - k) + (top - low) / t)


# -- what a top-K store holds, from float16 logits (numpy: the writer runs it on its rows) --------------------

def index_dtype(num_classes: int) -> np.dtype:
    """The class-index dtype of a top-K store (:func:`kdcache.store.form.index_itemsize`)."""
    return np.dtype(f"uint{8 * index_itemsize(num_classes)}")


def summarise_logits(logits: np.ndarray, labels: np.ndarray, k: int,
                     temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A top-K store's rows of float16 logits ``(R, C)``: the K largest (float16, largest first; ties by class),
    their classes, and the float32 scalars of :data:`LOGIT_STATS`, computed in float64 from the float16 values
    (what a dense store holds), so that a weight from them equals the dense store's. Done in blocks of
    SUMMARY_BLOCK_ROWS rows, so a shard of 2^16 rows of 1,000 classes needs tens of MB of float64, not GBs."""
    if len(logits) > SUMMARY_BLOCK_ROWS:
        parts = [summarise_logits(logits[i:i + SUMMARY_BLOCK_ROWS], labels[i:i + SUMMARY_BLOCK_ROWS], k, temperature)
                 for i in range(0, len(logits), SUMMARY_BLOCK_ROWS)]
        values, indices, stats = (np.concatenate(p) for p in zip(*parts))
        return values, indices, stats
    z16 = np.asarray(logits, dtype=np.float16)
    z = z16.astype(np.float64)
    order, chosen = _top_k(z, k)
    values = np.take_along_axis(z16, order, axis=1)
    top = z.max(1, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(1)
    lse = top[:, 0] + np.log(total)
    entropy = lse - (e * z).sum(1) / total
    label_logit = np.take_along_axis(z, np.asarray(labels, dtype=np.int64)[:, None], axis=1)[:, 0]
    e_t = np.exp((z - top) / float(temperature))
    total_t = e_t.sum(1)
    lse_t = top[:, 0] / float(temperature) + np.log(total_t)
    rest_t = np.where(chosen, 0.0, e_t).sum(1) / total_t    # summed outside the K, not 1 - (inside)
    stats = np.stack([lse, label_logit, entropy, lse_t, rest_t], axis=1).astype(np.float32)
    return values, order.astype(index_dtype(z.shape[1])), stats


def _top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The classes of each row's K largest values, largest first and equal values by class (what a stable
    descending sort gives, at a partition's cost), and the (R, C) mask of them."""
    kth = -np.partition(-z, k - 1, axis=1)[:, k - 1:k]       # each row's K-th largest value
    greater, equal = z > kth, z == kth
    need = k - greater.sum(1, keepdims=True)                  # how many of the values equal to it are in
    chosen = greater | (equal & (np.cumsum(equal, axis=1) <= need))
    classes = np.nonzero(chosen)[1].reshape(len(z), k)        # ascending class
    by_value = np.argsort(-np.take_along_axis(z, classes, axis=1), axis=1, kind="stable")
    return np.take_along_axis(classes, by_value, axis=1), chosen


def pack_topk(values: np.ndarray, indices: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """A top-K store's rows as one float32 array ``(R, 2K + 5)`` for the way to the device: values, classes
    (exact in float32 below 2^24), scalars. :class:`kdcache.topk.TopKLogits` unpacks it."""
    return np.concatenate([values.astype(np.float32), indices.astype(np.float32), stats.astype(np.float32)], axis=1)
