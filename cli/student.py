"""``kdcache distill``, ``kdcache eval`` and ``kdcache methods``: train and judge students."""

from __future__ import annotations

from pathlib import Path

import click

from kdcache import training
from kdcache.cli.common import (cache_option, data_root_option, device_option, image_size_option, milestones_option,
                                recipe_option, tensorboard_option)
from kdcache.distributed import DistContext
from kdcache.losses import MethodOptions, method_info, method_names
from kdcache.pipelines.distill import DistillRequest, EpochMetrics, distill
from kdcache.pipelines.evaluate import evaluate_checkpoint


@click.command("methods")
def methods() -> None:
    """List the distillation methods."""
    for name in method_names():
        info = method_info(name)
        click.echo(f"{name:<12} teachers {info.n_teachers:<2} {info.description}")


@click.command("distill")
@click.option("--student", required=True, help="Student architecture, from `kdcache models`.")
@click.option("--teachers", "teachers", multiple=True, required=True, metavar="ID",
              help="A teacher store id or unique prefix (repeat for several), from `kdcache cache ls`.")
@click.option("--method", required=True, type=click.Choice(method_names()), help="Distillation method.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory: config.json, metrics.jsonl, checkpoint.pth, best.pth, last.pth.")
@cache_option
@click.option("--dataset", default=None, help="Data set [default: the one the stores were computed on].")
@data_root_option
@click.option("--epochs", type=int, default=training.EPOCHS, help="Training epochs (official: 240).")
@click.option("--batch-size", type=int, default=training.BATCH_SIZE, help="Batch size (official: 64).")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 0.05; 0.01 for MobileNetV2, ShuffleV1, ShuffleV2 students].")
@milestones_option
@click.option("--momentum", type=float, default=training.MOMENTUM, help="SGD momentum (Nesterov).")
@click.option("--weight-decay", type=float, default=training.WEIGHT_DECAY, help="Weight decay.")
@click.option("--temperature", "-T", type=float, default=4.0, help="Distillation temperature T.")
@click.option("--gamma", type=float, default=1.0, help="Weight of the cross-entropy term.")
@click.option("--alpha", type=float, default=None, help="Weight of the KD term [default: the method's].")
@click.option("--beta", type=float, default=None,
              help="Weight of the feature term [default: the method's: fitnet 100, fitnet-mkd 100, camkd 50].")
@click.option("--camkd-weights", type=click.Choice(["confidence", "uniform"]), default="confidence",
              help="CA-MKD ablation: confidence weights (the paper) or uniform 1/K.")
@click.option("--camkd-feature-weights", type=click.Choice(["v", "w"]), default="v",
              help="CA-MKD ablation: weight the feature term by v (the paper) or by the KD weights w.")
@click.option("--seed", type=int, default=0, help="Seed of the student's weights and of the batch order.")
@device_option
@click.option("--amp", is_flag=True, help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")
@click.option("--prefetch", type=int, default=2, help="Chunk blocks read ahead of the training step.")
@click.option("--online", is_flag=True, help="Run the recorded teacher checkpoints live instead of reading stores.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.pth.")
@tensorboard_option
def distill_cmd(student: str, teachers: tuple[str, ...], method: str, out: Path, cache: Path | None,
                dataset: str | None, data_root: Path | None, epochs: int, batch_size: int, lr: float | None,
                lr_milestones: list[int] | None, momentum: float, weight_decay: float, temperature: float,
                gamma: float, alpha: float | None, beta: float | None, camkd_weights: str,
                camkd_feature_weights: str, seed: int, device: str | None, amp: bool, prefetch: int, online: bool,
                resume: bool, tensorboard: Path | None) -> None:
    """Train a student from cached teacher stores with CA-MKD or a baseline.

    Under `torchrun --nproc_per_node N $(command -v kdcache) distill ...` it trains data-parallel on N ranks:
    --batch-size is the global batch (a multiple of N), rank 0 writes the run directory and prints.
    """
    options = MethodOptions(temperature=temperature, gamma=gamma, alpha=alpha, beta=beta,
                            camkd_weights=camkd_weights, camkd_feature_weights=camkd_feature_weights)
    req = DistillRequest(student=student, teachers=list(teachers), method=method, out=out, cache=cache,
                         dataset=dataset, data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, milestones=lr_milestones, seed=seed,
                         device=device, resume=resume, online=online, amp=amp, prefetch=prefetch, options=options,
                         tensorboard=tensorboard)

    def report(m: EpochMetrics) -> None:
        terms = "  ".join(f"{k} {v:.4f}" for k, v in m.train.items())
        weights = "" if m.teacher_weights is None else "  w " + "/".join(f"{w:.2f}" for w in m.teacher_weights)
        click.echo(f"epoch {m.epoch:>3}/{epochs}  {terms}{weights}  test top-1 {m.test_top1:6.2f}%  "
                   f"top-5 {m.test_top5:6.2f}%  lr {m.lr:.4g}  {m.seconds:.1f}s", err=True)

    def started(ctx: DistContext) -> None:
        if ctx.distributed:
            click.echo(f"distributed: {ctx.world} ranks, backend {ctx.backend}", err=True)

    result = distill(req, on_epoch=report, on_start=started)
    if result.is_main:  # under torchrun, rank 0 alone reports
        click.echo(f"best test top-1 {result.best_top1:.2f}%; run in {result.out}", err=True)
        click.echo(str(result.out))


@click.command("eval")
@click.option("--arch", required=True, help="Architecture, from `kdcache models`.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Weights: {'model': sd}, {'state_dict': sd} or a bare state_dict.")
@click.option("--dataset", required=True, help="Data set from `kdcache datasets`.")
@data_root_option
@recipe_option
@image_size_option
@device_option
@click.option("--batch-size", type=int, default=256, help="Evaluation batch size.")
def eval_cmd(arch: str, checkpoint: Path, dataset: str, data_root: Path | None, recipe: str | None,
             image_size: int | None, device: str | None, batch_size: int) -> None:
    """Print a checkpoint's top-1 and top-5 accuracy on the test split, on the test-time view of the recipe the
    model was trained with (give the same --recipe / --image-size as to train-teacher)."""
    top1, top5 = evaluate_checkpoint(arch, checkpoint, dataset, data_root, device, batch_size, recipe, image_size)
    click.echo(f"top-1 {top1:.2f}%  top-5 {top5:.2f}%")


COMMANDS = (methods, distill_cmd, eval_cmd)
