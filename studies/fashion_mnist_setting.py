"""The Fashion-MNIST study's setting, shared by the study (fashion_mnist.py) and its report
(fashion_mnist_report.py), so that neither imports the other back: the class names, the
biased teacher's rotated labels, the teachers of each setting, and which of them is best."""

from __future__ import annotations

from typing import Any

CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
ROTATED = {1: 3, 3: 8, 8: 1}  # the biased teacher learns Trouser as Dress, Dress as Bag, Bag as Trouser
SETTINGS = {"A": ("t0", "t1", "t2"), "B": ("t0", "t1", "t2-rotated")}


def best_teacher(facts: dict[str, Any], setting: str) -> str:
    """The teacher of ``setting`` with the best test top-1 (the single teacher of kd and fitnet)."""
    return max(SETTINGS[setting], key=lambda n: facts["teachers"][n]["test"])
