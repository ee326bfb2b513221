"""Host-to-device transfer of a batch's arrays through reused staging buffers.

A batch reaches the device as a handful of numpy arrays (each teacher's logits and
features, the labels, the sample ids and replay parameters). Pinning each batch's tensors
anew costs a page-locked allocation per tensor and step; :class:`Staging` instead keeps,
per array (keyed by name: ``logits0``, ``features1``, ``labels``...), one host buffer per
*slot*, in a ring of ``slots`` (2: double-buffered), allocated once and reused for every
batch of the same shape. :meth:`Staging.put` fills the next slot's buffers from the arrays
and starts one copy per array into a *new* device tensor; :meth:`Staged.ready` hands
those device tensors to the consumer.

On a CUDA device the buffers are pinned and the copies run ``non_blocking`` on a side
:class:`torch.cuda.Stream`, so a batch's transfer overlaps the training step that runs on
the current stream; one CUDA event per slot is recorded after its copies. Three rules make
this correct by construction:

* a slot's buffers are refilled only after its event has completed (``Event.synchronize``:
  a host wait on the copy out of those buffers, which waits on nothing else, since the side
  stream never waits on the compute stream), so a copy in flight never reads a half
  overwritten buffer;
* :meth:`Staged.ready` makes the consumer's current stream wait on the batch's event
  (``Stream.wait_event``: a device-side wait, no host sync) before anything there reads the
  tensors, and calls ``record_stream`` on each, so the caching allocator does not hand
  their memory (allocated on the side stream) to the side stream again while the consumer's
  stream may still use it;
* what the consumer gets are device tensors of their own, never the staging buffers, so a
  batch kept by the consumer (a list of batches, a batch held across steps) is never
  overwritten when its slot is reused.

On the CPU the same code runs with plain (unpinned) buffers, no stream and no event: the
"copy to the device" is a copy into a fresh CPU tensor, so the third rule holds there too,
and the CPU tests exercise the ring as the GPU uses it.

:func:`fits_on_device` is the check that decides whether a resident data set is moved to
the device: its bytes against a share of the device's free memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

#: The share of the device's free memory a resident training set may take; the rest is left to the
#: student, the method, activations and the staging copies.
RESIDENT_SHARE = 0.5


def fits_on_device(nbytes: int, device: torch.device, free: int | None = None, share: float = RESIDENT_SHARE
                   ) -> bool:
    """Whether ``nbytes`` of data may live on ``device``: always on the CPU (it is already there); on CUDA
    when it takes at most ``share`` of the free memory (``free`` bytes, default ``torch.cuda.mem_get_info``)."""
    if device.type != "cuda":
        return True
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return nbytes <= share * free


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


@dataclass
class _Slot:
    """One batch's worth of host buffers, and (CUDA) the event recorded after their copies were queued."""

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    event: torch.cuda.Event | None = None
    queued: bool = False   # copies out of the buffers were queued since the last wait

    def settle(self) -> None:
        """Wait (host side) until the copies out of this slot's buffers have completed."""
        if self.queued and self.event is not None:
            self.event.synchronize()
        self.queued = False


@dataclass
class Staged:
    """One batch's arrays on their way to the device; :meth:`ready` gives the device tensors."""

    tensors: dict[str, torch.Tensor]
    event: torch.cuda.Event | None   # None off CUDA: the copies are done when put returns
    device: torch.device

    def ready(self) -> dict[str, torch.Tensor]:
        """The device tensors, safe to use on the current stream from here on (no host sync: on CUDA the
        current stream waits on the copies' event on the device)."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self.event)
            for t in self.tensors.values():
                t.record_stream(stream)
            self.event = None  # waited once; a second call must not wait on a later batch's copies
        return self.tensors


class Staging:
    """A ring of ``slots`` host buffers per array name, reused batch after batch, and the copies to ``device``.

    ``put`` of batch i+``slots`` waits until the copies of batch i have left the slot; with the default two
    slots, batch i+1 can be in flight while batch i is in use.
    """

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1 (got {slots})")
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._slots = [_Slot(event=torch.cuda.Event() if self.cuda else None) for _ in range(slots)]
        self._next = 0
        self.allocations = 0   # host buffers allocated so far (for tests: constant once every shape is seen)

    def put(self, arrays: Mapping[str, np.ndarray]) -> Staged:
        """Fill the next slot's buffers from ``arrays`` and start their copies to the device."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        slot.settle()  # its previous copies have left the buffers: they may be overwritten
        out: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for name, a in arrays.items():
                host = self._buffer(slot, name, a)
                np.copyto(host.numpy(), a, casting="no")
                # A fresh device tensor for every batch: never the buffer, which the next use of the slot
                # overwrites (on the CPU this copy is what keeps a kept batch intact).
                dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
                dev.copy_(host, non_blocking=self.cuda)
                out[name] = dev
            if slot.event is not None:
                slot.event.record(self.stream)
        slot.queued = True
        return Staged(out, slot.event, self.device)

    def _buffer(self, slot: _Slot, name: str, a: np.ndarray) -> torch.Tensor:
        """The slot's host buffer for ``name`` viewed as ``a``'s shape; (re)allocated when ``a`` does not fit."""
        dtype = _torch_dtype(a.dtype)
        buf = slot.buffers.get(name)
        if (buf is None or buf.dtype != dtype or buf.shape[1:] != a.shape[1:] or buf.shape[0] < a.shape[0]
                or a.ndim == 0):
            buf = torch.empty(a.shape, dtype=dtype, pin_memory=self.cuda)
            slot.buffers[name] = buf
            self.allocations += 1
        return buf[:a.shape[0]] if a.ndim else buf
