"""Damaged stores, generated: does every check end in a clean one-line error, and does none call a damaged store fine?

A base cache is built once from the library, without a teacher network: one plan (2 views of 40 rows, the digits
recipe, a made-up fingerprint) and three complete stores on it, each with a content id of its attributes:

- ``dense``: dense logits, pooled float16 features, one 16-row chunk a file;
- ``compact``: top-3 logits at T=4, spatial int8 features (8x2x2), 8-row chunks in 16-row shards;
- ``bare``: dense logits without features.

Each case copies the base cache, applies one damage drawn by hypothesis, and runs three checks in this process:
``kdcache cache verify`` and ``kdcache cache ls`` (click's CliRunner on kdcache.cli.main:main: the command line's own
code path, its error boundary included) and the distill path (``Cache.open_for_reading`` of every store, the plan
as :class:`kdcache.cached.CachedTeachers` opens it, then every row of every view, the heads and the plan's views
and labels read as distill reads them). Damages:

- ``attr``: one key of a node's zarr.json (the store's or the plan's group attributes, or any array's metadata:
  shape, data_type, chunk_grid, fill_value, codecs, ...) deleted, set to a value of another type, set to another
  int (for ints), or set to another node's id (for strings);
- ``delete`` / ``truncate`` / ``flip``: any file of a store or of the plan (zarr.json of any node, chunk and shard
  files, completion markers) deleted, cut to a shorter length, or one byte of it flipped;
- ``replace``: a store's folder replaced by a regular file, by a symbolic link that loops, or by an empty folder.

Outcome of each check: ``error`` (a clean refusal: one ``Error:`` line and status 1 from the commands, a
KdcacheError from the library), ``unexpected`` (the "failed unexpectedly" line, a traceback, or any other
exception: a failure), or ``accepted`` (status 0 / no error). Whether acceptance is a failure is decided by an
oracle, not by a list: the distill path is run and its result compared with the base cache's. A damage is
*harmless* when that path succeeds with every value it reads equal to the base's (the rows of every data array,
the heads, the plan's order, parameters and labels, and what distill takes from the attributes: each store's
form, classes, feature shape and chunk rows, the plan's classes, recipe and fingerprint). What that makes
harmless, honestly: informational attributes (``created``, versions, ``test_accuracy``, the checkpoint's ``path``,
the store's ``dataset`` name), ``feature_compression`` set to the other valid value (the features array's own
codecs decide how it is read), a codec parameter that decompression reads from the chunk's own header (Blosc's
clevel, cname, shuffle, typesize), ``creating`` set to anything but true on a complete store. The plan's data
set *name* is left out of the comparison: distill loads the data set by that name and refuses it unless its content
fingerprint (part of the plan id, which is checked) matches, so a changed name is refused downstream.

Failures counted: ``unexpected`` in any check; ``accepted`` by verify or by the distill path when the damage is not
harmless; ``accepted`` by ls when the damage is to metadata (a zarr.json or an attribute) and not harmless. ls is
cheap by design: it reads metadata only, so damage to chunk contents, shard files or completion markers is left
to verify and to the reader (both of which must catch it), and is reported as ``ls: left to verify``.

    python benchmarks/damage_fuzz.py --cases 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

KINDS = ("attr", "delete", "truncate", "flip", "replace")
V, N, C = 2, 40, 10
UNEXPECTED = "kdcache failed unexpectedly"


# -- the base cache ---------------------------------------------------------------------------------------


def build_base(root: Path) -> dict[str, str]:
    """A plan and three complete stores under ``root`` (a cache folder); their ids by name (``plan``, ``dense``,
    ``compact``, ``bare``)."""
    from kdcache.store import Cache, PlanStore, StoreForm, TeacherStore
    from kdcache.store.ids import plan_id, teacher_id
    from kdcache.store.layout import StoreShape
    from kdcache.views import view_drawer

    cache = Cache.at(root)
    cache.ensure_writable()
    recipe = {"name": "crop-flip", "pad": 4, "size": 32}
    fingerprint = "f" * 64
    pid = plan_id(fingerprint, recipe, V, 0)
    labels = (np.arange(N) % C).astype(np.int32)
    PlanStore.create(cache.plan_path(pid), cache.lock_path("plan", pid), pid,
                     {"dataset": {"name": "digits", "n_samples": N, "n_classes": C, "fingerprint": fingerprint},
                      "recipe": recipe, "seed": 0}, V, labels, view_drawer("crop-flip", N, 0))
    ids = {"plan": pid}
    rng = np.random.default_rng(0)
    forms = {"dense": (StoreForm(), 64, None, 16, None),
             "compact": (StoreForm("topk:3", "spatial", "int8", temperature=4.0), 8, (8, 2, 2), 8, 16),
             "bare": (StoreForm("dense", "none"), 16, None, 16, None)}
    for name, (form, dim, spatial, rows, shards) in forms.items():
        sha = f"{name:0<64}"[:64]
        tid = teacher_id(pid, "resnet8", sha, form)
        shape = StoreShape(V, N, C, dim, spatial)
        teacher = {"plan_id": pid, "arch": "resnet8", "checkpoint": {"path": f"/nowhere/{name}.pth", "sha256": sha},
                   "dataset": "digits"}
        store = TeacherStore.create(cache.teacher_path(tid), tid, form, shape, teacher,
                                    torch.from_numpy(rng.standard_normal((C, dim)).astype(np.float32)),
                                    torch.from_numpy(rng.standard_normal(C).astype(np.float32)),
                                    chunk_rows=rows, shard_rows=shards)
        fshape = shape.feature_shape(form)
        for v in range(V):
            for s in range(store.shards_per_view):
                part = store.shard_rows_of(s)
                n = part.stop - part.start
                logits = rng.standard_normal((n, C)).astype(np.float16)
                feats = rng.standard_normal((n, *fshape)).astype(np.float16) if form.has_features else None
                store.write_shard(v, s, logits, feats, [1] * len(store.shard_chunks(s)), labels[part])
        store.mark_complete(test_accuracy=10.0)
        ids[name] = tid
    return ids


# -- the checks -------------------------------------------------------------------------------------------


def run_command(*args: str, listing: bool = False) -> tuple[str, str]:
    """``kdcache ARGS`` through the command line's own code (CliRunner, in this process): (outcome, its text).
    ``listing``: ``cache ls``, whose status 0 is acceptance only when every store it lists is ``complete`` (each
    store of the base cache is; a row that says ``cut short`` or ``partial`` names the damage and its remedy)."""
    from click.testing import CliRunner

    from kdcache.cli.main import main

    try:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    except BaseException:  # an exception that escaped the command line's boundary
        return "unexpected", traceback.format_exc(limit=3).strip().splitlines()[-1]
    text = result.output
    if UNEXPECTED in text or "Traceback" in text:
        return "unexpected", text.strip().splitlines()[-1]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    if result.exit_code == 0:
        rows = result.stdout.splitlines()[1:]
        flagged = [r for r in rows if not r.rstrip().endswith("complete")]
        if listing and (flagged or len(rows) < 3):
            return "error", (flagged[0] if flagged else f"{len(rows)} stores listed").split("  ")[-1]
        return "accepted", ""
    if len(errors) != 1:
        return "unexpected", f"exit {result.exit_code} with {len(errors)} Error lines: {result.stderr[-300:]!r}"
    return "error", errors[0]


def read_like_distill(root: Path, ids: dict[str, str]) -> tuple[str, str, Any]:
    """The distill path: every store opened for reading (checked and locked), the plan as CachedTeachers opens it,
    then everything distill reads. (outcome, text, what was read)."""
    from kdcache.cached import open_plan
    from kdcache.errors import KdcacheError
    from kdcache.store import Cache

    cache = Cache.at(root)
    stores = []
    try:
        stores = [cache.open_for_reading(ids[name]) for name in ("dense", "compact", "bare")]
        plan = open_plan(cache, stores)
        seen: list[Any] = [plan.n_classes, plan.recipe, plan.attrs["dataset"]["fingerprint"], plan.labels]
        for v in range(plan.n_views):
            seen += list(plan.view(v))
        for s in stores:
            seen += [s.form, s.num_classes, s.feature_shape, s.chunk_rows, *(t.numpy() for t in s.head())]
            for v in range(s.n_views):
                logits, feats = s.read_rows(v, 0, s.n_samples)
                seen += [logits, feats]
        return "accepted", "", seen
    except KdcacheError as exc:
        return "error", str(exc).splitlines()[0], None
    except BaseException as exc:
        return "unexpected", f"{type(exc).__name__}: {str(exc)[:200]}", None
    finally:
        for s in stores:
            s.close()


def same(a: Any, b: Any) -> bool:
    """Whether two reads of the distill path hold the same values (NaN equal to NaN)."""
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape
                    and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")):
                return False
        elif x != y:
            return False
    return True


# -- damages ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    target: str  # the path (relative to the cache) damaged
    detail: str
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)
    harmless: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> bool:
        """Damage to metadata (a zarr.json, an attribute, a node replaced), which ls is expected to catch."""
        return self.kind in ("attr", "replace") or self.target.endswith("zarr.json")


OTHER_TYPES: list[Any] = ["x", 7, 2.5, True, None, [1, 2], {"a": 1}]


def files_of(root: Path) -> list[str]:
    """Every file of the plans and stores below ``root``, relative to it, in a stable order."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] in ("plans", "teachers"))


