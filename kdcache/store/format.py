"""The on-disk format of plans and teacher stores: its version, its directories, and the life of a node (a plan's
or a store's group): created with the mark of a creation under way, checked on opening, disk failures named.

What a store's rows hold is its form (:mod:`kdcache.store.form`); how they are cut into files, its layout
(:mod:`kdcache.store.layout`); how they are encoded, :mod:`kdcache.store.codecs`; its id, :mod:`kdcache.store.ids`.
docs/STORE.md is the human-readable twin of these modules.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Iterator, cast

import numpy as np
import zarr

from kdcache.errors import StoreError, UnfinishedCreationError

FORMAT_VERSION = 1
PLANS_DIR = "plans"
TEACHERS_DIR = "teachers"
LOCKS_DIR = "locks"
# The dtype of stored logits and float features (part of a teacher id).
STORED_DTYPE = "float16"


class MissingError(StoreError):
    """A plan or store that is not in the cache at all (as opposed to one that is there but unreadable)."""


def exc_line(exc: BaseException) -> str:
    """An exception as a short phrase for a one-line message: its type, and its text's first line."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' + text if text else ''}"


def open_node(where: Any, what: str, writable: bool = False) -> zarr.Group:
    """The group of a plan or store at ``where`` (a Location): a StoreError naming ``what`` when it is missing
    (:class:`MissingError`), not a folder, or its ``zarr.json`` is unreadable (truncated, not JSON, not a group)."""
    local = where.local_path
    if local is not None and (local.is_symlink() or local.exists()) and not local.is_dir():
        kind = "a symbolic link that leads nowhere (or loops)" if local.is_symlink() else "a file, not a folder"
        raise StoreError(f"{what} at {where} is {kind}")
    try:
        present = where.exists("zarr.json")
    except OSError as exc:
        raise StoreError(f"{what} at {where} cannot be read ({exc_line(exc)})") from None
    if not present:
        raise MissingError(f"{what} not found at {where}")
    try:
        return zarr.open_group(where.zarr_store(read_only=not writable), mode="r+" if writable else "r")
    except StoreError:
        raise
    except Exception as exc:  # zarr reading a damaged zarr.json: JSON, key, type or value errors, or a disk's
        raise StoreError(f"{what} at {where}: its zarr.json is unreadable ({exc_line(exc)})") from None


def default_cache_dir() -> Path:
    """``$KDCACHE_HOME``, else ``~/.cache/kdcache``."""
    env = os.environ.get("KDCACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdcache"


def create_group(where: Any, attrs: dict[str, Any]) -> zarr.Group:
    """Make the group of a new plan or store at ``where`` (a Location), replacing whatever is there, with
    ``attrs`` and the mark of a creation under way (see :func:`creation_unfinished`) in its first write."""
    return zarr.open_group(where.zarr_store(read_only=False), mode="w", zarr_format=3,
                           attributes={**attrs, "complete": False, "creating": True})


def array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array ``name`` of a plan or store group. zarr types a group's member as ``Array | Group``;
    every name this package looks up in its groups is an array of the format."""
    return cast(zarr.Array[Any], group[name])


def read(group: zarr.Group, name: str, selection: Any = ...) -> np.ndarray:
    """``group[name][selection]``: zarr types a read as an array-like or a scalar, but with its default
    (NumPy) buffers every read is a NumPy array, a 0-d one for a single element."""
    return cast(np.ndarray, array(group, name)[selection])


def finish_creation(group: zarr.Group) -> None:
    """Declare every array of a new plan or store created: from here on it is resumed, never made afresh."""
    group.attrs["creating"] = False


def creation_unfinished(attrs: dict[str, Any]) -> bool:
    """Whether a node's creation was cut short (a kill or a full disk between its group and its last
    array): its group says so, or has no attributes at all (how earlier versions began a creation)."""
    return not attrs or attrs.get("creating") is True


@contextlib.contextmanager
def disk_errors(what: str, where: Any, needs: str = "") -> Iterator[None]:
    """Turn a file-system failure inside the block into one StoreError line: what failed, where, why, and
    what to do (free space and run the same command again, which resumes or recreates what was cut short)."""
    try:
        yield
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno == errno.ENOSPC:
            remedy = f"free space there{f' ({needs})' if needs else ''} or pass another --cache"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            remedy = "make it writable or pass another --cache"
        else:
            remedy = "fix the disk"
        raise StoreError(f"{what} at {where} failed: {why}; {remedy}, then run the same command again "
                         "to finish it") from None


def check_format(attrs: dict[str, Any], kind: str, where: str, remedy: str = "precompute the store again") -> None:
    """Refuse a node that is not a kdcache ``kind`` of a format this version reads (``remedy``: what else makes it
    readable, after upgrading kdcache)."""
    if creation_unfinished(attrs):
        raise UnfinishedCreationError(f"{where} was cut short while being created (nothing in it is usable yet); "
                         "run the same `kdcache precompute` again to create it")
    if attrs.get("kind") != kind:
        raise StoreError(f"{where} is not a kdcache {kind} store (kind={attrs.get('kind')!r}); {remedy}")
    version = attrs.get("format")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{where} has store format {version!r}; this kdcache ({_version()}) reads format "
            f"{FORMAT_VERSION}: upgrade kdcache or {remedy}"
        )


def _version() -> str:
    from kdcache import __version__

    return __version__


def plan_removal(where: object) -> str:
    """The remedy of a plan that is damaged: remove it, and the precompute that made it redraws it, bit for bit
    (a plan is a pure function of its id)."""
    return (f"remove the plan (`rm -r {where}`) and run the same `kdcache precompute` again to redraw it (its "
            "stores keep their rows)")
