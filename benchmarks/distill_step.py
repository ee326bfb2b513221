"""Distill step times side by side: the student alone, CA-MKD from the stores, CA-MKD with live teachers.

    python benchmarks/distill_step.py                       # 3 x resnet32x4 -> vgg8, batch 64, CIFAR-shaped
    python benchmarks/distill_step.py --memory              # also: peak RSS of distill over V and 4V views

- t_student: a plain ``ce`` step (student forward, backward, SGD step), the bound;
- t_cached:  a ``camkd`` step, teacher rows streamed from the stores;
- t_online:  a ``camkd`` step, the same teachers run live on the same views.
All three go through the same distill pipeline on the same synthetic CIFAR-100
data, student, batch size and device, in one process; the step time is the
median interval between consecutive steps (first steps dropped as warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import fake_cifar100, machine
from kdcache.models import build_model
from kdcache.pipelines.distill import DistillRequest, StepRecord, distill
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.store import Cache

WARMUP = 3


def make_teachers(tmp: Path, root: Path, arch: str, k: int, views: int, dataset: str) -> list[str]:
    ids = []
    for seed in range(k):
        torch.manual_seed(seed)
        ckpt = tmp / f"{arch}-{seed}.pth"
        torch.save({"model": build_model(arch, 100 if dataset == "cifar100" else 10).state_dict()}, ckpt)
        ids.append(precompute(PrecomputeRequest(teacher=arch, checkpoint=ckpt, dataset=dataset, data_root=root,
                                                cache=tmp / "cache", views=views)).teacher_id)
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
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="vgg8")
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--memory", action="store_true", help="Also measure peak RSS over V and 4V views (digits).")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = fake_cifar100(tmp / "data", args.samples)
        ids = make_teachers(tmp, root, args.teacher, args.teachers, views=1, dataset="cifar100")
        common = dict(student=args.student, teachers=ids, cache=tmp / "cache", data_root=root, epochs=1,
                      batch_size=args.batch_size, device=args.device, seed=0)
        t_student = step_time(DistillRequest(method="ce", out=tmp / "ce", **common))
        t_cached = step_time(DistillRequest(method="camkd", out=tmp / "cached", **common))
        t_online = step_time(DistillRequest(method="camkd", out=tmp / "online", online=True, **common))
        print(f"machine: {machine()}")
        print(f"{args.teachers} x {args.teacher} -> {args.student}, batch {args.batch_size}, "
              f"{args.samples} CIFAR-shaped samples, steps timed per epoch: {args.samples // args.batch_size - 1 - WARMUP}")
        print(f"t_student {t_student * 1e3:9.1f} ms/step")
        print(f"t_cached  {t_cached * 1e3:9.1f} ms/step   t_cached / t_student = {t_cached / t_student:.3f}")
        print(f"t_online  {t_online * 1e3:9.1f} ms/step   t_online / t_cached  = {t_online / t_cached:.2f}")

        if args.memory:
            v = 3
            small = make_teachers(tmp / "m1", None, "resnet8", 2, views=v, dataset="digits")
            large = make_teachers(tmp / "m4", None, "resnet8", 2, views=4 * v, dataset="digits")
            rss_v = peak_rss_of_distill(tmp / "m1" / "cache", small, tmp / "m1" / "run", v)
            rss_4v = peak_rss_of_distill(tmp / "m4" / "cache", large, tmp / "m4" / "run", 4 * v)
            size = lambda c: sum(p.stat().st_size for p in (c / "teachers").rglob("*") if p.is_file())
            print(f"peak RSS, camkd resnet8 <- 2 x resnet8 on digits: {v} views/{v} epochs {rss_v / 1024:.0f} MiB "
                  f"(stores {size(tmp / 'm1' / 'cache') / 2**20:.1f} MiB); {4 * v} views/{4 * v} epochs "
                  f"{rss_4v / 1024:.0f} MiB (stores {size(tmp / 'm4' / 'cache') / 2**20:.1f} MiB); "
                  f"ratio {rss_4v / rss_v:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
