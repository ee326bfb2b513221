"""Running as one rank of a ``torchrun`` job: the process group and what the ranks must agree on.

torchrun starts N copies of the same command and tells each one its place through
the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). With ``WORLD_SIZE`` > 1, :func:`process_group` joins the group
(gloo on CPU; NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``) and leaves it when the
work ends, also on an error; without torchrun it yields a single-process context
and touches nothing, so a plain run behaves exactly as before.

The helpers on :class:`DistContext` are no-ops for a single process: rank 0's
decisions handed to every rank (:meth:`~DistContext.on_main`), means over ranks,
and the DDP wrapper.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdcache.errors import KdcacheError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``world == 1`` is a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False      # this context started the process group and so ends it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (a new tensor); ``tensor`` itself for a single process."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (any picklable object), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 alone and hand its result, or its :class:`KdcacheError`, to every rank.

        What only rank 0 may do (checking and writing the run directory, evaluating)
        goes through here, so a refusal stops every rank with the same line instead of
        leaving the others waiting in a collective.
        """
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except KdcacheError as exc:
                box[0] = ("error", exc)
            except Exception as exc:
                failure = exc
                box[0] = ("error", KdcacheError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        status, value = box[0]
        if status == "error":
            raise value
        # rank 0's fn() result, pickled across the group: the type fn declares
        return cast(T, value)

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` in :class:`DistributedDataParallel` (gradients averaged over ranks); itself for one process.

        DDP broadcasts rank 0's parameters and buffers when it is built, and rank 0's
        buffers (batch-norm running statistics) before every forward pass; batch-norm
        normalises each rank's slice with that slice's statistics (no SyncBatchNorm).
        """
        if not self.distributed:
            return module
        return DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)


def split_batch(batch_size: int, world: int, minimum: int = 1) -> int:
    """Each rank's share of a global batch of ``batch_size``: the ranks take equal, contiguous slices of at least
    ``minimum`` rows (training asks 2: BatchNorm cannot train on one sample a rank)."""
    if batch_size % world:
        raise KdcacheError(f"--batch-size {batch_size} does not split evenly over {world} ranks; use a multiple "
                           f"of {world} (it is the global batch: each rank takes an equal slice of it)")
    if batch_size // world < minimum:
        raise KdcacheError(f"--batch-size {batch_size} over {world} ranks leaves {batch_size // world} a rank, and "
                           f"training needs at least {minimum} (BatchNorm); use at least {minimum * world}")
    return batch_size // world


def init_from_env(device: torch.device) -> DistContext:
    """Join the torchrun job described by the environment; a single-process context without one.

    ``device`` is the device the run asked for: its type picks the backend (gloo for
    CPU, NCCL for CUDA); on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        raise KdcacheError(f"WORLD_SIZE={world} but RANK or LOCAL_RANK is missing; start distributed runs with "
                           "torchrun") from None
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise KdcacheError(f"rank {rank} has LOCAL_RANK {local_rank} but this machine has "
                               f"{torch.cuda.device_count()} GPUs; start at most that many ranks a node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise KdcacheError(f"distributed runs use cpu or cuda devices, not {device.type}")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, dist.get_backend(), device, owns)


def teardown(ctx: DistContext) -> None:
    """Leave the process group that :func:`init_from_env` joined (nothing for a single process)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistContext]:
    """:func:`init_from_env` for the duration of a ``with`` block, left again however the block ends."""
    ctx = init_from_env(device)
    try:
        yield ctx
    finally:
        teardown(ctx)
