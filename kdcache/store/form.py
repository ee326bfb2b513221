"""A teacher store's form, as one typed value: what its rows hold and how its teacher ran.

A form is its logits (dense, or the top K with the temperature T they serve), its features (none, the pooled
vector or the spatial map), their dtype (float16, or int8 with a float32 scale a row) and the precision of the
teacher's forward pass (float32, or autocast in bfloat16 or float16). It is parsed once (from the command
line's strings by :class:`StoreForm`'s constructor, from a store's attributes by :meth:`StoreForm.from_attrs`,
where the defaults of stores older than each option live) and carried everywhere else; the rest of kdcache asks
it questions (``form.has_features``, ``form.spatial``, ``form.int8``, ``form.topk``) instead of comparing
strings. docs/STORE.md describes the attributes it reads and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kdcache.defaults import AMP_DTYPES, TEMPERATURE

TOPK_PREFIX = "topk:"
DENSE = "dense"
AMP_PREFIX = "amp-"
# A top-K store's arrays (docs/STORE.md, "Top-K logits"): per row the K largest logits (float16, largest first),
# their classes (the smallest unsigned type that holds 0..C, its largest value marking an unwritten chunk), and
# float32 scalars: the log-sum-exp at T = 1, the label's logit, the entropy at T = 1, the log-sum-exp at the
# store's T and the probability mass at T outside the K. kdcache.topk computes and reads them.
TOPK_ARRAYS = ("topk_values", "topk_indices", "logit_stats")
LOGIT_STATS = ("lse", "label_logit", "entropy", "lse_t", "rest_t")
# The temperatures a KD term, and a top-K store's scalars, are computed at: T² scales the KD term in float32 and a
# top-K store keeps lse_t = max(z)/T + log Σ exp((z − max z)/T) in float32, z float16 (|z| ≤ 65,504). T in
# [2^-63, 2^63] keeps T² a normal float32 (2^-126 to 2^126: neither 0 nor inf) and lse_t finite (at most
# 65,504 · 2^63 ≈ 6e23 + log C); 1e-40, say, makes lse_t inf (a store `cache verify` calls damaged) and T² 0.
MIN_TEMPERATURE = 2.0 ** -63
MAX_TEMPERATURE = 2.0 ** 63


def temperature_problem(temperature: float) -> str | None:
    """Why ``temperature`` cannot be a KD temperature (one line, without the option's name), or None."""
    if math.isfinite(temperature) and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        return None
    return f"must be a positive number from {MIN_TEMPERATURE:.3g} to {MAX_TEMPERATURE:.3g} (got {temperature:g})"


def index_itemsize(num_classes: int) -> int:
    """Bytes of a top-K store's class index: the smallest unsigned type holding 0..C (so that its largest value,
    never a class, can mark an unwritten chunk)."""
    for size in (1, 2, 4):
        if int(num_classes) < 2 ** (8 * size):
            return size
    raise ValueError(f"{num_classes} classes are too many for a top-K store")


class FeatureForm(Enum):
    """What a store keeps of the teacher's features: the penultimate vector (V, N, D), the last-block map its
    global pool receives (V, N, C', H, W; the official CA-MKD ``feat[-2]``), or nothing."""

    POOLED = "pooled"
    SPATIAL = "spatial"
    NONE = "none"


class FeatureDtype(Enum):
    """How stored features are kept: float16, or int8 with one float32 scale a row (about half the bytes)."""

    FLOAT16 = "float16"
    INT8 = "int8"


class FeatureCompression(Enum):
    """How the features array is compressed before its CRC32C. Not part of a store's form or id (the values are
    the same): how a store is written, like its chunks."""

    ZSTD = "zstd"
    NONE = "none"


class Forward(Enum):
    """The precision of the teacher's forward pass. ``AMP`` is the device's own autocast dtype (float16 on CUDA,
    bfloat16 elsewhere) until :meth:`on` resolves it; a store records a resolved one."""

    FLOAT32 = "float32"
    AMP = "amp"
    AMP_BFLOAT16 = AMP_PREFIX + "bfloat16"
    AMP_FLOAT16 = AMP_PREFIX + "float16"

    @classmethod
    def autocast(cls, dtype: str | None) -> "Forward":
        """The forward of autocast in ``dtype`` (``bfloat16``, ``float16``; None: the device's own)."""
        if dtype is None:
            return cls.AMP
        if dtype not in AMP_DTYPES:
            raise FormError("forward", f"the autocast dtype must be one of {', '.join(AMP_DTYPES)}, got {dtype!r}")
        return cls(AMP_PREFIX + dtype)

    @property
    def autocast_dtype(self) -> str | None:
        """The autocast dtype of a resolved forward; None for float32."""
        if self is Forward.FLOAT32:
            return None
        if self is Forward.AMP:
            raise ValueError("the autocast dtype of --amp depends on the device: resolve it with Forward.on")
        value: str = self.value
        return value[len(AMP_PREFIX):]

    def on(self, device_type: str) -> "Forward":
        """This forward on a device of type ``device_type``: ``AMP`` becomes float16 on CUDA (tensor cores, and
        three more mantissa bits than bfloat16), bfloat16 elsewhere (the CPU's autocast dtype)."""
        if self is not Forward.AMP:
            return self
        return Forward.AMP_FLOAT16 if device_type == "cuda" else Forward.AMP_BFLOAT16


class FormError(ValueError):
    """A form no store can have; ``option`` names the part at fault (``logits``, ``temperature``, ``features``,
    ``feature_dtype``, ``forward``), so that a front end can name its own option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def parse_logits(text: str) -> int | None:
    """K of a ``topk:K`` logits form, None for ``dense``; ValueError saying what is wrong otherwise."""
    if text == DENSE:
        return None
    if text.startswith(TOPK_PREFIX):
        k = text[len(TOPK_PREFIX):]
        if k.isdigit() and int(k) >= 1:
            return int(k)
        raise FormError("logits", f"K of {text!r} must be a whole number of at least 1")
    raise FormError("logits", f"the logits form must be dense or topk:K (e.g. topk:5), got {text!r}")


def _enum(kind: type[Any], value: Any, option: str, what: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(str(m.value) for m in kind if m.value != "amp")
        raise FormError(option, f"unknown {what} {value!r}; known: {known}") from None


@dataclass(frozen=True, init=False)
class StoreForm:
    """The form of a teacher store's rows (module docstring). Equal forms of one teacher on one plan are one store."""

    topk: int | None
    temperature: float | None
    features: FeatureForm
    feature_dtype: FeatureDtype
    forward: Forward

    def __init__(self, logits: str = DENSE, features: FeatureForm | str = FeatureForm.POOLED,
                 feature_dtype: FeatureDtype | str = FeatureDtype.FLOAT16, forward: Forward | str = Forward.FLOAT32,
                 temperature: float | None = None) -> None:
        """``logits`` ``dense`` or ``topk:K``; a top-K form serves distillation at ``temperature`` (default the KD
        temperature, 4), a dense one takes none. ValueError, one line, for a form no store can have."""
        topk = parse_logits(logits)
        form = _enum(FeatureForm, features, "features", "feature form")
        dtype = _enum(FeatureDtype, feature_dtype, "feature_dtype", "feature dtype")
        fwd = _enum(Forward, forward, "forward", "forward precision")
        if topk is None:
            if temperature is not None:
                raise FormError("temperature", "a dense store keeps every logit and serves every temperature: give a "
                                               "temperature with topk:K only")
        else:
            temperature = TEMPERATURE if temperature is None else float(temperature)
            problem = temperature_problem(temperature)
            if problem is not None:
                raise FormError("temperature", f"the temperature of a top-K store {problem}")
        if dtype is FeatureDtype.INT8 and form is FeatureForm.NONE:
            raise FormError("feature_dtype", "a store without features has no feature dtype: int8 needs pooled or "
                                             "spatial features")
        object.__setattr__(self, "topk", topk)
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "features", form)
        object.__setattr__(self, "feature_dtype", dtype)
        object.__setattr__(self, "forward", fwd)

    # -- questions the rest of kdcache asks ---------------------------------------------------

    @property
    def logits(self) -> str:
        """The logits form's name: ``dense`` or ``topk:K``."""
        return DENSE if self.topk is None else f"{TOPK_PREFIX}{self.topk}"

    @property
    def has_features(self) -> bool:
        return self.features is not FeatureForm.NONE

    @property
    def spatial(self) -> bool:
        return self.features is FeatureForm.SPATIAL

    @property
    def int8(self) -> bool:
        return self.feature_dtype is FeatureDtype.INT8

    def on(self, device_type: str) -> "StoreForm":
        """This form with its forward resolved for a device of type ``device_type`` (:meth:`Forward.on`)."""
        return StoreForm(self.logits, self.features, self.feature_dtype, self.forward.on(device_type), self.temperature)

    def describe(self) -> str:
        """One line for tables: ``--logits dense, spatial float16``, ``--logits topk:10, no features``."""
        feats = "no features" if not self.has_features else f"{self.features.value} {self.feature_dtype.value}"
        return f"--logits {self.logits}, {feats}"

    def label(self) -> str:
        """The short form ``cache ls`` prints: ``spatial``, ``pooled:int8``, ``none``."""
        return self.features.value + (":" + self.feature_dtype.value if self.int8 else "")

    def logits_label(self) -> str:
        """The logits form ``cache ls`` prints: ``dense``, or ``topk:K@T`` with the temperature a top-K store serves."""
        return self.logits if self.temperature is None else f"{self.logits}@T{self.temperature:g}"

    # -- rows -------------------------------------------------------------------------------

    def feature_shape(self, dim: int, map_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-row shape of the features array: (D,), (C', H, W), or () without features."""
        if self.features is FeatureForm.POOLED:
            return (int(dim),)
        if self.features is FeatureForm.SPATIAL:
            return tuple(int(s) for s in map_shape)
        return ()

    def logit_arrays(self) -> tuple[str, ...]:
        """The arrays of one row's logits: ``logits``, or a top-K store's values, classes and scalars."""
        return ("logits",) if self.topk is None else TOPK_ARRAYS

    def feature_arrays(self) -> tuple[str, ...]:
        """The arrays of one row's features: none, the values, and their scales when int8."""
        if not self.has_features:
            return ()
        return ("features", "feature_scale") if self.int8 else ("features",)

    def data_arrays(self) -> tuple[str, ...]:
        return self.logit_arrays() + self.feature_arrays()

    def logits_row_bytes(self, num_classes: int) -> int:
        """Uncompressed bytes of one row's logits: C float16 values, or K values, K indices and the scalars."""
        if self.topk is None:
            return 2 * int(num_classes)
        return self.topk * (2 + index_itemsize(num_classes)) + 4 * len(LOGIT_STATS)

    def feature_row_bytes(self, feature_shape: tuple[int, ...]) -> int:
        """Uncompressed bytes of one row's features: 2 a value, or 1 a value and a float32 scale when int8."""
        values = _values(feature_shape)
        if self.int8 and values:
            return values + 4
        return 2 * values

    def row_bytes(self, num_classes: int, feature_shape: tuple[int, ...]) -> int:
        """Uncompressed bytes of one stored row: its logits and its features."""
        return self.logits_row_bytes(num_classes) + self.feature_row_bytes(feature_shape)

    def widest_row_bytes(self, num_classes: int, feature_shape: tuple[int, ...]) -> int:
        """The bytes of a row of the widest array, which sizes the chunks: the logits' or the features' at float16
        whatever their dtype (so an int8 store keeps the layout of its float16 twin)."""
        return max(self.logits_row_bytes(num_classes), 2 * _values(feature_shape))

    # -- attributes and ids -----------------------------------------------------------------

    def to_attrs(self) -> dict[str, Any]:
        """The store attributes that record this form (docs/STORE.md)."""
        if self.forward is Forward.AMP:
            raise ValueError("a store records a resolved forward precision: call StoreForm.on(device type) first")
        attrs: dict[str, Any] = {"features": self.features.value, "feature_dtype": self.feature_dtype.value,
                                 "logits": self.logits, "forward": self.forward.value}
        if self.topk is not None:
            attrs["logits_temperature"] = self.temperature
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "StoreForm":
        """The form a store's attributes record. Stores written before an option existed lack its attribute and
        hold its default: pooled float16 features, dense logits, a float32 forward."""
        logits = str(attrs.get("logits", DENSE))
        return cls(logits=logits, features=str(attrs.get("features", FeatureForm.POOLED.value)),
                   feature_dtype=str(attrs.get("feature_dtype", FeatureDtype.FLOAT16.value)),
                   forward=str(attrs.get("forward", Forward.FLOAT32.value)),
                   temperature=None if logits == DENSE else attrs.get("logits_temperature"))

    def id_payload(self) -> dict[str, Any]:
        """What the form adds to a teacher id's payload: nothing for pooled float16 dense float32 (so stores written
        before the options existed keep their ids), else each option that differs from that."""
        payload: dict[str, Any] = {}
        if self.features is not FeatureForm.POOLED:
            payload["features"] = self.features.value
        if self.feature_dtype is not FeatureDtype.FLOAT16:
            payload["feature_dtype"] = self.feature_dtype.value
        if self.topk is not None:
            payload["logits"] = self.logits
            payload["logits_temperature"] = self.temperature
        if self.forward is not Forward.FLOAT32:
            payload["forward"] = self.to_attrs()["forward"]
        return payload


def _values(feature_shape: tuple[int, ...]) -> int:
    """Values of one row's features: none for the shape () of a store without features."""
    return math.prod(feature_shape) if feature_shape else 0


def every_form(ks: tuple[int, ...] | list[int] = (10, 100)) -> list[StoreForm]:
    """Dense and top-K logits (each K of ``ks``), each with no, pooled and spatial features in float16 and int8."""
    out = []
    for logits in (DENSE, *(f"{TOPK_PREFIX}{k}" for k in ks)):
        for features in (FeatureForm.NONE, FeatureForm.POOLED, FeatureForm.SPATIAL):
            dtypes = [FeatureDtype.FLOAT16] if features is FeatureForm.NONE else list(FeatureDtype)
            out += [StoreForm(logits, features, dtype) for dtype in dtypes]
    return out
