"""How far `precompute --amp` stores are from float32 ones: the same views through the same teachers, in float32 and
under autocast, compared as the store keeps them (float16).

    python benchmarks/amp_agreement.py                                  # CPU: bfloat16 autocast
    python benchmarks/amp_agreement.py --device cuda                    # GPU: float16 and bfloat16 autocast
    python benchmarks/amp_agreement.py --rows 512                       # RESULTS.md's figures (17 min here)
    python benchmarks/amp_agreement.py --archs resnet8 resnet32x4 --rows 128   # slow in bfloat16 on most CPUs

Two sets of teachers, each on one view (kdcache's own view replay) of the first ``--rows`` training samples:

- random: CIFAR-style teachers (``--archs``, default resnet8 and resnet8x4) with seeded random weights
  (``torch.manual_seed(0)``) on digits, 10 classes (always available); resnet32x4 under bfloat16 autocast on a
  CPU without bfloat16 instructions takes minutes for a few hundred rows, hence not by default;
- fmnist: the Fashion-MNIST study's trained resnet20 teachers t0, t1, t2 (``--fmnist DIR`` holding
  ``teachers/t*-resnet20.pth`` and ``data/``), when present.

Both forwards go through :func:`kdcache.pipelines.precompute.forward_batch`, the precompute's own, so the
outputs are rounded to float16 as the store rounds them. Reported for each teacher and autocast dtype: the max and
mean absolute difference of the logits and of the pooled features, with the float32 outputs' scale (mean and max
absolute value) beside them, and the share of rows whose argmax agrees; for each set (K teachers stacked): the max
and mean absolute difference of CA-MKD's confidence weights (``confidence_weights(ce_per_sample(z, labels))``)
and of EBKD's entropy weights. The row "float16 store" is the float32 forward's own rounding to float16, the
floor any store has. Seconds a forward pass (after one warm-up batch) are printed too: not a benchmark of speed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import machine
from kdcache.batches import view_batch
from kdcache.data import DataSet, load_dataset
from kdcache.device import resolve_device
from kdcache.losses.base import ce_per_sample
from kdcache.losses.camkd import confidence_weights
from kdcache.losses.ebkd import entropy_weights
from kdcache.models import build_model, load_checkpoint
from kdcache.pipelines.precompute_engine import forward_batch
from kdcache.store.form import FeatureForm
from kdcache.views import get_recipe, view_drawer

BATCH = 256


def one_view(dataset: DataSet, rows: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """View 0 of a plan drawn with ``seed``, its first ``rows`` rows: the replayed images and their labels."""
    recipe = get_recipe(dataset.recipe)
    sizes = dataset.train.sizes if recipe.needs_sizes else None
    order, params = view_drawer(recipe.spec, len(dataset.train), seed, sizes)(0)
    order, params = order[:rows], params[:rows]
    x = view_batch(dataset, dataset.train, recipe.spec, order, params, device)
    labels = torch.as_tensor(np.asarray(dataset.train.labels)[order]).long()
    return x, labels


def run(model: torch.nn.Module, x: torch.Tensor, amp: str | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Float32 copies of the float16 logits and pooled features precompute would store, and seconds a pass."""
    forward_batch(model, x[:BATCH], FeatureForm.POOLED, amp)  # warm-up
    start = time.perf_counter()
    out = [forward_batch(model, x[i:i + BATCH], FeatureForm.POOLED, amp) for i in range(0, len(x), BATCH)]
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    z = torch.cat([o[0] for o in out]).float()
    h = torch.cat([o[1] for o in out if o[1] is not None]).float()
    return z, h, seconds


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs()
    return float(d.max()), float(d.mean())


