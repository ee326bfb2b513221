"""A request's fields in two kinds: what its result depends on, and how it runs.

A field declared with :func:`how` (the device, where files are read and written, threads,
whether to resume) does not change what a run computes; every other field does. The
split is declared once, on the request type, and read by one helper, :func:`result_args`:
what a run records in its config.json and checkpoint, what ``--resume`` compares
(:func:`kdcache.training.resume_changes`), and what a grid compares to tell its own
finished runs from another's (:func:`kdcache.pipelines.grid.check_same_grid`) all come
from it, so no list of "free" arguments is kept beside the type.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

_HOW = "kdcache.how"


def how(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that says how a run goes, not what it computes (declared like ``dataclasses.field``)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_HOW: True})


def is_how(f: dataclasses.Field[Any]) -> bool:
    """Whether the field ``f`` was declared with :func:`how`."""
    return bool(f.metadata.get(_HOW))


def result_fields(req: Any) -> list[str]:
    """The names of the fields of ``req`` (a request or its type) that its result depends on, in order."""
    return [f.name for f in dataclasses.fields(req) if not is_how(f)]


def result_args(req: Any) -> dict[str, Any]:
    """The result-determining fields of ``req`` by name, as JSON values (paths as strings, nested dataclasses as
    dicts, tuples as lists, mapping keys as strings), so that a value read back from config.json or a checkpoint
    compares equal to the one it was written from."""
    return {name: jsonable(getattr(req, name)) for name in result_fields(req)}


def how_args(req: Any) -> dict[str, Any]:
    """The fields of ``req`` declared with :func:`how`, as JSON values: recorded beside the result arguments, never
    compared."""
    return {f.name: jsonable(getattr(req, f.name)) for f in dataclasses.fields(req) if is_how(f)}


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def differing(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The names in ``wanted`` whose ``recorded`` value differs, sorted; a name ``recorded`` lacks (an argument
    an earlier kdcache did not have) does not count."""
    return sorted(k for k, v in wanted.items() if k in recorded and recorded[k] != v)
