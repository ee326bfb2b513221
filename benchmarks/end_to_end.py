"""The end-to-end saving: precompute plus N cached student runs against N online runs of the same settings.

    python benchmarks/end_to_end.py                      # the demo's setting on digits, N up to 10
    python benchmarks/end_to_end.py --runs 3 --epochs 5 --json out.json

Every step is the `kdcache` command a user would type, in a fresh process, timed by its wall clock
(start-up, imports, evaluation after each epoch and checkpoints included):

- once (``--precompute-runs`` times, each into a fresh cache, the median taken): ``kdcache precompute`` of the K
  teachers over ``--epochs`` views (one view per student epoch);
- for seeds 0 .. N-1: ``kdcache distill --seed s`` from the stores (cached) and the same command with
  ``--online`` (the teachers built and run on the same views every step), alternating which goes
  first from seed to seed.

N runs cost precompute + the first N cached runs against the first N online runs; the table gives
that for each ``--report`` N and the crossover, the smallest N at which the cache is not slower
(from the per-run means: ceil(t_precompute / (mean online - mean cached))).

Default setting: the demo's (`kdcache demo`): teachers resnet14, resnet14, resnet8, student resnet8,
camkd on spatial stores, 10 epochs of batch 64 over scikit-learn's digits. The teachers have random
weights unless ``--checkpoints`` gives trained ones: wall time does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, random_checkpoint  # noqa: E402

from kdcache.data import load_dataset  # noqa: E402


# `kdcache ARGS` as the command runs it, timing what the live teachers' forward passes take (``--online``).
PROBE = r"""
import sys, time
import kdcache.pipelines.distill as d
spent = [0.0]
real = d._teacher_outputs
def timed(*a, **k):
    s = time.perf_counter()
    try:
        return real(*a, **k)
    finally:
        spent[0] += time.perf_counter() - s
d._teacher_outputs = timed
from kdcache.cli.main import main
try:
    main(sys.argv[1:], prog_name="kdcache")
finally:
    print(f"TEACHERS {spent[0]}", file=sys.stderr)
"""


def kdcache(*args: str) -> tuple[float, str, float]:
    """Run ``kdcache ARGS`` in a fresh process; its wall time, standard output, and the seconds spent in the live
    teachers' forward passes (0 unless ``--online``)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"kdcache {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    teachers = float(next(x for x in done.stderr.splitlines() if x.startswith("TEACHERS ")).split()[1])
    return seconds, done.stdout, teachers


