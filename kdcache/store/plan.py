"""View plans on disk: which augmented image every teacher and student sees.

A plan is drawn once from a seed and stored, so that replay is a pure function
of (image, stored parameters) and never depends on an RNG at read time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from kdcache import __version__
from kdcache.errors import StoreError
from kdcache.store import codecs
from kdcache.store import format as fmt
from kdcache.store.layout import MAX_PLAN_CHUNK_ROWS, plan_views_per_chunk
from kdcache.store.location import Location, Where
from kdcache.store.lock import WriterLock
from kdcache.text import human_bytes
from kdcache.views.recipes import recipe_spec


class PlanStore:
    """A complete, read-only view plan: ``order`` (V, N), ``params`` (V, N, P), ``labels`` (N,)."""

    def __init__(self, group: zarr.Group, location: Where, plan_id: str) -> None:
        self.group = group
        self.location = Location.of(location)
        self.id = plan_id

    @property
    def path(self) -> Path | str:
        """The plan's folder: a Path when local, its URL otherwise."""
        return self.location.given

    @classmethod
    def open(cls, path: Where, plan_id: str) -> "PlanStore":
        """Open a plan read-only; refuse one that is missing, unfinished or of another format."""
        where = Location.of(path)
        try:
            group = fmt.open_node(where, f"plan {plan_id}")
        except fmt.MissingError:
            raise fmt.MissingError(f"plan {plan_id} not found at {where}; run `kdcache precompute` to create it "
                                   "(the same command redraws a plan that was removed)") from None
        except StoreError as exc:
            raise StoreError(f"{exc}; {fmt.plan_removal(where)}") from None
        attrs = dict(group.attrs)
        fmt.check_format(attrs, "plan", f"plan {plan_id}", fmt.plan_removal(where))
        if not attrs.get("complete"):
            raise StoreError(f"plan {plan_id} at {where} is incomplete; run `kdcache precompute` again to finish it")
        return cls(group, where, plan_id)

    @classmethod
    def create(cls, path: Where, lock_path: Path | None, plan_id: str, attrs: dict[str, Any], n_views: int,
               labels: np.ndarray, draw: Callable[[int], tuple[np.ndarray, np.ndarray]],
               progress: Callable[[int, int], Callable[[int], None]] | None = None) -> "PlanStore":
        """Write a plan once, view by view (``draw(v)`` gives view v's order (N,) and params (N, P)), so
        memory holds one chunk of views (at most about MAX_PLAN_CHUNK_ROWS rows) whatever V is; concurrent
        creators wait for the first and then reuse its plan.

        A plan cut short (killed, disk full) is not complete and is written again by the next creator.
        ``lock_path`` None (a backend without locks): the plan is written without one; its content is a
        pure function of its id, so two creators write the same bytes. ``progress(V, 0)`` returns a
        callback told each view written.
        """
        where = Location.of(path)
        lock = WriterLock(lock_path, f"plan {plan_id}", wait=True) if lock_path is not None else contextlib.nullcontext()
        with lock:
            try:
                return cls.open(where, plan_id)
            except StoreError:
                pass  # absent or unfinished: (re)write it below
            first_order, first_params = draw(0)
            n_samples, n_params = first_params.shape
            rows = min(n_samples, MAX_PLAN_CHUNK_ROWS)
            per_chunk = plan_views_per_chunk(n_views, n_samples)  # views of one chunk, buffered here
            needs = f"the plan needs about {human_bytes(n_views * n_samples * (4 + 2 * n_params))} before compression"
            tick = progress(n_views, 0) if progress else None
            with fmt.disk_errors(f"writing plan {plan_id}", where, needs):
                group = fmt.create_group(where, {
                    **attrs, "format": fmt.FORMAT_VERSION, "kind": "plan", "n_views": n_views,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "kdcache_version": __version__,
                })
                common: dict[str, Any] = {"compressors": codecs.compressors(), "config": codecs.array_config()}
                order = group.create_array("order", shape=(n_views, n_samples), chunks=(per_chunk, rows),
                                           dtype="int32", fill_value=-1, **common)
                params = group.create_array("params", shape=(n_views, n_samples, n_params),
                                            chunks=(per_chunk, rows, n_params), dtype="int16", fill_value=-1,
                                            **common)
                group.create_array("labels", shape=labels.shape, chunks=(rows,), dtype="int32",
                                   fill_value=-1, **common)[...] = labels
                fmt.finish_creation(group)
                block_order = np.empty((per_chunk, n_samples), dtype=np.int32)
                block_params = np.empty((per_chunk, n_samples, n_params), dtype=np.int16)
                for start in range(0, n_views, per_chunk):
                    stop = min(start + per_chunk, n_views)
                    for v in range(start, stop):
                        block_order[v - start], block_params[v - start] = \
                            (first_order, first_params) if v == 0 else draw(v)
                    order[start:stop] = block_order[: stop - start]
                    params[start:stop] = block_params[: stop - start]
                    if tick:  # views count once written: a failed write never shows as 100 %
                        tick(stop - start)
                group.attrs["complete"] = True  # last: a plan without it is never read
            return cls.open(where, plan_id)

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """The plan's attributes (data set, recipe, views, seed)."""
        return dict(self.group.attrs)

    @property
    def n_views(self) -> int:
        return int(self.attrs["n_views"])

    @property
    def n_samples(self) -> int:
        return int(self.attrs["dataset"]["n_samples"])

    @property
    def n_classes(self) -> int:
        return int(self.attrs["dataset"]["n_classes"])

    @property
    def recipe(self) -> str:
        """The plan's recipe spec: its name, or ``name:size`` for views of a non-default side."""
        return recipe_spec(self.attrs["recipe"])

    @cached_property
    def labels(self) -> np.ndarray:
        """Training labels in sample order, (N,) int64; damaged or missing, a StoreError naming the remedy."""
        try:
            labels = fmt.read(self.group, "labels")
        except (ValueError, KeyError, OSError) as exc:  # the CRC32C codec's checksum mismatch, or files gone
            raise StoreError(f"plan {self.id}: its labels are damaged ({fmt.exc_line(exc)}); "
                             f"{fmt.plan_removal(self.location)}") from None
        if (labels < 0).any():  # the fill value: its chunk file is missing
            raise StoreError(f"plan {self.id}: its labels are missing (their chunk file is gone); "
                             f"{fmt.plan_removal(self.location)}")
        return labels.astype(np.int64)

    def view(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        """Row order (N,) int64 and replay parameters (N, P) int16 of view ``v``; a damaged or missing chunk of
        them is a StoreError naming the plan and the remedy."""
        try:
            order = fmt.read(self.group, "order", v)
            params = fmt.read(self.group, "params", v)
        except (ValueError, KeyError, OSError) as exc:  # the CRC32C codec's checksum mismatch, or files gone
            raise StoreError(f"plan {self.id}: view {v} is damaged ({fmt.exc_line(exc)}); "
                             f"{fmt.plan_removal(self.location)}") from None
        if (order < 0).any():  # the fill value: its chunk file is missing
            raise StoreError(f"plan {self.id}: view {v} is missing (its order chunk file is gone); "
                             f"{fmt.plan_removal(self.location)}")
        return order.astype(np.int64), params

    def verify(self) -> list[str]:
        """Read every chunk of the plan's arrays; return the problems found (empty: sound)."""
        problems = []
        for name in ("order", "params"):
            per_chunk = fmt.array(self.group, name).chunks[0]
            for start in range(0, self.n_views, per_chunk):
                stop = min(start + per_chunk, self.n_views)
                try:
                    fmt.read(self.group, name, slice(start, stop))
                except (ValueError, KeyError, OSError) as exc:  # the CRC32C codec's checksum mismatch
                    views = f"view {start}" if stop - start == 1 else f"views {start}-{stop - 1}"
                    problems.append(f"plan {self.id}: {name} of {views} is damaged ({fmt.exc_line(exc)})")
        try:
            fmt.read(self.group, "labels")
        except (ValueError, KeyError, OSError) as exc:
            problems.append(f"plan {self.id}: labels are damaged ({fmt.exc_line(exc)})")
        return problems
