"""The CA-MKD paper's settings as data: every experiment of its Tables 1-4, Figure 4 and appendix, with the figures
the paper prints, as :class:`~kdcache.pipelines.experiment_spec.Experiment` literals.

Sources: every setting and every figure comes from the paper (Zhang, Chen, Wang,
"Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022, arXiv 2201.00007):

- Table 1, three teachers of one architecture, seven columns: ``t1-*``;
- Table 2, single-teacher KD and FitNet (AT, VID, CRD listed, not implemented) beside
  CA-MKD with three teachers: ``t2-*``;
- Table 3, resnet8x4 + resnet20x4 + resnet32x4 → vgg8: ``t3-*`` (the paper's Figure 3,
  CA-MKD's per-sample weights, is ``kdcache report`` on its ``camkd`` runs);
- Table 4, the CA-MKD ablation on vgg13 ×3 → MobileNetV2: ``t4-*``;
- Figure 4, one to four teachers, resnet56 → MobileNetV2 (the paper's example; curves
  only, so no paper figures): ``f4-*``;
- the appendix, Tiny-ImageNet (the CIFAR set-up) and Stanford Dogs (CS-KD's set-up),
  multi-teacher and single-teacher rows together: ``app-*``.

:mod:`kdcache.pipelines.experiments` imports this module at the first lookup of its
registry, not at its own import, and registers :data:`PAPER_EXPERIMENTS` there in this
order (the paper's); a plug-in's experiments come after them.
"""

from __future__ import annotations

from kdcache.pipelines.experiment_spec import (AEKD, AVER, CAMKD, CAMKD_BETA0, CAMKD_FEATURE_W, CAMKD_UNIFORM, CE,
                                               EBKD, FITNET_MKD, MULTI_TEACHER, SINGLE_TEACHER, Experiment,
                                               teacher_sweep)

__all__ = ["PAPER_EXPERIMENTS", "TABLES"]

# What each of the paper's tables is, for `kdcache experiment list` and the table headers.
TABLES = {
    "Table 1": "three teachers of one architecture, CIFAR-100",
    "Table 2": "single-teacher methods (one teacher) beside CA-MKD (three teachers), CIFAR-100",
    "Table 3": "three teachers of different architectures, CIFAR-100",
    "Table 4": "ablation of CA-MKD, CIFAR-100",
    "Figure 4": "number of teachers (1 to 4), CIFAR-100",
    "Appendix": "Tiny-ImageNet and Stanford Dogs, multi- and single-teacher rows",
}

_PAPER = "the CA-MKD paper (Zhang, Chen, Wang, ICASSP 2022, arXiv 2201.00007)"
_TEACHERS = ("Teachers of one architecture are three separately trained copies (the official settings name "
             "them cifar100-<arch>-0/1/2); here <arch>-0/1/2.pth, trained with seeds 0, 1, 2 unless supplied.")
_ENSEMBLE = "The paper's ensemble is the three teachers' majority vote."
_TABLE2_ROWS = (CE, *SINGLE_TEACHER, CAMKD)
_SINGLE_TEACHER_ROW = ("the single-teacher row (its teacher {}, shown on teacher 1, which kdcache's KD and FitNet use; "
                       "the paper does not say which teacher it was).")


def _table1_source(teacher: str, student: str) -> str:
    """Where a Table 1 column comes from: its figures are ``teacher``, ensemble, student alone, the five methods."""
    return (f"{_PAPER}, Table 1, column {teacher} → {student}: teacher = one teacher's accuracy (mean ± std of the "
            f"three), ensemble, student alone and the five methods. {_ENSEMBLE} {_TEACHERS}")


def _table2_source(teacher: str, teacher_figure: str, student: str, student_figure: str, note: str = "") -> str:
    """Where a Table 2 row comes from, with ``note`` on a figure that differs from Table 1's."""
    return (f"{_PAPER}, Table 2, row {teacher} ({teacher_figure}) → {student} ({student_figure}): KD and FitNet distil "
            "from one teacher (kdcache uses teacher 1, <arch>-0.pth; the paper does not say which of its three it used); "
            "AT, VID and CRD are listed with the paper's figures and not run (kdcache does not implement them); CA-MKD "
            "uses all three teachers, the same runs as Table 1's column (share --teachers-dir and --cache to reuse the "
            "teachers and stores)." + note)


