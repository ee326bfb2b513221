"""Your own training loop on cached teachers: a custom distillation loss, no teacher network anywhere.

The loss here is a "best teacher per sample" KD: each sample learns from the one teacher that gives its
true label the highest probability (a loss kdcache does not ship). Run, after `kdcache precompute`:

    python examples/own_loop.py --teachers ID1 ID2 [--cache DIR] [--epochs 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kdcache import CachedTeachers
from kdcache.evaluate import evaluate
from kdcache.models import build_model


def best_teacher_kd(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: list[torch.Tensor],
                    temperature: float = 4.0) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T, from the teacher most confident in the true label, plus CE."""
    stacked = torch.stack(teacher_logits)                                    # (K, B, C)
    confidence = stacked.softmax(-1).gather(2, labels.expand(len(stacked), -1)[..., None])[..., 0]  # (K, B)
    best = stacked[confidence.argmax(0), torch.arange(len(labels))]          # (B, C)
    kd = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.softmax(best / temperature, -1),
                  reduction="batchmean") * temperature ** 2
    return F.cross_entropy(student_logits, labels) + kd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", required=True, help="teacher store ids or unique prefixes")
    parser.add_argument("--cache", default=None, help="the cache directory [default: $KDCACHE_HOME]")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    teachers = CachedTeachers(args.teachers, args.cache, batch_size=args.batch_size, device=args.device)
    torch.manual_seed(0)
    student = build_model(args.student, teachers.num_classes).to(teachers.device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for epoch in range(1, args.epochs + 1):
        student.train()
        total = 0.0
        for batch in teachers.epoch(epoch):
            _, logits = student(batch.views)  # kdcache's models return (pooled features, logits)
            loss = best_teacher_kd(logits, batch.labels, batch.teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss)
        top1, _ = evaluate(student, teachers.dataset, teachers.plan.recipe, teachers.device)
        print(f"epoch {epoch}: view {batch.view}, mean loss {total / teachers.steps_per_epoch:.4f}, "
              f"test top-1 {top1:.2f}%")


if __name__ == "__main__":
    main()
