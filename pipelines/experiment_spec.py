"""What an experiment is: a setting of the CA-MKD paper (or one given on the command line) and the rows of its
table, as frozen dataclasses, with the rows kdcache runs.

A row (:class:`Variant`) is a method with its options and the teachers it reads: ``camkd``
as the paper runs it, ``camkd-uniform`` (the Table 4 ablation with ``w = v = 1/K``), ``kd``
on teacher 1 only (Table 2), ``aver-k2`` (Figure 4, the first two teachers), or a method
kdcache does not implement (AT, VID, CRD), which is shown with the paper's figure and never
run. An :class:`Experiment` names a data set, K teacher architectures, a student and its
rows. The paper's settings are data in :mod:`kdcache.pipelines.paper_settings`; the registry,
the dry run and the running are :mod:`kdcache.pipelines.experiments`'. This module holds only
the types, so that the settings, the registry and a plug-in's own experiments share them
without importing each other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from kdcache.pipelines.grid import Row
from kdcache.store.form import FeatureForm

__all__ = ["AEKD", "AT", "AVER", "CAMKD", "CAMKD_BETA0", "CAMKD_FEATURE_W", "CAMKD_UNIFORM", "CE", "CRD", "EBKD",
           "Experiment", "FITNET", "FITNET_MKD", "KD", "MULTI_TEACHER", "SINGLE_TEACHER", "VID", "Variant",
           "not_implemented", "rows_summary", "teacher_sweep", "variant"]


# -- rows: a method, its options, its teachers ----------------------------------------------------


@dataclass(frozen=True)
class Variant(Row):
    """One row of an experiment's table: a grid :class:`~kdcache.pipelines.grid.Row` (label, method, title,
    options, how many of the experiment's teachers it reads, implemented or only listed) and, for a point of a
    teacher-number sweep (Figure 4), the ``curve`` it belongs to."""

    curve: str | None = None


def variant(label: str, method: str, title: str, n_teachers: int | None = None, curve: str | None = None,
            **options: object) -> Variant:
    """A row with ``options`` given as keywords (``camkd_weights="uniform"``)."""
    return Variant(label, method, title, tuple(options.items()), n_teachers, curve=curve)


def not_implemented(label: str, title: str) -> Variant:
    """A method of the paper's table that kdcache does not implement: shown with its figure, never run."""
    return Variant(label, label, title, implemented=False)


CE = variant("ce", "ce", "Student alone")
AVER = variant("aver", "aver", "AVER")
FITNET_MKD = variant("fitnet-mkd", "fitnet-mkd", "FitNet-MKD")
EBKD = variant("ebkd", "ebkd", "EBKD")
AEKD = variant("aekd", "aekd", "AEKD")
CAMKD = variant("camkd", "camkd", "CA-MKD")
KD = variant("kd", "kd", "KD (teacher 1)", n_teachers=1)
FITNET = variant("fitnet", "fitnet", "FitNet (teacher 1)", n_teachers=1)
AT = not_implemented("at", "AT (one teacher)")
VID = not_implemented("vid", "VID (one teacher)")
CRD = not_implemented("crd", "CRD (one teacher)")
CAMKD_UNIFORM = variant("camkd-uniform", "camkd", "CA-MKD, uniform weights (w = v = 1/K)", camkd_weights="uniform")
CAMKD_BETA0 = variant("camkd-beta0", "camkd", "CA-MKD without the feature term (β = 0)", beta=0.0)
CAMKD_FEATURE_W = variant("camkd-feature-w", "camkd", "CA-MKD, feature term weighted by w instead of v",
                          camkd_feature_weights="w")

# Table 1's rows, the paper's compared methods with the student alone first (every experiment's default).
MULTI_TEACHER = (CE, AVER, FITNET_MKD, EBKD, AEKD, CAMKD)
# Table 2's single-teacher rows.
SINGLE_TEACHER = (KD, FITNET, AT, VID, CRD)


