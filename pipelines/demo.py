"""The demo stage: the whole pipeline on the built-in digits data, in a few minutes on a CPU.

Three teachers of deliberately different quality are trained: a good one; one
taught with systematically corrupted labels on three classes (3 -> 5 -> 8 -> 3),
so that it is confidently wrong there; and a weak one trained for two epochs.
Their stores are precomputed once (in the spatial form by default: the form the
paper's β = 50 was set for, and the better one on Fashion-MNIST in
docs/EVIDENCE.md), then the same student is distilled with ce, aver, ebkd, aekd,
fitnet-mkd and camkd for each seed, and a table compares them. Everything is
reused on a second run: teachers, stores and finished runs.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kdcache.data import load_dataset
from kdcache.errors import CheckpointError
from kdcache.evaluate import ensemble_accuracy
from kdcache.models.checkpoint import read_checkpoint
from kdcache.pipelines.distill import DistillRequest, distill
from kdcache.pipelines.precompute import PrecomputeRequest, precompute
from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher
from kdcache.runs import SampleWeights, load_run
from kdcache.store import Cache

CORRUPTED_CLASSES = {3: 5, 5: 8, 8: 3}


@dataclass(frozen=True)
class DemoTeacher:
    name: str
    arch: str
    epochs: int
    label_map: dict[int, int] | None = None


TEACHERS = (
    DemoTeacher("good", "resnet14", 15),
    DemoTeacher("corrupted", "resnet14", 15, CORRUPTED_CLASSES),
    DemoTeacher("weak", "resnet8", 2),
)
METHODS = ("ce", "aver", "ebkd", "aekd", "fitnet-mkd", "camkd")
STUDENT = "resnet8"
# Chosen on Fashion-MNIST (docs/EVIDENCE.md: camkd at β = 50, spatial 80.97 ± 0.51 % against pooled
# 80.09 ± 0.23 %, three seeds) and shown on digits there; pooled was the demo's form until then.
FEATURES = "spatial"


@dataclass
class DemoResult:
    """What the demo found: teacher and ensemble accuracies, each method's student top-1 per seed, and where."""

    out: Path
    cache: Path
    features: str = FEATURES
    teachers: dict[str, dict] = field(default_factory=dict)    # name -> {arch, id, test_accuracy}
    ensemble: float = 0.0
    students: dict[str, list[float]] = field(default_factory=dict)  # method -> top-1 per seed
    camkd_weights: dict[str, float] = field(default_factory=dict)   # evidence on the corrupted teacher
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)


