"""Stores written by today's code, pinned: in every form, the plan and teacher ids, the layout and attributes a
precompute records, and the sha256 of every array's bytes (the values as stored and each file as written).

The golden values were recorded from the code of commit 3bf60df, before the store form became one typed value
and the store package was split by job (issue 26): a refactor must leave every one of them unchanged. The ids
come from a real precompute of digits (the checkpoint is a seeded initialisation, so its bytes, and the ids, do
not depend on floating-point kernels); the bytes come from a store written through the store's own writer from
fixed float16 rows, so they pin the format (top-K summary, int8 quantisation, codecs, shards), not a CPU's
arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdcache.models import build_model
from kdcache.store import Cache, TeacherStore
from kdcache.store import format as fmt
from kdcache.store.form import FeatureCompression, StoreForm
from kdcache.store.ids import sha256_file
from kdcache.store.layout import StoreShape

# Every store form precompute can write: (name, its options as precompute takes them).
FORMS: dict[str, dict[str, Any]] = {
    "pooled": {},
    "spatial": {"features": "spatial"},
    "none": {"features": "none"},
    "pooled-int8": {"feature_dtype": "int8"},
    "spatial-int8": {"features": "spatial", "feature_dtype": "int8"},
    "spatial-uncompressed": {"features": "spatial", "feature_compression": "none"},
    "topk5": {"logits": "topk:5"},
    "topk3-T2-spatial-int8": {"logits": "topk:3", "logits_temperature": 2.0, "features": "spatial",
                              "feature_dtype": "int8"},
    "amp-bfloat16": {"amp": True, "amp_dtype": "bfloat16"},
}

# The golden values, recorded once from commit 3bf60df by `python tests/test_store_pins.py` (which prints them).
PINS_FILE = Path(__file__).parent / "store_pins.json"
PINS: dict[str, Any] = json.loads(PINS_FILE.read_text()) if PINS_FILE.exists() else {}

# Attributes that record when and with what a store was written, and the teacher's accuracies (the CPU's arithmetic),
# not what the store is.
_WHEN = {"created", "kdcache_version", "torch_version", "checkpoint", "precompute_seconds", "test_accuracy",
         "test_top5", "view_accuracy", "complete", "creating"}


@pytest.fixture(scope="module")
def seeded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pin") / "resnet8.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict(), "arch": "resnet8"}, path)
    return path


def _form(options: dict[str, Any]) -> tuple[StoreForm, FeatureCompression]:
    """The store form and the feature compression of precompute's ``options`` (a value of FORMS)."""
    form = StoreForm(logits=options.get("logits", "dense"), features=options.get("features", "pooled"),
                     feature_dtype=options.get("feature_dtype", "float16"),
                     forward="amp-" + options["amp_dtype"] if options.get("amp") else "float32",
                     temperature=options.get("logits_temperature"))
    return form, FeatureCompression(options.get("feature_compression", "zstd"))


def _request(checkpoint: Path, cache: Path, **options: Any) -> Any:
    from kdcache.pipelines.precompute import PrecomputeRequest

    form, compression = _form(options)
    return PrecomputeRequest(teacher="resnet8", checkpoint=checkpoint, dataset="digits", cache=cache, views=1,
                             device="cpu", form=form, feature_compression=compression)


def test_checkpoint_bytes_are_the_seeded_initialisation(seeded_checkpoint: Path) -> None:
    # If this moves, torch's initialisation or its file format moved, not kdcache: the ids follow it.
    assert sha256_file(seeded_checkpoint) == PINS["checkpoint_sha256"]


def _precomputed(name: str, checkpoint: Path, tmp_path: Path) -> dict[str, Any]:
    """The ids, attributes and arrays of the store precompute writes in form ``name``."""
    from kdcache.pipelines.precompute import precompute

    result = precompute(_request(checkpoint, tmp_path / "cache", **FORMS[name]))
    store = TeacherStore.open(Cache.at(tmp_path / "cache").teacher_location(result.teacher_id), result.teacher_id)
    attrs = {k: v for k, v in store.attrs.items() if k not in _WHEN}
    arrays = {n: [str(fmt.array(store.group, n).dtype), list(fmt.array(store.group, n).shape)]
              for n in store.data_arrays}
    return {"plan_id": result.plan_id, "teacher_id": result.teacher_id, "attrs": attrs, "arrays": arrays}


