"""A run directory as kdcache distill writes it: config.json, metrics.jsonl and sample_weights.npz.

One reader for everything that looks back at runs (report, demo, recipes), so a
damaged or foreign directory is the same one-line error everywhere.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError


@dataclass
class SampleWeights:
    """The per-sample KD weight of each teacher in one epoch, as sample_weights.npz holds it."""

    epoch: int
    indices: np.ndarray   # (n,) training sample ids
    labels: np.ndarray    # (n,)
    weights: np.ndarray   # (n, K)


@dataclass
class RunRecord:
    """One run directory: its name, config.json, the metrics.jsonl records, and the sample weights if any."""

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sample_weights: SampleWeights | None = None

    @property
    def method(self) -> str | None:
        return self.config.get("args", {}).get("method")

    @property
    def seed(self) -> int | None:
        return self.config.get("args", {}).get("seed")

    @property
    def label(self) -> str:
        """The run's legend label: ``method seed=S`` when config.json records both, else its name."""
        if self.method is None or self.seed is None:
            return self.name
        return f"{self.method} seed={self.seed}"

    @property
    def final_top1(self) -> float:
        """Test top-1 (%) after the last epoch recorded."""
        return float(self.metrics[-1]["test_top1"])

    @property
    def best_top1(self) -> float:
        """The best epoch's test top-1 (%), which the official scripts report."""
        return max(float(r["test_top1"]) for r in self.metrics)

    def teacher_labels(self) -> list[str]:
        """One label per teacher, "T1: arch (short id)", from config.json."""
        return [f"T{k + 1}: {t.get('arch', '?')} ({str(t.get('id', '?'))[:8]})"
                for k, t in enumerate(self.config.get("teachers") or [])]

    def teacher_accuracies(self) -> list[float | None]:
        """Each teacher's test accuracy (%) as config.json records it, None where it does not."""
        return [t.get("test_accuracy") if isinstance(t.get("test_accuracy"), (int, float)) else None
                for t in self.config.get("teachers") or []]


def load_run(path: Path | str, name: str | None = None) -> RunRecord:
    """Read the run directory ``path`` (named ``name``, default its directory name).

    Raises KdcacheError with one line when it is not a kdcache run or a file in it cannot be read.
    """
    path = Path(path)
    if not path.is_dir():
        raise KdcacheError(f"{path} is not a directory; give a run directory written by `kdcache distill --out`")
    missing = [f for f in ("config.json", "metrics.jsonl") if not (path / f).is_file()]
    if missing:
        raise KdcacheError(f"{path} is not a kdcache run: it has no {' or '.join(missing)} "
                           "(give directories written by `kdcache distill --out`)")
    config = _read_config(path / "config.json")
    metrics = _read_metrics(path / "metrics.jsonl")
    if not metrics:
        raise KdcacheError(f"{path / 'metrics.jsonl'} holds no epoch yet; let the run finish an epoch "
                           f"(or remove {path} to train it again)")
    weights = None
    if (path / "sample_weights.npz").is_file():
        weights = _read_sample_weights(path / "sample_weights.npz", len(config.get("teachers") or []))
    return RunRecord(name or path.resolve().name, path, config, metrics, weights)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdcacheError(f"cannot read {path}: {_one_line(exc)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise KdcacheError(f"{path} is not a kdcache run config (no \"args\" object)")
    return config


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KdcacheError(f"cannot read {path}: {_one_line(exc)}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KdcacheError(f"{path} line {number} is not valid JSON: {_one_line(exc)}") from None
        if not isinstance(record, dict) or not {"epoch", "test_top1"} <= set(record):
            raise KdcacheError(f"{path} line {number} is not a kdcache epoch record (no epoch or test_top1)")
        records.append(record)
    return records


def _read_sample_weights(path: Path, n_teachers: int) -> SampleWeights:
    try:
        with np.load(path, allow_pickle=False) as f:
            saved = SampleWeights(int(f["epoch"]), f["indices"], f["labels"], f["weights"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise KdcacheError(f"cannot read {path}: {_one_line(exc)}") from None
    w = saved.weights
    if w.ndim != 2 or w.shape[1] == 0 or (n_teachers and w.shape[1] != n_teachers) or len(saved.indices) != len(w):
        raise KdcacheError(f"{path} holds weights of shape {w.shape} for {len(saved.indices)} samples; "
                           f"expected (n, {n_teachers or 'K'})")
    return saved


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
