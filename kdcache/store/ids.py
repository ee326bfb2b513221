"""Content ids of plans and teacher stores, and the hash of a checkpoint file: equal inputs, equal id."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from kdcache.store.form import StoreForm
from kdcache.store.format import FORMAT_VERSION, STORED_DTYPE


def content_id(payload: dict[str, Any]) -> str:
    """A short content hash of a JSON-able description: equal inputs, equal id."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan_id(fingerprint: str, recipe: dict[str, Any], n_views: int, seed: int) -> str:
    """Id of a view plan: the data set's content, the recipe, the number of views and the seed."""
    return content_id(
        {"format": FORMAT_VERSION, "kind": "plan", "dataset": fingerprint,
         "recipe": recipe, "n_views": n_views, "seed": seed}
    )


def teacher_id(plan: str, arch: str, checkpoint_sha256: str, form: StoreForm = StoreForm(),
               dtype: str = STORED_DTYPE) -> str:
    """Id of a teacher store: the same teacher (its checkpoint's content) on the same plan in the same form
    (:meth:`StoreForm.id_payload`) is the same store. The pooled float16 dense form of a float32 forward adds
    nothing to the payload, so stores written before the forms existed keep their ids."""
    return content_id({"format": FORMAT_VERSION, "kind": "teacher", "plan_id": plan, "arch": arch,
                       "checkpoint_sha256": checkpoint_sha256, "dtype": dtype, **form.id_payload()})


def sha256_file(path: str | os.PathLike[str], block: int = 2**22) -> str:
    """The sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
