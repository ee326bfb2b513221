"""Precompute throughput against its bound: the same teacher's bare forward pass, same batch, same process.

    python benchmarks/precompute_throughput.py --arch resnet32x4 --samples 2048 --views 2
    python benchmarks/precompute_throughput.py --arch resnet8 --features pooled spatial   # both forms, alternating
    python benchmarks/precompute_throughput.py --device cuda --amp --batch-size 256 512 1024 --json out.json

With several ``--batch-size`` values, the bare forward is timed at each first and the fastest (the
teacher's best batch) is used for the rest. ``--amp`` runs both the bound and precompute under
autocast (precompute's ``--amp``: float16 on CUDA, bfloat16 elsewhere).

The bound feeds the same replayed views, built beforehand, to the teacher under inference mode and
does nothing else, in two ways at ``--batch-size``: ``model(x)`` (the pooled vector and the logits)
and ``forward_with_map(model, x)`` (the last-block map too, what precompute calls in every form).
Both run the same layers, so they should agree within noise. Precompute forwards consecutive chunks
of a view together up to ``--batch-size`` rows, so a spatial store's small chunks do not shrink
its batch.
Precompute does everything: plan lookup, image gather, replay
and normalisation, the forward pass, float16 conversion, compression, checksums
and the writes with their completion markers, in each ``--features`` form. The ratio says what the
pipeline costs beyond the teacher itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common import fake_cifar100, machine
from kdcache.batches import view_batch
from kdcache.data import load_dataset
from kdcache.data.base import DataSet
from kdcache.device import resolve_device
from kdcache.models import build_model, forward_with_map
from kdcache.pipelines import precompute as pc
from kdcache.pipelines import precompute_engine as engine
from kdcache.store.form import FeatureForm, Forward, StoreForm
from kdcache.views import draw_plan


@torch.inference_mode()
def bare_forward(forward: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], device: torch.device) -> float:
    """Images per second of the bare forward pass ``forward(x)`` over ready-made input batches."""
    forward(inputs[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for x in inputs:
        forward(x)
    _sync(device)
    return sum(len(x) for x in inputs) / (time.perf_counter() - t0)


def real_inputs(dataset: DataSet, n_rows: int, batch: int, device: torch.device) -> list[torch.Tensor]:
    """The teacher's actual inputs (replayed views of the training images), built before any timing."""
    order, params = draw_plan(dataset.recipe, 1, len(dataset.train), seed=0)
    idx = np.resize(order[0], n_rows)
    prm = np.resize(params[0], (n_rows, params.shape[2]))
    return [view_batch(dataset, dataset.train, dataset.recipe, idx[i:i + batch], prm[i:i + batch], device)
            for i in range(0, n_rows, batch)]


