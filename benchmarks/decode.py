"""Decoding against the teacher: an ImageFolder of ImageNet-sized JPEGs, side by side in one process.

    python benchmarks/decode.py                                  # resnet18 and resnet50, 128 images, batch 32
    python benchmarks/decode.py --compare --arch resnet18 --rounds 3   # also without the pool or the read-ahead

Writes a synthetic ImageFolder of ``--images`` training JPEGs of 500x375 (ImageNet's typical
size; smooth colour fields with noise, quality 90) into a temporary folder and measures, at
``--batch-size`` on one device:

- decode: ``FileSource.load`` over the tree, with 1 decode worker and with the default pool
  ($KDCACHE_DECODE_WORKERS, else min(8, CPU count));
- views: decode + RandomResizedCrop(224) replay + normalisation (``view_batch``), what a
  forward batch needs before the teacher runs, with 1 worker and with the pool;
- forward: the teacher's bare ``model(x)`` under inference mode on views built beforehand;
- precompute: the chunk loop of ``precompute --views 1`` on the tree (decode, replay, forward,
  writes), as shipped (decode pool, next batch read ahead) and, with ``--compare``, without the
  read-ahead, with 1 decode worker, and as before (1 worker, no read-ahead).

Rounds alternate forward and precompute so that drift of a shared machine hits both; medians.
Targets: precompute / forward >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from PIL import Image

from common import machine
from kdcache.batches import view_batch
from kdcache.data import load_dataset
from kdcache.data.base import DECODE_WORKERS_ENV, FileSource, decode_workers
from kdcache.device import resolve_device
from kdcache.models import build_model
from kdcache.pipelines import precompute as pc
from kdcache.pipelines import precompute_engine as engine
from kdcache.views import draw_plan

T = TypeVar("T")
U = TypeVar("U")


def write_jpeg_tree(root: Path, n_train: int, n_classes: int = 4, n_val: int = 1, size: tuple[int, int] = (500, 375),
                    seed: int = 0) -> Path:
    """ROOT/{train,val}/<class>/*.JPEG: ``n_train`` training images over ``n_classes`` classes, ``size`` (w, h)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split, n in (("train", n_train), ("val", n_val * n_classes)):
        for k in range(n):
            c = k % n_classes
            fx, fy, phase = rng.uniform(0.005, 0.05, 3), rng.uniform(0.005, 0.05, 3), rng.uniform(0, 6.3, 3)
            field = 127 + 100 * np.sin(xx[..., None] * fx + yy[..., None] * fy + phase)
            img = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{split}_{k:05d}.JPEG", quality=90)
    return root


def batches(n: int, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch):
        yield np.arange(start, min(start + batch, n))


def rate(work: Callable[[np.ndarray], object], groups: Iterable[np.ndarray], device: torch.device) -> float:
    """Images per second of ``work`` over the index batches."""
    groups = list(groups)
    work(groups[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for idx in groups:
        work(idx)
    _sync(device)
    return sum(len(g) for g in groups) / (time.perf_counter() - t0)


def with_workers(workers: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` with $KDCACHE_DECODE_WORKERS set to ``workers`` (None: unset, the default pool)."""
    saved = os.environ.get(DECODE_WORKERS_ENV)
    if workers is None:
        os.environ.pop(DECODE_WORKERS_ENV, None)
    else:
        os.environ[DECODE_WORKERS_ENV] = str(workers)
    try:
        return fn()
    finally:
        if saved is None:
            os.environ.pop(DECODE_WORKERS_ENV, None)
        else:
            os.environ[DECODE_WORKERS_ENV] = saved


def _sequential(make: Callable[[T], U], items: Iterable[T], ahead: int = 1) -> Iterator[U]:
    """precompute's loop as it was before: each batch made when the teacher asks for it."""
    return map(make, items)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"], help="Teachers from the zoo (random "
                    "weights: they do not change the cost).")
    ap.add_argument("--images", type=int, default=128, help="Training JPEGs in the tree.")
    ap.add_argument("--batch-size", type=int, default=32, help="The forward batch, for every measurement.")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu).")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of (forward, precompute) per teacher.")
    ap.add_argument("--compare", action="store_true", help="Also time precompute with the pool but no read-ahead, "
                    "with read-ahead but 1 decode worker, and serially (1 worker, no read-ahead: the code before).")
    args = ap.parse_args()
    device = resolve_device(args.device)
    b = args.batch_size

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        root = write_jpeg_tree(tmp / "data", args.images)
        data = load_dataset("imagefolder", root)
        assert isinstance(data.train, FileSource)  # an ImageFolder's training split: files
        n = len(data.train)
        kb = sum(os.path.getsize(p) for p in data.train.paths) / n / 1e3
        print(f"machine: {machine()}, device {device}, load average {os.getloadavg()[0]:.2f}")
        print(f"tree: {n} training JPEGs 500x375 ({kb:.0f} kB each), written in {time.perf_counter() - t0:.1f} s; "
              f"recipe {data.recipe}; batch {b}; decode pool {decode_workers()} workers")

        order, params = draw_plan(data.recipe, 1, n, seed=0, sizes=data.train.sizes)
        cpu = torch.device("cpu")

        def load(idx: np.ndarray) -> object:
            return data.train.load(idx)

        def views(idx: np.ndarray) -> torch.Tensor:
            return view_batch(data, data.train, data.recipe, order[0][idx], params[0][idx], device)

        decode = {w: with_workers(w, lambda: rate(load, batches(n, b), cpu)) for w in (1, None)}
        build = {w: with_workers(w, lambda: rate(views, batches(n, b), device)) for w in (1, None)}
        pool = decode_workers()
        print(f"decode        1 worker {decode[1]:8.1f} img/s   pool of {pool} {decode[None]:8.1f} img/s  "
              f"({decode[None] / decode[1]:.2f}x)")
        print(f"decode+replay 1 worker {build[1]:8.1f} img/s   pool of {pool} {build[None]:8.1f} img/s  "
              f"({build[None] / build[1]:.2f}x)")
        inputs = [views(idx) for idx in batches(n, b)]

        loop_seconds: list[float] = []
        original = pc.write_chunks

        def timed(*a: Any, **kw: Any) -> None:
            t = time.perf_counter()
            original(*a, **kw)
            _sync(device)
            loop_seconds.append(time.perf_counter() - t)

        pc.write_chunks = timed
        original_read_ahead = engine.read_ahead
        for arch in args.arch:
            model = build_model(arch, data.num_classes)
            ckpt = tmp / f"{arch}.pth"
            torch.save(model.state_dict(), ckpt)
            model.eval().to(device)
            req = pc.PrecomputeRequest(teacher=arch, checkpoint=ckpt, dataset="imagefolder", data_root=root, views=1,
                                       batch_size=b, device=str(device))

            modes: dict[str, tuple[int | None, bool]] = {"pool + read-ahead": (None, True)}
            if args.compare:
                modes.update({"pool, no read-ahead": (None, False), "1 worker + read-ahead": (1, True),
                              "serial (before)": (1, False)})
            fwd: list[float] = []
            loops: dict[str, list[float]] = {m: [] for m in modes}
            for r in range(args.rounds):
                fwd.append(_forward_rate(model, inputs, device))
                for mode, (workers, ahead) in modes.items():
                    if not ahead:
                        engine.read_ahead = _sequential
                    with_workers(workers, lambda: pc.precompute(replace(req, cache=tmp / f"c-{arch}-{mode}-{r}")))
                    engine.read_ahead = original_read_ahead
                    loops[mode].append(n / loop_seconds.pop())
            f = statistics.median(fwd)
            print(f"{arch}: forward {f:7.1f} img/s (rounds {', '.join(f'{x:.1f}' for x in fwd)}); "
                  f"decode/forward {decode[None] / f:.1f}x (1 worker {decode[1] / f:.1f}x), "
                  f"decode+replay/forward {build[None] / f:.1f}x (1 worker {build[1] / f:.1f}x)")
            for mode, rates in loops.items():
                p = statistics.median(rates)
                print(f"    precompute {mode:<21} {p:7.1f} img/s  precompute/forward {p / f:.3f}  "
                      f"(rounds {', '.join(f'{x:.1f}' for x in rates)})")
        pc.write_chunks = original
        print(f"load average at the end {os.getloadavg()[0]:.2f}")


@torch.inference_mode()
def _forward_rate(model: torch.nn.Module, inputs: list[torch.Tensor], device: torch.device) -> float:
    """Images per second of the bare ``model(x)`` over the ready-made batches (one warm-up batch first)."""
    model(inputs[0])
    _sync(device)
    t0 = time.perf_counter()
    for x in inputs:
        model(x)
    _sync(device)
    return sum(len(x) for x in inputs) / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
