"""What the routes share: the app's parts (filled by the lifespan) and per-request helpers."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from starlette.requests import Request

from server.http import errors
from server.config import Settings
from server.inference import inflight_limit
from server.inference.scope import Cancelled, request_scope, retry_after_s

T = TypeVar("T")

API_KEY_SCOPE = "compreface.api_key"  # the authenticated storage.ApiKey, set by the gate


@dataclass
class AppState:
    settings: Settings
    storage: Any = None  # server.storage.Storage
    index: Any = None  # index registry
    pipeline: Any = None  # server.vision.pipeline.FacePipeline
    plugins: Any = None  # server.vision.plugins.PluginRegistry
    service: Any = None  # server.core.service.FaceService
    backend: Any = None
    keys: "KeyCache | None" = None
    metrics: Any = None  # server.metrics.Metrics
    started: float = field(default_factory=time.time)
    ready: bool = False
    not_ready_reason: str = "starting"
    inference_limiter: CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        # at most this many requests run inference at once (server.inference.inflight_limit: auto by backend)
        self.inference_limiter = CapacityLimiter(inflight_limit(self.settings))
        self.inference_s = 0.0  # smoothed duration of one inference call, for Retry-After

    def admit_inference(self) -> None:
        """Request-level admission: when every inference slot is taken and max_waiting_inference
        requests already wait, refuse at once (503, code 60) instead of queueing without bound. The
        batcher's per-model capacity still guards each call; this bounds whole requests, so a refused
        request costs no inference and admitted ones keep a bounded wait (and memory)."""
        stats = self.inference_limiter.statistics()
        if stats.borrowed_tokens < stats.total_tokens or stats.tasks_waiting < self.settings.max_waiting_inference:
            return
        drain_s = (stats.tasks_waiting + stats.borrowed_tokens) * self.inference_s / stats.total_tokens
        raise errors.overloaded(retry_after_s(drain_s))

    def require_ready(self) -> None:
        if not self.ready:
            raise errors.not_ready(self.not_ready_reason)


class KeyCache:
    """API key lookups: hits are cached for `ttl` seconds, misses always ask storage.

    Keys created while the server runs (admin API, CLI) therefore work at once; a key deleted
    from another process stops working within `ttl`. Deletions through the admin API evict.
    Concurrent lookups of one key share one storage call (the first one's): a burst of requests with
    the same key, e.g. hundreds of connections arriving together, takes one worker thread, not one
    each (each new thread would grow anyio's pool, up to 40, and the process's memory with it).
    """

    def __init__(self, storage: Any, ttl: float = 1.0) -> None:
        self.storage = storage
        self.ttl = ttl
        self._hits: dict[str, tuple[float, Any]] = {}
        self._pending: dict[str, tuple[anyio.Event, list]] = {}

    async def find(self, key: str) -> Any:
        cached = self._hits.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        pending = self._pending.get(key)
        if pending is not None:
            done, answer = pending
            await done.wait()
            if answer:  # else the lookup was cancelled (its client went away): ask storage ourselves
                ok, value = answer[0]
                if ok:
                    return value
                # the storage's error (e.g. the database is down): each waiter fails as fast as the
                # first did, with its own copy, instead of waiting out a lookup of its own
                try:
                    err = copy.copy(value)
                except Exception:  # an exception type that cannot be copied: share it
                    err = value
                raise err
        return await self._lookup(key)

    async def _lookup(self, key: str) -> Any:
        now = time.monotonic()  # a hit counts from when storage was asked
        done, answer = anyio.Event(), []
        self._pending.setdefault(key, (done, answer))
        try:
            found = await anyio.to_thread.run_sync(self.storage.find_key, key)
            answer.append((True, found))
        except Exception as exc:
            answer.append((False, exc))
            raise
        finally:
            if self._pending.get(key, (None,))[0] is done:
                del self._pending[key]
            done.set()
        if found is None:
            self._hits.pop(key, None)
        else:
            if len(self._hits) > 10_000:  # bound memory against key-spraying clients
                self._hits.clear()
            self._hits[key] = (now, found)
        return found

    def evict(self, key: str) -> None:
        self._hits.pop(key, None)


def app_state(request: Request) -> AppState:
    return request.app.state.core


def api_key(request: Request) -> Any:
    """The storage.ApiKey the gate authenticated for this request."""
    return request.scope[API_KEY_SCOPE]


async def blocking(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run storage / file work in a worker thread."""
    return await anyio.to_thread.run_sync(partial(func, *args, **kwargs))


async def inference(request: Request, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run model work in a worker thread, at most `inference_limiter` at a time, under a request
    scope: the micro-batcher reads its deadline (settings.request_timeout_s) from the contextvar,
    which anyio copies into the worker thread. A client that disconnects meanwhile gets its queued
    work withdrawn from the batcher (and its wait for a slot abandoned), so it costs no inference."""
    state = app_state(request)
    state.require_ready()
    state.admit_inference()
    timeout = state.settings.request_timeout_s or None

    def timed() -> T:  # service time only (not the wait for a slot), for admit_inference's estimate
        started = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            state.inference_s = elapsed if state.inference_s == 0 else 0.9 * state.inference_s + 0.1 * elapsed

    with request_scope(timeout_s=timeout) as scope:
        outcome: list[T] = []
        failure: Exception | None = None
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                # the body has been read: the next ASGI message is http.disconnect, sent when the
                # client goes away (or when the response is complete, by which time we are gone)
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                scope.cancel()  # queued batcher work fails fast with Cancelled
                group.cancel_scope.cancel()  # a wait for an inference slot ends now

            group.start_soon(watch_disconnect)
            try:
                outcome.append(await anyio.to_thread.run_sync(timed, limiter=state.inference_limiter))
            except Exception as exc:  # re-raised below as itself, not inside the task group's ExceptionGroup
                failure = exc
            finally:
                group.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if not outcome:  # cancelled while waiting for a slot, or the thread finished after a disconnect
            raise Cancelled("request")
        return outcome[0]
