"""What a teacher store takes before any work: bytes a row, a view and a store, and files a view, for every
store form, from the form's and the layout's own arithmetic (kdcache.store.form, kdcache.store.layout), so the
figures follow the format.

``kdcache sizes`` prints them for any training set (ImageNet-1k's by default) without its data or a
checkpoint; ``kdcache precompute --dry-run`` states the same figures for the one store it would write, and
``kdcache experiment run --dry-run`` for each store of an experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kdcache.store.form import StoreForm
from kdcache.store.layout import Layout, StoreShape
from kdcache.text import human_bytes

# TinyViT's published totals for its stored sparse teacher logits (github.com/microsoft/Cream, TinyViT README):
# 16 GB for ImageNet-1k over 300 epochs, 481 GB for ImageNet-22k over 90 epochs.
TINYVIT = (("TinyViT, ImageNet-1k, 300 epochs (published total)", 16e9, 1_281_167, 300),
           ("TinyViT, ImageNet-22k, 90 epochs (published total)", 481e9, 14_197_122, 90))


@dataclass(frozen=True)
class StoreSize:
    """What a store of ``form`` takes: uncompressed bytes a row (its logits' and features'), a view and the store,
    in ``layout``, with the files a view comes to."""

    form: StoreForm
    shape: StoreShape
    layout: Layout
    logits_row_bytes: int
    row_bytes: int

    @property
    def feature_row_bytes(self) -> int:
        return self.row_bytes - self.logits_row_bytes

    @property
    def view_bytes(self) -> int:
        return self.row_bytes * self.shape.samples

    @property
    def store_bytes(self) -> int:
        return self.view_bytes * self.shape.views

    @property
    def files_per_view(self) -> int:
        return self.layout.files_per_view(self.shape.samples, len(self.form.data_arrays()))


def store_size(form: StoreForm, shape: StoreShape, layout: Layout | None = None) -> StoreSize:
    """Bytes and files of a store of ``form`` and ``shape``, in ``layout`` (default: the layout the store would
    choose, :meth:`Layout.choose`). ValueError for a top-K form of more classes than the teacher has."""
    if form.topk is not None and form.topk > shape.classes:
        raise ValueError(f"{form.logits}: K exceeds the {shape.classes} classes")
    fshape = shape.feature_shape(form)
    return StoreSize(form, shape, layout or Layout.choose(form, shape), form.logits_row_bytes(shape.classes),
                     form.row_bytes(shape.classes, fshape))


def size_table(sizes: Sequence[StoreSize], n_samples: int, views: int) -> list[str]:
    """A markdown table of ``sizes``, with TinyViT's published figures (bytes a row derived from them) below."""
    lines = [f"| store form ({n_samples:,} rows a view) | bytes a row | a view | {views} views | rows a chunk | "
             "rows a shard | files a view |", "|---|---|---|---|---|---|---|"]
    for s in sizes:
        lines.append(f"| {s.form.describe()} | {s.row_bytes:,} B | {human_bytes(s.view_bytes)} | "
                     f"{human_bytes(s.store_bytes)} | {s.layout.chunk_rows:,} | {s.layout.shard_rows:,} | "
                     f"{s.files_per_view:,} |")
    for name, total, rows, epochs in TINYVIT:
        lines.append(f"| {name} | ~{total / (rows * epochs):.0f} B | {human_bytes(total / epochs)} | "
                     f"{human_bytes(total)} over {epochs} | – | – | – |")
    return lines
