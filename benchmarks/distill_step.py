"""Distill step times in steady state, side by side: the student alone, the method from memory, from the
stores, and with live teachers.

    python benchmarks/distill_step.py                 # 3 x resnet32x4 -> vgg8, batch 64, 50,000 CIFAR-shaped samples
    python benchmarks/distill_step.py --rounds 5 --steps 300 --json out.json
    python benchmarks/distill_step.py --device cuda --batch-size 64 256   # both batches on the same stores
    python benchmarks/distill_step.py --memory --no-steps   # peak RSS of distill over V and 4V views

Four timings of one training step, all through the same distill pipeline, in one process:

- t_student:  a plain ``ce`` step (student forward, backward, SGD step);
- t_resident: the method, with every teacher row already in memory (the stores' chunks read and
  decompressed before timing): the bound for reading;
- t_cached:   the method, teacher rows streamed from the stores while the student trains;
- t_views:    the method, each view read whole into memory before its epoch (``--resident-share``), batches
  gathered there;
- t_online:   the method, the teachers run live on the same views.

For each ``--rows`` entry (method and feature form: camkd on pooled stores, camkd on spatial stores
(the official last-block maps, the student's map aligned by 1x1 conv + BN + ReLU), aver) the report
gives t_cached / t_resident (the cache's own cost) and t_online / t_cached (what the cache saves).

Steady state: the view holds ``--samples`` rows (50,000 by default, CIFAR-100-shaped), so the timed
steps read many chunks while the student trains (pooled float16 resnet32x4 rows: 4,096 a chunk, a chunk
every 64 steps at batch 64; spatial: 64 rows a chunk, a chunk per step), and the method sees epoch 2
(camkd's feature term acts from its second epoch). A step's time is the median interval between
consecutive steps after ``--warmup`` steps; each round runs every condition once, in the same order,
and the report gives the median over ``--rounds`` rounds and the range.

The teachers are resnet32x4 of random weights. Their stores are written by the precompute pipeline
with the forward pass replaced by random outputs of the teacher's shapes (normal logits, ReLU'd normal
features), since running resnet32x4 over 50,000 images on a CPU takes an hour and the values do not
change the cost of a student step. t_online runs the real teachers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fake_cifar100, machine, random_checkpoint  # noqa: E402
from readers import compressed_chunks, decode_bound  # noqa: E402

import kdcache.pipelines.distill as distill_mod  # noqa: E402
import kdcache.pipelines.precompute_engine as precompute_mod  # noqa: E402
from kdcache.data import load_dataset  # noqa: E402
from kdcache.pipelines.distill import DistillRequest, distill  # noqa: E402
from kdcache.pipelines.precompute import PrecomputeRequest, ensure_plan, precompute  # noqa: E402
from kdcache.store import Cache, TeacherStore, plan_id, teacher_id  # noqa: E402
from kdcache.store.form import FeatureCompression, FeatureForm, StoreForm  # noqa: E402
from kdcache.store.layout import StoreShape, chunk_rows_for  # noqa: E402
from kdcache.stream import TeacherStream  # noqa: E402
from kdcache.views import get_recipe  # noqa: E402

ROWS = ("camkd:pooled", "camkd:spatial", "aver:pooled")


class _Enough(Exception):
    """Raised from the step callback once the timed steps are done: the run stops there."""


@contextlib.contextmanager
def random_teacher_outputs(seed: int = 0) -> Iterator[None]:
    """Precompute with the teacher's forward replaced by random float16 outputs of its shapes."""
    real = precompute_mod.forward_batch
    shapes: dict[int, tuple[tuple[int, ...], ...]] = {}
    gen = torch.Generator().manual_seed(seed)

    def fake(model: torch.nn.Module, x: torch.Tensor, features: FeatureForm = FeatureForm.POOLED,
             amp: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if id(model) not in shapes:
            z, h = real(model, x[:1], features, amp)
            shapes[id(model)] = (tuple(z.shape[1:]), () if h is None else tuple(h.shape[1:]))
        zs, hs = shapes[id(model)]
        z = (3 * torch.randn(len(x), *zs, generator=gen)).to(torch.float16)
        h = None if features is FeatureForm.NONE else torch.randn(len(x), *hs, generator=gen).clamp_min(0).to(torch.float16)
        return z, h

    precompute_mod.forward_batch = fake
    try:
        yield
    finally:
        precompute_mod.forward_batch = real


Chunks = dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray | None]]