def best_batch(model: torch.nn.Module, dataset: DataSet, sizes: list[int], device: torch.device,
               autocast: contextlib.AbstractContextManager[object]) -> tuple[int, dict[int, float]]:
    """The batch of ``sizes`` at which the bare forward runs fastest (one pass over 4 batches of each), and every rate."""
    if len(sizes) == 1:
        return sizes[0], {}
    rates = {}
    for b in sizes:
        with autocast:
            rates[b] = bare_forward(model, real_inputs(dataset, 4 * b, b, device), device)
    return max(rates, key=rates.__getitem__), rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet32x4", help="The teacher (random weights: they do not change the cost).")
    ap.add_argument("--samples", type=int, default=2048, help="Synthetic CIFAR-100 training images.")
    ap.add_argument("--views", type=int, default=2, help="Views of the plan.")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[256],
                    help="The teacher's forward batch, bound and precompute; several: the fastest bare forward's.")
    ap.add_argument("--amp", action="store_true", help="Bound and precompute under autocast (precompute --amp).")
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when present).")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds of (bounds, then each form's precompute).")
    ap.add_argument("--features", nargs="+", choices=[f.value for f in FeatureForm], default=["pooled"],
                    help="Feature forms to precompute, each round in turn (default: pooled).")
    args = ap.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = fake_cifar100(tmp / "data", args.samples)
        dataset = load_dataset("cifar100", root)
        model = build_model(args.arch, 100)
        ckpt = tmp / "teacher.pth"
        torch.save({"model": model.state_dict()}, ckpt)
        model.eval().to(device)
        n_rows = args.samples * args.views
        precision = (Forward.AMP if args.amp else Forward.FLOAT32).on(device.type)
        amp = precision.autocast_dtype
        autocast = contextlib.nullcontext() if amp is None else engine._autocast(device, amp)
        batch, sweep = best_batch(model, dataset, args.batch_size, device, autocast)
        reqs = {form: pc.PrecomputeRequest(teacher=args.arch, checkpoint=ckpt, dataset="cifar100", data_root=root,
                                           views=args.views, batch_size=batch, device=str(device),
                                           form=StoreForm(features=form, forward=precision)) for form in args.features}
        chunk_rows = {form: pc.prepare(req, dataset).layout.chunk_rows for form, req in reqs.items()}
        bounds: dict[str, Callable[[torch.Tensor], object]] = {
            "model(x)": model, "forward_with_map": lambda x: forward_with_map(model, x)}
        inputs = real_inputs(dataset, n_rows, batch, device)

        # Time the chunk loop alone (the per-row cost) and the whole call, alternating with the bounds
        # so that drift of a shared machine hits all alike; report medians.
        loop_seconds: list[float] = []
        original = pc.write_chunks

        def timed(*a: Any, **kw: Any) -> None:
            t = time.perf_counter()
            original(*a, **kw)
            _sync(device)
            loop_seconds.append(time.perf_counter() - t)

        pc.write_chunks = timed
        bound_rates: dict[str, list[float]] = {key: [] for key in bounds}
        loops: dict[str, list[float]] = {form: [] for form in args.features}
        totals: dict[str, list[float]] = {form: [] for form in args.features}
        for r in range(args.rounds + 1):
            for key, forward in bounds.items():
                with autocast:
                    bound_rates[key].append(bare_forward(forward, inputs, device))
            if r == args.rounds:  # a last set of bounds closes the final round
                break
            for form, req in reqs.items():
                t0 = time.perf_counter()
                pc.precompute(replace(req, cache=tmp / f"cache-{form}-{r}"))
                totals[form].append(time.perf_counter() - t0)
                loops[form].append(loop_seconds.pop())
        pc.write_chunks = original

        print(f"machine: {machine()}, device {device}")
        if len(sweep) > 1:
            print("bare forward by batch: " + ", ".join(f"{b}: {r:.0f} img/s" for b, r in sweep.items())
                  + f" -> batch {batch}")
        print(f"teacher {args.arch}, {args.views} views x {args.samples} samples = {n_rows} rows, "
              f"--batch-size {batch}, {'autocast ' + amp if amp else 'float32'}, {args.rounds} rounds (medians)")
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": str(device), "arch": args.arch,
                  "rows": n_rows, "batch_size": batch, "batch_sweep": sweep, "precision": amp or "float32",
                  "bound_img_s": {}, "precompute": {}}
        bound = {key: statistics.median(rates) for key, rates in bound_rates.items()}
        for name, rates in bound_rates.items():
            print(f"bound {name:<16}: {bound[name]:9.1f} img/s  (rounds: {', '.join(f'{x:.0f}' for x in rates)})")
            result["bound_img_s"][name] = bound[name]
        plain, fair = bound["model(x)"], bound["forward_with_map"]
        for form in args.features:
            rate = n_rows / statistics.median(loops[form])
            total = n_rows / statistics.median(totals[form])
            print(f"precompute {form:<7} (chunks of {chunk_rows[form]} rows): loop {rate:9.1f} img/s  ratio "
                  f"{rate / plain:.3f} to model(x), {rate / fair:.3f} to forward_with_map  "
                  f"(rounds: {', '.join(f'{n_rows / t:.0f}' for t in loops[form])})")
            print(f"    end-to-end (plan, loop, test eval, marks): {total:9.1f} img/s  ratio {total / plain:.3f}, "
                  f"{total / fair:.3f}")
            result["precompute"][form] = {"chunk_rows": chunk_rows[form], "loop_img_s": rate, "total_img_s": total,
                                          "loop/forward_with_map": rate / fair, "total/forward_with_map": total / fair}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
