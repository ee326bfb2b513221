"""``kdcache train-teacher`` and ``kdcache precompute``: make a teacher, then its store."""

from __future__ import annotations

from pathlib import Path

import click

from kdcache import defaults
from kdcache.cli.common import (EnumChoice, IntRange, best_text, cache_option, data_root_option, device_option, image_size_option,
                                eval_every_option, milestones_option, recipe_option, row_progress, store_form_options,
                                tensorboard_option)
from kdcache.defaults import DEFAULT_VIEWS
from kdcache.store.form import FeatureCompression, StoreForm


@click.command("train-teacher")
@click.option("--arch", required=True, help="Architecture from `kdcache models`.")
@click.option("--dataset", required=True, help="Data set from `kdcache datasets`.")
@data_root_option
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run directory (config.json, metrics.jsonl, checkpoint.pth, best.pth, last.pth), or a .pth file: "
                   "the trained teacher's weights for precompute --checkpoint, written after the last epoch, with "
                   "the run directory beside it (t1.pth: t1/). The weights' path is printed.")
@click.option("--epochs", type=int, default=defaults.EPOCHS, help="Training epochs (official: 240).")
@click.option("--batch-size", type=int, default=defaults.BATCH_SIZE, help="Batch size (official: 64).")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 0.05; 0.01 for MobileNetV2, ShuffleV1, ShuffleV2].")
@milestones_option
@click.option("--momentum", type=float, default=defaults.MOMENTUM, help="SGD momentum (Nesterov).")
@click.option("--weight-decay", type=float, default=defaults.WEIGHT_DECAY, help="Weight decay.")
@click.option("--seed", type=int, default=0, help="Seed of the initial weights and the augmentation.")
@recipe_option
@image_size_option
@device_option
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.pth (--epochs may grow).")
@click.option("--force", is_flag=True, help="Replace an existing --out (without it, an existing run is refused).")
@eval_every_option
@tensorboard_option
def train_teacher_cmd(arch: str, dataset: str, data_root: Path | None, out: Path, epochs: int, batch_size: int,
                      lr: float | None, lr_milestones: list[int] | None, momentum: float, weight_decay: float,
                      seed: int, recipe: str | None, image_size: int | None, device: str | None,
                      resume: bool, force: bool, eval_every: int, tensorboard: Path | None) -> None:
    """Train a teacher from scratch with the official CA-MKD / RepDistiller recipe."""
    from kdcache.loop import EpochMetrics
    from kdcache.pipelines.train_teacher import TrainTeacherRequest, train_teacher

    req = TrainTeacherRequest(arch=arch, dataset=dataset, out=out, data_root=data_root, epochs=epochs,
                              batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                              milestones=lr_milestones, seed=seed, device=device, resume=resume, force=force,
                              recipe=recipe, image_size=image_size, eval_every=eval_every, tensorboard=tensorboard)

    def report(m: EpochMetrics) -> None:
        click.echo(f"epoch {m.epoch:>3}/{epochs}  loss {m.train['loss']:.4f}  train {m.train['accuracy']:6.2f}%  "
                   f"{m.test_text}  lr {m.lr:.4g}  {m.seconds:.1f}s", err=True)

    result = train_teacher(req, on_epoch=report)
    click.echo(f"{best_text(result.best_top1)}; run in {result.out}, weights in {result.checkpoint}", err=True)
    click.echo(str(result.checkpoint))


@click.command("precompute")
@click.option("--teacher", "teachers", required=True, multiple=True,
              help="The teacher's architecture, from `kdcache models`; repeat with --checkpoint for several teachers.")
@click.option("--checkpoint", "checkpoints", required=True, multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Teacher weights: {'model': sd}, {'state_dict': sd} or a bare state_dict; one per --teacher, "
                   "in the same order.")
@click.option("--dataset", required=True, help="Data set from `kdcache datasets`.")
@data_root_option
@cache_option
@click.option("--views", type=int, default=DEFAULT_VIEWS, show_default=True,
              help="Augmented views of the training set to store. A student epoch reads one and fewer views are "
                   "replayed; store at least two (README, 'How many views to store').")
@click.option("--plan-seed", type=int, default=0, help="Seed the view plan is drawn from.")
@recipe_option
@image_size_option
@click.option("--batch-size", type=int, default=None, help="Forward batch size [default: 2048 on GPU, 64 on CPU].")
@device_option
@click.option("--chunk-rows", type=int, default=None,
              help="Rows per stored chunk, the unit of reading [default: about 2 MB a chunk]. Given alone, one chunk "
                   "a file, as before shards.")
@click.option("--shard-rows", type=int, default=None,
              help="Rows per shard, a multiple of the chunk rows: one file, written whole by one writer [default: "
                   "about 128 MB a shard, or one chunk with --chunk-rows].")