def measure(name: str, teachers: list[tuple[str, torch.nn.Module]], x: torch.Tensor, labels: torch.Tensor,
            dtypes: list[str]) -> list[str]:
    lines = [f"### {name}: {len(teachers)} teachers, {len(x)} rows of one view", "",
             "| teacher | forward | logits max / mean abs diff | logits mean / max abs | argmax agrees | "
             "features max / mean abs diff | features mean / max abs | s a pass |",
             "|---|---|---|---|---|---|---|---|"]
    outs: dict[str | None, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for arch, model in teachers:
        z32, h32, s32 = run(model, x, None)
        outs.setdefault(None, []).append((z32, h32))
        with torch.inference_mode():  # the float32 forward before its float16 rounding: the store's own floor
            exact = [model(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
        z_exact = torch.cat([e[1] for e in exact]).float().cpu()
        h_exact = torch.cat([e[0] for e in exact]).float().cpu()
        scale = f"{float(z32.abs().mean()):.3g} / {float(z32.abs().max()):.3g}"
        fscale = f"{float(h32.abs().mean()):.3g} / {float(h32.abs().max()):.3g}"
        lz, lh = diff(z_exact, z32), diff(h_exact, h32)
        lines.append(f"| {arch} | float16 store (float32 forward, rounded) | {lz[0]:.2e} / {lz[1]:.2e} | {scale} | "
                     f"100% | {lh[0]:.2e} / {lh[1]:.2e} | {fscale} | {s32:.2f} |")
        for dtype in dtypes:
            z, h, s = run(model, x, dtype)
            outs.setdefault(dtype, []).append((z, h))
            dz, dh = diff(z, z32), diff(h, h32)
            agree = 100.0 * float((z.argmax(1) == z32.argmax(1)).float().mean())
            lines.append(f"| {arch} | autocast {dtype} | {dz[0]:.3g} / {dz[1]:.3g} | {scale} | {agree:.2f}% | "
                         f"{dh[0]:.3g} / {dh[1]:.3g} | {fscale} | {s:.2f} |")
    lines += ["", f"Teacher weights over the {len(teachers)} teachers (each sums to 1 over the teachers a row):", "",
              "| forward | camkd confidence weights max / mean abs diff | ebkd entropy weights max / mean abs diff |",
              "|---|---|---|"]
    stacked32 = torch.stack([z for z, _ in outs[None]])
    cw32 = confidence_weights(ce_per_sample(stacked32, labels))
    ew32 = entropy_weights(stacked32)
    for dtype in dtypes:
        stacked = torch.stack([z for z, _ in outs[dtype]])
        cw = diff(confidence_weights(ce_per_sample(stacked, labels)), cw32)
        ew = diff(entropy_weights(stacked), ew32)
        lines.append(f"| autocast {dtype} | {cw[0]:.3g} / {cw[1]:.3g} | {ew[0]:.3g} / {ew[1]:.3g} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float16"), default=None,
                    help="autocast dtypes [default: bfloat16 on CPU; float16 and bfloat16 on CUDA]")
    ap.add_argument("--rows", type=int, default=128,
                    help="rows of the view (training samples) [default: 128; RESULTS.md's figures: 512]")
    ap.add_argument("--archs", nargs="+", default=["resnet8", "resnet8x4"],
                    help="the random teachers' architectures [default: resnet8 resnet8x4]")
    ap.add_argument("--fmnist", type=Path, default=Path("/work/fmnist"),
                    help="the Fashion-MNIST study's folder (teachers/, data/); skipped when absent")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtypes = args.dtypes or (["float16", "bfloat16"] if device.type == "cuda" else ["bfloat16"])
    print(f"machine: {machine()}; device {device}")
    print()

    digits = load_dataset("digits")
    x, labels = one_view(digits, args.rows, device)
    random = []
    for arch in args.archs:
        torch.manual_seed(0)
        random.append((arch, build_model(arch, digits.num_classes).eval().to(device)))
    print("\n".join(measure("random (seeded) CIFAR-style teachers on digits", random, x, labels, dtypes)))

    ckpts = sorted((args.fmnist / "teachers").glob("t[0-9]-resnet20.pth"))
    if ckpts and (args.fmnist / "data").is_dir():
        fmnist = load_dataset("fashion-mnist", args.fmnist / "data")
        x, labels = one_view(fmnist, args.rows, device)
        trained = []
        for ckpt in ckpts:
            model = build_model("resnet20", fmnist.num_classes)
            load_checkpoint(model, ckpt)
            trained.append((ckpt.stem, model.eval().to(device)))
        print("\n".join(measure("trained Fashion-MNIST resnet20 teachers", trained, x, labels, dtypes)))
    else:
        print(f"(no Fashion-MNIST teachers under {args.fmnist}: skipped)")


if __name__ == "__main__":
    main()