def checkpoints(tmp: Path, archs: list[str], classes: int) -> list[Path]:
    """Random-weight checkpoints of ``archs`` (seeds 0, 1, ...)."""
    return [random_checkpoint(tmp / f"teacher{i}-{arch}.pth", arch, classes, i) for i, arch in enumerate(archs)]


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = ["--dataset", args.dataset, *(["--data-root", str(args.data_root)] if args.data_root else [])]
    ckpts = args.checkpoints or checkpoints(tmp, args.teachers, load_dataset(args.dataset, args.data_root).num_classes)
    device = ["--device", args.device]
    pre = ["precompute", *data, "--views", str(args.epochs), "--features", args.features, "--cache", str(tmp / "cache"),
           *device]
    for arch, ckpt in zip(args.teachers, ckpts):
        pre += ["--teacher", arch, "--checkpoint", str(ckpt)]
    t_pres = []
    for r in range(args.precompute_runs):  # each into a fresh cache; the runs read the first
        cache = str(tmp / (f"cache-{r}" if r else "cache"))
        t, out, _ = kdcache(*[cache if a == str(tmp / "cache") else a for a in pre])
        t_pres.append(t)
        if r == 0:
            ids = out.strip().splitlines()[-len(args.teachers):]
        print(f"precompute of {len(ids)} teachers x {args.epochs} views: {t:.1f} s", flush=True)
    t_pre = statistics.median(t_pres)
    base = ["distill", "--student", args.student, "--method", args.method, "--cache", str(tmp / "cache"),
            "--epochs", str(args.epochs), *device, *(x for t in ids for x in ("--teachers", t)),
            *(["--data-root", str(args.data_root)] if args.data_root else [])]
    cached: list[float] = []
    online: list[float] = []
    in_teachers: list[float] = []
    for seed in range(args.runs):
        order = [("cached", []), ("online", ["--online"])]
        for name, extra in order if seed % 2 == 0 else order[::-1]:
            t, _, teachers = kdcache(*base, "--seed", str(seed), "--out", str(tmp / f"{name}-{seed}"), *extra)
            (cached if name == "cached" else online).append(t)
            if name == "online":
                in_teachers.append(teachers)
        print(f"seed {seed}: cached {cached[-1]:.1f} s, online {online[-1]:.1f} s (teachers' forward passes "
              f"{in_teachers[-1]:.1f} s)", flush=True)
    gap = statistics.mean(online) - statistics.mean(cached)
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "setting": {"dataset": args.dataset, "teachers": args.teachers, "student": args.student,
                        "method": args.method, "features": args.features, "epochs": args.epochs,
                        "views": args.epochs, "device": args.device, "trained_teachers": bool(args.checkpoints)},
            "precompute_s": t_pre, "precompute_runs_s": t_pres, "cached_s": cached, "online_s": online,
            "online_teachers_s": in_teachers,
            "crossover_n": math.ceil(t_pre / gap) if gap > 0 else None,
            "rows": [{"n": n, "cache_s": t_pre + sum(cached[:n]), "online_s": sum(online[:n]),
                      "saving": sum(online[:n]) / (t_pre + sum(cached[:n]))}
                     for n in args.report if n <= args.runs]}


def print_table(r: dict[str, Any]) -> None:
    s = r["setting"]
    print(f"\n{' + '.join(s['teachers'])} -> {s['student']}, {s['method']} on {s['features']} stores, "
          f"{s['dataset']}, {s['epochs']} epochs ({s['views']} views), device {s['device']}")
    gap = statistics.mean(r["online_s"]) - statistics.mean(r["cached_s"])
    forward = statistics.mean(r["online_teachers_s"])
    print(f"precompute {r['precompute_s']:.1f} s; a cached run {statistics.mean(r['cached_s']):.1f} s "
          f"({min(r['cached_s']):.1f}-{max(r['cached_s']):.1f}); an online run {statistics.mean(r['online_s']):.1f} s "
          f"({min(r['online_s']):.1f}-{max(r['online_s']):.1f}); crossover N = {r['crossover_n']}")
    print(f"the teachers' share of an online run: online - cached = {gap:.1f} s (precompute / it = "
          f"**{r['precompute_s'] / gap:.2f}**); the live teachers' forward passes inside it {forward:.1f} s "
          f"({min(r['online_teachers_s']):.1f}-{max(r['online_teachers_s']):.1f}; precompute / it = "
          f"**{r['precompute_s'] / forward:.2f}**)")
    print("| N | precompute + N cached runs | N online runs | online / cache |")
    print("|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['n']} | {row['cache_s']:.0f} s | {row['online_s']:.0f} s | **{row['saving']:.2f}x** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--teachers", nargs="+", default=["resnet14", "resnet14", "resnet8"], help="Teacher architectures.")
    ap.add_argument("--checkpoints", nargs="+", type=Path, help="Trained weights, one per teacher (default: random).")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--method", default="camkd")
    ap.add_argument("--features", default="spatial", choices=("pooled", "spatial", "none"))
    ap.add_argument("--epochs", type=int, default=10, help="Student epochs, and views precomputed.")
    ap.add_argument("--runs", type=int, default=10, help="Student runs of each kind (seeds 0 .. N-1).")
    ap.add_argument("--report", type=int, nargs="+", default=[1, 3, 10], help="The N of the table's rows.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precompute-runs", type=int, default=1,
                    help="Precomputes timed, each into a fresh cache (the median is used).")
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    args = ap.parse_args()
    if args.checkpoints and len(args.checkpoints) != len(args.teachers):
        ap.error("give one --checkpoints file per --teachers architecture")
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
