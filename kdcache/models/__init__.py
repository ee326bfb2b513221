"""The model zoo: one registry of architectures, a uniform ``(h, z)`` interface, checkpoints.

Every registered model maps a batch ``x`` to ``(h, z)``: ``h`` (B, D) is the
input of the model's final ``nn.Linear`` and ``z`` (B, C) the logits, and
``model.head`` is that linear layer (a property, so it adds no state_dict keys),
so ``model.head(h)`` reproduces ``z``. Every model also exposes its last-block
map: ``model.feature_map(x)`` (B, C', H, W) is what its global pool receives and
``model.pool_map(m)`` gives ``h`` from it, so ``forward`` is
``head(pool_map(feature_map(x)))``: a teacher's stored map. A student's map, the one
its aligners take, is the official CA-MKD ``feat[-2]``; for most networks that is the
same map, and a network where it comes earlier (the MobileNetV2s and torchvision's
ShuffleNetV2, whose last 1x1 conv comes after it) adds ``model.student_map(x)`` and
``model.pool_input(f)``, with ``feature_map(x) == pool_input(student_map(x))``
(:func:`forward_with_map` ``as_student``). The CIFAR family keeps RepDistiller /
CA-MKD names and keys, the ImageNet family torchvision's. Plug-ins add their own
architectures with :func:`register_model` (``kdcache.contract.check_model`` tests one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from kdcache import arguments
from kdcache.errors import KdcacheError
from kdcache.registry import Registry

from .checkpoint import extract_state_dict, load_checkpoint, read_checkpoint
from .cifar import CIFAR_MODELS
from .imagenet import IMAGENET_MODELS

__all__ = [
    "ModelInfo", "model_names", "model_info", "build_model", "feature_dim", "forward_with_map", "map_shape",
    "load_checkpoint", "extract_state_dict", "read_checkpoint", "forbid_construction", "register_model", "head_of",
]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about an architecture without building it."""

    name: str
    family: str  # "cifar" or "imagenet" for the built-in ones, a plug-in's own word for its models
    input_size: int  # side of the square input image it is made for: 32 for cifar, 224 for imagenet
    description: str  # one line


_INPUT_SIZE = {"cifar": 32, "imagenet": 224}
Builder = Callable[[int], nn.Module]
_MODELS: Registry[tuple[ModelInfo, Builder]] = Registry("architecture")


def register_model(name: str, *, family: str = "plugin", input_size: int = 32, description: str = "",
                   replace: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(num_classes) -> nn.Module`` as architecture ``name``.

    The module must follow the zoo's interface (see this module's docstring): ``forward(x)`` gives
    ``(h, z)``, ``model.head`` is the final linear layer, and ``feature_map`` / ``pool_map`` split the
    forward pass at the global pool. ``kdcache.contract.check_model(name)`` checks all of it.
    """
    input_size = arguments.integer("input_size", input_size, low=1, high=2**16,
                                   why=f"the side in pixels of architecture {name!r}'s square input")

    def add(builder: Builder) -> Builder:
        doc = (builder.__doc__ or "").strip().splitlines()
        _MODELS.add(name, (ModelInfo(name, family, input_size, description or (doc[0] if doc else name)),
                           builder), replace=replace)
        return builder
    return add


for _family, _table in (("cifar", CIFAR_MODELS), ("imagenet", IMAGENET_MODELS)):
    for _name, (_builder, _description) in _table.items():
        register_model(_name, family=_family, input_size=_INPUT_SIZE[_family], description=_description)(_builder)

# Reasons of the forbid_construction contexts now active (process-wide, so that
# background threads are covered too).
_forbidden: list[str] = []


def model_names() -> list[str]:
    """All registered architecture names, in registration order (CIFAR family, ImageNet family, plug-ins)."""
    return _MODELS.names()


def _lookup(name: str) -> tuple[ModelInfo, Builder]:
    return _MODELS.get(name)


def model_info(name: str) -> ModelInfo:
    """Registry facts about ``name``; UnknownNameError listing the known names if absent."""
    return _lookup(name)[0]


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``name`` network with ``num_classes`` outputs (no weights loaded).

    Raises UnknownNameError for an unregistered name, and KdcacheError while a
    :func:`forbid_construction` context is active.
    """
    if _forbidden:
        raise KdcacheError(f"refusing to build a network: {_forbidden[-1]}")
    _, builder = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdcacheError(f"num_classes must be a positive integer, got {num_classes!r}")
    with _MODELS.running(name):  # a plug-in's failure is named as its own
        model = builder(num_classes)
    # Plain attribute (not state): lets checkpoint errors name the architecture.
    setattr(model, "kdcache_arch", name)
    return model


