"""Distill step time per rank with 1 and N data-parallel ranks (torchrun), on the same stores, in one run.

    python benchmarks/distill_ranks.py         # 3 x resnet32x4 -> vgg8, camkd, global batch 64, CIFAR-shaped
    python benchmarks/distill_ranks.py --device cuda --json out.json   # N = every GPU of the machine (NCCL)

Every configuration runs the distill pipeline on the same teacher stores, student,
method, global batch and seed, as a fresh torchrun job:
- 1 rank:             one process, torch's default intra-op threads (all cores);
- 1 rank, 1 thread:   one process with the one thread each rank gets below (torchrun's default);
- N ranks:            ``torchrun --nproc_per_node N`` (``--ranks``; default 2 on CPU, every GPU on CUDA):
                      DDP over gloo on CPU (NCCL on GPU, one GPU a rank), each rank training on 1/N of
                      every global batch and reading only its rows of the stores.
On CUDA the one-thread configuration is left out (the GPU does the arithmetic).
The step time of a rank is the median interval between its consecutive steps
within an epoch (the first steps of each epoch dropped as warm-up); samples/s is
the global batch over the slowest rank's step time. Rounds run the configurations
in turn and the medians over rounds are reported, because a shared machine's load
drifts between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

import torch

WARMUP = 3


class RankResult(TypedDict):
    """One rank of a configuration: its intra-op threads and median step time (seconds)."""
    threads: int
    step: float


def worker(args: argparse.Namespace) -> None:
    """One rank: run distill, write this rank's step stamps to ``args.worker/rank<RANK>.json``."""
    from kdcache.pipelines.distill import DistillRequest, distill

    stamps: list[tuple[int, float]] = []
    req = DistillRequest(student=args.student, teachers=args.ids, method=args.method, out=Path(args.out),
                         cache=Path(args.cache), data_root=Path(args.data_root), epochs=args.epochs,
                         batch_size=args.batch_size, device=args.device, seed=0)
    distill(req, on_step=lambda r: stamps.append((r.epoch, time.perf_counter())))
    Path(args.worker, f"rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"threads": torch.get_num_threads(), "stamps": stamps}))


def step_time(stamps: list[tuple[int, float]]) -> float:
    """Median seconds between consecutive steps of the same epoch, warm-up steps dropped."""
    gaps = []
    for epoch in sorted({e for e, _ in stamps}):
        times = [t for e, t in stamps if e == epoch]
        gaps += [b - a for a, b in zip(times, times[1:])][WARMUP:]
    return statistics.median(gaps)


def launch(tmp: Path, name: str, ranks: int, threads: int | None, common: list[str]) -> list[RankResult]:
    """Run the workers of one configuration as a torchrun job; each rank's threads and step time."""
    record = tmp / f"record-{name}"
    record.mkdir()
    shutil.rmtree(tmp / f"run-{name}", ignore_errors=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           __file__, "--worker", str(record), "--out", str(tmp / f"run-{name}"), *common]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"torchrun of {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    results = [json.loads((record / f"rank{r}.json").read_text()) for r in range(ranks)]
    return [{"threads": r["threads"], "step": step_time(r["stamps"])} for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="vgg8")
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--method", default="camkd")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64, help="The global batch.")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranks", type=int, help="The data-parallel ranks (default: 2 on CPU, every GPU on CUDA).")
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--data-root", help=argparse.SUPPRESS)
    ap.add_argument("--ids", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    from common import fake_cifar100, machine
    from distill_step import make_teachers

    print(f"machine: {machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = fake_cifar100(tmp / "data", args.samples)
        ids = make_teachers(tmp, root, args.teacher, args.teachers, views=1, dataset="cifar100", cache=tmp / "cache")
        common = ["--student", args.student, "--method", args.method, "--batch-size", str(args.batch_size),
                  "--epochs", str(args.epochs), "--device", args.device, "--cache", str(tmp / "cache"),
                  "--data-root", str(root), "--ids", *ids]
        cuda = torch.device(args.device).type == "cuda"
        ranks = args.ranks or (torch.cuda.device_count() if cuda else 2)
        configs = [("1 rank", 1, None)] + ([] if cuda else [("1 rank, 1 thread", 1, 1)])
        if ranks > 1:
            configs.append((f"{ranks} ranks", ranks, None))
        print(f"{args.teachers} x {args.teacher} -> {args.student} {args.method}, global batch {args.batch_size}, "
              f"{args.samples} CIFAR-shaped samples, {args.epochs} epochs of {args.samples // args.batch_size} "
              f"steps ({WARMUP} warm-up steps dropped per epoch), {args.rounds} rounds")
        runs: dict[str, list[list[RankResult]]] = {name: [] for name, _, _ in configs}
        for r in range(args.rounds):
            for name, n, threads in configs:
                per_rank = launch(tmp, f"{r}-{name.replace(' ', '').replace(',', '-')}", n, threads, common)
                runs[name].append(per_rank)
                print(f"  round {r + 1} {name:<17} " + "  ".join(f"{p['step'] * 1e3:.1f}" for p in per_rank)
                      + " ms/step", flush=True)
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": args.device,
                  "global_batch": args.batch_size, "configs": {}}
        for name, n, _ in configs:
            steps = [statistics.median(rnd[i]["step"] for rnd in runs[name]) for i in range(n)]
            threads = runs[name][0][0]["threads"]
            ranks_text = "  ".join(f"rank {i}: {t * 1e3:7.1f} ms/step" for i, t in enumerate(steps))
            print(f"{name:<17} {ranks_text}  ({threads} thread{'s' if threads > 1 else ''} and "
                  f"{args.batch_size // n} samples a rank)   {args.batch_size / max(steps):6.1f} samples/s")
            result["configs"][name] = {"ranks": n, "threads": threads, "step_s": steps,
                                       "samples_s": args.batch_size / max(steps)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
