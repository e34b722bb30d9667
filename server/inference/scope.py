"""A request's deadline and cancellation, and the three ways inference refuses to run.

    with request_scope(timeout_s=settings.request_timeout_s) as scope:  # per request, in the API
        faces = await run_in_threadpool(pipeline.faces, image)        # contextvars reach the thread
    scope.cancel()  # client went away (callable from any thread / the loop)

Whatever waits for inference on behalf of a request reads `current_scope()`: the micro-batcher
(server/inference/batcher.py) withdraws the scope's queued work on `cancel()` and gives up at its
deadline; the decode pixel budget (server/vision/decode.py) waits no longer than either allows.

The exceptions carry data only (the model, the seconds to wait); the HTTP layer maps each class to
its answer (server/http/errors.py).
"""
from __future__ import annotations

import contextvars
import math
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Protocol

from server.inference.base import BackendError

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "Overloaded",
    "RequestScope",
    "current_scope",
    "request_scope",
    "retry_after_s",
]

RETRY_AFTER_MAX_S = 60


# ---------------------------------------------------------------------------- errors
class Overloaded(BackendError):
    """Too much work waits already (a model's queue, or whole requests); retry after `retry_after_s` s."""

    def __init__(self, model: str, retry_after_s: int) -> None:
        self.model = model
        self.retry_after_s = retry_after_s
        super().__init__(f"{model}: overloaded, retry after {retry_after_s} s")


class DeadlineExceeded(BackendError):
    """The request's deadline passed before its inference was done."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"{model}: the request's deadline passed")


class Cancelled(BackendError):
    """The request was cancelled (client disconnected); its queued work was dropped."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"{model}: the request was cancelled")


def retry_after_s(drain_s: float) -> int:
    """Retry-After for work expected to drain in `drain_s` seconds: whole seconds (HTTP's unit),
    at least 1, at most RETRY_AFTER_MAX_S."""
    return int(min(RETRY_AFTER_MAX_S, max(1, math.ceil(drain_s))))


# ---------------------------------------------------------------------------- request scope
class Withdrawable(Protocol):
    """Queued work of a request (the batcher's calls): `cancel` withdraws it, and its waiting caller
    raises `Cancelled` (nothing happens to work that is done already)."""

    def cancel(self) -> object: ...


class RequestScope:
    """Per-request deadline and cancellation, shared by every backend call of the request."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline  # time.monotonic() seconds; None: no deadline
        self._lock = threading.Lock()
        self._cancelled = False
        self._work: set[Withdrawable] = set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def cancel(self) -> None:
        """Withdraw this request's queued work; its waiting callers raise `Cancelled`. Idempotent."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            work = list(self._work)
        for item in work:
            item.cancel()

    def register(self, work: Withdrawable) -> bool:
        """Track queued work until `unregister`; False (nothing tracked) once cancelled."""
        with self._lock:
            if self._cancelled:
                return False
            self._work.add(work)
            return True

    def unregister(self, work: Withdrawable) -> None:
        with self._lock:
            self._work.discard(work)


_SCOPE: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("request_scope", default=None)


def current_scope() -> RequestScope | None:
    return _SCOPE.get()


@contextmanager
def request_scope(timeout_s: float | None = None, *, deadline: float | None = None) -> Iterator[RequestScope]:
    """Make a RequestScope current for the block (and for threads started with a copy of the context)."""
    if deadline is None and timeout_s is not None and timeout_s > 0:
        deadline = time.monotonic() + timeout_s
    scope = RequestScope(deadline)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