def teacher_sweep(methods: Sequence[Variant], counts: Sequence[int]) -> tuple[Variant, ...]:
    """Figure 4's points: every method of ``methods`` on the first n teachers, for each n in ``counts``."""
    out = []
    for base in methods:
        for n in counts:
            out.append(Variant(f"{base.label}-k{n}", base.method, f"{base.title}, {n} teacher{'s' if n > 1 else ''}",
                               base.options, n_teachers=n, curve=base.title))
    return tuple(out)


def rows_summary(variants: Sequence[Variant]) -> str:
    """The rows in one line: 'ce, kd, at (not implemented)', a teacher sweep as 'aver, camkd with 1-4 teachers'."""
    parts: list[str] = []
    curves: dict[str, list[int]] = {}
    for v in variants:
        if v.curve and v.n_teachers is not None:
            curves.setdefault(v.method, []).append(v.n_teachers)
            continue
        parts.append(v.label + ("" if v.implemented else " (not implemented)"))
    if curves:
        counts = sorted({n for ns in curves.values() for n in ns})
        parts.append(f"{', '.join(curves)} with {counts[0]}-{counts[-1]} teachers")
    return ", ".join(parts)


# -- experiments --------------------------------------------------------------------------------

# The data's names in titles and tables, keyed by an experiment's data label.
DATA_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "tiny-imagenet": "Tiny-ImageNet",
              "stanford-dogs": "Stanford Dogs"}


@dataclass(frozen=True)
class Experiment:
    """One setting of the paper: data set, K teacher architectures, student, rows, set-up and the paper's figures.

    ``paper`` maps a row to the paper's figure as printed: a variant's label, ``"teacher"``
    (the teachers' mean, or the one teacher), ``"teacher <i>"``, ``"ensemble"``.
    ``data`` labels the data when ``dataset`` alone does not say which (``imagefolder`` is
    both Tiny-ImageNet and Stanford Dogs): it keys the dry run's known data sizes and the
    teachers' folder. ``epochs`` and ``views`` default to the set-up's epochs.
    """

    name: str
    table: str                       # "Table 1", "Table 2", "Table 3", "Table 4", "Figure 4", "Appendix", "custom"
    dataset: str
    teachers: tuple[str, ...]
    student: str
    variants: tuple[Variant, ...] = MULTI_TEACHER
    data: str = ""
    setup: str = "official"
    features: FeatureForm = FeatureForm.SPATIAL
    seeds: int = 3
    epochs: int | None = None
    views: int | None = None         # default: one fresh view per student epoch
    plan_seed: int = 0
    source: str = ""                 # where the setting comes from, and what is not reproduced
    paper: Mapping[str, str] = field(default_factory=dict)

    @property
    def data_label(self) -> str:
        """The data's label: ``data``, or the data set's name when ``data`` is not given."""
        return self.data or self.dataset

    @property
    def data_name(self) -> str:
        """The data's name in titles and tables: 'CIFAR-100', 'Tiny-ImageNet', or the data label."""
        return DATA_NAMES.get(self.data_label, self.data_label)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods run (implemented rows), in order, each once."""
        return tuple(dict.fromkeys(v.method for v in self.ran))

    @property
    def ran(self) -> tuple[Variant, ...]:
        """The rows that are run (the implemented ones), as :attr:`~kdcache.pipelines.grid.GridSpec.ran`."""
        return tuple(v for v in self.variants if v.implemented)

    @property
    def title(self) -> str:
        """'resnet32x4 ×3 → vgg8' or 'resnet8x4 + resnet20x4 + resnet32x4 → vgg8'."""
        counts = Counter(self.teachers)
        if len(counts) == 1:
            teachers = f"{self.teachers[0]} ×{len(self.teachers)}"
        else:
            teachers = " + ".join(self.teachers)
        return f"{teachers} → {self.student}"
