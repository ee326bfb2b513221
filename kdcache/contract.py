"""What kdcache expects of a registered architecture, method and data set, as checks anyone can run.

kdcache's own tests run these over every entry of each registry; a plug-in author runs
them on theirs (``kdcache.contract.check_method("my-method")`` in a test). Each check
raises :class:`ContractError` (an ``AssertionError``, so pytest shows it as a failure)
naming the entry and the broken promise, and returns quietly when all holds. They run
on the CPU in about a second per entry (ImageNet-sized models take a few).
"""

from __future__ import annotations

import math
import os
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.losses import Batch, LossTerms, MethodOptions, build_method, method_class
from kdcache.models import build_model, forward_with_map, map_shape, model_info
from kdcache.store.form import FeatureForm
from kdcache.topk import TopKLogits


class ContractError(AssertionError):
    """A registered entry that breaks what kdcache relies on."""


def _require(ok: bool, what: str, message: str) -> None:
    if not ok:
        raise ContractError(f"{what}: {message}")


# -- architectures ------------------------------------------------------------------------------


def check_model(name: str, num_classes: int = 10, batch: int = 2) -> None:
    """Architecture ``name`` builds for ``num_classes``, maps ``x`` to ``(h, z)`` with ``model.head(h) == z``
    (``head`` the final ``nn.Linear``, a property that adds no state_dict keys), and splits its forward pass
    at the global pool: ``pool_map(feature_map(x)) == h``, with a 4-D last-block map whose shape
    :func:`~kdcache.models.map_shape` predicts; a model with ``student_map`` (the official ``feat[-2]`` before the
    pool's input) also has ``pool_input(student_map(x)) == feature_map(x)``. Distill and precompute rely on all
    of it."""
    what = f"architecture {name}"
    info = model_info(name)
    model = build_model(name, num_classes).eval()
    _require(isinstance(model, nn.Module), what, f"the builder returned {type(model).__name__}, not an nn.Module")
    head = getattr(model, "head", None)
    _require(isinstance(head, nn.Linear) and head.out_features == num_classes, what,
             f"model.head must be the final nn.Linear with {num_classes} outputs, got {head!r}")
    assert isinstance(head, nn.Linear)  # for the type checker: _require above has made sure
    _require(any(m is head for m in model.modules()), what, "model.head is not a module of the model")
    _require("head" not in dict(model.named_children()) and not any(k.startswith("head.") for k in model.state_dict()),
             what, "model.head must be a property returning the existing final layer (no new state_dict keys)")
    for method in ("feature_map", "pool_map"):
        _require(callable(getattr(model, method, None)), what, f"model.{method} is missing")
    torch.manual_seed(0)
    x = torch.rand(batch, 3, info.input_size, info.input_size)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(x)
        hook.remove()
        _require(isinstance(out, tuple) and len(out) == 2, what, "forward(x) must return the pair (h, z)")
        h, z = out
        _require(h.shape == (batch, head.in_features), what,
                 f"h has shape {tuple(h.shape)}, expected ({batch}, {head.in_features}) (the head's input)")
        _require(z.shape == (batch, num_classes), what, f"z has shape {tuple(z.shape)}, expected ({batch}, "
                                                        f"{num_classes})")
        _require(len(seen) == 1 and torch.equal(seen[0], h), what, "h must be exactly what model.head receives")
        _require(torch.equal(head(h), z), what, "model.head(h) must reproduce z")
        m, h2, z2 = forward_with_map(model, x)
        _require(m.dim() == 4 and m.shape[0] == batch, what, f"feature_map(x) must be (B, C, H, W), got "
                                                             f"{tuple(m.shape)}")
        _require(torch.equal(h2, h) and torch.equal(z2, z), what,
                 "head(pool_map(feature_map(x))) must equal forward(x)")
        if hasattr(model, "student_map"):  # the official feat[-2] comes before the pool's input
            _require(callable(getattr(model, "pool_input", None)), what,
                     "a model with student_map needs pool_input (student map -> the pool's input)")
            f, h3, z3 = forward_with_map(model, x, as_student=True)
            _require(f.dim() == 4 and f.shape[0] == batch, what, f"student_map(x) must be (B, C, H, W), got "
                                                                 f"{tuple(f.shape)}")
            _require(torch.equal(cast(Any, model).pool_input(f), m) and torch.equal(h3, h) and torch.equal(z3, z), what,
                     "pool_input(student_map(x)) must equal feature_map(x)")
            _require(tuple(f.shape[1:]) == map_shape(model, info.input_size, as_student=True), what,
                     "map_shape(as_student) disagrees with the real student map")
    _require(tuple(m.shape[1:]) == map_shape(model, info.input_size), what,
             "map_shape (a meta-device forward pass) disagrees with the real last-block map")
    _require(getattr(model, "kdcache_arch", None) == name, what, "build_model must tag the model with its name")


