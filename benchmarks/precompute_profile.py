"""Where the time of `kdcache precompute` goes, end to end, stage by stage, in a fresh process as a user runs it.

    python benchmarks/precompute_profile.py                      # the demo's teachers on digits, spatial, 10 views
    python benchmarks/precompute_profile.py --teachers resnet32x4 resnet32x4 resnet32x4 --views 3
    python benchmarks/precompute_profile.py --repeat 3 --json profile.json

One `kdcache precompute` of the teachers (random weights: time does not depend on them) into a fresh cache,
run in a fresh process through a probe that times, without changing it, each stage of the pipeline:

- ``start-up``: the interpreter, kdcache's command line and its imports, to the first teacher's preparation;
- ``data set``: the training set loaded and fingerprinted (once for all teachers);
- ``prepare``: the checkpoint hashed, the teacher built and loaded (the data set too, for a single teacher);
- ``plan``: the view plan drawn and written (once for all teachers);
- ``forward``: the teacher's forward passes (on the main thread: the critical path);
- ``views``: decoding and replaying the views (on a GPU on the read-ahead thread, beside the forward pass;
  on the CPU in turn with it);
- ``writes``: compressing, checksumming and writing the shards and their markers (on a GPU on the writer
  thread; on the CPU in turn with the forward);
- ``summaries`` (inside writes): a top-K store's summaries of the logits;
- ``waits``: the main thread waiting for the views or the writer (what background work adds to the
  critical path);
- ``test evaluation``: the teacher on the test split;
- ``mark complete``: accuracies recorded, the store declared complete;
- ``total``: the process's wall clock, from its start to its exit.

On a GPU, views and writes overlap the forward pass and the critical path is start-up + data set + prepare + plan +
forward + waits + test evaluation + mark complete; on the CPU views and writes are on it too. ``other`` is the
rest: the forward loop's own work (outputs gathered, checked for NaN, correct rows counted) and bookkeeping.
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
from common import machine, random_checkpoint  # noqa: E402

PROBE = r"""
import collections, json, os, sys, threading, time
t0 = float(os.environ["KDCACHE_T0"])
spent = collections.defaultdict(float)
marks = {}
inside = threading.local()
def timed(owner, name, stage):
    real = getattr(owner, name)
    def wrapper(*a, **k):
        s = time.perf_counter()
        inside.depth = getattr(inside, "depth", 0) + 1
        try:
            return real(*a, **k)
        finally:
            inside.depth -= 1
            spent[stage] += time.perf_counter() - s
    setattr(owner, name, wrapper)
from kdcache.cli.main import main
import kdcache.pipelines.precompute as pc
import kdcache.pipelines.precompute_engine as engine
import kdcache.batches as batches
import kdcache.store.teacher as teacher_module
from kdcache.store import TeacherStore
from concurrent.futures import Future
real_prepare = pc.prepare
def prepare(*a, **k):
    marks.setdefault("start-up", time.time() - t0)
    s = time.perf_counter()
    try:
        return real_prepare(*a, **k)
    finally:
        spent["prepare"] += time.perf_counter() - s
pc.prepare = prepare
timed(pc, "load_dataset", "data set")      # several teachers: once, by the front end
timed(engine, "load_dataset", "data set")  # one teacher: by prepare
timed(pc, "ensure_plan", "plan")
timed(engine, "forward_batch", "forward")
timed(engine, "view_batch", "views")
timed(TeacherStore, "write_shard", "writes")
timed(teacher_module, "summarise_logits", "summaries")  # the name write_shard calls
timed(engine, "evaluate", "test evaluation")
timed(TeacherStore, "mark_complete", "mark complete")
real_result = Future.result
def result(self, *a, **k):
    if (threading.current_thread() is threading.main_thread() and not self.done()
            and not getattr(inside, "depth", 0)):  # a wait inside a timed stage is that stage's
        s = time.perf_counter()
        try:
            return real_result(self, *a, **k)
        finally:
            spent["waits"] += time.perf_counter() - s
    return real_result(self, *a, **k)
Future.result = result
try:
    main(sys.argv[1:], prog_name="kdcache", standalone_mode=False)
finally:
    spent["start-up"] = marks.get("start-up", 0.0)
    spent["total"] = time.time() - t0
    print("PROBE " + json.dumps(spent), flush=True)
"""

STAGES = ("start-up", "data set", "prepare", "plan", "forward", "views", "writes", "summaries", "waits",
          "test evaluation", "mark complete", "other", "total")
CRITICAL = ("start-up", "data set", "prepare", "plan", "forward", "waits", "test evaluation", "mark complete")


def run_once(args: list[str], inline: bool) -> dict[str, float]:
    env = {**os.environ, "KDCACHE_T0": repr(time.time())}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PROBE ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"precompute failed:\n{done.stderr[-3000:]}")
    spent: dict[str, float] = json.loads(line[len("PROBE "):])
    on_path = CRITICAL + (("views", "writes") if inline else ())
    spent["other"] = spent["total"] - sum(spent.get(s, 0.0) for s in on_path)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--teachers", nargs="+", default=["resnet14", "resnet14", "resnet8"])
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--features", default="spatial", choices=("pooled", "spatial", "none"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More precompute options, as given.")
    ap.add_argument("--repeat", type=int, default=1, help="Fresh caches, one after another; medians reported.")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from kdcache.data import load_dataset

    classes = load_dataset(args.dataset, args.data_root).num_classes
    print(f"machine: {machine()}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = [random_checkpoint(Path(tmp) / f"t{i}-{a}.pth", a, classes, i) for i, a in enumerate(args.teachers)]
        for r in range(args.repeat):
            cmd = ["precompute", "--dataset", args.dataset, "--views", str(args.views), "--features", args.features,
                   "--cache", str(Path(tmp) / f"cache{r}"), "--device", args.device,
                   *(["--data-root", str(args.data_root)] if args.data_root else []), *args.extra]
            for arch, ckpt in zip(args.teachers, ckpts):
                cmd += ["--teacher", arch, "--checkpoint", str(ckpt)]
            runs.append(run_once(cmd, inline=args.device == "cpu"))
            print(f"run {r + 1}: {runs[-1]['total']:.1f} s", flush=True)
    med = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGES}
    print(f"\n`kdcache precompute` of {' + '.join(args.teachers)} over {args.views} views of {args.dataset}, "
          f"{args.features}, {args.device}; median of {len(runs)} fresh run(s), seconds")
    print("| stage | seconds | share of total |")
    print("|---|---|---|")
    for s in STAGES:
        tag = " (background)" if s in ("views", "writes") and args.device != "cpu" else ""
        print(f"| {s}{tag} | {med[s]:.2f} | {med[s] / med['total']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                         "setting": vars(args) | {"data_root": str(args.data_root), "json": None},
                                         "runs": runs, "median": med}, indent=1, default=str))


if __name__ == "__main__":
    main()