def read_every_chunk(cache: Path, ids: list[str]) -> Chunks:
    """Every chunk of the stores ``ids``, read and decompressed: (store id, view, chunk) -> (logits, features)."""
    stores = [Cache.at(cache).open_teacher(t) for t in ids]
    return {(s.id, v, c): s.read_chunk(v, c) for s in stores for v in range(s.n_views)
            for c in range(s.chunks_per_view)}


class _Done:
    """A read already done: what :meth:`TeacherStore.submit_rows` returns, served from memory."""

    def __init__(self, value: tuple[np.ndarray, np.ndarray | None]) -> None:
        self.value = value

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.value


@contextlib.contextmanager
def resident(held: Chunks) -> Iterator[None]:
    """Reads of the chunks in ``held`` served from memory (the rest of the reading path unchanged)."""
    real = TeacherStore.submit_rows

    def submit_rows(self: TeacherStore, v: int, start: int, stop: int, pool: Any = None) -> Any:
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        found = [held.get((self.id, v, c)) for c in range(first, last + 1)]
        parts = [p for p in found if p is not None]
        if len(parts) < len(found):
            return real(self, v, start, stop, pool) if pool is not None else real(self, v, start, stop)
        keep = slice(start - first * self.chunk_rows, stop - first * self.chunk_rows)
        z = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        h = None if parts[0][1] is None else (np.concatenate([p[1] for p in parts]) if len(parts) > 1
                                               else parts[0][1])
        return _Done((z[keep], None if h is None else h[keep]))

    TeacherStore.submit_rows = submit_rows  # type: ignore[method-assign]
    try:
        yield
    finally:
        TeacherStore.submit_rows = real  # type: ignore[method-assign]


@contextlib.contextmanager
def steady_epoch() -> Iterator[None]:
    """The method sees epoch e + 1 while the loop reads epoch e, so epoch 1 is timed as a later epoch."""
    real = distill_mod._Stepper.__call__

    def call(self: Any, batch: Any, epoch: int, live: Any) -> Any:
        return real(self, batch, epoch + 1, live)

    distill_mod._Stepper.__call__ = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        distill_mod._Stepper.__call__ = real  # type: ignore[method-assign]


def step_times(req: DistillRequest, warmup: int, steps: int) -> list[float]:
    """Seconds between consecutive steps ``warmup`` .. ``warmup + steps`` of the run's first epoch."""
    stamps: list[float] = []

    def on_step(_: object) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) > warmup + steps:
            raise _Enough

    with contextlib.suppress(_Enough), steady_epoch():
        distill(req, on_step=on_step)
    shutil.rmtree(req.out, ignore_errors=True)
    gaps = np.diff(stamps)[warmup:]
    if len(gaps) == 0:
        raise SystemExit(f"an epoch has {len(stamps)} steps, too few for --warmup {warmup}: raise --samples")
    return [float(g) for g in gaps]