# Every setting of the paper, in its order: Tables 1-4, Figure 4, the appendix.
PAPER_EXPERIMENTS: tuple[Experiment, ...] = (
    # Table 1, as printed: teacher ×3 → student | teacher | ensemble | student alone | AVER | FitNet-MKD | EBKD |
    # AEKD | CA-MKD
    Experiment(name="t1-wrn_40_2-ShuffleV1", table="Table 1", dataset="cifar100", teachers=("wrn_40_2",) * 3,
               student="ShuffleV1", source=_table1_source("wrn_40_2", "ShuffleV1"),
               paper={"teacher": "76.62 ± 0.26", "ensemble": "79.62", "ce": "71.70 ± 0.43", "aver": "76.30 ± 0.25",
                      "fitnet-mkd": "76.59 ± 0.17", "ebkd": "76.61 ± 0.14", "aekd": "76.34 ± 0.24",
                      "camkd": "77.94 ± 0.31"}),
    Experiment(name="t1-resnet56-MobileNetV2", table="Table 1", dataset="cifar100", teachers=("resnet56",) * 3,
               student="MobileNetV2", source=_table1_source("resnet56", "MobileNetV2"),
               paper={"teacher": "73.28 ± 0.30", "ensemble": "76.00", "ce": "65.64 ± 0.19", "aver": "70.21 ± 0.10",
                      "fitnet-mkd": "70.69 ± 0.56", "ebkd": "70.91 ± 0.22", "aekd": "70.47 ± 0.15",
                      "camkd": "71.38 ± 0.02"}),
    Experiment(name="t1-vgg13-vgg8", table="Table 1", dataset="cifar100", teachers=("vgg13",) * 3,
               student="vgg8", source=_table1_source("vgg13", "vgg8"),
               paper={"teacher": "75.17 ± 0.18", "ensemble": "77.07", "ce": "70.74 ± 0.40", "aver": "74.07 ± 0.23",
                      "fitnet-mkd": "73.97 ± 0.22", "ebkd": "74.10 ± 0.27", "aekd": "73.78 ± 0.03",
                      "camkd": "74.30 ± 0.16"}),
    Experiment(name="t1-vgg13-MobileNetV2", table="Table 1", dataset="cifar100", teachers=("vgg13",) * 3,
               student="MobileNetV2", source=_table1_source("vgg13", "MobileNetV2"),
               paper={"teacher": "75.17 ± 0.18", "ensemble": "77.07", "ce": "65.64 ± 0.19", "aver": "68.91 ± 0.35",
                      "fitnet-mkd": "68.48 ± 0.07", "ebkd": "68.24 ± 0.82", "aekd": "68.39 ± 0.50",
                      "camkd": "69.41 ± 0.20"}),
    Experiment(name="t1-resnet32x4-resnet8x4", table="Table 1", dataset="cifar100", teachers=("resnet32x4",) * 3,
               student="resnet8x4", source=_table1_source("resnet32x4", "resnet8x4"),
               paper={"teacher": "79.31 ± 0.14", "ensemble": "81.16", "ce": "72.79 ± 0.14", "aver": "74.99 ± 0.24",
                      "fitnet-mkd": "74.86 ± 0.21", "ebkd": "75.59 ± 0.15", "aekd": "74.75 ± 0.28",
                      "camkd": "75.90 ± 0.13"}),
    Experiment(name="t1-resnet32x4-ShuffleV2", table="Table 1", dataset="cifar100", teachers=("resnet32x4",) * 3,
               student="ShuffleV2", source=_table1_source("resnet32x4", "ShuffleV2"),
               paper={"teacher": "79.31 ± 0.14", "ensemble": "81.16", "ce": "72.94 ± 0.24", "aver": "75.87 ± 0.19",
                      "fitnet-mkd": "76.09 ± 0.13", "ebkd": "76.41 ± 0.12", "aekd": "75.95 ± 0.20",
                      "camkd": "77.41 ± 0.14"}),
    Experiment(name="t1-resnet32x4-vgg8", table="Table 1", dataset="cifar100", teachers=("resnet32x4",) * 3,
               student="vgg8", source=_table1_source("resnet32x4", "vgg8"),
               paper={"teacher": "79.31 ± 0.14", "ensemble": "81.16", "ce": "70.74 ± 0.40", "aver": "73.26 ± 0.39",
                      "fitnet-mkd": "73.27 ± 0.19", "ebkd": "73.60 ± 0.22", "aekd": "73.11 ± 0.27",
                      "camkd": "75.26 ± 0.32"}),

    # Table 2, as printed: teacher (its accuracy) → student (alone) | KD | FitNet | AT | VID | CRD | CA-MKD (3 teachers)
    Experiment(name="t2-wrn_40_2-ShuffleV1", table="Table 2", dataset="cifar100", teachers=("wrn_40_2",) * 3,
               student="ShuffleV1", variants=_TABLE2_ROWS,
               source=_table2_source("wrn_40_2", "76.62", "ShuffleV1", "71.70"),
               paper={"teacher": "76.62", "ce": "71.70", "kd": "75.77 ± 0.14", "fitnet": "76.22 ± 0.21",
                      "at": "76.44 ± 0.38", "vid": "76.32 ± 0.08", "crd": "76.58 ± 0.23", "camkd": "77.94 ± 0.31"}),
    Experiment(name="t2-resnet32x4-vgg8", table="Table 2", dataset="cifar100", teachers=("resnet32x4",) * 3,
               student="vgg8", variants=_TABLE2_ROWS,
               source=_table2_source("resnet32x4", "79.31", "vgg8", "70.74",
                                     note=" Table 2 prints CA-MKD's figure here as 75.26 ± 0.13, Table 1 as 75.26 ± 0.32: "
                                          "the Table 2 figure is shown."),
               paper={"teacher": "79.31", "ce": "70.74", "kd": "72.90 ± 0.34", "fitnet": "72.55 ± 0.66",
                      "at": "72.16 ± 0.12", "vid": "73.09 ± 0.29", "crd": "73.57 ± 0.25", "camkd": "75.26 ± 0.13"}),
    Experiment(name="t2-resnet56-MobileNetV2", table="Table 2", dataset="cifar100", teachers=("resnet56",) * 3,
               student="MobileNetV2", variants=_TABLE2_ROWS,
               source=_table2_source("resnet56", "73.28", "MobileNetV2", "65.64"),
               paper={"teacher": "73.28", "ce": "65.64", "kd": "69.96 ± 0.14", "fitnet": "69.02 ± 0.28",
                      "at": "69.79 ± 0.26", "vid": "69.45 ± 0.17", "crd": "71.15 ± 0.44", "camkd": "71.38 ± 0.02"}),

    Experiment(
        name="t3-resnet8x4-resnet20x4-resnet32x4-vgg8", table="Table 3", dataset="cifar100",
        teachers=("resnet8x4", "resnet20x4", "resnet32x4"), student="vgg8",
        paper={"teacher 1": "72.79", "teacher 2": "78.39", "teacher 3": "79.31", "ce": "70.74 ± 0.40",
               "aver": "74.55 ± 0.24", "fitnet-mkd": "74.47 ± 0.21", "ebkd": "74.07 ± 0.17", "aekd": "74.69 ± 0.29",
               "camkd": "75.96 ± 0.05"},
        source=f"{_PAPER}, Table 3: teachers resnet8x4 (72.79), resnet20x4 (78.39), resnet32x4 (79.31), student vgg8 "
               "(70.74 ± 0.40); the paper gives no ensemble figure here. Its Figure 3 (CA-MKD's per-sample weights per "
               "teacher on this setting) is `kdcache report` on <out>/camkd/seed<k>."),

    Experiment(
        name="t4-vgg13-MobileNetV2", table="Table 4", dataset="cifar100", teachers=("vgg13",) * 3,
        student="MobileNetV2", variants=(CAMKD_UNIFORM, CAMKD_BETA0, CAMKD_FEATURE_W, CAMKD),
        paper={"camkd-uniform": "67.74 ± 0.87", "camkd-beta0": "68.11 ± 0.02", "camkd-feature-w": "68.82 ± 0.63",
               "camkd": "69.41 ± 0.20"},
        source=f"{_PAPER}, Table 4 (ablation on vgg13 ×3 → MobileNetV2): uniform weights (w = v = 1/K, "
               "--camkd-weights uniform), no feature term (--beta 0), feature term weighted by w instead of v "
               "(--camkd-feature-weights w), and CA-MKD (equal to Table 1's column). The teachers and CA-MKD runs are "
               "those of t1-vgg13-MobileNetV2."),

    Experiment(
        name="f4-resnet56-MobileNetV2", table="Figure 4", dataset="cifar100", teachers=("resnet56",) * 4,
        student="MobileNetV2", variants=(CE, *teacher_sweep((AVER, FITNET_MKD, EBKD, AEKD, CAMKD), (1, 2, 3, 4))),
        source=f"{_PAPER}, Figure 4: student accuracy as the number of teachers grows, CA-MKD against the other "
               "methods, on the paper's example resnet56 → MobileNetV2. The paper draws curves and prints no numbers, "
               "so every paper figure is n/a; it does not say how many teachers its curves reach: here 1 to 4, the "
               "first n of resnet56-0..3.pth."),

    Experiment(
        name="app-tiny-imagenet-resnet32x4-vgg8", table="Appendix", dataset="imagefolder", data="tiny-imagenet",
        teachers=("resnet32x4",) * 3, student="vgg8", variants=(*MULTI_TEACHER, *SINGLE_TEACHER),
        paper={"teacher": "53.38 ± 0.11", "teacher 1": "53.45", "ce": "44.40 ± 0.15", "aver": "47.82 ± 0.15",
               "fitnet-mkd": "47.82 ± 0.05", "ebkd": "47.20 ± 0.10", "aekd": "47.62 ± 0.38", "camkd": "49.55 ± 0.12",
               "kd": "47.42 ± 0.07", "fitnet": "47.24 ± 0.28", "at": "45.73 ± 0.05", "vid": "47.76 ± 0.08",
               "crd": "48.11 ± 0.07"},
        source=f"{_PAPER}, appendix, Tiny-ImageNet rows of both tables: the multi-teacher row (teacher 53.38 ± 0.11) "
               f"and {_SINGLE_TEACHER_ROW.format('53.45')} The paper says Tiny-ImageNet uses the CIFAR-100 set-up: "
               "the official schedule and CIFAR-style views (random crop with zero padding + flip) at 64×64; the data "
               "set is `imagefolder` with train/<class>/ and val/<class>/ (Tiny-ImageNet's val images sorted into class "
               "folders), 100,000 training images, 200 classes. No ensemble figure is given."),

    Experiment(
        name="app-stanford-dogs-resnet34-shufflenet_v2_x0_5", table="Appendix", dataset="imagefolder",
        data="stanford-dogs", teachers=("resnet34",) * 3, student="shufflenet_v2_x0_5",
        variants=(*MULTI_TEACHER, *SINGLE_TEACHER), setup="cs-kd",
        paper={"teacher": "64.76 ± 1.06", "teacher 1": "65.97", "ce": "59.36 ± 0.73", "aver": "64.49 ± 0.16",
               "fitnet-mkd": "64.11 ± 0.80", "ebkd": "64.32 ± 0.23", "aekd": "64.19 ± 0.34", "camkd": "65.19 ± 0.23",
               "kd": "63.90 ± 0.08", "fitnet": "62.45 ± 0.61", "at": "63.48 ± 0.60", "vid": "64.45 ± 0.23",
               "crd": "64.61 ± 0.17"},
        source=f"{_PAPER}, appendix, Stanford Dogs rows of both tables: the multi-teacher row (teacher 64.76 ± 1.06) "
               f"and {_SINGLE_TEACHER_ROW.format('65.97')} The paper says Stanford Dogs follows CS-KD's set-up "
               "(Yun et al., CVPR 2020; alinlab/cs-kd). Reproduced of it: torchvision ResNet-style networks trained "
               "from scratch on 224×224 views, RandomResizedCrop(224) + horizontal flip for training, shorter side 256 "
               "+ centre 224 crop for testing, ImageNet normalisation, SGD momentum 0.9, lr 0.1, weight decay 1e-4, "
               "batch 32, 200 epochs, lr ×0.1 after 101 and 151 epochs (CS-KD's code), 12,000 training images of 120 "
               "classes (`imagefolder`: train/<class>/ and val/<class>/, the latter CS-KD's test split). Not "
               "reproduced: CS-KD's SGD has no Nesterov momentum (kdcache's has); CS-KD keeps the incomplete last "
               "batch (kdcache drops it); the student sees a fixed schedule of 200 stored views rather than fresh "
               "random crops; CS-KD's own class-wise regularisation loss is not part of the set-up and is not used; "
               "T = 4, α = 1, β = 50 are the CIFAR values, as the paper states them for every data set. No ensemble "
               "figure is given."),
)
