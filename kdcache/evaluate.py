"""Top-1 / top-5 accuracy of a model, and of an ensemble of teachers, on a data set's test split."""

from __future__ import annotations

from pathlib import Path

import torch

from kdcache.batches import test_batches
from kdcache.data import DataSet
from kdcache.device import resolve_device
from kdcache.models import build_model, load_checkpoint


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


@torch.inference_mode()
def ensemble_accuracies(teachers: list[tuple[str, Path]], dataset: DataSet, device: str | None) -> tuple[float, float]:
    """Test top-1 (%) of the teachers' majority vote and of their averaged softmax, in one pass.

    The vote is the paper's ensemble: each teacher votes its top-1 class; a tie (e.g. three
    teachers, three classes) goes to the tied class with the largest summed softmax.
    """
    dev = resolve_device(device)
    models = []
    for arch, ckpt in teachers:
        m = build_model(arch, dataset.num_classes)
        load_checkpoint(m, ckpt)
        models.append(m.eval().to(dev))
    vote_correct = soft_correct = total = 0
    for x, y in test_batches(dataset, dataset.recipe, dev, 256):
        probs = torch.stack([torch.softmax(m(x)[1].float(), dim=1) for m in models])   # (K, B, C)
        summed = probs.sum(0)
        votes = torch.zeros_like(summed)
        votes.scatter_add_(1, probs.argmax(2).T, torch.ones(y.shape[0], len(models), device=dev))
        top = votes == votes.max(1, keepdim=True).values
        vote = torch.where(top, summed, torch.full_like(summed, -1.0)).argmax(1)
        vote_correct += int((vote == y).sum())
        soft_correct += int((summed.argmax(1) == y).sum())
        total += len(y)
    return 100.0 * vote_correct / total, 100.0 * soft_correct / total