def make_teachers(tmp: Path, root: Path, arch: str, k: int, views: int, dataset: str,
                  features: str = "pooled", random_outputs: bool = False, cache: Path | None = None) -> list[str]:
    """K teachers of random weights (seeds 0..K-1, the same checkpoints for every form) precomputed in
    ``features``; with ``random_outputs`` their stored rows are random (no forward pass is run)."""
    ids = []
    tmp.mkdir(parents=True, exist_ok=True)
    outputs = random_teacher_outputs() if random_outputs else contextlib.nullcontext()
    with outputs:
        for seed in range(k):
            ckpt = tmp / f"{arch}-{seed}.pth"
            if not ckpt.exists():
                random_checkpoint(ckpt, arch, 100 if dataset == "cifar100" else 10, seed)
            ids.append(precompute(PrecomputeRequest(teacher=arch, checkpoint=ckpt, dataset=dataset, data_root=root,
                                                    cache=cache or tmp / f"cache-{features}", views=views,
                                                    form=StoreForm(features=features.split("-")[0]), device="cpu",
                                                    feature_compression=FeatureCompression.NONE
                                                    if features.endswith("-raw") else FeatureCompression.ZSTD)
                                 ).teacher_id)
    return ids


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure_steps(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The stores written once, then for each ``--batch-size`` every condition once a round, ``args.rounds``
    rounds; per-round medians, then their median and range."""
    root = fake_cifar100(tmp / "data", args.samples)
    rows = [tuple(r.split(":")) for r in args.rows]
    forms = list(dict.fromkeys(form for _, form in rows))
    t0 = time.perf_counter()
    ids = {form: make_teachers(tmp, root, args.teacher, args.teachers, views=1, dataset="cifar100",
                               features=form, random_outputs=True) for form in forms}
    print(f"stores written in {time.perf_counter() - t0:.0f} s", flush=True)
    readers = {form: reader_table(tmp / f"cache-{form}", ids[form], args.reader_threads) for form in forms}
    for form, at in readers.items():
        for threads, r in at.items():
            print(f"reader alone, {form} stores, {threads} threads: {r['stream']:,.0f} rows/s of {args.teachers} "
                  f"teachers; decode bound {r['bound']:,.0f} rows/s ({r['stream'] / r['bound']:.2f})", flush=True)
    t0 = time.perf_counter()
    held = {key: chunk for form in forms for key, chunk in read_every_chunk(tmp / f"cache-{form}", ids[form]).items()
            } if args.rounds else {}
    print(f"resident copies read in {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict[str, Any] = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": str(args.device or "default"),
        "setting": {k: getattr(args, k) for k in ("teacher", "teachers", "student", "samples", "rounds", "steps",
                                                  "online_steps", "warmup")},
        "reader_rows_s": readers, "batches": {}}
    for batch in args.batch_size if args.rounds else []:
        result["batches"][str(batch)] = rounds_at(tmp, args, root, ids, held, rows, forms, batch)
    return result


def reader_rate(cache: Path, ids: list[str], threads: int | None = None, batch: int = 64) -> float:
    """Rows a second (each with every teacher's logits and features) that the stream delivers on ``threads``
    reader threads with nothing else running: the reading path's ceiling, which a GPU step must not outrun."""
    stores = [Cache.at(cache).open_teacher(t) for t in ids]
    stream = TeacherStream(Cache.at(cache).open_plan(stores[0].plan_id), stores, seed=0, read_threads=threads)
    t0, n = time.perf_counter(), 0
    for b in stream.epoch(1, batch):
        n += len(b.rows)
    return n / (time.perf_counter() - t0)


def reader_table(cache: Path, ids: list[str], threads: list[int]) -> dict[str, dict[str, float]]:
    """The stream's rows a second and the decode bound's (the same chunks' compressed bytes in memory, decoded
    by numcodecs: ``readers.decode_bound``) at each reader thread count; the bound counts the rows the stream
    delivers (an epoch's, less the dropped last batch, all of whose chunks it decodes)."""
    stores = [Cache.at(cache).open_teacher(t) for t in ids]
    held = compressed_chunks([Path(s.path) for s in stores])
    out = {}
    for t in threads:
        stream = reader_rate(cache, ids, t)
        out[str(t)] = {"stream": stream, "bound": stores[0].n_samples / decode_bound(held, t)}
    return out


def rounds_at(tmp: Path, args: argparse.Namespace, root: Path, ids: dict[str, list[str]], held: Chunks,
              rows: list[tuple[str, ...]], forms: list[str], batch: int) -> dict[str, Any]:
    """Every condition at ``batch``, once a round: the times (ms) and the ratios, per-round medians summarised."""
    common = dict(student=args.student, data_root=root, epochs=1, batch_size=batch, device=args.device, seed=0)

    def timed(name: str, r: int, method: str, form: str, steps: int, **extra: Any) -> float:
        req = DistillRequest(method=method, out=tmp / f"run-{r}-{name}", teachers=ids[form],
                             cache=tmp / f"cache-{form}", **common, **extra)
        t = statistics.median(step_times(req, args.warmup, steps))
        print(f"  batch {batch} round {r + 1} {name:<28} {t * 1e3:9.1f} ms/step", flush=True)
        return t

    per_round: dict[str, list[float]] = {}
    for r in range(args.rounds):
        per_round.setdefault("student", []).append(timed("student", r, "ce", forms[0], args.steps))
        for method, form in rows:
            key = f"{method} {form}"
            with resident(held):
                per_round.setdefault(f"{key} resident", []).append(
                    timed(f"{key} resident", r, method, form, args.steps, resident_share=0.0))
            per_round.setdefault(f"{key} cached", []).append(
                timed(f"{key} cached", r, method, form, args.steps, resident_share=0.0))
            if args.views_resident:
                # views whole in memory: a share high enough for the view beside this benchmark's own copies
                per_round.setdefault(f"{key} views", []).append(
                    timed(f"{key} views", r, method, form, args.steps, resident_share=0.9))
            if not args.no_online:
                per_round.setdefault(f"{key} online", []).append(
                    timed(f"{key} online", r, method, form, args.online_steps, online=True))
    out: dict[str, Any] = {"times_ms": {k: summary([t * 1e3 for t in v]) for k, v in per_round.items()},
                           "ratios": {}}
    for method, form in rows:
        key = f"{method} {form}"
        ratios = {"cached/resident": [c / s for c, s in zip(per_round[f"{key} cached"], per_round[f"{key} resident"])],
                  "resident/student": [s / b for s, b in zip(per_round[f"{key} resident"], per_round["student"])]}
        if args.views_resident:
            ratios["views/resident"] = [c / s for c, s in zip(per_round[f"{key} views"], per_round[f"{key} resident"])]
        if not args.no_online:
            ratios["online/cached"] = [o / c for o, c in zip(per_round[f"{key} online"], per_round[f"{key} cached"])]
        out["ratios"][key] = {k: summary(v) for k, v in ratios.items()}
    return out


def print_steps(result: dict[str, Any]) -> None:
    """The result as the markdown table RESULTS.md carries."""
    for batch, at in result["batches"].items():
        print_batch(result, int(batch), at)
    print("\nreader alone (the stream over the stores, nothing training), against the decode bound (the same "
          "chunks' compressed bytes in memory, decoded by numcodecs on as many threads)")
    print("| stores | threads | stream rows/s | decode bound rows/s | stream / bound |")
    print("|---|---|---|---|---|")
    for form, at in result["reader_rows_s"].items():
        for threads, r in at.items():
            print(f"| {form} | {threads} | {r['stream']:,.0f} | {r['bound']:,.0f} | **{r['stream'] / r['bound']:.2f}** |")
        first, last = list(at.values())[0], list(at.values())[-1]
        if len(at) > 1:
            print(f"| {form} | {' to '.join(list(at)[::len(at) - 1])} | **{last['stream'] / first['stream']:.2f}x** | "
                  f"{last['bound'] / first['bound']:.2f}x | |")


def print_batch(result: dict[str, Any], batch: int, at: dict[str, Any]) -> None:
    """One batch size's table."""
    s, t = result["setting"], at["times_ms"]
    print(f"\n{s['teachers']} x {s['teacher']} -> {s['student']}, batch {batch}, {s['samples']:,} "
          f"CIFAR-shaped samples, device {result['device']}; {s['rounds']} rounds of {s['steps']} timed steps "
          f"({s['online_steps']} online) after {s['warmup']}; medians over the rounds (min-max)")

    def ms(d: dict[str, float] | None) -> str:
        return "-" if d is None else f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})"

    def ratio(d: dict[str, float] | None) -> str:
        return "-" if d is None else f"**{d['median']:.3f}** ({d['min']:.3f}-{d['max']:.3f})"

    print(f"t_student (ce): {ms(t['student'])} ms")
    print("| row | t_resident ms | t_cached ms | t_views ms | t_online ms | t_cached / t_resident "
          "| t_views / t_resident | t_online / t_cached | t_resident / t_student |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in at["ratios"].items():
        print(f"| {key} | {ms(t[f'{key} resident'])} | {ms(t[f'{key} cached'])} | {ms(t.get(f'{key} views'))} | "
              f"{ms(t.get(f'{key} online'))} | {ratio(r['cached/resident'])} | {ratio(r.get('views/resident'))} | "
              f"{ratio(r.get('online/cached'))} | {ratio(r['resident/student'])} |")


RSS_PROBE = ("import resource, sys\n"
             "from kdcache.cli.main import main\n"
             "main(sys.argv[1:], standalone_mode=False)\n"
             "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")


def peak_rss_of_distill(cache: Path, ids: list[str], out: Path, epochs: int) -> int:
    """Peak resident set (KiB) of a fresh process running `kdcache distill`."""
    args = ["distill", "--student", "resnet8", "--method", "camkd", "--cache", str(cache), "--out", str(out),
            "--epochs", str(epochs), "--device", "cpu"]
    for t in ids:
        args += ["--teachers", t]
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1].split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="resnet32x4", help="Teacher architecture (random weights).")
    ap.add_argument("--student", default="vgg8", help="Student architecture.")
    ap.add_argument("--teachers", type=int, default=3, help="How many teachers.")
    ap.add_argument("--samples", type=int, default=50_000, help="CIFAR-100-shaped training images in the view.")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[64],
                    help="Batch size(s): each is timed in turn on the same stores (default: 64).")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when present).")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), metavar="METHOD:FORM",
                    help=f"Method and feature form of each row (default: {' '.join(ROWS)}).")
    ap.add_argument("--rounds", type=int, default=3,
                    help="Rounds; each runs every condition once (0: only the reader's ceiling).")
    ap.add_argument("--steps", type=int, default=200, help="Timed steps per condition and round.")
    ap.add_argument("--online-steps", type=int, default=12, help="Timed steps of t_online (live teachers are slow).")
    ap.add_argument("--warmup", type=int, default=5, help="Steps dropped at the start of each run.")
    ap.add_argument("--no-online", action="store_true", help="Skip t_online.")
    ap.add_argument("--no-views", dest="views_resident", action="store_false",
                    help="Skip t_views (the method on views held whole in memory, --resident-share's default).")
    ap.add_argument("--reader-threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="Reader thread counts of the reader's ceiling and its decode bound (default: 1 and every "
                         "core).")
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    ap.add_argument("--memory", action="store_true", help="Also measure peak RSS over V and 4V views (digits).")
    ap.add_argument("--no-steps", action="store_true", help="Skip the step times (with --memory).")
    args = ap.parse_args()
    for row in args.rows:
        if row.count(":") != 1 or row.split(":")[1] not in ("pooled", "spatial", "spatial-raw"):
            ap.error(f"--rows takes METHOD:FORM with FORM pooled, spatial or spatial-raw (the maps with "
                     f"--feature-compression none) (got {row!r})")

    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, Any] = {}
        if not args.no_steps:
            result = measure_steps(Path(tmp), args)
            print_steps(result)
        if args.memory:
            result["memory"] = measure_memory(Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def synthetic_stores(cache_root: Path, n_views: int, k: int, dim: int) -> list[str]:
    """K complete digits teacher stores of random float16 rows, ``dim`` features wide (no teacher is run)."""
    dataset = load_dataset("digits")
    recipe = get_recipe(dataset.recipe)
    pid = plan_id(dataset.fingerprint, recipe.description, n_views, 0)
    cache = Cache.at(cache_root)
    cache.ensure_writable()
    ensure_plan(cache, dataset, recipe, n_views, 0, pid)
    n, c = len(dataset.train), dataset.num_classes
    rng = np.random.default_rng(0)
    ids = []
    for t in range(k):
        tid = teacher_id(pid, "synthetic", f"{t:064x}")
        attrs = {"plan_id": pid, "arch": "synthetic", "dataset": "digits",
                 "checkpoint": {"path": "-", "sha256": f"{t:064x}"}}
        rows = chunk_rows_for(n, 2 * dim)
        store = TeacherStore.create(cache.teacher_path(tid), tid, StoreForm(), StoreShape(n_views, n, c, dim), attrs,
                                    torch.randn(c, dim) / dim ** 0.5, torch.zeros(c), chunk_rows=rows)
        for v, ch in store.pending():
            r = store.rows(ch)
            store.write_chunk(v, ch, rng.standard_normal((r.stop - r.start, c)).astype(np.float16),
                              np.abs(rng.standard_normal((r.stop - r.start, dim))).astype(np.float16), 0)
        store.mark_complete(test_accuracy=0.0, view_accuracy=0.0)
        ids.append(tid)
    return ids


def measure_memory(tmp: Path, v: int = 3, dim: int = 2048) -> dict[str, float]:
    """Peak RSS of a camkd distill over V views in V epochs against 4V views in 4V epochs.

    Two synthetic teachers with 2048-wide features (a resnet50's) make each view 5.9 MB a
    teacher, so the 4V run reads 4x the bytes of the V run: any accumulation would show.
    """
    results = []
    for views in (v, 4 * v):
        root = tmp / f"mem{views}"
        ids = synthetic_stores(root / "cache", views, 2, dim)
        rss = peak_rss_of_distill(root / "cache", ids, root / "run", views)
        read = sum(p.stat().st_size for p in (root / "cache" / "teachers").rglob("*") if p.is_file()) / 2**20
        results.append((views, rss / 1024, read))
    (v1, r1, b1), (v4, r4, b4) = results
    print(f"peak RSS, camkd resnet8 <- 2 synthetic teachers (D={dim}) on digits, one view per epoch: "
          f"{v1} views/epochs {r1:.0f} MiB (reads {b1:.0f} MiB of stores); {v4} views/epochs {r4:.0f} MiB "
          f"(reads {b4:.0f} MiB); ratio {r4 / r1:.3f}")
    return {"views": v1, "peak_rss_mib": r1, "views_4x": v4, "peak_rss_4x_mib": r4, "ratio": r4 / r1}


if __name__ == "__main__":
    main()
