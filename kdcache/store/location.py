"""Where a cache folder lives: a local directory, or a folder behind an fsspec URL.

A plain path (``/data/kdcache``, ``~/.cache/kdcache``) is a local directory: zarr's
``LocalStore`` writes each chunk to a temporary file and renames it into place,
and the writer lock is a kernel ``flock`` beside the stores. A URL
(``file://``, ``memory://``, ``s3://``, ``gs://``..., any protocol fsspec knows
once its package is installed) goes through zarr's ``FsspecStore``. Both kinds are
named the same way everywhere: a local directory is a :class:`~pathlib.Path`, a
URL is a ``str``. :meth:`Location.of` turns either into a ``Location``, the one
object the store classes do their file-level work with (exists, list, size, remove).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.errors import StoreError


def is_url(where: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...``: a location fsspec resolves, not a plain local path."""
    return isinstance(where, str) and "://" in where


@dataclass(frozen=True)
class Location:
    """A folder of the cache: ``where`` is a local path, or a URL with its scheme."""

    where: str

    @classmethod
    def of(cls, where: "str | os.PathLike[str] | Location") -> "Location":
        """The location named by a Path, a path string, a URL or a Location."""
        if isinstance(where, Location):
            return where
        if is_url(where):
            return cls(str(where).rstrip("/"))
        return cls(str(Path(where).expanduser()))

    # -- what kind of place --------------------------------------------------------------

    @property
    def is_url(self) -> bool:
        """Reached through fsspec and zarr's FsspecStore (as opposed to a plain local directory)."""
        return is_url(self.where)

    @property
    def protocol(self) -> str:
        """``local`` for a plain directory, else the URL's scheme (``file``, ``memory``, ``s3``...)."""
        return self.where.split("://", 1)[0] if self.is_url else "local"

    @property
    def local_path(self) -> Path | None:
        """The directory on this machine's file system, for a plain path or a ``file://`` URL; else None."""
        if not self.is_url:
            return Path(self.where)
        if self.protocol == "file":
            return Path(self._fs()[1])
        return None

    @property
    def given(self) -> Path | str:
        """The location as callers name it: a Path for a local directory, the URL string otherwise."""
        return self.where if self.is_url else Path(self.where)

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.where}/{name}" if self.is_url else str(Path(self.where) / name))

    def __str__(self) -> str:
        return self.where

    # -- zarr ------------------------------------------------------------------------------

    def zarr_store(self, read_only: bool) -> Any:
        """What ``zarr.open_group`` should open: the path itself, or an ``FsspecStore`` for a URL."""
        if not self.is_url:
            return Path(self.where)
        from zarr.storage import FsspecStore

        self._fs()  # a missing filesystem package or an unknown protocol is a clear error
        return FsspecStore.from_url(self.where, storage_options=self._options(), read_only=read_only)

    # -- file-level work -----------------------------------------------------------------

    def exists(self, key: str = "") -> bool:
        """Whether the folder (or the file ``key`` below it) exists."""
        if not self.is_url:
            return (Path(self.where) / key).exists() if key else Path(self.where).exists()
        fs, root = self._fs()
        return bool(fs.exists(f"{root}/{key}" if key else root))

    def subfolders(self) -> list[str]:
        """Names of the folders directly below this one (none if it does not exist)."""
        if not self.is_url:
            folder = Path(self.where)
            return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        fs, root = self._fs()
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def entries(self) -> list[str]:
        """Names of everything directly below this folder (folders, files, links; none if it does not exist)."""
        if not self.is_url:
            folder = Path(self.where)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        fs, root = self._fs()
        try:
            found = fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in found} - {""})

    def files(self, prefix: str = "") -> set[str]:
        """Keys (``a/b/c`` relative to this folder) of every file below ``prefix``, in one listing."""
        if not self.is_url:
            base = Path(self.where)
            below = base / prefix
            return {p.relative_to(base).as_posix() for p in below.rglob("*") if p.is_file()} if below.is_dir() else set()
        fs, root = self._fs()
        try:
            found = fs.find(f"{root}/{prefix}" if prefix else root)
        except FileNotFoundError:
            return set()
        return {f[len(root) + 1:] for f in found if f.startswith(root + "/")}

    def size(self) -> int:
        """Bytes of all files below this folder."""
        if not self.is_url:
            folder = Path(self.where)
            return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
        fs, root = self._fs()
        try:
            return int(fs.du(root, total=True))
        except FileNotFoundError:
            return 0

    def remove(self) -> None:
        """Delete this folder and everything below it."""
        if not self.is_url:
            path = Path(self.where)
            if path.is_symlink() or (path.exists() and not path.is_dir()):  # a file or a link in a folder's place
                path.unlink()
            else:
                shutil.rmtree(self.where, ignore_errors=False)
            return
        fs, root = self._fs()
        fs.rm(root, recursive=True)

    def makedirs(self) -> None:
        """Create the folder (a no-op on object stores, which have no folders)."""
        if not self.is_url:
            Path(self.where).mkdir(parents=True, exist_ok=True)
            return
        fs, root = self._fs()
        fs.makedirs(root, exist_ok=True)

    # -- fsspec ----------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        # a local file system through fsspec does not create parent folders unless asked
        return {"auto_mkdir": True} if self.protocol == "file" else {}

    def _fs(self) -> tuple[Any, str]:
        """The fsspec file system and this folder's path within it (fsspec caches the instances)."""
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(self.where, **self._options())
        except ImportError as exc:
            raise StoreError(f"cache {self.where} needs a file system package that is not installed ({exc})") from None
        except ValueError as exc:
            raise StoreError(f"cache {self.where}: {exc}") from None
        return fs, root.rstrip("/")


Where = str | os.PathLike[str] | Location
"""Anything that names a cache folder: a Path or path string (local), a URL, or a Location."""
