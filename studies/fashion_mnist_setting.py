"""The Fashion-MNIST study's setting, shared by the study (fashion_mnist.py) and its report
(fashion_mnist_report.py), so that neither imports the other back: the study's sizes, the class
names, the biased teacher's rotated labels, the teachers of each setting, and which of them is best."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
ROTATED = {1: 3, 3: 8, 8: 1}  # the biased teacher learns Trouser as Dress, Dress as Bag, Bag as Trouser
SETTINGS = {"A": ("t0", "t1", "t2"), "B": ("t0", "t1", "t2-rotated")}
# the paired comparison's methods (run names of parts A and B); each is compared with the first, camkd
PAIRED_METHODS = ("camkd-spatial", "aver", "kd", "aekd", "fitnet-mkd")

# the study's stores: (teacher, form, V) -> teacher id, and (teacher, form, V, "path") -> its directory
StoreIds = dict[tuple[str, str, int] | tuple[str, str, int, str], str]


@dataclass(frozen=True)
class Config:
    """The sizes of the study; the defaults fit about two hours on a 2-core CPU (docs/EVIDENCE.md says why)."""

    per_class: int = 250          # training images per class, drawn from the 60,000 (seed 0)
    test_per_class: int = 500     # test images per class, drawn from the 10,000 (seed 0)
    teacher: str = "resnet20"
    teacher_epochs: int = 15
    student: str = "resnet8"
    epochs: int = 8
    batch_size: int = 64          # the official scripts'
    views: int = 8
    seeds: int = 3
    betas: tuple[int, ...] = (0, 5, 15, 50)
    view_counts: tuple[int, ...] = (1, 2, 4, 8)
    # issue 28: paired comparisons over more seeds, and stored views over a longer schedule
    paired_seeds: int = 10        # seeds 0..9 of PAIRED_METHODS in settings A and B
    long_epochs: int = 40
    long_view_counts: tuple[int, ...] = (1, 2, 5, 10, 40)
    long_seeds: int = 3
    # camkd's β over the long schedule at the largest V (is the feature term what holds camkd back there?)
    long_betas: tuple[int, ...] = (0, 5)
    long_beta_seeds: int = 3


def best_teacher(facts: dict[str, Any], setting: str) -> str:
    """The teacher of ``setting`` with the best test top-1 (the single teacher of kd and fitnet)."""
    return max(SETTINGS[setting], key=lambda n: facts["teachers"][n]["test"])
