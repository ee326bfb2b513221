"""Stored views over a long schedule, shown on digits: the check of README's advice on ``--views`` (issue 28).

The advice was chosen on Fashion-MNIST (studies/fashion_mnist.py, its long part: 40 epochs, V in {1, 2, 5, 10,
40}): a logit-only method pays for a single stored view replayed every epoch, and a few views give what one view
per epoch gives. This shows it on other data: the demo's three digits teachers (good, corrupted, weak; trained as
``kdcache demo`` trains them), a resnet8 student, aver, 40 epochs, the stores' views V in {1, 2, 40}, five
seeds; the rule for "within the noise of V = 40" is the Fashion-MNIST one, written down before these runs:
for the V, the mean of the per-seed differences from V = 40 is no larger than the seed std of the V = 40 runs,
and its paired-t 95 % interval contains 0.

    python studies/digits_views.py --out /work/digits-views [--seeds 5] [--threads 1]

Resumable (the grid reuses teachers, stores and finished runs). Writes ``OUT/views.json`` and prints a markdown
table for docs/EVIDENCE.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist_report import paired_stats, within_noise  # noqa: E402  (the Fashion-MNIST study's statistics)

from kdcache.pipelines.demo import demo_spec  # noqa: E402
from kdcache.pipelines.grid import Row  # noqa: E402
from kdcache.pipelines.grid_runner import run_grid  # noqa: E402
from kdcache.store.cache import Cache, size_on_disk  # noqa: E402
from kdcache.store.form import FeatureForm  # noqa: E402

VIEW_COUNTS = (1, 2, 40)
EPOCHS = 40
METHOD = "aver"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder of the teachers, stores, runs and views.json")
    ap.add_argument("--seeds", type=int, default=5, help="student seeds at each V (at least 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the runs go one after another)")
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error(f"--seeds must be at least 2 (the rule needs a seed std and a paired interval), not {args.seeds}")
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, not {args.threads}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    found: dict[int, dict[int, float]] = {}
    disk: dict[int, int] = {}
    for v in VIEW_COUNTS:
        # The demo's teachers and data; aver reads logits only, so the stores keep no features.
        spec = replace(demo_spec(args.out, epochs=EPOCHS, features=FeatureForm.NONE), name=f"views-V{v}",
                       rows=(Row(METHOD, METHOD),), views=v, seeds=args.seeds, runs=args.out / "runs" / f"V{v}")
        result = run_grid(spec, "cpu", say)
        if result.n_failed:
            raise SystemExit(f"V = {v}: {result.n_failed} runs failed: {result.failures}")
        found[v] = {r["seed"]: r["last"] for r in result.students[METHOD]}
        cache = Cache.at(spec.cache)
        disk[v] = sum(size_on_disk(cache.teacher_path(t["id"])) for t in result.teachers)
        say(f"V = {v}: final top-1 {found[v]}")

    ref = found[VIEW_COUNTS[-1]]
    ref_std = statistics.stdev(ref.values())
    rows: list[dict[str, Any]] = []
    for v in VIEW_COUNTS:
        seeds = sorted(found[v])
        row: dict[str, Any] = {"views": v, "top1": [found[v][s] for s in seeds], "disk_bytes": disk[v],
                               "mean": statistics.mean(found[v].values()), "std": statistics.stdev(found[v].values())}
        if v != VIEW_COUNTS[-1]:
            stats = paired_stats([found[v][s] - ref[s] for s in seeds])
            row.update(minus_ref=stats, within_noise=within_noise(stats, list(ref.values())))
        rows.append(row)
    record = {"epochs": EPOCHS, "method": METHOD, "seeds": args.seeds, "ref_std": ref_std, "rows": rows,
              "seconds": time.perf_counter() - t0}
    (args.out / "views.json").write_text(json.dumps(record, indent=1))

    print("\n" + "\n".join(table(rows, ref_std)))


def table(rows: list[dict[str, Any]], ref_std: float) -> list[str]:
    """The markdown table: each V's final top-1 over seeds, its paired difference from the last V, the verdict."""
    ref = VIEW_COUNTS[-1]
    lines = [f"| V | {METHOD}, final top-1 % | − V = {ref}, paired t 95 % | bootstrap 95 % | within noise | disk |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        cell = f"{row['mean']:.2f} ± {row['std']:.2f} ({', '.join(f'{x:.2f}' for x in row['top1'])})"
        diff, boot, verdict = "", "", f"(std {ref_std:.2f})"
        if "minus_ref" in row:
            s = row["minus_ref"]
            diff = f"{s['mean']:+.2f} [{s['t'][0]:+.2f}, {s['t'][1]:+.2f}]"
            boot = f"[{s['bootstrap'][0]:+.2f}, {s['bootstrap'][1]:+.2f}]"
            verdict = "yes" if row["within_noise"] else "no"
        lines.append(f"| {row['views']} | {cell} | {diff} | {boot} | {verdict} | {row['disk_bytes'] / 2**20:.2f} MiB |")
    return lines


if __name__ == "__main__":
    main()
