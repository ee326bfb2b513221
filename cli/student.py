"""``kdcache distill``, ``kdcache eval`` and ``kdcache methods``: train and judge students.

torch and the pipelines are imported inside the commands, so that `--help` and usage
errors answer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kdcache import defaults
from kdcache.cli.common import (MAX_PREFETCH, MAX_THREADS, FiniteFloatRange, IntRange, TemperatureType, best_text, cache_option,
                                data_root_option, device_option, eval_every_option, image_size_option,
                                milestones_option, recipe_option, tensorboard_option)
from kdcache.store.form import MAX_TEMPERATURE, MIN_TEMPERATURE

if TYPE_CHECKING:
    from kdcache.losses import MethodParam


@click.command("methods")
@click.argument("name", required=False)
def methods(name: str | None) -> None:
    """List the distillation methods (plug-ins' included) with their own options; NAME shows one in full."""
    from kdcache.losses import method_class, method_names

    for method in [name] if name else method_names():
        cls = _method_class(method, method_class, method_names)
        info = cls.info
        click.echo(f"{method:<12} teachers {info.n_teachers:<2} {info.description}")
        for p in cls.params:
            choices = f" [{'|'.join(p.choices)}]" if p.choices else f" {p.kind.__name__.upper()}"
            click.echo(f"    {p.flag}{choices}  {p.help} (default: {p.default})")


_METHOD_OPTIONS_HELP = ("Each method's own options (e.g. camkd's --camkd-weights, aekd's --aekd-cap) follow --method; "
                        "`kdcache methods` lists them.")


@click.command("distill", epilog=_METHOD_OPTIONS_HELP,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--student", required=True, help="Student architecture, from `kdcache models`.")
@click.option("--teachers", "teachers", multiple=True, required=True, metavar="ID",
              help="A teacher store id or unique prefix (repeat for several), from `kdcache cache ls`.")
@click.option("--method", required=True, metavar="NAME",
              help="Distillation method, from `kdcache methods` (ce, kd, fitnet, aver, fitnet-mkd, ebkd, aekd, camkd "
                   "and those of installed plug-ins).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory: config.json, metrics.jsonl, checkpoint.pth, best.pth, last.pth.")
@cache_option
@click.option("--dataset", default=None, help="Data set [default: the one the stores were computed on].")
@data_root_option
@click.option("--epochs", type=int, default=defaults.EPOCHS, help="Training epochs (official: 240).")
@click.option("--batch-size", type=int, default=defaults.BATCH_SIZE, help="Batch size (official: 64).")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 0.05; 0.01 for MobileNetV2, ShuffleV1, ShuffleV2 students].")
@milestones_option
@click.option("--momentum", type=float, default=defaults.MOMENTUM, help="SGD momentum (Nesterov).")
@click.option("--weight-decay", type=float, default=defaults.WEIGHT_DECAY, help="Weight decay.")
@click.option("--temperature", "-T", type=TemperatureType(), default=defaults.TEMPERATURE, show_default=True,
              help="Distillation temperature T (a top-K store serves only the T it was precomputed at); from "
                   f"{MIN_TEMPERATURE:.3g} to {MAX_TEMPERATURE:.3g}, where T² stays a finite float32.")
@click.option("--gamma", type=float, default=1.0, help="Weight of the cross-entropy term.")
@click.option("--alpha", type=float, default=None, help="Weight of the KD term [default: the method's].")
@click.option("--beta", type=float, default=None,
              help="Weight of the feature term [default: the method's: fitnet 100, fitnet-mkd 100, camkd 50].")
@click.option("--seed", type=int, default=0, help="Seed of the student's weights and of the batch order.")
@device_option
@click.option("--amp", is_flag=True, help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")
@click.option("--prefetch", type=IntRange(1, MAX_PREFETCH), default=2,
              help=f"Chunk blocks read ahead of the training step, each held in memory (1 to {MAX_PREFETCH}).")
@click.option("--read-threads", type=IntRange(1, MAX_THREADS), default=None,
              help="Threads decoding the stores' chunks [default: the cores this process may use].")
@click.option("--resident-share", type=FiniteFloatRange(0, 1), default=defaults.VIEW_SHARE, show_default=True,
              help="Hold each view whole on the device (the next read in the background) when the views held at "
                   "once fit in this share of its free memory (on the CPU, of the memory available); 0 streams "
                   "block by block. Same batches either way.")
@click.option("--online", is_flag=True, help="Run the recorded teacher checkpoints live instead of reading stores.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.pth.")
@click.option("--force", is_flag=True, help="Replace the run in --out (without it, an existing run is refused).")
@eval_every_option
@tensorboard_option
@click.pass_context
def distill_cmd(ctx: click.Context, student: str, teachers: tuple[str, ...], method: str, out: Path,
                cache: Path | None, dataset: str | None, data_root: Path | None, epochs: int, batch_size: int,
                lr: float | None, lr_milestones: list[int] | None, momentum: float, weight_decay: float,
                temperature: float, gamma: float, alpha: float | None, beta: float | None, seed: int,
                device: str | None, amp: bool, prefetch: int, read_threads: int | None, resident_share: float,
                online: bool, resume: bool, force: bool, eval_every: int, tensorboard: Path | None) -> None:
    """Train a student from cached teacher stores with CA-MKD or a baseline.

    Under `torchrun --nproc_per_node N $(command -v kdcache) distill ...` it trains data-parallel on N ranks:
    --batch-size is the global batch (a multiple of N), rank 0 writes the run directory and prints.
    """
    from kdcache.distributed import DistContext
    from kdcache.losses import MethodOptions, method_class, method_names
    from kdcache.pipelines.distill import DistillRequest, EpochMetrics, distill

    cls = _method_class(method, method_class, method_names)
    options = MethodOptions(temperature=temperature, gamma=gamma, alpha=alpha, beta=beta,
                            params=_parse_method_options(ctx, method, cls.params))
    req = DistillRequest(student=student, teachers=list(teachers), method=method, out=out, cache=cache,
                         dataset=dataset, data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, milestones=lr_milestones, seed=seed,
                         device=device, resume=resume, force=force, online=online, amp=amp, prefetch=prefetch,
                         read_threads=read_threads, resident_share=resident_share, options=options,
                         eval_every=eval_every, tensorboard=tensorboard)

    def report(m: EpochMetrics) -> None:
        terms = "  ".join(f"{k} {v:.4f}" for k, v in m.train.items())
        weights = "" if m.teacher_weights is None else "  w " + "/".join(f"{w:.2f}" for w in m.teacher_weights)
        click.echo(f"epoch {m.epoch:>3}/{epochs}  {terms}{weights}  {m.test_text}  lr {m.lr:.4g}  {m.seconds:.1f}s",
                   err=True)

    def started(ctx: DistContext) -> None:
        if ctx.distributed:
            click.echo(f"distributed: {ctx.world} ranks, backend {ctx.backend}", err=True)

    result = distill(req, on_epoch=report, on_start=started)
    if result.is_main:  # under torchrun, rank 0 alone reports
        click.echo(f"{best_text(result.best_top1)}; run in {result.out}", err=True)
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
@click.option("--batch-size", type=IntRange(min=1), default=256, help="Evaluation batch size.")
def eval_cmd(arch: str, checkpoint: Path, dataset: str, data_root: Path | None, recipe: str | None,
             image_size: int | None, device: str | None, batch_size: int) -> None:
    """Print a checkpoint's top-1 and top-5 accuracy on the test split, on the test-time view of the recipe the
    model was trained with (give the same --recipe / --image-size as to train-teacher)."""
    from kdcache.pipelines.evaluate import evaluate_checkpoint

    top1, top5 = evaluate_checkpoint(arch, checkpoint, dataset, data_root, device, batch_size, recipe, image_size)
    click.echo(f"top-1 {top1:.2f}%  top-5 {top5:.2f}%")


def _method_class(name: str, method_class: Any, method_names: Any) -> Any:
    """The registered method ``name``, or click's usage error (exit 2) naming the known ones."""
    if name not in method_names():
        raise click.BadParameter(f"{name!r} is not one of {', '.join(map(repr, method_names()))} (`kdcache methods`)",
                                 param_hint="'--method'")
    return method_class(name)


def _parse_method_options(ctx: click.Context, method: str, params: "tuple[MethodParam, ...]") -> dict[str, Any]:
    """The options after ``--method`` that belong to the method, parsed by click against what the method
    declares; anything else is a usage error naming what the method takes."""
    if not ctx.args:
        return {}
    options: list[click.Parameter] = [click.Option([f"{p.flag}/--no-{p.flag[2:]}"] if p.kind is bool else [p.flag], default=None,
                            type=None if p.kind is bool else click.Choice(p.choices) if p.choices else p.kind,
                            help=p.help) for p in params]
    parser = click.Command(f"{ctx.command_path} --method {method}", params=options, add_help_option=False)
    takes = ", ".join(p.flag for p in params) or "no options of its own"
    try:
        sub = parser.make_context(parser.name, list(ctx.args), parent=ctx)
    except click.NoSuchOption as exc:
        raise click.UsageError(f"no such option: {exc.option_name} (distill's options are in `kdcache distill "
                               f"--help`; method {method} takes {takes})", ctx=ctx) from None
    except click.UsageError as exc:
        raise click.UsageError(f"{exc.format_message()} (method {method} takes {takes})", ctx=ctx) from None
    return {p.name: sub.params[p.name] for p in params if sub.params.get(p.name) is not None}


COMMANDS = (methods, distill_cmd, eval_cmd)
