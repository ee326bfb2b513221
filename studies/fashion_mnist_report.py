"""Tables and figures of the Fashion-MNIST study (studies/fashion_mnist.py) from its finished runs.

Every number comes from a run directory (config.json, metrics.jsonl, sample_weights.npz) or a store on disk;
a run that has not finished shows as "—" and is counted as missing.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.runs import load_run

from fashion_mnist_setting import CLASSES, ROTATED, SETTINGS, Config, StoreIds, best_teacher  # beside it

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OverSeeds = list[float | None]  # a run's final top-1 at each seed, None where it has not finished
Points = list[tuple[float, tuple[float, float] | None]]  # (x, (mean, std) over seeds, or None: no runs)


class Keyed(Protocol):
    """A run of the study (fashion_mnist.Run), as far as the report reads it: its key, part/name/seed<s>."""

    @property
    def key(self) -> str: ...


def _final(out: Path, key: str) -> float | None:
    path = out / "runs" / key
    if not (path / "last.pth").is_file():
        return None
    try:
        return load_run(path).final_top1
    except KdcacheError:
        return None


def _cell(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "—"
    spread = f" ± {statistics.stdev(got):.2f}" if len(got) > 1 else ""
    each = ", ".join(f"{v:.2f}" for v in got)
    missing = f"; {len(values) - len(got)} missing" if len(got) < len(values) else ""
    return f"{statistics.mean(got):.2f}{spread} ({each}{missing})"


def _mean_std(values: list[float | None]) -> tuple[float, float] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return statistics.mean(got), (statistics.stdev(got) if len(got) > 1 else 0.0)


def _disk(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_report(out: Path, cfg: Config, ids: StoreIds, runs: Sequence[Keyed], facts: dict[str, Any],
                 timing: dict[str, float]) -> dict[str, Any]:
    """Write tables.md, results.json and the figures under ``out``; return what results.json holds."""
    seeds = range(cfg.seeds)
    results: dict[str, Any] = {"config": asdict(cfg), "teachers": facts, "timing": timing}
    acc = {r.key: _final(out, r.key) for r in runs}
    results["runs"] = acc
    lines = [f"# Fashion-MNIST study: tables ({sum(v is not None for v in acc.values())} of {len(acc)} runs "
             "finished)", ""]

    def over_seeds(part: str, name: str) -> list[float | None]:
        return [acc.get(f"{part}/{name}/seed{s}") for s in seeds]

    # teachers
    lines += ["## Teachers (test top-1 %)", "", "| teacher | seed | labels | test | on Trouser, Dress, Bag | on the "
              "other classes |", "|---|---|---|---|---|---|"]
    for name, t in facts["teachers"].items():
        labels = "rotated " + ", ".join(f"{CLASSES[a]}→{CLASSES[b]}" for a, b in ROTATED.items()) \
            if t["label_map"] else "true"
        lines.append(f"| {name} ({cfg.teacher}) | {t['seed']} | {labels} | {t['test']:.2f} | "
                     f"{t['rotated_classes']:.2f} | {t['other_classes']:.2f} |")
    for setting, names in SETTINGS.items():
        lines.append(f"| ensemble {setting} ({', '.join(names)}; mean softmax) | | | {facts['ensemble'][setting]:.2f} "
                     "| | |")
    lines.append("")

    # main table
    lines += ["## Student accuracy by method (final-epoch test top-1 %, mean ± std over seeds, each seed in brackets)",
              "", "| method | A: three good teachers | B: one teacher rotated on three classes |", "|---|---|---|"]
    methods = [("ce", "ce"), ("kd", "kd (best teacher: A {}, B {})".format(best_teacher(facts, "A"),
                                                                         best_teacher(facts, "B"))),
               ("aver", "aver"), ("ebkd", "ebkd"), ("aekd", "aekd"), ("fitnet-mkd", "fitnet-mkd (spatial)"),
               ("camkd-pooled", "camkd, pooled form, β = 50"), ("camkd-spatial", "camkd, spatial form, β = 50")]
    main: dict[str, dict[str, OverSeeds]] = {}
    for name, label in methods:
        in_a = over_seeds("A", name)
        in_b = over_seeds("A", name) if name == "ce" else over_seeds("B", name)
        main[name] = {"A": in_a, "B": in_b}
        lines.append(f"| {label} | {_cell(in_a)} | {_cell(in_b)} |")
    lines.append("")

    # beta
    lines += ["## camkd against β (setting A)", "", "| β | pooled form | spatial form |", "|---|---|---|"]
    beta: dict[int, dict[str, OverSeeds]] = {}
    for b in cfg.betas:
        row: dict[str, OverSeeds] = {}
        for form in ("pooled", "spatial"):
            row[form] = over_seeds("A", f"camkd-{form}") if b == 50 else over_seeds("beta", f"camkd-{form}-beta{b}")
        beta[b] = row
        lines.append(f"| {b} | {_cell(row['pooled'])} | {_cell(row['spatial'])} |")
    lines.append("")

    # ablations
    lines += ["## The paper's Table 4 ablations (setting A, spatial form)", "", "| variant | top-1 % |", "|---|---|"]
    abl: dict[str, OverSeeds] = {
        "camkd (confidence weights, β = 50, feature term weighted by v)": over_seeds("A", "camkd-spatial"),
        "uniform weights w = v = 1/K (`--camkd-weights uniform`)": over_seeds("abl", "camkd-spatial-uniform"),
        "no feature term (`--beta 0`)": beta[0]["spatial"] if 0 in beta else [None],
        "feature term weighted by w (`--camkd-feature-weights w`)": over_seeds("abl", "camkd-spatial-feature-by-w")}
    for label, values in abl.items():
        lines.append(f"| {label} | {_cell(values)} |")
    lines.append("")

    # views
    lines += ["## Student accuracy against stored views V (setting A, spatial stores, "
              f"{cfg.epochs} epochs: epoch e reads view σ(e) mod V)", "",
              "| V | aver | camkd (spatial) | disk per teacher: logits only | pooled | spatial |",
              "|---|---|---|---|---|---|"]
    views: dict[int, dict[str, Any]] = {}  # V -> aver, camkd: accuracies over seeds; disk: bytes by form
    for v in cfg.view_counts:
        view_row: dict[str, Any] = {}
        for method in ("aver", "camkd"):
            if v == cfg.views:  # part A's runs
                view_row[method] = over_seeds("A", "camkd-spatial" if method == "camkd" else method)
            else:
                view_row[method] = over_seeds("views", f"{method}-spatial-V{v}")
        view_row["disk"] = {form: (_disk(ids[("t0", form, v, "path")]) if ("t0", form, v, "path") in ids else None)
                            for form in ("none", "pooled", "spatial")}
        views[v] = view_row
        rows = v * cfg.per_class * len(CLASSES)
        disk = " | ".join(f"{d / 2**20:.2f} MiB ({d / rows:,.0f} B/row)" if d else "—"
                          for d in view_row["disk"].values())
        lines.append(f"| {v} | {_cell(view_row['aver'])} | {_cell(view_row['camkd'])} | {disk} |")
    lines += ["", f"(V = {cfg.views}'s aver runs read the pooled stores of part A, the others spatial stores; aver "
              "reads only logits, which are identical in both forms. Disk: t0's whole store directory as written, "
              "final classifier and metadata included.)", ""]

    # online
    lines += ["## Cached against online camkd (setting A, spatial form, same views and seeds)", "",
              "| seed | cached | online | difference |", "|---|---|---|---|"]
    online = {"cached": over_seeds("A", "camkd-spatial"), "online": over_seeds("online", "camkd-spatial-online")}
    for s in seeds:
        c, o = online["cached"][s], online["online"][s]
        diff = f"{o - c:+.2f}" if c is not None and o is not None else "—"
        lines.append(f"| {s} | {'—' if c is None else f'{c:.2f}'} | {'—' if o is None else f'{o:.2f}'} | {diff} |")
    lines.append(f"| mean ± std | {_cell(online['cached'])} | {_cell(online['online'])} | |")
    lines.append("")

    # weights on the rotated teacher
    weights = _rotated_teacher_weights(out, cfg, list(ROTATED), CLASSES)
    if weights:
        lines += ["## CA-MKD's per-sample KD weights in setting B (last epoch, all seeds)", "",
                  "| form | teacher | mean weight on Trouser, Dress, Bag | on the other classes |", "|---|---|---|---|"]
        for form, w in weights.items():
            for k, t in enumerate(SETTINGS["B"]):
                lines.append(f"| {form} | {t} | {w['inside'][k]:.3f} | {w['outside'][k]:.3f} |")
        lines.append("")
    results.update(main=main, beta=beta, ablations=abl, views=views, online=online, weights=weights)
    lines += ["## Time", "", "| stage | seconds |", "|---|---|"] + \
             [f"| {k} | {v:.0f} |" for k, v in sorted(timing.items())] + [""]
    (out / "tables.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    _figures(out, cfg, beta, views, weights, CLASSES, SETTINGS["B"])
    return results


def _rotated_teacher_weights(out: Path, cfg: Config, rotated: list[int],
                             classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean KD weight of each teacher inside and outside the rotated classes, and per class, per form."""
    found: dict[str, dict[str, Any]] = {}
    for form in ("pooled", "spatial"):
        saved = []
        for s in range(cfg.seeds):
            path = out / "runs" / f"B/camkd-{form}/seed{s}"
            if (path / "last.pth").is_file():
                record = load_run(path)
                if record.sample_weights is not None:
                    saved.append(record.sample_weights)
        if not saved:
            continue
        labels = np.concatenate([w.labels for w in saved])
        w = np.concatenate([w.weights for w in saved])
        inside = np.isin(labels, rotated)
        found[form] = {"inside": w[inside].mean(0).tolist(), "outside": w[~inside].mean(0).tolist(),
                       "per_class": [w[labels == c].mean(0).tolist() for c in range(len(classes))]}
    return found


