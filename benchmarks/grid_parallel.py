"""A grid on a local dask cluster against the serial runner: wall clock, ratio, and whether every run's result is
the same.

    python benchmarks/grid_parallel.py                                # 12 runs on digits, CPU, --workers 2
    python benchmarks/grid_parallel.py --epochs 3 --json grid.json
    python benchmarks/grid_parallel.py --device cuda --seeds 4 --runs-per-device 1 2 4 8   # on a GPU machine

The grid: 3 resnet8 teachers trained inside it for ``--teacher-epochs`` (as tasks side by side on the cluster),
their spatial stores over ``--epochs`` views, and a resnet8 student with ce, aver, fitnet-mkd and camkd for
``--seeds`` seeds (4 x 3 = 12 runs by default) on scikit-learn's digits. Every grid starts from nothing (its own
teachers, cache and runs) in a fresh process, timed by its wall clock (imports, cluster start-up, teachers,
precompute and runs); the order of the modes alternates from round to round.

Modes, on a CPU:

- ``serial``: ``run_grid`` in one process, torch at its default threads (every core): what a user runs today;
- ``serial-1t``: the same at the torch threads a cluster task gets (the cores / the task slots), the reference
  every cluster run must equal bit for bit (torch's CPU kernels sum in an order that depends on the thread
  count);
- ``workers N``: ``--workers N``, one torch thread per slot.

With ``--device cuda`` and ``--runs-per-device R ...``: one GPU, ``--workers 1 --runs-per-device R`` for each R,
reported as runs per hour beside the serial runner's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

METHODS = ("ce", "aver", "fitnet-mkd", "camkd")


def grid_spec(root: Path, epochs: int, teacher_epochs: int, seeds: int) -> Any:
    from kdcache.pipelines.grid import GridSpec, GridTeacher, Row
    from kdcache.store.form import FeatureForm

    teachers = tuple(GridTeacher("resnet8", root / "teachers" / f"resnet8-{i}.pth", teacher_epochs, seed=i)
                     for i in range(3))
    return GridSpec(name="grid-parallel", dataset="digits", teachers=teachers, student="resnet8",
                    rows=tuple(Row(m, m) for m in METHODS), out=root, runs=root / "runs", views=epochs,
                    epochs=epochs, seeds=seeds, features=FeatureForm.SPATIAL, cache=root / "cache")


def child(args: argparse.Namespace) -> None:
    """One grid in this fresh process; its seconds and every run's top-1 as JSON on stdout."""
    import torch

    from kdcache.pipelines import grid, grid_runner
    from kdcache.pipelines.precompute_cluster import ClusterOptions

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cluster = ClusterOptions(workers=args.workers, runs_per_device=args.runs_per_device[0]) if args.workers else None
    spec = grid_spec(Path(args.root), args.epochs, args.teacher_epochs, args.seeds)
    result = grid_runner.run_grid(spec, args.device, cluster=cluster)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "stages": result.seconds, "failed": result.n_failed,
                      "table": grid.format_table(result, "grid"),
                      "runs": {f"{label}/seed{r['seed']}": [r["best"], r["last"]]
                               for label, rs in result.students.items() for r in rs}}))


def same_weights(a: Path, b: Path, epochs: int, teacher_epochs: int, seeds: int) -> bool:
    import torch

    from kdcache.runs import RunDir

    spec_a, spec_b = grid_spec(a, epochs, teacher_epochs, seeds), grid_spec(b, epochs, teacher_epochs, seeds)
    for row, seed in spec_a.runs_in_order():
        wa = torch.load(spec_a.run_dir(row.label, seed).file(RunDir.LAST), weights_only=False)["model"]
        wb = torch.load(spec_b.run_dir(row.label, seed).file(RunDir.LAST), weights_only=False)["model"]
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


def run_mode(name: str, root: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--root", str(root), "--epochs", str(args.epochs),
           "--teacher-epochs", str(args.teacher_epochs), "--seeds", str(args.seeds), "--device", args.device, *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    found["wall"] = time.perf_counter() - t0
    print(f"  {name:<14} {found['wall']:7.1f} s  (stages: "
          + ", ".join(f"{k} {v:.1f}" for k, v in found["stages"].items()) + ")", flush=True)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5, help="student epochs (and views)")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="local cluster's workers on a CPU [default: 2]")
    ap.add_argument("--runs-per-device", type=int, nargs="+", default=[1])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.workers = args.workers or 2

    cores = len(os.sched_getaffinity(0))
    gpu = args.device.startswith("cuda")
    modes: list[tuple[str, list[str]]] = [("serial", [])]
    if not gpu:
        slots = args.workers * args.runs_per_device[0]
        modes.append(("serial-1t", ["--threads", str(max(1, cores // slots))]))
        modes.append((f"workers {args.workers}", ["--workers", str(args.workers), "--runs-per-device",
                                                  str(args.runs_per_device[0])]))
    else:
        modes += [(f"1 GPU x {r}", ["--workers", "1", "--runs-per-device", str(r)]) for r in args.runs_per_device]
    n_runs = len(METHODS) * args.seeds
    print(f"{machine()}; {n_runs} runs, {args.epochs} epochs, teachers {args.teacher_epochs} epochs, "
          f"device {args.device}", flush=True)
    found: dict[str, list[dict[str, Any]]] = {m: [] for m, _ in modes}
    roots: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            order = modes if r % 2 == 0 else modes[::-1]
            for name, extra in order:
                root = Path(tmp) / f"r{r}-{name.replace(' ', '-')}"
                roots[name] = root
                found[name].append(run_mode(name, root, args, extra))
        report = {"machine": machine(), "runs": n_runs, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                  "device": args.device, "modes": {}}
        base = statistics.median(f["wall"] for f in found["serial"])
        print(f"\n| grid | wall s (median of {args.rounds}) | serial / this | runs per hour | failed |")
        print("|---|---|---|---|---|")
        for name, _ in modes:
            wall = statistics.median(f["wall"] for f in found[name])
            report["modes"][name] = {"wall": [f["wall"] for f in found[name]], "stages": [f["stages"] for f in found[name]],
                                     "runs": found[name][-1]["runs"]}
            print(f"| {name} | {wall:.1f} | {base / wall:.2f}x | {3600 * n_runs / wall:.0f} | "
                  f"{found[name][-1]['failed']} |")
        if not gpu:
            cluster_name = modes[2][0]
            ref, got = found["serial-1t"][-1], found[cluster_name][-1]
            tables = ref["table"] == got["table"]
            weights = same_weights(roots["serial-1t"], roots[cluster_name], args.epochs, args.teacher_epochs,
                                   args.seeds)
            default = found["serial"][-1]["runs"]
            differ = [k for k in ref["runs"] if ref["runs"][k] != default.get(k)]
            gap = statistics.mean(abs(ref["runs"][k][0] - default[k][0]) for k in ref["runs"])
            print(f"\n{cluster_name} against serial-1t: the same table: {tables}; every run's final weights "
                  f"bit-identical: {weights}")
            print(f"serial (torch's default threads) against serial-1t: {len(differ)} of {n_runs} runs differ, best "
                  f"top-1 by {gap:.2f} points on average")
            report.update(same_table=tables, same_weights=weights, default_threads_differ=len(differ))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