# -- distillation methods -----------------------------------------------------------------------


def check_method(name: str, options: MethodOptions = MethodOptions(), num_classes: int = 5, batch: int = 4) -> None:
    """Method ``name`` builds for the teacher counts it declares, in the pooled form and (when it uses
    features) the spatial form; at epochs 1 and 2 it returns :class:`~kdcache.losses.LossTerms` with a finite
    scalar total that backpropagates into the student's logits, scalar terms, ``(K,)`` teacher weights and
    ``(B, K)`` sample weights or None; and its state_dict loads into a fresh copy (``--resume`` needs that)."""
    cls = method_class(name)
    info = cls.info
    counts = {"0": [2], "1": [1], "K": [1, 3]}[info.n_teachers]
    forms = [FeatureForm.POOLED, FeatureForm.SPATIAL] if info.uses_features else [FeatureForm.POOLED]
    for k in counts:
        for form in forms:
            what = f"method {name} ({k} teacher{'s' if k > 1 else ''}, {form.value} features)"
            _check_method_case(name, options, num_classes, batch, k, form, what)


def _check_method_case(name: str, options: MethodOptions, num_classes: int, batch: int, k: int, form: FeatureForm,
                       what: str) -> None:
    cls = method_class(name)
    torch.manual_seed(0)
    if form is FeatureForm.POOLED:
        student_dim: int | tuple[int, int, int] = 6
        pooled_dims = [4 + 2 * j for j in range(k)]
        dims: list[int | tuple[int, int, int]] = list(pooled_dims)
        feats = [torch.randn(batch, d) for d in pooled_dims]
        student_feature = torch.randn(batch, 6)
    else:
        map_dims = [(4 + 2 * j, 2 + 2 * (j % 2), 2 + 2 * (j % 2)) for j in range(k)]
        student_dim, dims = (6, 4, 4), list(map_dims)
        feats = [torch.relu(torch.randn(batch, *d)) for d in map_dims]
        student_feature = torch.randn(batch, 6, 4, 4)
    widths = [d if isinstance(d, int) else d[0] for d in dims]
    heads = [(torch.randn(num_classes, w), torch.randn(num_classes)) for w in widths]
    build: dict[str, Any] = dict(num_classes=num_classes, student_dim=student_dim, teacher_dims=dims,
                                 teacher_heads=heads if cls.info.uses_heads else None, options=options)
    try:
        method = build_method(name, **build)
    except KdcacheError as exc:
        raise ContractError(f"{what}: build_method refused: {exc}") from None
    _require(isinstance(method, cls), what, f"build_method gave a {type(method).__name__}, not {cls.__name__}")
    # epochs 1 and 2 from dense stores; epoch 3 from top-2 stores (their spread logits and exact rows), unless
    # the method declares that it needs every logit
    for epoch in (1, 2, 3)[:2 if cls.info.dense_logits else 3]:
        s = torch.randn(batch, num_classes, requires_grad=True)
        g = student_feature.clone().requires_grad_(True)
        labels = torch.arange(batch) % num_classes
        teacher_logits = [torch.randn(batch, num_classes) for _ in range(k)]
        topk: list[TopKLogits | None] | None = None
        if epoch == 3:
            tops = [TopKLogits.from_logits(z, labels, 2, options.temperature) for z in teacher_logits]
            teacher_logits, topk = [t.dense() for t in tops], list(tops)
        out = method(Batch(s, g, labels, teacher_logits, feats, epoch, topk))
        _require(isinstance(out, LossTerms), what, f"forward must return LossTerms, got {type(out).__name__}")
        _require(out.total.dim() == 0 and math.isfinite(float(out.total.detach())), what,
                 f"total must be a finite scalar, got {out.total}")
        _require(bool(out.terms) and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.terms.values()),
                 what, "terms must map names to scalar tensors (the log's columns)")
        if out.teacher_weights is not None:
            _require(tuple(out.teacher_weights.shape) == (k,), what,
                     f"teacher_weights must be (K,) = ({k},), got {tuple(out.teacher_weights.shape)}")
        if out.sample_weights is not None:
            _require(tuple(out.sample_weights.shape) == (batch, k), what,
                     f"sample_weights must be (B, K) = ({batch}, {k}), got {tuple(out.sample_weights.shape)}")
        out.total.backward()
        _require(s.grad is not None and bool(torch.isfinite(s.grad).all()), what,
                 "the total must give finite gradients to the student's logits")
    copy = build_method(name, **build)
    try:
        copy.load_state_dict(method.state_dict())
    except (RuntimeError, KeyError) as exc:
        raise ContractError(f"{what}: its state_dict does not load into a fresh copy: "
                            f"{str(exc).splitlines()[0]}") from None


