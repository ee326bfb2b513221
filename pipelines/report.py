"""The report stage: figures of finished (or running) distill runs.

``accuracy.png`` compares every run's test top-1 per epoch; ``weights-<run>.png``
shows, for each run that recorded per-sample weights (camkd, ebkd), how its
weights spread over each teacher (the paper's Figure 3).
"""

from __future__ import annotations

from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.plots import plot_accuracy_curves, plot_weight_distributions
from kdcache.runs import load_run


def report(runs: list[Path], out: Path) -> list[Path]:
    """Read the run directories ``runs``, write their figures into ``out`` (created), return the PNGs written."""
    paths = _distinct([Path(r) for r in runs])
    if not paths:
        raise KdcacheError("no run directories given")
    records = [load_run(p, name) for p, name in zip(paths, run_names(paths))]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdcacheError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    written = [out / "accuracy.png"]
    plot_accuracy_curves(records, written[0])
    for record in records:
        if record.sample_weights is not None:
            written.append(out / f"weights-{record.name}.png")
            plot_weight_distributions(record, written[-1])
    return written


def run_names(paths: list[Path]) -> list[str]:
    """Short distinct names: the directory name, with parents joined by "-" where two would clash.

    The demo's runs/camkd/seed0 and runs/aver/seed0 become camkd-seed0 and aver-seed0.
    """
    parts = [p.resolve().parts[1:] or ("run",) for p in paths]
    depth = 1
    while True:
        names = ["-".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


def _distinct(paths: list[Path]) -> list[Path]:
    """The paths in order, each directory once however it was spelled."""
    seen: set[Path] = set()
    kept = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            kept.append(p)
    return kept
