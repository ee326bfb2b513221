"""Run ``kdcache ARGS...`` as one rank of a torchrun job and record what this rank did (for test_ddp.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py RECORD_DIR distill ... --out RUN

Writes ``RECORD_DIR/rank<RANK>.pt``: the sample ids of every step this rank trained
on, every path under RUN that it opened for writing, created, renamed or removed,
and its student's parameters at the end. The command itself runs unchanged through
the CLI; only ``distill`` is wrapped to watch its steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import kdcache.pipelines.distill as distill_pipeline  # the CLI imports distill from it when it runs
from kdcache.cli.main import main

record_dir, args = Path(sys.argv[1]), sys.argv[2:]
run_dir = os.path.abspath(args[args.index("--out") + 1])
steps: list[tuple[int, int, list[int]]] = []
writes: list[str] = []
params: dict[str, torch.Tensor] = {}


def audit(event: str, a: tuple) -> None:
    if event == "open":
        path, mode, flags = a
        writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir"):  # os.replace raises os.rename
        path, writing = a[0], True
    else:
        return
    if writing and isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path == run_dir or path.startswith(run_dir + os.sep):
            writes.append(path)


real_distill = distill_pipeline.distill


def watched_distill(req, **kw):
    result = real_distill(req, on_step=lambda r: steps.append((r.epoch, r.step, r.indices.tolist())), **kw)
    params.update({k: v.detach().clone() for k, v in result.student.named_parameters()})
    return result


distill_pipeline.distill = watched_distill
sys.addaudithook(audit)
try:
    main(args, prog_name="kdcache")
finally:
    record_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"steps": steps, "writes": writes, "params": params},
               record_dir / f"rank{os.environ.get('RANK', '0')}.pt")
