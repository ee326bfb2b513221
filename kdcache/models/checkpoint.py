"""Reading checkpoints and loading their weights into a model, with one-line errors.

Accepted layouts: ``{'model': state_dict}`` (RepDistiller, CA-MKD, torchvision
references), ``{'state_dict': state_dict}`` (timm) and a bare ``state_dict``; a
``module.`` prefix left by DataParallel / DistributedDataParallel is stripped.
Every failure is a :class:`~kdcache.errors.CheckpointError` whose message is a
single line naming the file and what does not fit.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from kdcache.errors import CheckpointError

_WRAPPER_KEYS = ("model", "state_dict")
_DP_PREFIX = "module."
_SHOW = 5  # how many key names a mismatch message lists


def read_checkpoint(path: str | os.PathLike[str]) -> object:
    """Load a checkpoint file onto the CPU and return the raw object.

    Tries ``weights_only=True`` first; only when the file is a valid pickle that
    holds more than tensors and plain containers (e.g. the ``argparse.Namespace``
    torchvision's reference scripts store under ``'args'``) does it fall back to
    a full unpickle, which runs code from the file: load only checkpoints you trust.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"cannot read checkpoint {p}: it is not a file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise _unreadable(p, exc) from None
    except Exception as exc:  # torch.load raises many types on bad input
        raise _unreadable(p, exc) from None
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise _unreadable(p, exc) from None


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(detail) > 120:
        detail = detail[:117] + "..."
    reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return CheckpointError(
        f"cannot read checkpoint {path}: it is truncated or not a PyTorch file ({reason})")


def _is_state_dict(obj: object) -> TypeGuard[Mapping[str, torch.Tensor]]:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def extract_state_dict(ckpt: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the model weights inside a loaded checkpoint object.

    Looks for a bare state_dict, then under ``'model'`` and ``'state_dict'``;
    strips a ``module.`` prefix that every key carries. ``source`` names the
    checkpoint in the error raised when no state_dict is found.
    """
    if _is_state_dict(ckpt):
        sd = ckpt
    elif isinstance(ckpt, Mapping) and any(_is_state_dict(ckpt.get(k)) for k in _WRAPPER_KEYS):
        sd = next(ckpt[k] for k in _WRAPPER_KEYS if _is_state_dict(ckpt.get(k)))
    else:
        if isinstance(ckpt, Mapping):
            keys = ", ".join(repr(k) for k in list(ckpt)[:10]) or "none"
            found = f"a dict with keys {keys}"
        else:
            found = f"a {type(ckpt).__name__}"
        raise CheckpointError(
            f"no state dict found in {source}: expected {{'model': state_dict}}, "
            f"{{'state_dict': state_dict}} or a bare state_dict of tensors, got {found}")
    if all(k.startswith(_DP_PREFIX) for k in sd):
        return {k[len(_DP_PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def _head_param_names(model: nn.Module) -> set[str]:
    head = getattr(model, "head", None)
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.weight", f"{name}.bias"}
    return set()


def _listing(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {what} key{'s' if len(keys) != 1 else ''} ({shown})"


def check_fit(model: nn.Module, sd: Mapping[str, torch.Tensor], ckpt: object,
              source: str = "checkpoint") -> None:
    """Raise CheckpointError unless ``sd`` has exactly the model's keys and shapes.

    A missing BatchNorm ``num_batches_tracked`` counter is tolerated: checkpoints
    from PyTorch < 0.4.1 lack it, and it does not affect the forward pass.
    """
    arch = getattr(model, "kdcache_arch", type(model).__name__)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = [_listing(missing, "missing")] if missing else []
        parts += [_listing(unexpected, "unexpected")] if unexpected else []
        saved = ""
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get("arch"), str):
            saved = f" (it was saved from architecture '{ckpt['arch']}')"
        raise CheckpointError(
            f"checkpoint {source} does not fit architecture '{arch}'{saved}: "
            + "; ".join(parts))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if wrong:
        shown = "; ".join(
            f"{k} is {tuple(sd[k].shape)} in the checkpoint but {tuple(expected[k].shape)} "
            f"in the model" for k in wrong[:_SHOW])
        more = f" (and {len(wrong) - _SHOW} more)" if len(wrong) > _SHOW else ""
        hint = ""
        head = sorted(_head_param_names(model) & set(wrong))
        if head and sd[head[0]].ndim >= 1:
            hint = (f"; the checkpoint has {sd[head[0]].shape[0]} classes, "
                    f"the model {expected[head[0]].shape[0]}")
        raise CheckpointError(
            f"checkpoint {source} does not fit architecture '{arch}': {shown}{more}{hint}")


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model``; return the raw checkpoint.

    The returned object is the dict that was read (a bare state_dict is returned
    as is), so callers can look at entries such as ``'epoch'`` or ``'arch'``.
    """
    ckpt = read_checkpoint(path)
    source = str(path)
    sd = extract_state_dict(ckpt, source=source)
    check_fit(model, sd, ckpt, source=source)
    try:
        # strict=False only to allow the missing counters check_fit tolerates.
        model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load checkpoint {source}: {first}") from None
    return ckpt if isinstance(ckpt, dict) else dict(ckpt)  # type: ignore[call-overload]
