"""int8 features: symmetric quantisation with one float32 scale a row (``--feature-dtype int8``, docs/STORE.md)."""

from __future__ import annotations

import numpy as np

# Fill value of int8 feature arrays: symmetric quantisation writes only -127..127, so an unwritten chunk
# reads as -128 everywhere and is told from a written one, as NaN tells the float arrays'.
INT8_FILL = -128


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation with one scale a row: ``q = round(x / s)`` in -127..127, ``s = max|x| / 127``
    over the row (1 for a row of zeros), so that ``q·s`` is within ``s/2`` of every value of ``x``."""
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    absmax = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(len(flat), np.float32)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(np.shape(x)), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values of int8 rows ``q`` (R, ...) with their scales ``scale`` (R,)."""
    rows: np.ndarray = q.astype(np.float32).reshape(len(q), -1) * scale[:, None]
    return rows.reshape(q.shape)
