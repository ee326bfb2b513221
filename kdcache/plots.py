"""Figures of distillation runs: test accuracy per epoch, and the per-sample teacher weights (Figure 3).

The runs come from ``kdcache.runs.load_run`` (config.json, metrics.jsonl, and
sample_weights.npz for camkd and ebkd). The plot functions draw
on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas: no pyplot, no
global backend switch, so they are safe headless and from several threads. They
write a PNG and return the Figure, so callers and tests can inspect what was drawn.
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.runs import RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 5.0, 120


# -- figures ------------------------------------------------------------------------------------


def _new_figure(width: float = WIDTH_IN, height: float = HEIGHT_IN) -> Figure:
    """A Figure on its own Agg canvas (no pyplot state), with constrained layout."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KdcacheError("drawing figures needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path | str) -> None:
    """Write the PNG next to its final name, then move it there, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KdcacheError(f"cannot write {path}: {exc.strerror or exc}") from None


def _legend_labels(runs: list[RunRecord]) -> list[str]:
    """Each run's label, with its name added where two runs would otherwise read the same."""
    labels = [r.label for r in runs]
    return [f"{lab} ({r.name})" if labels.count(lab) > 1 and lab != r.name else lab
            for lab, r in zip(labels, runs)]


_LINE_STYLES = ("-", "--", ":", "-.")


def plot_accuracy_curves(runs: list[RunRecord], path: Path | str) -> Figure:
    """Test top-1 per epoch, one line per run, written as a PNG to ``path``; returns the Figure.

    Compares methods and seeds at a glance; the legend sits outside the axes so it never hides a curve.
    """
    if not runs:
        raise KdcacheError("no runs to plot")
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure()
    ax = fig.add_subplot()
    colors: dict[str, str] = {}   # one colour per method, one line style per run of that method
    styles: dict[str, int] = {}
    for run, label in zip(runs, _legend_labels(runs)):
        group = run.method or run.name
        color = colors.setdefault(group, f"C{len(colors) % 10}")
        style = _LINE_STYLES[styles.get(group, 0) % len(_LINE_STYLES)]
        styles[group] = styles.get(group, 0) + 1
        epochs = [m["epoch"] for m in run.evaluated]  # the epochs --eval-every skipped have no point
        top1 = [m["test_top1"] for m in run.evaluated]
        if not run.metrics:
            label += " (no epochs yet)"
        ax.plot(epochs, top1, label=label, color=color, linestyle=style, linewidth=1.8,
                marker="o" if len(epochs) <= 40 else None, markersize=4)
    ax.set_title("Test top-1 accuracy per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    seen = [m["epoch"] for r in runs for m in r.metrics]
    if seen and max(seen) - min(seen) < 2:  # one or two epochs: whole-number ticks around them
        ax.set_xlim(min(seen) - 0.5, max(seen) + 0.5)
    ax.grid(True, alpha=0.4)
    fig.legend(loc="outside right upper", title="run", fontsize="small", ncols=math.ceil(len(runs) / 24))
    _save(fig, path)
    return fig


def plot_weight_distributions(run: RunRecord, path: Path | str, bins: int = 40) -> Figure:
    """The paper's Figure 3: for each teacher, a histogram of its per-sample KD weights, written to ``path``.

    One panel per teacher on shared axes, so a teacher the method trusts more shows up as mass further
    right; the dashed line marks the equal share (what uniform weights would give), the dotted one the mean.
    """
    if run.sample_weights is None:
        raise KdcacheError(f"{run.path} has no sample_weights.npz (only camkd and ebkd runs record per-sample "
                           "weights)")
    from matplotlib.ticker import MaxNLocator

    saved = run.sample_weights
    w = np.asarray(saved.weights, dtype=np.float64)
    n, k = w.shape
    names = run.teacher_labels() or [f"T{i + 1}" for i in range(k)]
    accuracies = run.teacher_accuracies() or [None] * k
    ncols = min(k, 3)
    nrows = math.ceil(k / ncols)
    fig = _new_figure(WIDTH_IN if ncols <= 2 else 10.0, max(HEIGHT_IN, 2.6 * nrows + 1.0))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    finite = np.isfinite(w)  # a diverged run can hold NaN: left out of the bins and the means, and said so
    lo, hi = (float(w[finite].min()), float(w[finite].max())) if finite.any() else (0.0, 1.0)
    if hi - lo < 1e-6:  # all weights equal (uniform ablation, K = 1): one bin centred on the value
        lo, hi, bins = lo - 0.05, hi + 0.05, 2 * (bins // 2) + 1
    edges = np.linspace(lo, hi, bins + 1)
    rows = finite.all(1)
    equal_share = float(w[rows].sum(1).mean() / k) if rows.any() else None
    for i, ax in enumerate(axes):
        if i >= k:
            ax.set_visible(False)
            continue
        counts, _ = np.histogram(w[:, i], bins=edges)
        ax.stairs(counts, edges, fill=True, color=f"C{i}", alpha=0.85)
        column = w[finite[:, i], i]
        if equal_share is not None:
            ax.axvline(equal_share, color="0.35", linestyle="--", linewidth=1.2)
        if column.size:
            ax.axvline(column.mean(), color="black", linestyle=":", linewidth=1.8)
        facts = ([f"test acc {accuracies[i]:.1f}%"] if accuracies[i] is not None else []) + \
            [f"mean weight {column.mean():.3f}" if column.size else "no finite weights"]
        ax.set_title(f"{names[i]}\n{', '.join(facts)}", fontsize="medium")
        ax.grid(True, alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("samples")
        if i >= k - ncols:
            ax.set_xlabel("per-sample KD weight")
            ax.tick_params(labelbottom=True)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))  # shared: counts of samples
    if not finite.any():  # nothing drawn: keep the empty count axis at 0..1 rather than around 0
        axes[0].set_ylim(0, 1)
    if equal_share is not None:  # the reference lines look alike in every panel: one legend, outside the data
        from matplotlib.lines import Line2D

        fig.legend([Line2D([], [], color="0.35", linestyle="--", linewidth=1.2),
                    Line2D([], [], color="black", linestyle=":", linewidth=1.8)],
                   [f"equal share ({equal_share:.2f}: what uniform weights give)", "the teacher's mean weight"],
                   loc="outside lower center", ncols=2, fontsize="small")
    name = "" if run.name in (run.label, run.method) else f" ({run.name})"
    bad = f", {int((~finite).sum())} non-finite weights left out" if not finite.all() else ""
    fig.suptitle(f"Per-sample KD weights of each teacher: {run.label}{name}\n"
                 f"epoch {saved.epoch}, {n} samples{bad}")
    _save(fig, path)
    return fig