@pytest.mark.parametrize("name", list(FORMS))
def test_precompute_writes_the_pinned_ids_and_layout(name: str, seeded_checkpoint: Path, tmp_path: Path) -> None:
    assert _precomputed(name, seeded_checkpoint, tmp_path) == PINS["precompute"][name]


# A store of fixed rows written by the store's writer: V views of N rows, C classes, pooled D or spatial (D, 2, 2).
V, N, C, D = 2, 11, 7, 3


def _rows() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20261205)
    logits = (3 * rng.standard_normal((V, N, C))).astype(np.float16)
    pooled = rng.standard_normal((V, N, D)).astype(np.float16)
    spatial = np.maximum(rng.standard_normal((V, N, D, 2, 2)), 0).astype(np.float16)
    return logits, pooled, spatial, rng.integers(0, C, N)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _written(name: str, shards: bool, tmp_path: Path) -> dict[str, str]:
    """Digests of the values of every array, and of every file, of a store of the fixed rows in form ``name``."""
    form, compression = _form(FORMS[name])  # a top-K form's temperature defaults to 4
    teacher = {"plan_id": "p" * 16, "arch": "resnet8", "checkpoint": {"path": "-", "sha256": "0" * 64}}
    where = tmp_path / "store"
    store = TeacherStore.create(where, "t" * 16, form, StoreShape(V, N, C, D, map_shape=(D, 2, 2)), teacher,
                                torch.arange(C * D, dtype=torch.float32).reshape(C, D) / 7,
                                torch.linspace(-1, 1, C), compression=compression, chunk_rows=4,
                                shard_rows=8 if shards else None)
    logits, pooled, spatial, labels = _rows()
    feats = {"pooled": pooled, "spatial": spatial, "none": None}[form.features.value]
    for v, s in store.pending_shards():
        rows = store.shard_rows_of(s)
        store.write_shard(v, s, logits[v, rows], None if feats is None else feats[v, rows],
                          list(range(len(store.shard_chunks(s)))), labels[rows])
    store.mark_complete()
    ro = TeacherStore.open(where, "t" * 16)
    got = {f"values:{n}": _digest(np.ascontiguousarray(fmt.read(ro.group, n)).tobytes())
           for n in (*ro.data_arrays, "done", "head/weight", "head/bias")}
    # Every file but the group's own zarr.json (its attributes record when the store was written).
    for path in sorted(p for p in where.rglob("*") if p.is_file() and p != where / "zarr.json"):
        got[f"file:{path.relative_to(where).as_posix()}"] = _digest(path.read_bytes())
    return got


@pytest.mark.parametrize("shards", [False, True], ids=["a-file-a-chunk", "shards"])
@pytest.mark.parametrize("name", list(FORMS))
def test_stored_bytes_are_pinned(name: str, shards: bool, tmp_path: Path) -> None:
    assert _written(name, shards, tmp_path) == PINS["bytes"][f"{name}/{'shards' if shards else 'chunks'}"]


if __name__ == "__main__":  # print the golden values of the code as it stands (to record them, once)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        ckpt = root / "resnet8.pth"
        torch.save({"model": build_model("resnet8", 10).state_dict(), "arch": "resnet8"}, ckpt)
        pins = {"checkpoint_sha256": sha256_file(ckpt),
                "precompute": {n: _precomputed(n, ckpt, root / f"p-{n}") for n in FORMS},
                "bytes": {f"{n}/{'shards' if sh else 'chunks'}": _written(n, sh, root / f"b-{n}-{sh}")
                          for n in FORMS for sh in (False, True)}}
        json.dump(pins, sys.stdout, indent=1, sort_keys=True)