def _figures(out: Path, cfg: Config, beta: dict[int, dict[str, OverSeeds]], views: dict[int, dict[str, Any]],
             weights: dict[str, dict[str, Any]], classes: Sequence[str], teachers: Sequence[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beta_lines: dict[str, Points] = {f"camkd, {form} form": [(k + (i - 0.5) * 0.08, _mean_std(v[form]))
                                                             for k, v in enumerate(beta.values())]
                                     for i, form in enumerate(("pooled", "spatial"))}
    fig, ax = _accuracy_figure(plt, beta_lines, "β (weight of the feature term)",
                               "Fashion-MNIST, setting A: camkd against β (3 seeds)")
    ax.set_xticks(range(len(beta)), [str(b) for b in beta])
    fig.savefig(out / "fmnist-beta.png", dpi=120)
    plt.close(fig)

    view_lines: dict[str, Points] = {method + (" (spatial)" if method == "camkd" else ""):
                                     [(v, _mean_std(row[method])) for v, row in views.items()]
                                     for method in ("aver", "camkd")}
    fig, ax = _accuracy_figure(plt, view_lines, f"stored views V ({cfg.epochs} epochs)",
                               "Fashion-MNIST, setting A: accuracy against stored views")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(views), [str(v) for v in views])
    fig.savefig(out / "fmnist-views.png", dpi=120)
    plt.close(fig)

    if "spatial" in weights:
        per_class = np.asarray(weights["spatial"]["per_class"])
        fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
        width = 0.8 / per_class.shape[1]
        for k, name in enumerate(teachers):
            ax.bar(np.arange(len(classes)) + (k - 1) * width, per_class[:, k], width, label=name)
        ax.set_xticks(range(len(classes)), classes, rotation=30)
        ax.set_ylabel("mean KD weight (last epoch)")
        ax.set_title("CA-MKD's weights per class, setting B (spatial form, every seed)")
        ax.legend()
        fig.savefig(out / "fmnist-weights.png", dpi=120)
        plt.close(fig)


def _accuracy_figure(plt: ModuleType, lines: dict[str, Points], xlabel: str, title: str) -> tuple[Figure, Axes]:
    """Student accuracy (mean ± std over seeds) as one error-bar line per label; points without runs left out."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for label, points in lines.items():
        pts = [(x, m) for x, m in points if m is not None]
        if pts:
            ax.errorbar([x for x, _ in pts], [m[0] for _, m in pts], [m[1] for _, m in pts], marker="o", capsize=3,
                        label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("student test top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.4)
    ax.legend()
    return fig, ax
