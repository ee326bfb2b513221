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

from fashion_mnist_setting import (CLASSES, PAIRED_METHODS, ROTATED, SETTINGS, Config, StoreIds,  # beside it
                                   best_teacher)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OverSeeds = list[float | None]  # a run's final top-1 at each seed, None where it has not finished
Points = list[tuple[float, tuple[float, float] | None]]  # (x, (mean, std) over seeds, or None: no runs)


class Keyed(Protocol):
    """A run of the study (fashion_mnist.Run), as far as the report reads it: its key, part/name/seed<s>, and
    the --parts name that selects it."""

    @property
    def key(self) -> str: ...

    @property
    def group(self) -> str: ...


def finished_top1(path: Path) -> float | None:
    """A run directory's final test top-1, or None unless its metrics reach the epochs its config.json asks for.

    The report needs only config.json and metrics.jsonl (and sample_weights.npz for the weights table), so a
    study's finished runs can be kept as those files alone (studies/results/runs/) and count as done."""
    try:
        record = load_run(path)
    except KdcacheError:
        return None
    if not record.metrics or record.metrics[-1].get("epoch") != record.config.get("args", {}).get("epochs"):
        return None
    return record.final_top1


def _final(out: Path, key: str) -> float | None:
    return finished_top1(out / "runs" / key)


def _curve(out: Path, key: str) -> dict[int, float]:
    """A run's test top-1 at each epoch it evaluated."""
    return {int(m["epoch"]): float(m["test_top1"]) for m in load_run(out / "runs" / key).evaluated}