# -- data sets ----------------------------------------------------------------------------------


def check_dataset(name: str, root: str | os.PathLike[str] | None = None) -> None:
    """Data set ``name`` loads from ``root`` into a :class:`~kdcache.data.DataSet` whose splits hold labels in
    ``[0, C)``, uint8 RGB images of the sizes they report, a view recipe that replays to batches of the
    data set's side, and a fingerprint that is the same on a second load (stores are keyed by it)."""
    from kdcache.batches import test_batches
    from kdcache.data import DataSet, load_dataset
    from kdcache.views import get_recipe

    what = f"data set {name}"
    data = load_dataset(name, root)
    _require(isinstance(data, DataSet), what, f"the loader returned {type(data).__name__}, not a DataSet")
    _require(data.num_classes >= 1 and len(data.classes) == data.num_classes, what,
             f"{len(data.classes)} class names for {data.num_classes} classes")
    _require(len(data.mean) == 3 and len(data.std) == 3 and min(data.std) > 0, what,
             "mean and std must be three numbers each, std positive")
    recipe = get_recipe(data.recipe)
    _require(recipe.size == data.image_size, what, f"the recipe {data.recipe!r} makes {recipe.size} px views, the "
                                                   f"data set says {data.image_size}")
    _require(isinstance(data.fingerprint, str) and bool(data.fingerprint), what, "the fingerprint must be a text")
    for split_name, split in (("train", data.train), ("test", data.test)):
        where = f"{what}, {split_name} split"
        n = len(split)
        _require(n > 0, where, "it is empty")
        labels = np.asarray(split.labels)
        _require(labels.dtype == np.int64 and labels.shape == (n,), where, "labels must be (N,) int64")
        _require(int(labels.min()) >= 0 and int(labels.max()) < data.num_classes, where,
                 f"labels must lie in [0, {data.num_classes})")
        sizes = np.asarray(split.sizes)
        _require(sizes.shape == (n, 2), where, f"sizes must be (N, 2), got {sizes.shape}")
        images = split.load([0, n - 1])
        for i, image in zip((0, n - 1), images):
            _require(image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3, where,
                     f"image {i} must be a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
            _require(tuple(image.shape[1:]) == tuple(int(v) for v in sizes[i]), where,
                     f"image {i} is {tuple(image.shape[1:])}, its size says {tuple(sizes[i])}")
    x, y = next(iter(test_batches(data, data.recipe, torch.device("cpu"), 2)))
    _require(tuple(x.shape) == (min(2, len(data.test)), 3, data.image_size, data.image_size), what,
             f"test views have shape {tuple(x.shape)}")
    _require(load_dataset(name, root).fingerprint == data.fingerprint, what,
             "a second load gives another fingerprint (it must identify the data, not the load)")
