"""Top-1 / top-5 accuracy of a model on a data set's test split."""

from __future__ import annotations

import torch

from kdcache.batches import test_batches
from kdcache.data import DataSet


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


@torch.inference_mode()
def evaluate(model: torch.nn.Module, dataset: DataSet, recipe: str, device: torch.device,
             batch_size: int = 256) -> tuple[float, float]:
    """(top-1, top-5) in percent on the test split, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    top1 = top5 = total = 0
    for x, y in test_batches(dataset, recipe, device, batch_size):
        _, logits = model(x)
        top1 += topk_correct(logits, y, 1)
        top5 += topk_correct(logits, y, 5)
        total += len(y)
    model.train(was_training)
    return 100.0 * top1 / total, 100.0 * top5 / total