@click.option("--workers", type=IntRange(min=1), default=None,
              help="Run on a local dask cluster of N workers: one per GPU on a GPU machine, else N processes.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on an existing dask cluster (e.g. tcp://host:8786); its workers must import kdcache "
                   "and see the cache, checkpoints and data at the same paths.")
@store_form_options
@click.option("--feature-compression", type=EnumChoice(list(FeatureCompression)),
              default=FeatureCompression.ZSTD.value, show_default=True,
              help="How the features are compressed before their checksum: zstd (Blosc, level 1), or none, which "
                   "keeps spatial maps in about 1.9x the disk but writes and reads them at a fraction of the CPU "
                   "time (benchmarks/RESULTS.md). Not part of the teacher id: the values are the same.")
@click.option("--dry-run", is_flag=True, help="Print what would be written (and the cache's free space), and exit.")
@click.option("--force", is_flag=True,
              help="Write even when the cache's file system has less free space than the store and plan need "
                   "before compression (without it, precompute refuses before any work).")
def precompute_cmd(teachers: tuple[str, ...], checkpoints: tuple[Path, ...], dataset: str, data_root: Path | None,
                   cache: str | None, views: int, plan_seed: int, recipe: str | None, image_size: int | None,
                   batch_size: int | None,
                   device: str | None, chunk_rows: int | None, shard_rows: int | None, workers: int | None,
                   scheduler: str | None,
                   form: StoreForm, feature_compression: FeatureCompression, dry_run: bool, force: bool) -> None:
    """Run teachers over a stored plan of augmented views and store their outputs.

    The last line of standard output is the teacher id, for `kdcache distill --teachers`;
    with several --teacher/--checkpoint pairs, the last lines are their ids, one a line, in the order given.
    """
    from kdcache.pipelines.precompute import PrecomputeRequest, precompute_many

    if len(teachers) != len(checkpoints):
        raise click.UsageError(f"got {len(teachers)} --teacher and {len(checkpoints)} --checkpoint options; "
                               "give one --checkpoint per --teacher, in the same order")
    reqs = [PrecomputeRequest(teacher=t, checkpoint=c, dataset=dataset, data_root=data_root, cache=cache, views=views,
                              plan_seed=plan_seed, recipe=recipe, batch_size=batch_size, device=device,
                              chunk_rows=chunk_rows, shard_rows=shard_rows, dry_run=dry_run, image_size=image_size,
                              form=form, feature_compression=feature_compression, force=force)
            for t, c in zip(teachers, checkpoints)]
    results = precompute_many(reqs, workers=workers, scheduler=scheduler,
                              progress=row_progress(f"precompute {', '.join(teachers)}"),
                              warn=lambda msg: click.echo(f"Warning: {msg}", err=True))
    for result in results:
        for line in result.lines:
            click.echo(line, err=not dry_run)
    for result in results:
        click.echo(result.teacher_id)


@click.command("sizes")
@click.option("--teacher", default="resnet50", show_default=True, help="Architecture from `kdcache models`.")
@click.option("--classes", "num_classes", type=IntRange(min=1), default=1000, show_default=True,
              help="Classes of the data set (ImageNet-1k's by default).")
@click.option("--samples", type=IntRange(min=1), default=1_281_167, show_default=True,
              help="Training samples: rows a view (ImageNet-1k's by default).")
@click.option("--views", type=IntRange(min=1), default=100, show_default=True, help="Views a store holds.")
@click.option("--image-size", type=IntRange(min=1), default=224, show_default=True,
              help="Side of the views, which sets the last-block map's size.")
@click.option("--topk", "ks", type=IntRange(min=1), multiple=True, default=(10, 100), show_default=True,
              help="The K of the top-K options to list (repeat for several).")
def sizes_cmd(teacher: str, num_classes: int, samples: int, views: int, image_size: int,
              ks: tuple[int, ...]) -> None:
    """Bytes a row, a view and a store, and files a view, of every store option, before any data exists.

    Arithmetic from the store format (no data, checkpoint or weights needed): dense and top-K logits, with no,
    pooled or spatial features in float16 or int8, beside TinyViT's published figures. `precompute --dry-run`
    states the same for the one store it would write.
    """
    from kdcache.pipelines.sizes import teacher_store_sizes
    from kdcache.store.sizes import size_table

    rows = teacher_store_sizes(teacher, num_classes, samples, views, image_size, ks)
    click.echo(f"{teacher}, {num_classes} classes, {samples:,} samples, {views} views at {image_size} px; "
               "before compression")
    click.echo("\n".join(size_table(rows, samples, views)))


COMMANDS = (train_teacher_cmd, precompute_cmd, sizes_cmd)