def run_demo(out: Path, cache: Path | None = None, seeds: int = 1, epochs: int = 10, device: str | None = None,
             say: Callable[[str], None] = print, features: str = FEATURES) -> DemoResult:
    """Train the three teachers, precompute their stores in the ``features`` form, distil every method for
    ``seeds`` seeds. The runs of each form go to their own folder, so both forms can sit side by side."""
    out = Path(out)
    cache = Path(cache) if cache is not None else out / "cache"
    result = DemoResult(out, cache, features, reused={"teachers": 0, "stores": 0, "runs": 0})
    dataset = load_dataset("digits")

    t0 = time.perf_counter()
    ckpts = {}
    for t in TEACHERS:
        ckpts[t.name] = out / "teachers" / f"{t.name}-{t.arch}.pth"
        if _finished_training(ckpts[t.name], t.epochs):
            result.reused["teachers"] += 1
            continue
        say(f"training the {t.name} teacher ({t.arch}, {t.epochs} epochs"
            f"{', labels of classes 3, 5, 8 rotated' if t.label_map else ''})")
        train_teacher(TrainTeacherRequest(arch=t.arch, dataset="digits", out=ckpts[t.name], epochs=t.epochs,
                                          device=device, label_map=t.label_map, seed=len(ckpts), force=True))
    result.seconds["teachers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids = []
    for t in TEACHERS:
        say(f"precomputing the {t.name} teacher's store ({epochs} views, {features} form)")
        pre = precompute(PrecomputeRequest(teacher=t.arch, checkpoint=ckpts[t.name], dataset="digits", cache=cache,
                                           views=epochs, device=device, features=features))
        result.reused["stores"] += pre.status == "complete"
        ids.append(pre.teacher_id)
        store = Cache.at(cache).open_teacher(pre.teacher_id)
        result.teachers[t.name] = {"arch": t.arch, "id": pre.teacher_id,
                                   "test_accuracy": store.attrs["test_accuracy"]}
    result.seconds["precompute"] = time.perf_counter() - t0
    result.ensemble = ensemble_accuracy([(t.arch, ckpts[t.name]) for t in TEACHERS], dataset, device)

    t0 = time.perf_counter()
    weights = []
    for seed in range(seeds):
        for method in METHODS:
            run = out / "runs" / features / method / f"seed{seed}"
            if (run / "last.pth").is_file():
                result.reused["runs"] += 1
            else:
                say(f"distilling {STUDENT} with {method}, seed {seed} ({epochs} epochs)")
                distill(DistillRequest(student=STUDENT, teachers=ids, method=method, out=run, cache=cache,
                                       epochs=epochs, seed=seed, device=device,
                                       resume=(run / "checkpoint.pth").is_file()))
            record = load_run(run)
            result.students.setdefault(method, []).append(record.final_top1)
            if method == "camkd" and record.sample_weights is not None:
                weights.append(record.sample_weights)
    result.seconds["distill"] = time.perf_counter() - t0
    corrupted = next(i for i, t in enumerate(TEACHERS) if t.label_map)
    result.camkd_weights = corrupted_teacher_weights(weights, list(CORRUPTED_CLASSES), teacher=corrupted)
    (out / f"demo-{features}.json").write_text(json.dumps(_as_json(result), indent=2) + "\n")
    return result


def corrupted_teacher_weights(saved: list[SampleWeights], classes: list[int], teacher: int) -> dict[str, float]:
    """CA-MKD's mean KD weight on ``teacher`` over the samples of ``classes`` and over all other samples."""
    if not saved:
        return {}
    labels = np.concatenate([s.labels for s in saved])
    w = np.concatenate([s.weights[:, teacher] for s in saved])
    inside = np.isin(labels, classes)
    return {"corrupted_classes": float(w[inside].mean()), "other_classes": float(w[~inside].mean())}


def format_table(result: DemoResult) -> list[str]:
    """The demo's table: teachers, their ensemble, each method's student top-1 (mean ± spread over seeds)."""
    lines = [f"{'':<28} {'test top-1':>12}"]
    for name, t in result.teachers.items():
        lines.append(f"{'teacher ' + name + ' (' + t['arch'] + ')':<28} {t['test_accuracy']:>11.2f}%")
    lines.append(f"{'teacher ensemble':<28} {result.ensemble:>11.2f}%")
    for method, accs in result.students.items():
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        form = f" ({result.features} form)" if method in ("fitnet-mkd", "camkd") else ""
        lines.append(f"{'student ' + STUDENT + ' ' + method:<28} {statistics.mean(accs):>11.2f}%{spread}{form}"
                     f"{'  (' + str(len(accs)) + ' seeds)' if len(accs) > 1 else ''}")
    if result.camkd_weights:
        lines.append(f"camkd's mean weight on the corrupted teacher: {result.camkd_weights['corrupted_classes']:.3f} "
                     f"on classes 3, 5, 8; {result.camkd_weights['other_classes']:.3f} on the others")
    return lines


def _finished_training(ckpt: Path, epochs: int) -> bool:
    if not ckpt.is_file():
        return False
    try:
        return int(read_checkpoint(ckpt).get("epoch", 0)) >= epochs
    except CheckpointError:  # an unreadable leftover is simply trained again
        return False


def _as_json(result: DemoResult) -> dict:
    return {"features": result.features, "teachers": result.teachers, "ensemble": result.ensemble, "students": result.students,
            "camkd_weights_on_corrupted_teacher": result.camkd_weights, "seconds": result.seconds,
            "reused": result.reused, "cache": str(result.cache), "runs": str(result.out / "runs" / result.features)}