def damage(root: Path, ids: dict[str, str], draw: Callable[[Any], Any], st: Any) -> Case:
    """Apply one damage to the cache at ``root``, drawn with hypothesis' ``draw`` from strategies ``st``."""
    kind = draw(st.sampled_from(KINDS))
    if kind == "replace":
        name = draw(st.sampled_from(["dense", "compact", "bare"]))
        how = draw(st.sampled_from(["file", "symlink loop", "empty folder"]))
        folder = root / "teachers" / ids[name]
        shutil.rmtree(folder)
        if how == "file":
            folder.write_text("not a store")
        elif how == "symlink loop":
            folder.symlink_to(folder.name)
        else:
            folder.mkdir()
        return Case(kind, f"teachers/{ids[name]}", how)
    if kind == "attr":
        nodes = sorted(p.relative_to(root).as_posix() for p in root.rglob("zarr.json")
                       if p.relative_to(root).parts[0] in ("plans", "teachers"))
        target = draw(st.sampled_from(nodes))
        meta = json.loads((root / target).read_text())
        group = meta.get("node_type") == "group" and target.count("/") == 2  # a plan's or a store's own group
        holder = meta["attributes"] if group else meta
        if not holder:
            holder, group = meta, False
        key = draw(st.sampled_from(sorted(holder)))
        old = holder[key]
        actions = ["delete", "type"] + (["int"] if isinstance(old, int) and not isinstance(old, bool) else []) + (
            ["id"] if isinstance(old, str) else [])
        action = draw(st.sampled_from(actions))
        if action == "delete":
            del holder[key]
        elif action == "type":
            holder[key] = draw(st.sampled_from([t for t in OTHER_TYPES if type(t) is not type(old)]))
        elif action == "int":
            holder[key] = draw(st.sampled_from([old + 1, old - 1, 0, old * 2, -old]).filter(lambda x: x != old))
        else:
            holder[key] = draw(st.sampled_from([i for n, i in sorted(ids.items()) if i != old]))
        (root / target).write_text(json.dumps(meta))
        detail = f"{'attributes.' if group else ''}{key} {action}" + (
            "" if action == "delete" else f" -> {json.dumps(holder[key])[:40]}")
        return Case(kind, target, detail)
    target = draw(st.sampled_from(files_of(root)))
    path = root / target
    data = path.read_bytes()
    if kind == "delete":
        path.unlink()
        return Case(kind, target, "deleted")
    if kind == "truncate":
        size = draw(st.integers(0, max(0, len(data) - 1)))
        path.write_bytes(data[:size])
        return Case(kind, target, f"{len(data)} -> {size} bytes")
    at = draw(st.integers(0, max(0, len(data) - 1)))
    bit = draw(st.integers(0, 7))
    flipped = bytearray(data)
    if flipped:
        flipped[at] ^= 1 << bit
    path.write_bytes(bytes(flipped))
    return Case(kind, target, f"byte {at} bit {bit}")


