"""A run directory of ``kdcache distill`` or ``kdcache train-teacher``: :class:`RunDir` writes it and reads it back.

Its files: config.json (the run's kind, "teacher" or "distill"; its arguments, those its
result depends on under "args" and those saying how it ran under "how"; its data or
teachers; versions), metrics.jsonl (one record per finished epoch), checkpoint.pth
(everything to resume), best.pth and last.pth (the trained network's weights as
``{'model': state_dict, 'epoch', 'arch', 'test_top1', ...}``, which ``load_checkpoint``
reads; last.pth is written once, after the last epoch, so its presence is the one rule
for "finished"), and sample_weights.npz (camkd's and ebkd's per-sample teacher weights
of the latest epoch). One class for the writer (:mod:`kdcache.loop`, which both
commands train through) and every reader (report, demo, experiments, the grid's
teacher rule), so a damaged or foreign directory is the same one-line error everywhere.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from kdcache import atomic
from kdcache.errors import CheckpointError, KdcacheError
from kdcache.request import differing


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
        return cast("str | None", self.config.get("args", {}).get("method"))

    @property
    def seed(self) -> int | None:
        return cast("int | None", self.config.get("args", {}).get("seed"))

    @property
    def label(self) -> str:
        """The run's legend label: ``method seed=S`` when config.json records both, else its name."""
        if self.method is None or self.seed is None:
            return self.name
        return f"{self.method} seed={self.seed}"

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """The epoch records with a test top-1 (every epoch but those --eval-every skipped; the last is always one)."""
        return [r for r in self.metrics if r["test_top1"] is not None]

    @property
    def final_top1(self) -> float:
        """Test top-1 (%) after the last epoch evaluated (in a finished run, the last epoch)."""
        return float(self.evaluated[-1]["test_top1"])

    @property
    def best_top1(self) -> float:
        """The best evaluated epoch's test top-1 (%), which the official scripts report."""
        return max(float(r["test_top1"]) for r in self.evaluated)

    def teacher_labels(self) -> list[str]:
        """One label per teacher, "T1: arch (short id)", from config.json."""
        return [f"T{k + 1}: {t.get('arch', '?')} ({str(t.get('id', '?'))[:8]})"
                for k, t in enumerate(self.config.get("teachers") or [])]

    def teacher_accuracies(self) -> list[float | None]:
        """Each teacher's test accuracy (%) as config.json records it, None where it does not."""
        return [t.get("test_accuracy") if isinstance(t.get("test_accuracy"), (int, float)) else None
                for t in self.config.get("teachers") or []]


def load_run(path: Path | str, name: str | None = None) -> RunRecord:
    """Read the run directory ``path`` (named ``name``, default its directory name); see :meth:`RunDir.load`."""
    return RunDir(path).load(name)


