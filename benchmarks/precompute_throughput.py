"""Precompute throughput against its bound: the same teacher's bare forward pass, same batch, same process.

    python benchmarks/precompute_throughput.py --arch resnet32x4 --samples 2048 --views 2

The bound feeds ready-made input tensors to ``model(x)`` under inference mode and
does nothing else. Precompute does everything: plan lookup, image gather, replay
and normalisation, the forward pass, float16 conversion, compression, checksums
and the writes with their completion markers. The ratio says what the pipeline
costs beyond the teacher itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import fake_cifar100, machine
from kdcache.device import resolve_device
from kdcache.models import build_model
from kdcache.pipelines import precompute as pc
from kdcache.store import Cache, TeacherStore


@torch.inference_mode()
def bare_forward(model: torch.nn.Module, n_images: int, batch: int, device: torch.device) -> float:
    """Images per second of the bare forward pass over ``n_images`` at ``batch``."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    model(x)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(max(1, n_images // batch)):
        model(x)
    _sync(device)
    return max(1, n_images // batch) * batch / (time.perf_counter() - t0)


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

        before = bare_forward(model, n_rows, args.batch_size, device)
        req = pc.PrecomputeRequest(teacher=args.arch, checkpoint=ckpt, dataset="cifar100", data_root=root,
                                   cache=tmp / "cache", views=args.views, batch_size=args.batch_size,
                                   device=str(device))
        # Time the chunk loop alone (the per-row cost), and the whole call for reference.
        loop_seconds = []
        original = pc.write_chunks

        def timed(*a, **kw):
            t = time.perf_counter()
            original(*a, **kw)
            _sync(device)
            loop_seconds.append(time.perf_counter() - t)

        pc.write_chunks = timed
        t0 = time.perf_counter()
        result = pc.precompute(req)
        total = time.perf_counter() - t0
        pc.write_chunks = original
        after = bare_forward(model, n_rows, args.batch_size, device)

        bound = (before + after) / 2
        rate = n_rows / loop_seconds[0]
        store = TeacherStore.open(Cache.at(tmp / "cache").teacher_path(result.teacher_id), result.teacher_id)
        print(f"machine: {machine()}, device {device}")
        print(f"teacher {args.arch}, {args.views} views x {args.samples} samples = {n_rows} rows, "
              f"batch {args.batch_size}, chunk rows {store.chunk_rows}")
        print(f"bare forward (bound): {bound:9.1f} img/s  (before {before:.1f}, after {after:.1f})")
        print(f"precompute loop:      {rate:9.1f} img/s  ratio {rate / bound:.3f}")
        print(f"precompute end-to-end (plan, loop, test eval, marks): {n_rows / total:9.1f} img/s  "
              f"ratio {n_rows / total / bound:.3f}")


if __name__ == "__main__":
    main()
