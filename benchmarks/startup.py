"""Start-up cost of a distill run: wall time from the command to the end of its first training step, in parts.

    python benchmarks/startup.py [--cifar-samples 50000] [--views 4] [--repeat 3]

Two set-ups: digits (1,437 samples, three resnet8 teachers) and a CIFAR-100-sized synthetic plan
(50,000 samples, three resnet8 teachers on random pixels), both camkd on pooled stores, batch 64, CPU.
Each run is a fresh Python process that enters kdcache's command line as `kdcache distill ...` does,
with a probe that stamps the time at each stage and exits after the first step:

- ``python + kdcache cli``: interpreter start and importing the command line (torch is not imported yet);
- ``torch, parse, checks``: argument parsing, then distill's imports (torch, zarr, dask) and checks;
- ``stores, plan, data``: CachedTeachers: the stores and plan opened, the data set loaded and fingerprinted;
- ``student, method``: the student and the method built, the run directory started;
- ``first step``: the first batch read, replayed and trained on.

Beside them, a fresh process that only imports torch: the floor that no change in kdcache lowers.
Medians over ``--repeat`` rounds, alternating the set-ups.
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


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fake_cifar100, machine, random_checkpoint  # noqa: E402

from kdcache.pipelines.precompute import PrecomputeRequest, precompute  # noqa: E402

PROBE = r"""
import json, os, sys, time
t0 = float(os.environ["KDCACHE_T0"])
marks = []
def mark(name): marks.append((name, time.time() - t0))
from kdcache.cli.main import main
mark("python + kdcache cli")
import kdcache.pipelines.distill as d
mark("torch, parse, checks")
Real = d.CachedTeachers
class Probe(Real):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        mark("stores, plan, data")
d.CachedTeachers = Probe
step = d._Stepper.__call__
def first(self, *a, **k):
    mark("student, method")
    out = step(self, *a, **k)
    float(out.total)
    mark("first step")
    print("PROBE " + json.dumps(marks), flush=True)
    os._exit(0)
d._Stepper.__call__ = first
main(sys.argv[1:], prog_name="kdcache")
"""


def teachers(tmp: Path, dataset: str, root: Path | None, classes: int, views: int) -> list[str]:
    ids = []
    for seed in range(3):
        ckpt = random_checkpoint(tmp / f"{dataset}-{seed}.pth", "resnet8", classes, seed)
        ids.append(precompute(PrecomputeRequest(teacher="resnet8", checkpoint=ckpt, dataset=dataset, data_root=root,
                                                cache=tmp / "cache", views=views)).teacher_id)
    return ids


def run_once(args: list[str]) -> list[tuple[str, float]]:
    env = {**os.environ, "KDCACHE_T0": repr(time.time())}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
    if line is None:
        raise RuntimeError(f"the probe did not reach a step: {out.stderr[-2000:]}")
    return [(name, t) for name, t in json.loads(line[len("PROBE "):])]


def torch_import() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cifar-samples", type=int, default=50_000)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        root = fake_cifar100(tmp / "cifar", a.cifar_samples)
        setups = {"digits": ("digits", None, 10), f"cifar100-sized ({a.cifar_samples:,})": ("cifar100", root, 100)}
        commands = {}
        for name, (dataset, data_root, classes) in setups.items():
            ids = teachers(tmp, dataset, data_root, classes, a.views)
            cmd = ["distill", "--student", "resnet8", "--method", "camkd", "--cache", str(tmp / "cache"),
                   "--out", str(tmp / f"run-{dataset}"), "--epochs", "1", "--batch-size", "64", "--device", "cpu",
                   *(x for t in ids for x in ("--teachers", t))]
            if data_root is not None:
                cmd += ["--data-root", str(data_root)]
            commands[name] = cmd
        results: dict[str, list[list[tuple[str, float]]]] = {n: [] for n in commands}
        floor = []
        for _ in range(a.repeat):
            floor.append(torch_import())
            for name, cmd in commands.items():
                results[name].append(run_once(cmd))
    print(f"machine: {machine()}; {a.repeat} rounds, medians (min-max) in seconds from the command")
    stages = [s for s, _ in next(iter(results.values()))[0]]
    print(f"| set-up | {' | '.join(stages)} | import torch alone |")
    print("|---|" + "---|" * (len(stages) + 1))
    for name, runs in results.items():
        cells = []
        for i in range(len(stages)):
            ts = [r[i][1] for r in runs]
            cells.append(f"{statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f})")
        print(f"| {name} | {' | '.join(cells)} | {statistics.median(floor):.2f} |")


if __name__ == "__main__":
    main()
