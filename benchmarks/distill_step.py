"""Distill step times side by side: the student alone, CA-MKD from the stores, CA-MKD with live teachers.

    python benchmarks/distill_step.py                       # 3 x resnet32x4 -> vgg8, batch 64, CIFAR-shaped
    python benchmarks/distill_step.py --features pooled spatial   # the same teachers in both feature forms
    python benchmarks/distill_step.py --memory              # also: peak RSS of distill over V and 4V views

- t_student: a plain ``ce`` step (student forward, backward, SGD step), the bound;
- t_cached:  a ``camkd`` step, teacher rows streamed from the stores;
- t_online:  a ``camkd`` step, the same teachers run live on the same views.
t_cached and t_online are taken for each ``--features`` form: the same teacher
checkpoints precomputed as pooled stores (penultimate vectors, kdcache's compact
CA-MKD) and as spatial stores (last-block maps, the official CA-MKD, with the
student's map aligned by 1x1 conv + BN + ReLU). All go through the same distill
pipeline on the same synthetic CIFAR-100 data, student, batch size and device,
in one process; the step time is the median interval between consecutive steps
(first steps dropped as warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import fake_cifar100, machine
from kdcache.data import load_dataset
from kdcache.models import build_model
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.precompute import PrecomputeRequest, ensure_plan, precompute
from kdcache.store import Cache, TeacherStore, chunk_rows_for, plan_id, teacher_id
from kdcache.views import get_recipe

WARMUP = 3


def make_teachers(tmp: Path, root: Path, arch: str, k: int, views: int, dataset: str,
                  features: str = "pooled") -> list[str]:
    """K teachers of random weights (seeds 0..K-1, the same checkpoints for every form) precomputed in ``features``."""
    ids = []
    tmp.mkdir(parents=True, exist_ok=True)
    for seed in range(k):
        ckpt = tmp / f"{arch}-{seed}.pth"
        if not ckpt.exists():
            torch.manual_seed(seed)
            torch.save({"model": build_model(arch, 100 if dataset == "cifar100" else 10).state_dict()}, ckpt)
        ids.append(precompute(PrecomputeRequest(teacher=arch, checkpoint=ckpt, dataset=dataset, data_root=root,
                                                cache=tmp / "cache", views=views, features=features)).teacher_id)
    return ids


def step_time(req: DistillRequest) -> float:
    """Median seconds between consecutive training steps of one epoch."""
    stamps: list[float] = []
    distill(req, on_step=lambda r: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP:]
    return statistics.median(gaps)


RSS_PROBE = ("import resource, sys\n"
             "from kdcache.cli.main import main\n"
             "main(sys.argv[1:], standalone_mode=False)\n"
             "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")


def peak_rss_of_distill(cache: Path, ids: list[str], out: Path, epochs: int) -> int:
    """Peak resident set (KiB) of a fresh process running `kdcache distill`."""
    args = ["distill", "--student", "resnet8", "--method", "camkd", "--cache", str(cache), "--out", str(out),
            "--epochs", str(epochs), "--device", "cpu"]
    for t in ids:
        args += ["--teachers", t]
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1].split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="resnet32x4", help="Teacher architecture (random weights).")
    ap.add_argument("--student", default="vgg8", help="Student architecture.")
    ap.add_argument("--teachers", type=int, default=3, help="How many teachers.")
    ap.add_argument("--samples", type=int, default=1024, help="Synthetic CIFAR-100 training images (one epoch).")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when present).")
    ap.add_argument("--features", nargs="+", choices=("pooled", "spatial"), default=["pooled"],
                    help="Feature forms of the teacher stores to time camkd on, in this order (default: pooled).")
    ap.add_argument("--no-online", action="store_true", help="Skip t_online.")
    ap.add_argument("--memory", action="store_true", help="Also measure peak RSS over V and 4V views (digits).")
    ap.add_argument("--no-steps", action="store_true", help="Skip the step times (with --memory).")
    args = ap.parse_args()

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.no_steps:
            measure_steps(tmp, args)
        if args.memory:
            measure_memory(tmp)


def measure_steps(tmp: Path, args: argparse.Namespace) -> None:
    """t_student, then t_cached and t_online for each feature form, on the same data, student, batch and device."""
    root = fake_cifar100(tmp / "data", args.samples)
    ids = {form: make_teachers(tmp, root, args.teacher, args.teachers, views=1, dataset="cifar100", features=form)
           for form in args.features}
    common = dict(student=args.student, cache=tmp / "cache", data_root=root, epochs=1,
                  batch_size=args.batch_size, device=args.device, seed=0)
    t_student = step_time(DistillRequest(method="ce", out=tmp / "ce", teachers=ids[args.features[0]], **common))
    t_cached = {form: step_time(DistillRequest(method="camkd", out=tmp / f"cached-{form}", teachers=ids[form],
                                               **common)) for form in args.features}
    t_online = {} if args.no_online else {
        form: step_time(DistillRequest(method="camkd", out=tmp / f"online-{form}", teachers=ids[form], online=True,
                                       **common)) for form in args.features}
    print(f"{args.teachers} x {args.teacher} -> {args.student}, batch {args.batch_size}, {args.samples} "
          f"CIFAR-shaped samples, steps timed per epoch: {args.samples // args.batch_size - 1 - WARMUP}")
    print(f"t_student {t_student * 1e3:9.1f} ms/step")
    for form in args.features:
        print(f"{form:>8}: t_cached {t_cached[form] * 1e3:9.1f} ms/step   "
              f"t_cached / t_student = {t_cached[form] / t_student:.3f}")
        if form in t_online:
            print(f"{form:>8}: t_online {t_online[form] * 1e3:9.1f} ms/step   "
                  f"t_online / t_cached  = {t_online[form] / t_cached[form]:.2f}")


def synthetic_stores(cache_root: Path, n_views: int, k: int, dim: int) -> list[str]:
    """K complete digits teacher stores of random float16 rows, ``dim`` features wide (no teacher is run)."""
    dataset = load_dataset("digits")
    recipe = get_recipe(dataset.recipe)
    pid = plan_id(dataset.fingerprint, recipe.description, n_views, 0)
    cache = Cache.at(cache_root)
    cache.ensure_writable()
    ensure_plan(cache, dataset, recipe, n_views, 0, pid)
    n, c = len(dataset.train), dataset.num_classes
    rng = np.random.default_rng(0)
    ids = []
    for t in range(k):
        tid = teacher_id(pid, "synthetic", f"{t:064x}")
        attrs = {"plan_id": pid, "arch": "synthetic", "num_classes": c, "feature_dim": dim, "dataset": "digits",
                 "checkpoint": {"path": "-", "sha256": f"{t:064x}"}}
        rows = chunk_rows_for(n, dim)
        store = TeacherStore.open_for_writing(cache.teacher_path(tid), tid, attrs, (n_views, n, c, dim), rows,
                                              torch.randn(c, dim) / dim ** 0.5, torch.zeros(c))
        for v, ch in store.pending():
            r = store.rows(ch)
            store.write_chunk(v, ch, rng.standard_normal((r.stop - r.start, c)).astype(np.float16),
                              np.abs(rng.standard_normal((r.stop - r.start, dim))).astype(np.float16), 0)
        store.mark_complete(test_accuracy=0.0, view_accuracy=0.0)
        ids.append(tid)
    return ids


def measure_memory(tmp: Path, v: int = 3, dim: int = 2048) -> None:
    """Peak RSS of a camkd distill over V views in V epochs against 4V views in 4V epochs.

    Two synthetic teachers with 2048-wide features (a resnet50's) make each view 5.9 MB a
    teacher, so the 4V run reads 4x the bytes of the V run: any accumulation would show.
    """
    results = []
    for views in (v, 4 * v):
        root = tmp / f"mem{views}"
        ids = synthetic_stores(root / "cache", views, 2, dim)
        rss = peak_rss_of_distill(root / "cache", ids, root / "run", views)
        read = sum(p.stat().st_size for p in (root / "cache" / "teachers").rglob("*") if p.is_file()) / 2**20
        results.append((views, rss / 1024, read))
    (v1, r1, b1), (v4, r4, b4) = results
    print(f"peak RSS, camkd resnet8 <- 2 synthetic teachers (D={dim}) on digits, one view per epoch: "
          f"{v1} views/epochs {r1:.0f} MiB (reads {b1:.0f} MiB of stores); {v4} views/epochs {r4:.0f} MiB "
          f"(reads {b4:.0f} MiB); ratio {r4 / r1:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