# -- the run ----------------------------------------------------------------------------------------------


def judge(case: Case, base_read: Any, read: Any) -> None:
    """Fill ``case.harmless`` and ``case.failures`` from its outcomes (module docstring)."""
    case.harmless = case.outcomes["distill"][0] == "accepted" and same(base_read, read)
    for check, (outcome, text) in case.outcomes.items():
        if outcome == "unexpected":
            case.failures.append(f"{check}: unexpected: {text}")
        elif outcome == "accepted" and not case.harmless and (check != "ls" or case.metadata):
            case.failures.append(f"{check}: accepted while damaged")


def run_cases(n: int, seed: int = 0, work: Path | None = None, on_case: Callable[[Case], None] | None = None) -> list[Case]:
    """Generate ``n`` damaged copies of the base cache with hypothesis and check each; the cases, judged."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    own = work is None
    work = Path(tempfile.mkdtemp(prefix="kdcache-damage-")) if work is None else work
    base = work / "base"
    ids = build_base(base)
    outcome, text, base_read = read_like_distill(base, ids)
    assert outcome == "accepted", f"the base cache does not read: {text}"
    for command in (("cache", "verify"), ("cache", "ls")):
        assert run_command(*command, "--cache", str(base))[0] == "accepted", command
    cases: list[Case] = []
    counter = [0]

    @hypothesis_seed(seed)
    @settings(max_examples=n, phases=[Phase.generate], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: Any) -> None:
        counter[0] += 1
        root = work / f"case{counter[0]}"
        shutil.copytree(base, root, symlinks=True)
        try:
            case = damage(root, ids, data.draw, st)
            case.outcomes["verify"] = run_command("cache", "verify", "--cache", str(root))
            case.outcomes["ls"] = run_command("cache", "ls", "--cache", str(root), listing=True)
            outcome, text, read = read_like_distill(root, ids)
            case.outcomes["distill"] = (outcome, text)
            judge(case, base_read, read)
            cases.append(case)
            if on_case:
                on_case(case)
        finally:
            subprocess_safe_rmtree(root)

    one()
    if own:
        subprocess_safe_rmtree(work)
    return cases


def subprocess_safe_rmtree(path: Path) -> None:
    """Remove ``path`` whatever a damage left there (a symbolic link that loops, a file for a folder)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def summary(cases: list[Case], seconds: float) -> str:
    """The table the script prints: cases and outcomes per damage kind, the failures, the first few examples."""
    lines = [f"{len(cases)} cases in {seconds:.0f} s ({seconds / max(1, len(cases)):.2f} s a case)", ""]
    head = f"{'damage':<9} {'cases':>5} {'harmless':>8} {'verify err/acc/unexp':>21} {'ls err/acc/left/unexp':>22} " \
           f"{'distill err/acc/unexp':>22} {'failures':>8}"
    lines.append(head)
    for kind in (*KINDS, "all"):
        of = [c for c in cases if kind in ("all", c.kind)]
        if not of:
            continue

        def count(check: str) -> Counter[str]:
            return Counter(c.outcomes[check][0] for c in of)

        v, ls_, d = count("verify"), count("ls"), count("distill")
        left = sum(1 for c in of if c.outcomes["ls"][0] == "accepted" and not c.metadata and not c.harmless)
        lines.append(f"{kind:<9} {len(of):>5} {sum(c.harmless for c in of):>8} "
                     f"{v['error']:>7}/{v['accepted']:>4}/{v['unexpected']:>4}      "
                     f"{ls_['error']:>6}/{ls_['accepted'] - left:>4}/{left:>4}/{ls_['unexpected']:>4}   "
                     f"{d['error']:>8}/{d['accepted']:>4}/{d['unexpected']:>4}   {sum(bool(c.failures) for c in of):>8}")
    unexpected = [c for c in cases if any(f.split(": ")[1].startswith("unexpected") for f in c.failures)]
    accepted = [c for c in cases if any("accepted while damaged" in f for f in c.failures)]
    lines += ["", f"unexpected: {len(unexpected)} case(s); accepted while damaged: {len(accepted)} case(s)"]
    for c in (unexpected + accepted)[:8]:
        lines.append(f"  {c.kind} {c.target} ({c.detail}): {'; '.join(c.failures)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=500, help="damaged caches to generate [500]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="one line a case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.pop("KDCACHE_DEBUG", None)
    start = time.monotonic()

    def say(case: Case) -> None:
        if args.verbose:
            outcomes = " ".join(f"{k}={o}" for k, (o, _) in case.outcomes.items())
            print(f"{case.kind:<8} {case.target} ({case.detail}): {outcomes}{' FAIL' if case.failures else ''}",
                  flush=True)

    cases = run_cases(args.cases, args.seed, on_case=say)
    print(summary(cases, time.monotonic() - start))
    sys.exit(1 if any(c.failures for c in cases) else 0)


if __name__ == "__main__":
    main()
