"""Precompute throughput on a dask cluster: serial, 1 worker and 2 workers, same teacher and plan, one process.

    python benchmarks/precompute_workers.py --arch resnet8 --samples 4096 --views 8
    python benchmarks/precompute_workers.py --device cuda --json out.json   # serial against one worker per GPU

Each mode precomputes the same teacher over the same plan into a fresh cache (on CPU by default):
``serial`` is today's single process (torch's own intra-op threads, one writer
thread); ``N workers`` is ``--workers N``: a local dask cluster of N worker
processes, each with cpu_count // N torch threads. Two rates per mode:

- chunk phase: rows / seconds from the first chunk to the last marker (serial: the
  chunk loop; cluster: from submitting the tasks until the last one finishes, which
  includes each worker loading the data set and the teacher once);
- end to end: rows / seconds of the whole call (plan, model, cluster start and
  shutdown, test evaluation, marking complete).

With ``--device cuda`` the modes are serial (this process on the GPU) and the GPU cluster with one
worker per GPU (``--workers`` = every GPU, each worker pinned to its own by ``CUDA_VISIBLE_DEVICES``).

Modes alternate within each round so that drift on a shared machine hits all alike; medians reported.

``--probe`` instead times the teacher's bare forward pass (batch 256, random input)
in this process's main thread and in a second thread, alternating: a dask worker
runs its tasks in a thread, the serial path in the main thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common import fake_cifar100, machine
from kdcache.models import build_model
from kdcache.pipelines import precompute as pc
from kdcache.pipelines import precompute_cluster as pcc

def modes(device: str, workers: list[int] | None) -> list[tuple[str, int | None]]:
    """(name, workers) of each mode: serial first, then each cluster size (default 1 and 2 on CPU, every GPU on CUDA)."""
    if workers is None:
        workers = [torch.cuda.device_count()] if torch.device(device).type == "cuda" else [1, 2]
    return [("serial", None)] + [(f"{n} {'GPU ' if device.startswith('cuda') else ''}worker{'s' if n > 1 else ''}", n)
                                 for n in workers]


@torch.inference_mode()
def bare_forward(model: torch.nn.Module, x: torch.Tensor, steps: int = 8) -> float:
    """Images per second of ``steps`` forward passes (after one warm-up)."""
    model(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * len(x) / (time.perf_counter() - t0)


def probe(arch: str, batch: int, rounds: int) -> None:
    """The bare forward pass in the main thread and in another thread of this process."""
    model = build_model(arch, 100).eval()
    x = torch.randn(batch, 3, 32, 32)
    main_rates, thread_rates = [], []
    for _ in range(rounds):
        main_rates.append(bare_forward(model, x))
        out: list[float] = []
        t = threading.Thread(target=lambda: out.append(bare_forward(model, x)))
        t.start()
        t.join()
        thread_rates.append(out[0])
    print(f"machine: {machine()}")
    print(f"{arch} bare forward, batch {batch}, {torch.get_num_threads()} threads, {rounds} rounds (medians): "
          f"main thread {statistics.median(main_rates):.0f} img/s, other thread "
          f"{statistics.median(thread_rates):.0f} img/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet8")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda (the GPU cluster: one worker per GPU).")
    ap.add_argument("--workers", type=int, nargs="+", help="Cluster sizes (default: 1 2 on CPU, every GPU on CUDA).")
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    ap.add_argument("--probe", action="store_true", help="time the bare forward pass in the main thread and another")
    args = ap.parse_args()
    if args.probe:
        probe(args.arch, args.batch_size, max(args.rounds, 3))
        return

    phase: list[float] = []

    def timed(original: Callable[..., None]) -> Callable[..., None]:
        def run(*a: Any, **kw: Any) -> None:
            t0 = time.perf_counter()
            original(*a, **kw)
            phase.append(time.perf_counter() - t0)
        return run

    pc.write_chunks = timed(pc.write_chunks)   # the serial chunk loop (workers import their own, untimed)
    pcc.run_tasks = timed(pcc.run_tasks)       # submit to last task done

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = fake_cifar100(tmp / "data", args.samples)
        ckpt = tmp / "teacher.pth"
        torch.save({"model": build_model(args.arch, 100).state_dict()}, ckpt)
        rows = args.samples * args.views
        mode_list = modes(args.device, args.workers)
        chunk_rate: dict[str, list[float]] = {m: [] for m, _ in mode_list}
        total_rate: dict[str, list[float]] = {m: [] for m, _ in mode_list}
        ids = set()
        for r in range(args.rounds):
            for mode, workers in mode_list:
                req = pc.PrecomputeRequest(teacher=args.arch, checkpoint=ckpt, dataset="cifar100", data_root=root,
                                           cache=tmp / f"cache-{r}-{workers}", views=args.views,
                                           batch_size=args.batch_size, device=args.device)
                phase.clear()
                t0 = time.perf_counter()
                [done] = pc.precompute_many([req], workers=workers)
                total_rate[mode].append(rows / (time.perf_counter() - t0))
                chunk_rate[mode].append(rows / phase[0])
                ids.add(done.teacher_id)
        assert len(ids) == 1
        print(f"machine: {machine()}, {pcc._cpu_count()} CPUs")
        print(f"teacher {args.arch}, {args.views} views x {args.samples} samples = {rows} rows, batch {args.batch_size}, "
              f"{args.rounds} rounds (medians)")
        base = statistics.median(chunk_rate["serial"])
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": args.device, "arch": args.arch,
                  "rows": rows, "modes": {}}
        for mode, workers in mode_list:
            rate, total = statistics.median(chunk_rate[mode]), statistics.median(total_rate[mode])
            print(f"{mode:<13} chunk phase {rate:8.1f} rows/s  ratio to serial {rate / base:.3f}  "
                  f"end to end {total:8.1f} rows/s  (rounds: {', '.join(f'{x:.0f}' for x in chunk_rate[mode])})")
            result["modes"][mode] = {"workers": workers, "chunk_rows_s": rate, "total_rows_s": total,
                                     "chunk/serial": rate / base}
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
