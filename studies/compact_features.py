"""What int8 features cost on real data: the Fashion-MNIST study's setting A, camkd from int8 stores.

Reuses a finished ``studies/fashion_mnist.py --out DIR`` (its data subset, teachers and
dense float16 stores, and its camkd runs as the reference), then for each feature form
(pooled, spatial):

1. precomputes the three teachers of setting A again with ``--feature-dtype int8`` on the
   same plan (V = 8);
2. compares the stored features with the float16 ones, row by row: the largest and the
   mean absolute difference, and both relative to the row's largest value;
3. distils camkd from the int8 stores for seeds 0, 1, 2 with the study's settings, and sets
   the final-epoch top-1 beside the float16 stores' runs of the same seeds.

    python studies/compact_features.py --out /work/fmnist [--jobs 2]

Writes ``DIR/compact/results.json`` and prints a markdown table (for docs/EVIDENCE.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist as study  # noqa: E402  (the study this one extends)

from kdcache.losses import MethodOptions  # noqa: E402
from kdcache.pipelines.distill import DistillRequest, distill  # noqa: E402
from kdcache.pipelines.precompute import PrecomputeRequest, precompute  # noqa: E402
from kdcache.runs import load_run  # noqa: E402
from kdcache.store import Cache  # noqa: E402
from kdcache.store.form import StoreForm  # noqa: E402

FORMS = ("pooled", "spatial")


def stores(out: Path, cfg: study.Config, dtype: str, form: str) -> list[str]:
    ids = []
    for name in study.SETTINGS["A"]:
        pre = precompute(PrecomputeRequest(teacher=cfg.teacher, checkpoint=out / "teachers" / f"{name}-{cfg.teacher}.pth",
                                           dataset=study.DATASET, data_root=out / "data", cache=out / "cache",
                                           views=cfg.views, device="cpu",
                                           form=StoreForm(features=form, feature_dtype=dtype)))
        ids.append(pre.teacher_id)
    return ids


def feature_error(cache: Cache, dense: list[str], int8: list[str]) -> dict[str, float]:
    """Differences between the int8 and the float16 features of the same teachers, rows and views."""
    worst = mean_sum = rel_worst = 0.0
    count = 0
    for a_id, b_id in zip(dense, int8):
        a, b = cache.open_teacher(a_id), cache.open_teacher(b_id)
        for v in range(a.n_views):
            _, ha = a.read_rows(v, 0, a.n_samples)
            _, hb = b.read_rows(v, 0, b.n_samples)
            assert ha is not None and hb is not None  # stores of a feature form
            ha32 = ha.astype(np.float32).reshape(len(ha), -1)
            diff = np.abs(hb.reshape(len(hb), -1) - ha32)
            peak = np.maximum(np.abs(ha32).max(1), 1e-12)
            worst = max(worst, float(diff.max()))
            rel_worst = max(rel_worst, float((diff.max(1) / peak).max()))
            mean_sum += float(diff.sum())
            count += diff.size
    return {"max_abs": worst, "mean_abs": mean_sum / count, "max_rel_to_row_peak": rel_worst}


def _run(out: Path, key: str, ids: list[str], cfg: study.Config, seed: int, threads: int) -> tuple[str, float]:
    torch.set_num_threads(threads)
    d = out / "compact" / "runs" / key / f"seed{seed}"
    if (d / "last.pth").is_file():
        return key, 0.0
    t0 = time.perf_counter()
    distill(DistillRequest(student=cfg.student, teachers=ids, method="camkd", out=d, cache=out / "cache",
                           data_root=out / "data", epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                           device="cpu", resume=(d / "checkpoint.pth").is_file(), options=MethodOptions()))
    return key, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="a finished studies/fashion_mnist.py folder")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out, cfg = args.out, study.Config()
    cache = Cache.at(out / "cache")
    result: dict[str, Any] = {"forms": {}}
    tasks = []
    for form in FORMS:
        dense, int8 = stores(out, cfg, "float16", form), stores(out, cfg, "int8", form)
        store = cache.open_teacher(int8[0])
        fshape = store.feature_shape
        result["forms"][form] = {
            "dense_ids": dense, "int8_ids": int8, "error": feature_error(cache, dense, int8),
            "row_bytes": {"float16": StoreForm().row_bytes(10, fshape),
                          "int8": StoreForm(feature_dtype="int8").row_bytes(10, fshape)}}
        tasks += [(out, f"camkd-{form}-int8", int8, cfg, seed) for seed in range(cfg.seeds)]
    threads = max(1, torch.get_num_threads() // args.jobs)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for key, seconds in pool.map(_run, *zip(*tasks), [threads] * len(tasks)):
            print(f"{key}: {seconds:.0f} s", file=sys.stderr)
    result["seconds"] = time.perf_counter() - t0
    rows = ["| camkd (setting A, V = 8) | float16 features | int8 features | per seed (int8 − float16) |",
            "|---|---|---|---|"]
    for form in FORMS:
        dense_top1 = [load_run(out / "runs" / "A" / f"camkd-{form}" / f"seed{s}").final_top1
                      for s in range(cfg.seeds)]
        int8_top1 = [load_run(out / "compact" / "runs" / f"camkd-{form}-int8" / f"seed{s}").final_top1
                     for s in range(cfg.seeds)]
        result["forms"][form].update(float16_top1=dense_top1, int8_top1=int8_top1)
        rows.append(f"| {form} | {statistics.mean(dense_top1):.2f} ± {statistics.stdev(dense_top1):.2f} | "
                    f"{statistics.mean(int8_top1):.2f} ± {statistics.stdev(int8_top1):.2f} | "
                    f"{', '.join(f'{b - a:+.2f}' for a, b in zip(dense_top1, int8_top1))} |")
    (out / "compact").mkdir(exist_ok=True)
    (out / "compact" / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(rows))
    for form in FORMS:
        f = result["forms"][form]
        print(f"{form}: row {f['row_bytes']['float16']} B -> {f['row_bytes']['int8']} B; feature error "
              f"max {f['error']['max_abs']:.4g}, mean {f['error']['mean_abs']:.3g}, max relative to the row's peak "
              f"{f['error']['max_rel_to_row_peak']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