class RunDir:
    """One run directory, written by distill and train-teacher and read by everything that looks back at runs."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pth"
    BEST = "best.pth"
    LAST = "last.pth"
    SAMPLE_WEIGHTS = "sample_weights.npz"
    RUN_FILES = (CONFIG, METRICS, CHECKPOINT, BEST, LAST, SAMPLE_WEIGHTS)

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # -- state --------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether an epoch of a run was saved here (checkpoint.pth exists): it can be resumed."""
        return self.file(self.CHECKPOINT).is_file()

    @property
    def finished(self) -> bool:
        """Whether the run trained all its epochs: last.pth is written only then."""
        return self.file(self.LAST).is_file()

    def held(self) -> list[str]:
        """The run files here that a new run would replace, in :meth:`clear`'s order; none when the folder is
        missing or empty, or holds only a run started and stopped before its first epoch was saved (config.json
        and an empty metrics.jsonl: nothing in it to lose)."""
        present = [name for name in self.RUN_FILES if self.file(name).exists()]
        if set(present) <= {self.CONFIG, self.METRICS} and self.METRICS in present:
            try:
                if not self.file(self.METRICS).read_bytes().strip():
                    return []
            except OSError:
                pass
        return present

    def check_can_start(self, resume: bool, force: bool = False) -> None:
        """Refuse, with one line saying what to do, to replace a run without ``force`` (a run is any of its files
        here, :meth:`held`: a finished run, a started one, or another run's config.json and metrics.jsonl), to
        resume none, or to be given both ``resume`` and ``force``. An empty or missing folder starts a run."""
        if resume and force:
            raise KdcacheError("--resume continues the run in --out and --force replaces it: give one of them")
        if force:
            return
        held = self.held()
        if resume:
            if not self.started:
                if held:
                    raise CheckpointError(f"--resume: {self.file(self.CHECKPOINT)} does not exist, so the run in "
                                          f"{self.path} ({', '.join(held)}) cannot be continued; pass --force "
                                          "instead to replace it, or choose another --out")
                raise CheckpointError(f"--resume: {self.file(self.CHECKPOINT)} does not exist; drop --resume "
                                      "to start a run")
        elif held:
            raise KdcacheError(f"{self.path} already holds a run; pass --resume to continue it, --force to replace "
                               f"it, or choose another --out (it holds {', '.join(held)})")

    def differing_args(self, want: dict[str, Any]) -> list[str]:
        """The names of ``want``'s arguments (result arguments, as config.json's "args" holds them) this run recorded
        with another value; an argument the run did not record does not count (:func:`kdcache.request.differing`)."""
        return differing(self.read_config()["args"], want)

    # -- writing ------------------------------------------------------------------------------

    # Every file is replaced whole (temporary file, fsync, rename) or appended to (metrics.jsonl, whose cut last
    # line readers drop): a kill or a full disk never leaves half a file where a whole one was
    # (:mod:`kdcache.atomic`). A failed write raises :class:`kdcache.atomic.WriteError`.

    def start(self, config: dict[str, Any]) -> None:
        """Begin a new run: the folder, an empty metrics.jsonl and config.json."""
        atomic.write_bytes(self.file(self.METRICS), b"")
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.file(self.CONFIG), config)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one epoch's record to metrics.jsonl (one line, fsynced; a failed write takes its part back)."""
        atomic.append_line(self.file(self.METRICS), json.dumps(record))

    def keep_metrics_through(self, epoch: int) -> None:
        """Drop the records after ``epoch`` (a resumed run trains them again) and a last line cut short (a kill
        while it was written); the kept lines keep their bytes. The file is replaced whole."""
        path = self.file(self.METRICS)
        lines = _metric_lines(path) if path.exists() else []
        kept = [line for line, record in lines if record["epoch"] <= epoch]
        atomic.write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def clear(self) -> None:
        """Remove the files of a run here (--force), leaving the folder and anything else in it."""
        for name in self.RUN_FILES:
            self.file(name).unlink(missing_ok=True)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """checkpoint.pth: everything ``--resume`` needs, replaced atomically."""
        self._save(state, self.CHECKPOINT)

    def save_best(self, state: dict[str, Any]) -> None:
        self._save(state, self.BEST)

    def save_last(self, state: dict[str, Any]) -> None:
        """last.pth: the student after the last epoch, which marks the run finished."""
        self._save(state, self.LAST)

    def _save(self, state: dict[str, Any], name: str) -> None:
        from kdcache.training import save_atomic  # torch: imported only by writers

        save_atomic(state, self.file(name))

    def save_sample_weights(self, epoch: int, indices: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        """The per-sample KD weights ``(n, K)`` of the samples ``indices`` (with their labels) in ``epoch``;
        replaced every epoch, so the file holds the latest (the data of the paper's Figure 3)."""
        buf = io.BytesIO()  # small (n x K floats): made in memory, then written whole
        np.savez(buf, epoch=epoch, indices=indices, labels=labels, weights=weights)
        atomic.write_bytes(self.file(self.SAMPLE_WEIGHTS), buf.getbuffer())

    # -- reading ------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        return _read_config(self.file(self.CONFIG))

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_metrics(self.file(self.METRICS))

    def read_sample_weights(self, n_teachers: int = 0) -> SampleWeights:
        return _read_sample_weights(self.file(self.SAMPLE_WEIGHTS), n_teachers)

    def read_checkpoint(self, kind: str = "distill", parts: tuple[str, ...] = ("method",)) -> dict[str, Any]:
        """checkpoint.pth, refused with one line unless it is a checkpoint of a ``kind`` run ("distill" or
        "teacher") holding the state of ``parts`` beside the model's (a distill run's method)."""
        from kdcache.models.checkpoint import read_checkpoint

        path = self.file(self.CHECKPOINT)
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, dict) or not {"model", *parts, "optimizer", "lr_scheduler", "epoch",
                                              "args"} <= set(ckpt):
            raise CheckpointError(f"--resume: {path} is not a kdcache {kind} checkpoint")
        held = ckpt.get("kind", "distill")  # distill checkpoints of earlier versions name no kind
        if held != kind:
            raise CheckpointError(f"--resume: {path} holds a {held} run, not a {kind} run")
        return ckpt

    def load(self, name: str | None = None) -> RunRecord:
        """The run as a :class:`RunRecord` (named ``name``, default its directory name).

        Raises KdcacheError with one line when it is not a kdcache run or a file in it cannot be read.
        """
        path = self.path
        if not path.is_dir():
            raise KdcacheError(f"{path} is not a directory; give a run directory written by `kdcache distill --out`")
        missing = [f for f in (self.CONFIG, self.METRICS) if not self.file(f).is_file()]
        if missing:
            raise KdcacheError(f"{path} is not a kdcache run: it has no {' or '.join(missing)} "
                               "(give directories written by `kdcache distill --out`)")
        config = self.read_config()
        metrics = self.read_metrics()
        if not metrics:
            raise KdcacheError(f"{self.file(self.METRICS)} holds no epoch yet; let the run finish an epoch "
                               f"(or remove {path} to train it again)")
        weights = None
        if self.file(self.SAMPLE_WEIGHTS).is_file():
            weights = self.read_sample_weights(len(config.get("teachers") or []))
        return RunRecord(name or path.resolve().name, path, config, metrics, weights)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, through a temporary file and a rename: never half a file (a failed
    write is :class:`kdcache.atomic.WriteError`)."""
    atomic.write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdcacheError(f"cannot read {path}: {_one_line(exc)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise KdcacheError(f"{path} is not a kdcache run config (no \"args\" object)")
    return config


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in _metric_lines(path)]


def _metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each record of metrics.jsonl with its line. A last line cut short (no newline and not valid JSON: the
    process was killed while appending it) is dropped: that epoch was not saved. Any other bad line is an error."""
    try:
        text = path.read_bytes().decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise KdcacheError(f"cannot read {path}: {_one_line(exc)}") from None
    lines = text.split("\n")
    cut = lines.pop()  # after the last newline: "" unless the last line was cut short
    records = []
    for number, line in enumerate([*lines, cut], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number > len(lines):
                break  # the cut last line
            raise KdcacheError(f"{path} line {number} is not valid JSON: {_one_line(exc)}") from None
        if not isinstance(record, dict) or not {"epoch", "test_top1"} <= set(record):
            raise KdcacheError(f"{path} line {number} is not a kdcache epoch record (no epoch or test_top1)")
        records.append((line, record))
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
