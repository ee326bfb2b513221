"""A plan or a teacher store checked against its own description: every array its attributes promise present, of
the shape, chunks, shards, dtype, fill value and checksum they imply; its id the content hash of the attributes
that make it (:mod:`kdcache.store.ids`); a store's plan present and of the store's shape.

The one place these checks live: :func:`teacher_problems` and :func:`plan_problems`, called by
:class:`kdcache.store.cache.Cache` for ``cache ls`` (metadata only), ``cache verify``, distill's opening of its
stores (:meth:`kdcache.store.cache.Cache.open_for_reading`) and precompute (before it resumes a store or calls it
complete). Each problem is one sentence naming what disagrees; the callers
add the remedy (:class:`Problem`).

What is read: the attributes and each array's ``zarr.json`` (a few small files); with ``deep``, also the listing
of the plan's chunk files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec

from kdcache.store import format as fmt
from kdcache.store.chunks import ChunkLayout
from kdcache.store.form import LOGIT_STATS, FeatureCompression, StoreForm
from kdcache.store.ids import plan_id as make_plan_id
from kdcache.store.ids import teacher_id as make_teacher_id
from kdcache.store.layout import n_chunks
from kdcache.topk import index_dtype

if TYPE_CHECKING:
    from kdcache.store.plan import PlanStore
    from kdcache.store.teacher import TeacherStore

# What a problem is about, which decides its remedy: the store itself (remove it and precompute it again), its plan
# missing (precompute again redraws it), or its plan damaged (remove the plan's folder, then precompute again).
STORE, PLAN_MISSING, PLAN = "store", "plan missing", "plan"


@dataclass(frozen=True)
class Problem:
    """One way a store (or its plan) disagrees with its description: ``about`` one of STORE, PLAN_MISSING, PLAN."""

    about: str
    text: str
    said: bool = False  # the text ends in its remedy already

    def line(self, store_id: str, plan_where: Any) -> str:
        """The problem and its remedy, one line: a store is removed and precomputed again; a missing plan is redrawn
        by the precompute that made it; a damaged plan is removed first (``plan_where``: its folder)."""
        if self.said:
            return self.text
        if self.about == STORE:
            return f"{self.text}; remove it with `kdcache cache rm {store_id}` and precompute it again"
        if self.about == PLAN_MISSING:
            return (f"{self.text}; run the same `kdcache precompute` again to redraw it (a plan is a pure function of "
                    "its data set, recipe, views and seed)")

        return f"{self.text}; {fmt.plan_removal(plan_where)}"


class _Found(Exception):
    """A description check's first disagreement in one group of checks (the rest would only repeat it)."""