def _last_terms(out: Path, key: str) -> dict[str, float]:
    """A finished run's loss terms at its last epoch (the means over its batches that metrics.jsonl records)."""
    return {k: float(v) for k, v in load_run(out / "runs" / key).metrics[-1].get("train", {}).items()}


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
    """Write tables.md, results.json and the figures under ``out``, and the paired and long parts alone in
    tables-paired.md and results-paired.json; return what results.json holds."""
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
    lines += ["", f"(V = {cfg.views}'s runs are part A's, which since issue 28 are the paired runs: every run here "
              "reads spatial stores. Disk: t0's whole store directory as written, final classifier and metadata "
              "included.)", ""]

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
    # paired differences from camkd over every seed (issue 28)
    issue28 = len(lines)
    paired_seeds = range(cfg.paired_seeds)
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for setting in SETTINGS:
        base = [acc.get(f"{setting}/{PAIRED_METHODS[0]}/seed{s}") for s in paired_seeds]
        paired[setting] = {PAIRED_METHODS[0]: {"top1": base}}
        for name in PAIRED_METHODS[1:]:
            top1 = [acc.get(f"{setting}/{name}/seed{s}") for s in paired_seeds]
            diffs = paired_diffs(top1, base)
            paired[setting][name] = {"top1": top1, "diffs": diffs, **paired_stats(diffs)}
    _adjust([row for by_method in paired.values() for row in by_method.values() if "diffs" in row])
    family = len(SETTINGS) * (len(PAIRED_METHODS) - 1)
    lines += [f"## Paired differences from camkd (spatial), {cfg.paired_seeds} seeds", "",
              "Each method's final top-1 minus camkd's at the same seed (the same student initialisation and batch "
              "order), in points; the mean with 95 % intervals from a paired t and from a bootstrap over seeds "
              f"({BOOTSTRAP:,} resamples), the paired t's two-sided p and Holm's adjustment of it over the table's "
              f"{family} comparisons. *Resolved*: both intervals exclude 0 (uncorrected); *after Holm*: the "
              "adjusted p is below 0.05.", "",
              "| setting | method | n | mean top-1 | mean difference | paired t 95 % | bootstrap 95 % | p | Holm p | "
              "resolved | after Holm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, by_method in paired.items():
        base = by_method[PAIRED_METHODS[0]]["top1"]
        lines.append(f"| {setting} | {PAIRED_METHODS[0]} | {sum(v is not None for v in base)} | "
                     f"{_cell_short(base)} | (reference) | | | | | | |")
        for name in PAIRED_METHODS[1:]:
            prow = by_method[name]
            lines.append(f"| {setting} | {name} | {len(prow['diffs'])} | {_cell_short(prow['top1'])} | "
                         f"{_signed(prow.get('mean'))} | {_interval(prow.get('t'))} | "
                         f"{_interval(prow.get('bootstrap'))} | {_p(prow.get('p'))} | {_p(prow.get('holm'))} | "
                         f"{_resolved(prow)} | {_after_holm(prow)} |")
    lines.append("")

    # what the wrong teacher costs each method: B minus A at the same seed (the same student initialisation and
    # batch order: the two settings' stores differ in one teacher's values, not in their chunking)
    cost: dict[str, dict[str, Any]] = {}
    for name in PAIRED_METHODS:
        a_top1, b_top1 = (paired[setting][name]["top1"] for setting in ("A", "B"))
        diffs = paired_diffs(b_top1, a_top1)
        cost[name] = {"diffs": diffs, **paired_stats(diffs)}
    _adjust(list(cost.values()))
    lines += [f"## What the wrong teacher costs: setting B minus setting A, {cfg.paired_seeds} seeds", "",
              "Each method's final top-1 in B (t2 replaced by t2-rotated) minus its top-1 in A at the same seed, in "
              f"points; intervals, p and Holm's adjustment (over these {len(PAIRED_METHODS)} comparisons) as above.",
              "", "| method | n | mean B − A | paired t 95 % | bootstrap 95 % | p | Holm p | resolved | after Holm |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, crow in cost.items():
        lines.append(f"| {name} | {len(crow['diffs'])} | {_signed(crow.get('mean'))} | {_interval(crow.get('t'))} | "
                     f"{_interval(crow.get('bootstrap'))} | {_p(crow.get('p'))} | {_p(crow.get('holm'))} | "
                     f"{_as_cost(_resolved(crow))} | {_as_cost(_after_holm(crow))} |")
    lines.append("")

    # stored views over a long schedule (issue 28)
    long_seeds = range(cfg.long_seeds)
    top_v = max(cfg.long_view_counts)
    lines += [f"## Stored views over {cfg.long_epochs} epochs (setting A, spatial stores, {cfg.long_seeds} seeds)",
              "", f"Difference from V = {top_v} at the same seed, mean with its paired t 95 % interval; camkd − aver: "
              "the two methods at the same seed and V (the same student start and batch order); disk: the three "
              "teachers' spatial stores at V, and per stored view.", "",
              f"| V | aver | − V={top_v} | camkd (spatial) | − V={top_v} | camkd − aver | disk, 3 teachers | per view |",
              "|---|---|---|---|---|---|---|---|"]
    long: dict[int, dict[str, Any]] = {}
    for v in cfg.long_view_counts:
        row_l: dict[str, Any] = {}
        cells = []
        for method in ("aver", "camkd"):
            vals = [acc.get(f"long/{method}-spatial-V{v}/seed{s}") for s in long_seeds]
            ref = [acc.get(f"long/{method}-spatial-V{top_v}/seed{s}") for s in long_seeds]
            diffs = paired_diffs(vals, ref)
            stats = paired_stats(diffs) if v != top_v else {}
            row_l[method] = {"top1": vals, "diffs": diffs, **stats}
            cells += [_cell(vals), "(reference)" if v == top_v else
                      f"{_signed(stats.get('mean'))} {_interval(stats.get('t'))}"]
        between = paired_diffs(row_l["camkd"]["top1"], row_l["aver"]["top1"])
        row_l["camkd_minus_aver"] = {"diffs": between, **paired_stats(between)}
        cells.append(f"{_signed(row_l['camkd_minus_aver'].get('mean'))} "
                     f"{_interval(row_l['camkd_minus_aver'].get('t'))}")
        paths = [ids.get((t, "spatial", v, "path")) for t in SETTINGS["A"]]
        nbytes = sum(_disk(p) for p in paths if p) if all(paths) else None
        row_l["disk"] = nbytes
        long[v] = row_l
        lines.append(f"| {v} | {' | '.join(cells)} | "
                     + (f"{nbytes / 2**20:.1f} MiB | {nbytes / v / 2**20:.2f} MiB |" if nbytes else "— | — |"))
    # the rule set before any 40-epoch run finished (docs/EVIDENCE.md): which V are within the noise of top_v
    noise: dict[str, Any] = {}
    for method in ("aver", "camkd"):
        at_top = [x for x in long[top_v][method]["top1"] if x is not None]
        found = {v: within_noise(long[v][method], at_top) for v in cfg.long_view_counts if v != top_v}
        for v, verdict in found.items():
            long[v][method]["within_noise"] = verdict
        inside = [v for v, verdict in found.items() if verdict]
        noise[method] = {"ref_std": statistics.stdev(at_top) if len(at_top) > 1 else None, "within": inside,
                         "smallest": min(inside, default=None),
                         "decided": all(verdict is not None for verdict in found.values())}
    lines += [""] + [f"Within the noise of V = {top_v} ({method}: |mean difference| at most the seed std of its "
                     f"V = {top_v} runs, {_num(noise[method]['ref_std'])}, and the paired-t interval holds 0): "
                     + (f"V = {', '.join(map(str, noise[method]['within'])) or 'none'}"
                        if noise[method]["decided"] else "not decided (fewer than 2 seeds at some V)")
                     for method in ("aver", "camkd")]
    # camkd − aver over the whole curve: each seed's mean over V (the seed is the unit; its V runs share a start)
    over_v = []
    for s in long_seeds:
        pairs = [(long[v]["aver"]["top1"][s], long[v]["camkd"]["top1"][s]) for v in cfg.long_view_counts]
        if all(a is not None and c is not None for a, c in pairs):
            over_v.append(statistics.mean(c - a for a, c in pairs))
    long_gap = {"per_seed_mean_over_v": over_v, **paired_stats(over_v)}
    lines += ["", f"camkd − aver, each seed's mean over the {len(cfg.long_view_counts)} V: "
              f"{_signed(long_gap.get('mean'))} {_interval(long_gap.get('t'))} (paired t 95 %, {len(over_v)} seeds "
              "with every V finished)", ""]
    # the same runs' test top-1 at each evaluated epoch: does a student replaying few views fall behind late?
    curves = {(method, v): [_curve(out, key) for s in long_seeds
                            if acc.get(key := f"long/{method}-spatial-V{v}/seed{s}") is not None]
              for method in ("aver", "camkd") for v in cfg.long_view_counts}
    epochs = sorted({e for done in curves.values() for c in done for e in c})
    lines += ["Test top-1 at each evaluated epoch, mean over the finished seeds:", "",
              "| method | V | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
              "|---|---|" + "---|" * len(epochs)]
    for (method, v), done in curves.items():
        means = [statistics.mean(c[e] for c in done) if done and all(e in c for c in done) else None
                 for e in epochs]
        long[v][method]["curve"] = dict(zip(epochs, means, strict=True))
        lines.append(f"| {method} | {v} | " + " | ".join("—" if m is None else f"{m:.2f}" for m in means) + " |")
    lines.append("")

    # camkd's β over the long schedule at the largest V: is the feature term what holds camkd below aver there?
    beta_seeds = range(cfg.long_beta_seeds)
    lines += [f"## camkd's β over {cfg.long_epochs} epochs (V = {top_v}, {cfg.long_beta_seeds} seeds)", "",
              f"β = 50 and aver are the long part's V = {top_v} runs at the same seeds; differences are paired (the "
              "same student start and batch order), with their t 95 % intervals; the loss terms are the last epoch's "
              "means over its batches, seed 0.", "",
              "| β | camkd (spatial) | − β = 50 | − aver | CE | KD | feature | β × feature |",
              "|---|---|---|---|---|---|---|---|"]
    aver_top = [acc.get(f"long/aver-spatial-V{top_v}/seed{s}") for s in beta_seeds]
    at_50 = [acc.get(f"long/camkd-spatial-V{top_v}/seed{s}") for s in beta_seeds]
    long_beta: dict[int, dict[str, Any]] = {}
    for b in sorted({*cfg.long_betas, 50}):
        keys = [f"longbeta/camkd-spatial-V{top_v}-beta{b}/seed{s}" if b != 50 else f"long/camkd-spatial-V{top_v}/seed{s}"
                for s in beta_seeds]
        vals = [acc.get(k) for k in keys]
        row_b: dict[str, Any] = {"top1": vals}
        for name, ref in (("minus_beta50", at_50), ("minus_aver", aver_top)):
            if name == "minus_beta50" and b == 50:
                continue
            d = paired_diffs(vals, ref)
            row_b[name] = {"diffs": d, **paired_stats(d)}
        terms = _last_terms(out, keys[0]) if vals[0] is not None else {}
        row_b["loss_terms_seed0"] = terms
        long_beta[b] = row_b
        lines.append(f"| {b} | {_cell(vals)} | "
                     + ("(reference)" if b == 50 else f"{_signed(row_b['minus_beta50'].get('mean'))} "
                                                      f"{_interval(row_b['minus_beta50'].get('t'))}")
                     + f" | {_signed(row_b['minus_aver'].get('mean'))} {_interval(row_b['minus_aver'].get('t'))} | "
                     f"{_num(terms.get('ce'), 3)} | {_num(terms.get('kd'), 3)} | {_num(terms.get('feat'), 3)} | "
                     f"{_num(b * terms['feat'] if 'feat' in terms else None, 3)} |")
    lines.append("")

    results.update(main=main, beta=beta, ablations=abl, views=views, online=online, weights=weights, paired=paired,
                   wrong_teacher_cost=cost, long=long, long_within_noise=noise, long_camkd_minus_aver=long_gap,
                   long_beta=long_beta)
    lines += ["## Time", "", "| stage | seconds |", "|---|---|"] + \
             [f"| {k} | {v:.0f} |" for k, v in sorted(timing.items())] + [""]
    (out / "tables.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    # the paired and long parts alone (issue 28), whose runs studies/results/runs/ keeps
    kept = {r.key for r in runs if r.group in ("paired", "long", "longbeta")}
    (out / "tables-paired.md").write_text("\n".join(
        [f"# Fashion-MNIST study: the paired and long parts ({sum(acc[k] is not None for k in kept)} of {len(kept)} "
         "runs finished)", ""] + lines[issue28:]))
    (out / "results-paired.json").write_text(json.dumps(
        {"config": asdict(cfg), "runs": {k: acc[k] for k in sorted(kept)}, "paired": paired,
         "wrong_teacher_cost": cost, "long": long, "long_within_noise": noise,
         "long_camkd_minus_aver": long_gap, "long_beta": long_beta}, indent=2, default=str) + "\n")
    _figures(out, cfg, beta, views, weights, CLASSES, SETTINGS["B"])
    _paired_figure(out, cfg, paired)
    _long_figure(out, cfg, long)
    return results


BOOTSTRAP = 10_000


def paired_diffs(values: Sequence[float | None], refs: Sequence[float | None]) -> list[float]:
    """``value - ref`` seed by seed, for the seeds at which both runs finished (None: not finished)."""
    return [v - r for v, r in zip(values, refs, strict=True) if v is not None and r is not None]


def paired_stats(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean of paired differences with a paired-t 95 % interval and two-sided p, and a percentile bootstrap 95 %
    interval over seeds (10,000 resamples, generator seed 0); only the mean where there are fewer than 2
    differences."""
    if not diffs:
        return {}
    d = np.asarray(diffs, dtype=np.float64)
    found: dict[str, Any] = {"mean": float(d.mean())}
    if len(d) < 2:
        return found
    from scipy import stats  # scikit-learn's dependency
    sem = d.std(ddof=1) / np.sqrt(len(d))
    half = float(stats.t.ppf(0.975, len(d) - 1) * sem)
    found["t"] = (found["mean"] - half, found["mean"] + half)
    found["p"] = float(2 * stats.t.sf(abs(found["mean"]) / sem, len(d) - 1)) if sem > 0 else float(found["mean"] == 0)
    means = np.random.default_rng(0).choice(d, (BOOTSTRAP, len(d)), replace=True).mean(1)
    found["bootstrap"] = (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    return found


def within_noise(row: dict[str, Any], ref: Sequence[float]) -> bool | None:
    """The long part's rule: a V is within the noise of the reference V when the mean of its per-seed differences
    from it is at most the seed std of the reference runs and its paired-t 95 % interval contains 0; None where
    either needs more than one seed. ``row``: the V's :func:`paired_stats` of those differences."""
    if len(ref) < 2 or "t" not in row:
        return None
    lo, hi = row["t"]
    return bool(abs(row["mean"]) <= statistics.stdev(ref) and lo <= 0 <= hi)


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (the family-wise error stays at most alpha when
    each adjusted p is compared with alpha), in the order given."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted = [0.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def _resolved(row: dict[str, Any]) -> str:
    if "t" not in row:
        return "—"
    return _verdict(row, all(lo > 0 or hi < 0 for lo, hi in (row["t"], row["bootstrap"])))


def _verdict(row: dict[str, Any], resolved: bool) -> str:
    if not resolved:
        return "no"
    return "yes: camkd ahead" if row["mean"] < 0 else "yes: camkd behind"


def _adjust(rows: list[dict[str, Any]]) -> None:
    """Adds each row's Holm-adjusted p ("holm"), over the rows that have a p (tested together)."""
    tested = [row for row in rows if "p" in row]
    for row, adjusted in zip(tested, holm([row["p"] for row in tested]), strict=True):
        row["holm"] = adjusted


def _after_holm(row: dict[str, Any]) -> str:
    if "holm" not in row:
        return "—"
    return _verdict(row, row["holm"] < 0.05)


def _as_cost(verdict: str) -> str:
    """A verdict on B - A differences: their sign says whether B is lower, not whether camkd is ahead."""
    return verdict.replace("camkd ahead", "B lower").replace("camkd behind", "B higher")


def _p(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _interval(pair: tuple[float, float] | None) -> str:
    return "" if pair is None else f"[{pair[0]:+.2f}, {pair[1]:+.2f}]"


def _cell_short(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "—"
    return f"{statistics.mean(got):.2f} ± {statistics.stdev(got):.2f}" if len(got) > 1 else f"{got[0]:.2f}"


def _paired_figure(out: Path, cfg: Config, paired: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Each method's per-seed differences from camkd (dots) with the mean and its paired-t interval, per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paired), figsize=(9, 3.6), sharey=True, layout="constrained")
    for ax, (setting, rows) in zip(np.atleast_1d(axes), paired.items(), strict=True):
        names = list(PAIRED_METHODS[1:])
        for i, name in enumerate(names):
            row = rows.get(name, {})
            d = row.get("diffs", [])
            ax.scatter(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d, s=10, color="0.6")
            if "t" in row:
                lo, hi = row["t"]
                ax.errorbar([i], [row["mean"]], [[row["mean"] - lo], [hi - row["mean"]]], fmt="o", color="C0",
                            capsize=4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(f"setting {setting}")
        ax.grid(True, axis="y", alpha=0.4)
    np.atleast_1d(axes)[0].set_ylabel("top-1 minus camkd's (points)")
    fig.suptitle(f"Fashion-MNIST: paired differences from camkd (spatial), {cfg.paired_seeds} seeds, 95 % paired t")
    fig.savefig(out / "fmnist-paired.png", dpi=120)
    plt.close(fig)


def _long_figure(out: Path, cfg: Config, long: dict[int, dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, Points] = {method + (" (spatial)" if method == "camkd" else ""):
                                [(v, _mean_std(row[method]["top1"])) for v, row in long.items()]
                                for method in ("aver", "camkd")}
    fig, ax = _accuracy_figure(plt, lines, f"stored views V ({cfg.long_epochs} epochs)",
                               f"Fashion-MNIST, setting A: {cfg.long_epochs} epochs against stored views")
    ax.set_xscale("log")
    ax.set_xticks(list(long), [str(v) for v in long])
    fig.savefig(out / "fmnist-views-long.png", dpi=120)
    plt.close(fig)


def _rotated_teacher_weights(out: Path, cfg: Config, rotated: list[int],
                             classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean KD weight of each teacher inside and outside the rotated classes, and per class, per form."""
    found: dict[str, dict[str, Any]] = {}
    for form in ("pooled", "spatial"):
        saved = []
        for s in range(cfg.seeds):
            path = out / "runs" / f"B/camkd-{form}/seed{s}"
            if finished_top1(path) is not None:
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
