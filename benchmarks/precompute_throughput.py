"""Precompute throughput against its bound: the same teacher's bare forward pass, same batch, same process.

    python benchmarks/precompute_throughput.py --arch resnet32x4 --samples 2048 --views 2

The bound feeds the same replayed views, built beforehand, to ``model(x)`` under inference mode and
does nothing else. Precompute does everything: plan lookup, image gather, replay
and normalisation, the forward pass, float16 conversion, compression, checksums
and the writes with their completion markers. The ratio says what the pipeline
costs beyond the teacher itself.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import fake_cifar100, machine
from kdcache.batches import view_batch
from kdcache.data import load_dataset
from kdcache.device import resolve_device
from kdcache.models import build_model
from kdcache.pipelines import precompute as pc
from kdcache.store import Cache, TeacherStore
from kdcache.views import draw_plan


@torch.inference_mode()
def bare_forward(model: torch.nn.Module, inputs: list[torch.Tensor], device: torch.device) -> float:
    """Images per second of the bare forward pass over ready-made input batches."""
    model(inputs[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for x in inputs:
        model(x)
    _sync(device)
    return sum(len(x) for x in inputs) / (time.perf_counter() - t0)


def real_inputs(dataset, n_rows: int, batch: int, device: torch.device) -> list[torch.Tensor]:
    """The teacher's actual inputs (replayed views of the training images), built before any timing."""
    order, params = draw_plan(dataset.recipe, 1, len(dataset.train), seed=0)
    idx = np.resize(order[0], n_rows)
    prm = np.resize(params[0], (n_rows, params.shape[2]))
    return [view_batch(dataset, dataset.train, dataset.recipe, idx[i:i + batch], prm[i:i + batch], device)
            for i in range(0, n_rows, batch)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet32x4")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = fake_cifar100(tmp / "data", args.samples)
        model = build_model(args.arch, 100)
        ckpt = tmp / "teacher.pth"
        torch.save({"model": model.state_dict()}, ckpt)
        model.eval().to(device)
        n_rows = args.samples * args.views

        inputs = real_inputs(load_dataset("cifar100", root), n_rows, args.batch_size, device)
        # Time the chunk loop alone (the per-row cost) and the whole call, alternating with the bound
        # so that drift of a shared machine hits both alike; report medians.
        loop_seconds: list[float] = []
        original = pc.write_chunks

        def timed(*a, **kw):
            t = time.perf_counter()
            original(*a, **kw)
            _sync(device)
            loop_seconds.append(time.perf_counter() - t)

        pc.write_chunks = timed
        bounds, totals = [], []
        for r in range(args.rounds):
            bounds.append(bare_forward(model, inputs, device))
            req = pc.PrecomputeRequest(teacher=args.arch, checkpoint=ckpt, dataset="cifar100", data_root=root,
                                       cache=tmp / f"cache{r}", views=args.views, batch_size=args.batch_size,
                                       device=str(device))
            t0 = time.perf_counter()
            result = pc.precompute(req)
            totals.append(time.perf_counter() - t0)
        bounds.append(bare_forward(model, inputs, device))
        pc.write_chunks = original

        bound = statistics.median(bounds)
        rate = n_rows / statistics.median(loop_seconds)
        total = statistics.median(totals)
        store = TeacherStore.open(Cache.at(tmp / "cache0").teacher_path(result.teacher_id), result.teacher_id)
        print(f"machine: {machine()}, device {device}")
        print(f"teacher {args.arch}, {args.views} views x {args.samples} samples = {n_rows} rows, "
              f"batch {args.batch_size}, chunk rows {store.chunk_rows}, {args.rounds} rounds (medians)")
        print(f"bare forward (bound): {bound:9.1f} img/s  (rounds: {', '.join(f'{b:.0f}' for b in bounds)})")
        print(f"precompute loop:      {rate:9.1f} img/s  ratio {rate / bound:.3f}  "
              f"(rounds: {', '.join(f'{n_rows / t:.0f}' for t in loop_seconds)})")
        print(f"precompute end-to-end (plan, loop, test eval, marks): {n_rows / total:9.1f} img/s  "
              f"ratio {n_rows / total / bound:.3f}")


if __name__ == "__main__":
    main()
