"""What top-K logits cost on real data: the Fashion-MNIST study's setting A, aver and camkd from top-K stores.

Reuses a finished ``studies/fashion_mnist.py --out DIR`` (its data subset, teachers, dense
stores and runs) and ``studies/compact_features.py`` (its int8 camkd runs), then:

1. precomputes the three teachers of setting A again with ``--logits topk:K`` for K = 1, 2, 3
   (pooled float16 features), and with ``--logits topk:1 --feature-dtype int8``, on the same
   plan (V = 8, T = 4, the study's);
2. measures the top-K approximation on the real teacher outputs against a real student (the
   dense aver run's final student, seed 0, on the same stored views): per sample the mass at T
   outside the K, the KD term ``T² KL`` and its gradient in the student's logits from the spread
   distribution against the exact ones, and the documented bound (kdcache.topk);
3. distils aver and camkd from the top-K stores (and camkd from top-1 + int8) for seeds 0, 1, 2
   with the study's settings, beside the dense stores' runs of the same seeds.

    python studies/compact_logits.py --out /work/fmnist [--jobs 2]

Writes ``DIR/compact/logits.json`` and prints markdown tables (for docs/EVIDENCE.md).
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist as study  # noqa: E402  (the study this one extends)

from kdcache.cached import CachedTeachers  # noqa: E402
from kdcache.losses import MethodOptions  # noqa: E402
from kdcache.losses.base import kl_per_sample  # noqa: E402
from kdcache.models import build_model, load_checkpoint  # noqa: E402
from kdcache.pipelines.distill import DistillRequest, distill  # noqa: E402
from kdcache.pipelines.precompute import PrecomputeRequest, precompute  # noqa: E402
from kdcache.runs import load_run  # noqa: E402
from kdcache.store.form import StoreForm  # noqa: E402
from kdcache.topk import kl_error_bound  # noqa: E402

KS = (1, 2, 3)
T = 4.0
# (key, logits form, feature dtype): the stores this study adds
FORMS = [*((f"top{k}", f"topk:{k}", "float16") for k in KS), ("top1-int8", "topk:1", "int8")]


def stores(out: Path, cfg: study.Config, logits: str, dtype: str) -> list[str]:
    ids = []
    for name in study.SETTINGS["A"]:
        pre = precompute(PrecomputeRequest(teacher=cfg.teacher, checkpoint=out / "teachers" / f"{name}-{cfg.teacher}.pth",
                                           dataset=study.DATASET, data_root=out / "data", cache=out / "cache",
                                           views=cfg.views, device="cpu",
                                           form=StoreForm(logits, feature_dtype=dtype, temperature=T)))
        ids.append(pre.teacher_id)
    return ids


@torch.no_grad()
def approximation(out: Path, cfg: study.Config, dense: list[str], top: list[str]) -> dict[str, float]:
    """The spread distribution against the exact one on every row of the first two epochs' views."""
    student = build_model(cfg.student, 10)
    load_checkpoint(student, out / "runs" / "A" / "aver" / "seed0" / "last.pth")
    student.eval()
    a = CachedTeachers(dense, out / "cache", data_root=out / "data", batch_size=500, seed=0, device="cpu")
    b = CachedTeachers(top, out / "cache", data_root=out / "data", batch_size=500, seed=0, device="cpu")
    sums = {"mass": 0.0, "kl": 0.0, "abs_err": 0.0, "bound": 0.0, "grad_l1": 0.0, "grad_err_l1": 0.0}
    worst = {"mass": 0.0, "abs_err": 0.0, "rel_err": 0.0, "grad_rel_err": 0.0}
    n = 0
    for epoch in (1, 2):
        for x, y in zip(a.epoch(epoch), b.epoch(epoch)):
            _, s = student(x.views)
            q = torch.softmax(s / T, dim=1)
            for z, z_hat, t in zip(x.teacher_logits, y.teacher_logits, y.teacher_topk):
                assert t is not None
                exact, approx = kl_per_sample(s, z, T), kl_per_sample(s, z_hat, T)
                g_exact = T * (q - torch.softmax(z / T, dim=1))
                g_err = T * (torch.softmax(z_hat / T, dim=1) - torch.softmax(z / T, dim=1))
                err, m = (approx - exact).abs(), t.rest_mass()
                sums["mass"] += float(m.sum())
                sums["kl"] += float(exact.sum())
                sums["abs_err"] += float(err.sum())
                sums["bound"] += float(kl_error_bound(s, t).sum())
                sums["grad_l1"] += float(g_exact.abs().sum())
                sums["grad_err_l1"] += float(g_err.abs().sum())
                worst["mass"] = max(worst["mass"], float(m.max()))
                worst["abs_err"] = max(worst["abs_err"], float(err.max()))
                worst["rel_err"] = max(worst["rel_err"], float((err / exact.clamp_min(1e-6)).max()))
                worst["grad_rel_err"] = max(worst["grad_rel_err"], float(
                    (g_err.abs().sum(1) / g_exact.abs().sum(1).clamp_min(1e-6)).max()))
                n += len(m)
    return {"rows": n, "mean_rest_mass": sums["mass"] / n, "max_rest_mass": worst["mass"],
            "mean_kl": sums["kl"] / n, "mean_abs_kl_error": sums["abs_err"] / n,
            "kl_error_relative": sums["abs_err"] / sums["kl"], "max_abs_kl_error": worst["abs_err"],
            "mean_bound": sums["bound"] / n, "grad_error_relative": sums["grad_err_l1"] / sums["grad_l1"],
            "max_grad_error_relative": worst["grad_rel_err"]}