def _int(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _array(group: zarr.Group, name: str, what: str) -> zarr.Array[Any]:
    """Array ``name`` of ``group``, or _Found naming it missing or unreadable."""
    try:
        node = group[name]
    except KeyError:
        raise _Found(f"{what} has no {name} array ({name}/zarr.json is missing)") from None
    except Exception as exc:  # zarr's reading of a damaged zarr.json: JSON, key or value errors
        raise _Found(f"{what}: {name}/zarr.json is unreadable ({fmt.exc_line(exc)})") from None
    if not isinstance(node, zarr.Array):
        raise _Found(f"{what}: {name} is a group, not an array")
    return node


def _expect(array: zarr.Array[Any], name: str, what: str, shape: tuple[int, ...], dtype: str,
            chunks: tuple[int, ...] | None, shards: tuple[int, ...] | None, fill: float | int,
            reader: bool = False) -> None:
    """Raise _Found at the first of the array's shape, dtype, chunks, shards, fill value, key encoding and checksum
    that is not the one the description implies (``chunks`` None: any chunks of the right rank). ``reader``: a data
    array, which kdcache's own chunk reader must be able to decode."""
    got_shape = tuple(int(s) for s in array.shape)
    if got_shape != shape:
        raise _Found(f"{what}: {name} has shape {list(got_shape)}, its attributes say {list(shape)}")
    if np.dtype(array.dtype) != np.dtype(dtype):
        raise _Found(f"{what}: {name} holds {array.dtype}, its attributes say {dtype}")
    got_chunks = tuple(int(s) for s in array.chunks)
    if (got_chunks != chunks) if chunks is not None else (len(got_chunks) != len(shape) or min(got_chunks) < 1):
        raise _Found(f"{what}: {name} has chunks {list(got_chunks)}, its attributes say "
                     f"{list(chunks) if chunks is not None else 'chunks of its rank'}")
    got_shards = None if array.shards is None else tuple(int(s) for s in array.shards)
    if got_shards != shards:
        raise _Found(f"{what}: {name} has shards {list(got_shards) if got_shards else 'none'}, its attributes say "
                     f"{list(shards) if shards else 'none'}")
    fill_value: Any = array.metadata.fill_value
    if isinstance(fill, float) and math.isnan(fill):
        same_fill = bool(np.isnan(np.asarray(fill_value, dtype=np.float64)))
    else:
        same_fill = bool(fill_value == fill)
    if not same_fill:
        raise _Found(f"{what}: {name} has fill value {fill_value!r}, the format's is {fill!r}")
    if array.metadata.encode_chunk_key((0,) * len(shape)) != "/".join(["c"] + ["0"] * len(shape)):
        raise _Found(f"{what}: {name} names its chunk files otherwise than the format (chunk_key_encoding changed)")
    codecs = list(getattr(array.metadata, "codecs", ()))
    inner = list(codecs[0].codecs) if codecs and isinstance(codecs[0], ShardingCodec) else codecs
    if not inner or not isinstance(inner[-1], Crc32cCodec):
        raise _Found(f"{what}: {name}'s codecs end without the CRC32C checksum the format gives every chunk")
    if reader and ChunkLayout.of(array) is None:
        raise _Found(f"{what}: {name}'s codecs are not the format's (kdcache cannot decode its chunks)")


def teacher_problems(store: "TeacherStore", plan_of: Callable[[str], "PlanStore"] | None = None,
                     deep: bool = False) -> list[Problem]:
    """The ways ``store`` disagrees with its description (empty: none found), its own first; then, given
    ``plan_of`` (a plan id to its opened plan, raising StoreError), its plan's. ``deep``: also the plan's chunk
    files (each present: a missing one would read as its fill value). A store's chunks and markers are not read
    here: ``cache verify`` reads them all, and a reader names any it meets."""
    what = f"teacher store {store.id}"
    a = store.attrs
    try:
        classes = _teacher_attrs(store, what, a)
    except _Found as found:
        return [Problem(STORE, str(found))]
    from kdcache.errors import StoreError

    plan: PlanStore | None = None
    about_plan: list[Problem] = []
    if plan_of is not None:
        try:
            plan = plan_of(a["plan_id"])
        except fmt.MissingError:
            about_plan = [Problem(PLAN_MISSING, f"{what}: its plan {a['plan_id']} is missing from the cache")]
        except StoreError as exc:
            about_plan = [Problem(PLAN, f"{what}: its plan {a['plan_id']} is unreadable: {exc}", said=True)]
        else:
            about_plan = [Problem(PLAN, p) for p in plan_problems(plan, deep)]
    if plan is not None and not about_plan and plan.n_classes != classes:  # the teacher's classes, before its arrays'
        return [Problem(STORE, f"{what} has {classes} classes but {plan.attrs['dataset']['name']} has {plan.n_classes} "
                               f"(its plan {plan.id}'s data set)")]
    try:
        views, samples = _teacher_arrays(store, what, a)
    except _Found as found:
        return [Problem(STORE, str(found))]
    if about_plan or plan is None:
        return about_plan
    if (plan.n_views, plan.n_samples) != (views, samples):
        return [Problem(STORE, f"{what} holds {views}x{samples} rows but its plan {plan.id} has "
                               f"{plan.n_views}x{plan.n_samples}")]
    return []


def _teacher_attrs(store: "TeacherStore", what: str, a: dict[str, Any]) -> int:
    """The attributes that make the store's id hash to it, and the types of the others that shape it; its classes."""
    ckpt = a.get("checkpoint")
    if not isinstance(a.get("plan_id"), str) or not isinstance(a.get("arch"), str) or not (
            isinstance(ckpt, dict) and isinstance(ckpt.get("sha256"), str)):
        raise _Found(f"{what} lacks the plan_id, arch or checkpoint sha256 its id is made of (its attributes were "
                     "changed)")
    if a.get("dtype", fmt.STORED_DTYPE) != fmt.STORED_DTYPE:
        raise _Found(f"{what} has dtype {a.get('dtype')!r}; the format stores {fmt.STORED_DTYPE}")
    try:
        form = StoreForm.from_attrs(a)
    except (ValueError, TypeError) as exc:
        raise _Found(f"{what}: {exc} (its attributes were changed)") from None
    expected = make_teacher_id(a["plan_id"], a["arch"], ckpt["sha256"], form, a.get("dtype", fmt.STORED_DTYPE))
    if expected != store.id:
        raise _Found(f"{what}: its attributes (plan_id, arch, checkpoint, dtype, form) hash to {expected}, not to its "
                     "id (they were changed)")
    if not isinstance(a.get("complete", False), bool):
        raise _Found(f"{what} has complete={a.get('complete')!r}, neither true nor false")
    for key in ("num_classes", "feature_dim", "chunk_rows"):
        if not _int(a.get(key)):
            raise _Found(f"{what} has {key}={a.get(key)!r}, not a whole number of at least 1")
    shard_rows = a.get("shard_rows", a["chunk_rows"])
    if not _int(shard_rows) or shard_rows % a["chunk_rows"]:
        raise _Found(f"{what} has shard_rows={shard_rows!r}, not a multiple of its chunk_rows {a['chunk_rows']}")
    compression = a.get("feature_compression", FeatureCompression.ZSTD.value)
    if compression not in {c.value for c in FeatureCompression}:
        raise _Found(f"{what} has feature_compression={compression!r}, not one the format knows")
    shape = a.get("feature_shape", [a["feature_dim"]])
    if not isinstance(shape, list) or not all(_int(s) for s in shape):
        raise _Found(f"{what} has feature_shape={shape!r}, not a list of sizes")
    want = {"pooled": [a["feature_dim"]], "none": []}.get(form.features.value)
    if (want is not None and shape != want) or (form.spatial and len(shape) != 3):
        raise _Found(f"{what} has feature_shape={shape!r}, which {form.features.value} features of "
                     f"feature_dim {a['feature_dim']} cannot have")
    return int(a["num_classes"])


def _teacher_arrays(store: "TeacherStore", what: str, a: dict[str, Any]) -> tuple[int, int]:
    """Every array the store's form implies, of the shape, chunks and dtype its attributes give; (views, samples)."""
    form = StoreForm.from_attrs(a)
    classes, dim, rows = int(a["num_classes"]), int(a["feature_dim"]), int(a["chunk_rows"])
    shard_rows = int(a.get("shard_rows", rows))
    fshape = tuple(int(s) for s in a.get("feature_shape", [dim]))
    group = store.group
    names = form.data_arrays()
    first = _array(group, names[0], what)
    if len(first.shape) < 2:
        raise _Found(f"{what}: {names[0]} has shape {list(first.shape)}, not (views, samples, ...)")
    views, samples = int(first.shape[0]), int(first.shape[1])
    if views < 1 or samples < 1:
        raise _Found(f"{what}: {names[0]} has shape {list(first.shape)}, without rows")
    chunked = min(shard_rows, rows * n_chunks(samples, rows))  # never more than a view's chunks
    per_shard = chunked // rows
    topk = form.topk or 0
    rows_of = {"logits": ((classes,), fmt.STORED_DTYPE, math.nan),
               "topk_values": ((topk,), fmt.STORED_DTYPE, math.nan),
               "topk_indices": ((topk,), index_dtype(classes).name if topk else "uint8",
                                int(np.iinfo(index_dtype(classes)).max) if topk else 0),
               "logit_stats": ((len(LOGIT_STATS),), "float32", math.nan),
               "features": (fshape, "int8" if form.int8 else fmt.STORED_DTYPE, -128 if form.int8 else math.nan),
               "feature_scale": ((), "float32", math.nan)}
    if topk > classes:
        raise _Found(f"{what} keeps the top {topk} of {classes} classes, more than there are")
    for name in names:
        row, dtype, fill = rows_of[name]
        _expect(_array(group, name, what), name, what, (views, samples, *row), dtype, (1, rows, *row),
                (1, rows * per_shard, *row) if per_shard > 1 else None, fill, reader=True)
    try:
        head = group["head"]
    except KeyError:
        raise _Found(f"{what} has no head group (head/zarr.json is missing)") from None
    except Exception as exc:  # zarr's reading of a damaged zarr.json
        raise _Found(f"{what}: head/zarr.json is unreadable ({fmt.exc_line(exc)})") from None
    if not isinstance(head, zarr.Group):
        raise _Found(f"{what}: head is an array, not the group of the final classifier")
    done = _array(group, "done", what)
    _expect(done, "done", what, (views, n_chunks(samples, rows)), "int32", (1, per_shard), None, -1)
    _expect(_array(group, "head/weight", what), "head/weight", what, (classes, dim), "float32", None, None, math.nan)
    _expect(_array(group, "head/bias", what), "head/bias", what, (classes,), "float32", None, None, math.nan)
    return views, samples


def plan_problems(plan: "PlanStore", deep: bool = False) -> list[str]:
    """The ways ``plan`` disagrees with its description (empty: none found): its id the hash of its data set's
    fingerprint, recipe, views and seed; ``order`` (V, N) int32, ``params`` (V, N, P) int16 and ``labels`` (N,)
    int32, checksummed. ``deep``: also every chunk file of them present (a missing one would read as fill)."""
    what = f"plan {plan.id}"
    a = plan.attrs
    try:
        data = a.get("dataset")
        if not (isinstance(data, dict) and isinstance(data.get("fingerprint"), str) and isinstance(data.get("name"), str)
                and isinstance(a.get("recipe"), dict) and _int(a.get("n_views")) and _int(a.get("seed"), least=0)
                and _int(data.get("n_samples")) and _int(data.get("n_classes"))):
            raise _Found(f"{what} lacks the data set, recipe, n_views or seed it is made of, or holds them in the wrong "
                         "type (its attributes were changed)")
        expected = make_plan_id(data["fingerprint"], a["recipe"], a["n_views"], a["seed"])
        if expected != plan.id:
            raise _Found(f"{what}: its attributes (data set fingerprint, recipe, n_views, seed) hash to {expected}, not "
                         "to its id (they were changed)")
        views, samples = int(a["n_views"]), int(data["n_samples"])
        order = _array(plan.group, "order", what)
        _expect(order, "order", what, (views, samples), "int32", None, None, -1)
        params = _array(plan.group, "params", what)
        if len(params.shape) != 3 or int(params.shape[2]) < 1:
            raise _Found(f"{what}: params has shape {list(params.shape)}, not (views, samples, parameters)")
        _expect(params, "params", what, (views, samples, int(params.shape[2])), "int16", None, None, -1)
        labels = _array(plan.group, "labels", what)
        _expect(labels, "labels", what, (samples,), "int32", None, None, -1)
        if deep:
            present = plan.location.files()
            for name, array in (("order", order), ("params", params), ("labels", labels)):
                grid = [range(-(-int(s) // int(c))) for s, c in zip(array.shape, array.chunks)]
                for index in np.ndindex(*(len(g) for g in grid)):
                    key = f"{name}/{array.metadata.encode_chunk_key(tuple(int(i) for i in index))}"
                    if key not in present:
                        raise _Found(f"{what}: its {name} chunk file {key} is missing")
    except _Found as found:
        return [str(found)]
    return []
