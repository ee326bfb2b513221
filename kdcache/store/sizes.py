"""What a teacher store takes before any work: bytes a row, a view and a store, and files a view, for every
store option, from the format's own arithmetic (kdcache.store.format), so the figures follow the format.

``kdcache sizes`` prints them for any training set (ImageNet-1k's by default) without its data or a
checkpoint; ``kdcache precompute --dry-run`` states the same figures for the one store it would write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kdcache.store import format as fmt
from kdcache.text import human_bytes

# TinyViT's published totals for its stored sparse teacher logits (github.com/microsoft/Cream, TinyViT README):
# 16 GB for ImageNet-1k over 300 epochs, 481 GB for ImageNet-22k over 90 epochs.
TINYVIT = (("TinyViT, ImageNet-1k, 300 epochs (published total)", 16e9, 1_281_167, 300),
           ("TinyViT, ImageNet-22k, 90 epochs (published total)", 481e9, 14_197_122, 90))


@dataclass(frozen=True)
class StoreOption:
    """One way to store a teacher: its logits form, feature form and feature dtype."""

    logits: str = fmt.DEFAULT_LOGITS      # dense | topk:K
    features: str = fmt.DEFAULT_FEATURE_FORM
    feature_dtype: str = fmt.DEFAULT_FEATURE_DTYPE

    def describe(self) -> str:
        feats = "no features" if self.features == "none" else f"{self.features} {self.feature_dtype}"
        return f"--logits {self.logits}, {feats}"


@dataclass(frozen=True)
class StoreSize:
    """What one option takes for a training set of ``n_samples`` over ``views`` views."""

    option: StoreOption
    row_bytes: int
    view_bytes: int
    store_bytes: int
    chunk_rows: int
    shard_rows: int
    files_per_view: int


def every_option(ks: Sequence[int] = (10, 100)) -> list[StoreOption]:
    """Dense and top-K logits (each K of ``ks``), each with no, pooled and spatial features in float16 and int8."""
    out = []
    for logits in (fmt.DEFAULT_LOGITS, *(fmt.logits_form(k) for k in ks)):
        for form in ("none", "pooled", "spatial"):
            for dtype in (("float16",) if form == "none" else fmt.FEATURE_DTYPES):
                out.append(StoreOption(logits, form, dtype))
    return out


def store_size(option: StoreOption, n_samples: int, num_classes: int, feature_dim: int,
               map_shape: tuple[int, int, int], views: int) -> StoreSize:
    """Bytes and files of ``option`` for a teacher of ``num_classes`` classes whose pooled feature has
    ``feature_dim`` values and last-block map ``map_shape``, over ``views`` views of ``n_samples`` rows, in the
    layout precompute would choose (2 MB chunks in shards of about 128 MB)."""
    k = fmt.parse_logits(option.logits)
    if k is not None and k > num_classes:
        raise ValueError(f"{option.logits}: K exceeds the {num_classes} classes")
    fshape = fmt.feature_shape(option.features, feature_dim, map_shape)
    row = fmt.row_bytes(num_classes, fshape, feature_dtype=option.feature_dtype, topk=k)
    chunk, shard = fmt.default_layout(n_samples, fmt.widest_row_bytes(num_classes, k, fshape))
    arrays = fmt.data_array_names(k, bool(fshape), option.feature_dtype == "int8")
    return StoreSize(option, row, row * n_samples, row * n_samples * views, chunk, shard,
                     fmt.files_per_view(n_samples, shard, len(arrays)))


def size_table(sizes: Sequence[StoreSize], n_samples: int, views: int) -> list[str]:
    """A markdown table of ``sizes``, with TinyViT's published figures (bytes a row derived from them) below."""
    lines = [f"| store option ({n_samples:,} rows a view) | bytes a row | a view | {views} views | rows a chunk | "
             "rows a shard | files a view |", "|---|---|---|---|---|---|---|"]
    for s in sizes:
        lines.append(f"| {s.option.describe()} | {s.row_bytes:,} B | {human_bytes(s.view_bytes)} | "
                     f"{human_bytes(s.store_bytes)} | {s.chunk_rows:,} | {s.shard_rows:,} | {s.files_per_view:,} |")
    for name, total, rows, epochs in TINYVIT:
        lines.append(f"| {name} | ~{total / (rows * epochs):.0f} B | {human_bytes(total / epochs)} | "
                     f"{human_bytes(total)} over {epochs} | – | – | – |")
    return lines