def _run(out: Path, key: str, method: str, ids: list[str], cfg: study.Config, seed: int,
         threads: int) -> tuple[str, float]:
    torch.set_num_threads(threads)
    d = out / "compact" / "runs" / key / f"seed{seed}"
    if (d / "last.pth").is_file():
        return key, 0.0
    t0 = time.perf_counter()
    distill(DistillRequest(student=cfg.student, teachers=ids, method=method, out=d, cache=out / "cache",
                           data_root=out / "data", epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                           device="cpu", resume=(d / "checkpoint.pth").is_file(), options=MethodOptions()))
    return key, time.perf_counter() - t0


def _top1(path: Path, seeds: int) -> list[float]:
    return [load_run(path / f"seed{s}").final_top1 for s in range(seeds)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="a finished studies/fashion_mnist.py folder")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out, cfg = args.out, study.Config()
    t0 = time.perf_counter()
    dense = stores(out, cfg, "dense", "float16")
    ids = {key: stores(out, cfg, logits, dtype) for key, logits, dtype in FORMS}
    result: dict[str, Any] = {"dense_ids": dense, "ids": ids, "temperature": T,
                              "precompute_seconds": time.perf_counter() - t0,
                              "approximation": {f"top{k}": approximation(out, cfg, dense, ids[f"top{k}"]) for k in KS},
                              "row_bytes": {"dense": StoreForm().row_bytes(10, (64,)),
                                            **{key: StoreForm(logits, feature_dtype=dtype, temperature=T).row_bytes(10, (64,))
                                               for key, logits, dtype in FORMS}}}
    tasks = [(out, f"{method}-{key}", method, ids[key], cfg, seed)
             for key, _, _ in FORMS for method in ("aver", "camkd")
             if not (method == "aver" and key.endswith("int8")) for seed in range(cfg.seeds)]
    threads = max(1, torch.get_num_threads() // args.jobs)
    t1 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for key, seconds in pool.map(_run, *zip(*tasks), [threads] * len(tasks)):
            print(f"{key}: {seconds:.0f} s", file=sys.stderr)
    result["runs_seconds"] = time.perf_counter() - t1
    reference = {"aver": {"dense": out / "runs" / "A" / "aver"},
                 "camkd": {"dense": out / "runs" / "A" / "camkd-pooled",
                           "dense-int8": out / "compact" / "runs" / "camkd-pooled-int8"}}
    top1: dict[str, dict[str, list[float]]] = {}
    for method in ("aver", "camkd"):
        top1[method] = {k: _top1(p, cfg.seeds) for k, p in reference[method].items()}
        for key, _, _ in FORMS:
            if (out / "compact" / "runs" / f"{method}-{key}").is_dir():
                top1[method][key] = _top1(out / "compact" / "runs" / f"{method}-{key}", cfg.seeds)
    result["top1"] = top1
    (out / "compact").mkdir(exist_ok=True)
    (out / "compact" / "logits.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = ["| store (setting A, V = 8, T = 4) | bytes a row | aver | camkd |", "|---|---|---|---|"]
    for key in ("dense", "top3", "top2", "top1", "dense-int8", "top1-int8"):
        cells = []
        for method in ("aver", "camkd"):
            acc = top1[method].get(key)
            cells.append("–" if acc is None else f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f}")
        size = result["row_bytes"].get(key, StoreForm(feature_dtype="int8").row_bytes(10, (64,)))
        rows.append(f"| {key} | {size} B | {cells[0]} | {cells[1]} |")
    rows += ["", "| K | mean mass outside the K (max) | KL error / KL | mean bound / mean KL | "
             "gradient error / gradient (L1; worst row) |", "|---|---|---|---|---|"]
    for k in KS:
        a = result["approximation"][f"top{k}"]
        rows.append(f"| {k} | {a['mean_rest_mass']:.4f} ({a['max_rest_mass']:.3f}) | {a['kl_error_relative']:.4f} | "
                    f"{a['mean_bound'] / a['mean_kl']:.3f} | {a['grad_error_relative']:.4f} "
                    f"({a['max_grad_error_relative']:.3f}) |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