def feature_dim(model: nn.Module) -> int:
    """Width D of the penultimate features ``h``: the input size of ``model.head``."""
    return int(head_of(model).in_features)


def head_of(model: nn.Module) -> nn.Linear:
    """``model.head``, the final linear layer of every registered model (a property of the zoo's interface)."""
    return cast(nn.Linear, getattr(model, "head"))


def forward_with_map(model: nn.Module, x: torch.Tensor,
                     as_student: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, h, z)`` of one forward pass: the map, the pooled features and the logits.

    ``m`` is the map the global pool receives (a teacher's, as stored), or with ``as_student`` the official
    CA-MKD ``feat[-2]`` (the map a student's aligners take: :meth:`student_map` where a network has one).
    """
    zoo = cast(Any, model)  # the zoo's interface: feature_map, pool_map and head (student_map, pool_input)
    if as_student and hasattr(zoo, "student_map"):
        f = zoo.student_map(x)
        h = zoo.pool_map(zoo.pool_input(f))
        return f, h, zoo.head(h)
    m = zoo.feature_map(x)
    h = zoo.pool_map(m)
    return m, h, zoo.head(h)


def map_shape(model: nn.Module, image_size: int, as_student: bool = False) -> tuple[int, int, int]:
    """``(C', H, W)`` of ``model``'s last-block map (with ``as_student``, of its student map: see
    :func:`forward_with_map`) for square inputs of side ``image_size``.

    Runs a copy of the model in eval mode on one blank image on the CPU (the model itself, its mode and
    its batch-norm statistics are untouched), or on the meta device when its weights are there (no memory,
    no arithmetic: ``kdcache sizes``). The meta device's first use imports torch's decompositions, about
    3 s, which every run would pay; one small CPU forward costs milliseconds to a fraction of a second.
    Raises KdcacheError with one line when the model cannot take that size.
    """
    import copy

    on_meta = any(p.is_meta for p in model.parameters())
    device = torch.device("meta" if on_meta else "cpu")
    probe = copy.deepcopy(model).to(device).eval()
    try:
        with torch.no_grad():
            m, h, z = forward_with_map(probe, torch.zeros(1, 3, image_size, image_size, device=device), as_student)
    except (RuntimeError, ValueError) as exc:
        arch = getattr(model, "kdcache_arch", type(model).__name__)
        raise KdcacheError(f"{arch} cannot take {image_size}x{image_size} images: "
                           f"{str(exc).splitlines()[0]}") from None
    if m.dim() != 4 or min(m.shape[-2:]) < 1:
        raise KdcacheError(f"{getattr(model, 'kdcache_arch', '?')} gives a last-block map of shape "
                           f"{tuple(m.shape[1:])} for {image_size}x{image_size} images")
    return int(m.shape[1]), int(m.shape[2]), int(m.shape[3])


@contextlib.contextmanager
def forbid_construction(reason: str) -> Iterator[None]:
    """While active, :func:`build_model` raises instead of building.

    Lets a caller prove a code path (e.g. distillation from cached teacher
    outputs) never builds a network. Contexts nest; each exit restores the
    previous state, also when the body raises.
    """
    _forbidden.append(reason)
    try:
        yield
    finally:
        _forbidden.pop()
