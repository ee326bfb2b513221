"""An executor that runs each task at once on the calling thread.

For code written against :class:`concurrent.futures.Executor` that must sometimes do its work in turn, on one
thread: a store's chunks read without a pool, a CPU precompute's writes (where work beside the forward pass
only stalls it). A task's exception is kept in its future, as a pool would keep it.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class InlineExecutor(Executor):
    """Runs ``fn(*args)`` inside :meth:`submit` and returns its finished future."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever asks for the result, as a pool would
            future.set_exception(exc)
        return future


INLINE = InlineExecutor()
