"""Dynamic micro-batching across requests: a `Backend` wrapper that coalesces concurrent calls.

    batcher = MicroBatcher(OnnxRuntimeBackend(repo), policies_from_settings(settings), metrics=metrics)
    pipeline = FacePipeline.from_settings(settings, backend=batcher)   # pipeline code is unchanged
    ...
    with request_scope(timeout_s=settings.request_timeout_s) as scope:  # server/inference/scope.py
        faces = await run_in_threadpool(pipeline.faces, image)        # contextvars reach the thread
    # client went away: scope.cancel() frees its queued work (callable from any thread / the loop),
    # e.g. from a task that awaits the ASGI `http.disconnect` message once the body has been read
    batcher.close()                                                   # lifespan shutdown

Design
------
The pipeline is synchronous numpy/ONNX code that the API runs in worker threads, so callers of
`run` are OS threads that must block until their rows come back. Each batched model gets one
queue guarded by a `threading.Condition` and one dispatcher thread (`BatchPolicy.instances` for
more). This is the simplest *and* cheapest shape for thread callers: enqueueing is one lock
acquisition plus `notify`, the hand-back is one `threading.Event`, and the batching window is
`Condition.wait(timeout)`. An asyncio loop in a dedicated thread (the issue's wording) would add
a `call_soon_threadsafe` self-pipe write and a `concurrent.futures.Future` per call, timers on
the loop for the window, and inference would still have to leave the loop for another thread;
every hop costs latency and buys nothing here. ONNX Runtime releases the GIL in `Session.run`,
so dispatchers of different models (P-Net, R-Net, O-Net, embedder) and callers' numpy work
overlap.

Batching rules (per model):
- items are grouped by their input signature (names, non-batch shapes, dtypes); only items of
  one group are concatenated (P-Net pyramid levels of different sizes never mix; R-Net/O-Net
  crops and embedder chips always match);
- a group is dispatched as soon as it holds `max_batch_size` rows, or when its oldest item has
  waited `max_queue_delay_ms`; among ready groups the one with the oldest item goes first;
  items are taken in arrival order while they fit in `max_batch_size` rows;
- while a batch runs, new items queue up, so under load batches form with no added delay;
- idle fast path: with `max_queue_delay_ms == 0`, a call that finds its model idle (nothing
  queued, fewer than `instances` batches running) runs at once in the caller's own thread
  (also off the event loop). It saves the two thread switches of the hand-off, several times
  this path's own cost per call (docs/benchmarks.md, Idle fast path; a request makes ~13 model
  calls), and calls arriving meanwhile queue and batch as usual.
  At most `instances` batches of a model run at once either way;
- an item larger than `max_batch_size` is split into chunks of at most `max_batch_size` rows
  (a Triton backend enforces its config's max_batch_size, so a bigger batch is never sent);
  the caller gets the chunks' outputs concatenated back in order;
- each caller gets exactly its own rows of every output.

Back-pressure, deadlines, cancellation:
- a model's queue holds at most `queue_capacity` rows (in-flight batches not counted); a call
  that does not fit raises `Overloaded(retry_after_s)` at once (a call bigger than the whole
  capacity is still accepted by an empty queue, or it could never run);
- the deadline (monotonic seconds) is the `deadline=` keyword or the current `RequestScope`'s
  (scope.py: a contextvar set by the API; anyio's `to_thread.run_sync` / Starlette's `run_in_threadpool`
  copy the context into the worker thread). A caller whose deadline passes gets
  `DeadlineExceeded` at that moment: its queued chunks are withdrawn, and a dispatcher never
  sends an item whose deadline has passed. A batch already running is not interrupted; its
  result for that caller is dropped;
- `RequestScope.cancel()` (e.g. on client disconnect) withdraws the scope's queued work and
  wakes its callers with `Cancelled`; later `run` calls under that scope fail at once.
- an exception in `inner.run` fails every call in that batch with `BackendError`; the
  dispatcher thread carries on.
- `close()` fails queued calls with `BackendError`, stops the dispatchers (running batches
  finish) and closes the inner backend when the batcher owns it.

Defaults (Settings.batch_*), by measurement on CPU (docs/benchmarks.md): batch sizes sit where a
model's rows/s peaks or plateaus (P-Net 4, R-Net 64, O-Net 16, embedder 8; "Batch sizes"); the CPU
default queue delay is 0, since a few ms of delay made idle requests slower and bought no
throughput ("Queue delay"). Instances: in-process, one single-threaded instance of each model per
core (server.inference.model_instances, Settings.intra_op_threads), which does more images/s than one instance on
threads of its own ("Threads and instances").

The request scope and the three refusals (`Overloaded`, `DeadlineExceeded`, `Cancelled`) are
server/inference/scope.py's; server/http/errors.py maps them to HTTP answers.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from server.inference import model_instances, names
from server.inference.base import Backend, BackendError
from server.inference.scope import Cancelled, DeadlineExceeded, Overloaded, current_scope, retry_after_s

if TYPE_CHECKING:  # metrics is optional at run time; only its type is needed here
    from server.config import Settings
    from server.metrics import Metrics

__all__ = [
    "BatchPolicy",
    "MicroBatcher",
    "create_batcher",
    "policies_from_settings",
]


# ---------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    queue_capacity: int = 1024  # rows waiting (not yet dispatched)
    instances: int = 1  # batches of this model running at once (dispatcher threads)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_capacity < 1 or self.instances < 1:
            raise ValueError("max_batch_size, queue_capacity and instances must be >= 1")
        if not self.max_queue_delay_ms >= 0:
            raise ValueError("max_queue_delay_ms must be >= 0")


# ---------------------------------------------------------------------------- queue internals
class _Call:
    """One `run` invocation: one or more chunks (tickets) of the same input signature."""

    __slots__ = ("queue", "deadline", "tickets", "pending", "done", "error", "event", "inline")

    def __init__(self, queue: "_ModelQueue", deadline: float | None) -> None:
        self.queue = queue
        self.deadline = deadline
        self.tickets: list[_Ticket] = []
        self.pending = 0
        self.done = False
        self.error: BaseException | None = None
        self.event: threading.Event | None = None  # only queued calls need one to wait on
        self.inline = False  # the caller runs it itself (idle fast path)

    def cancel(self) -> None:
        """RequestScope.cancel: withdraw the queued chunks; the caller raises Cancelled."""
        self.queue.abandon(self, Cancelled(self.queue.model))


class _Ticket:
    """One queued chunk of a call (at most max_batch_size rows)."""

    __slots__ = ("call", "inputs", "rows", "key", "enqueued", "outputs", "queued")

    def __init__(self, call: _Call, inputs: dict[str, np.ndarray], rows: int, key: tuple, now: float) -> None:
        self.call = call
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.enqueued = now
        self.outputs: dict[str, np.ndarray] | None = None
        self.queued = True


class _ModelQueue:
    """Queue, dispatcher thread(s) and statistics of one model."""

    def __init__(self, batcher: "MicroBatcher", model: str, policy: BatchPolicy) -> None:
        self.batcher = batcher
        self.model = model
        self.policy = policy
        self.max_rows = policy.max_batch_size
        self.delay_s = policy.max_queue_delay_ms / 1000.0
        self.cond = threading.Condition(threading.Lock())
        self.groups: dict[tuple, deque[_Ticket]] = {}
        self.group_rows: dict[tuple, int] = {}
        self.rows = 0  # queued rows, all groups
        self.running = 0  # batches being run, by dispatchers or inline callers
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.rows_per_s = 0.0  # smoothed inference throughput, for Retry-After
        self.batches = 0
        self.batched_rows = 0
        self.largest_batch = 0

    # -- caller side ----------------------------------------------------------------------
    def submit(self, inputs: dict[str, np.ndarray], rows: int, key: tuple, deadline: float | None) -> _Call:
        call = _Call(self, deadline)
        metrics = self.batcher.metrics
        with self.cond:
            if self.closed:
                raise BackendError(f"{self.model}: the batcher is closed")
            if self.rows and self.rows + rows > self.policy.queue_capacity:
                if metrics is not None:
                    metrics.rejected.labels(self.model).inc()
                raise Overloaded(self.model, self._retry_after_locked())
            if not self.threads:
                self._start_locked()
            now = time.monotonic()
            idle = not self.groups and self.running < self.policy.instances
            if idle and self.delay_s == 0 and rows <= self.max_rows:
                call.tickets.append(_Ticket(call, inputs, rows, key, now))
                call.tickets[0].queued = False
                call.pending = 1
                call.inline = True
                self.running += 1
                if metrics is not None:
                    metrics.queue_delay.labels(self.model).observe(0.0)
                return call
            call.event = threading.Event()
            dq = self.groups.setdefault(key, deque())
            step = self.max_rows
            for start in range(0, rows, step):
                chunk = inputs if rows <= step else {k: v[start : start + step] for k, v in inputs.items()}
                ticket = _Ticket(call, chunk, min(step, rows - start), key, now)
                call.tickets.append(ticket)
                dq.append(ticket)
            call.pending = len(call.tickets)
            self.group_rows[key] = self.group_rows.get(key, 0) + rows
            self.rows += rows
            if metrics is not None:
                metrics.queue_depth.labels(self.model).set(self.rows)
            self.cond.notify()
        return call

    def run_inline(self, call: _Call) -> None:
        """Run a fast-path call in the caller's thread (unless it was cancelled meanwhile)."""
        try:
            if not call.done:
                self._execute(call.tickets)
        finally:
            self._finished_batch()

    def _finished_batch(self) -> None:
        with self.cond:
            self.running -= 1
            if self.groups or self.closed:  # a dispatcher waits for the free slot, or close() does
                self.cond.notify_all()

    def wait(self, call: _Call) -> dict[str, np.ndarray]:
        while not call.done:  # inline calls are done here already
            timeout = None if call.deadline is None else call.deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                self.abandon(call, DeadlineExceeded(self.model))
                break
            if call.event.wait(timeout):
                break
        if call.error is not None:
            raise call.error
        outs = [t.outputs for t in call.tickets]
        if len(outs) == 1:
            return outs[0]
        return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}

    def abandon(self, call: _Call, error: BaseException) -> bool:
        """Fail a call that is not done yet (deadline, cancel); its queued chunks are withdrawn."""
        with self.cond:
            return self._fail_locked(call, error)

    # -- internals (hold self.cond) ------------------------------------------------------------
    def _fail_locked(self, call: _Call, error: BaseException) -> bool:
        if call.done:
            return False
        for t in call.tickets:
            if t.queued:
                self._unqueue_locked(t)
                self.groups[t.key].remove(t)
                if not self.groups[t.key]:
                    del self.groups[t.key]
        call.done = True
        call.error = error
        metrics = self.batcher.metrics
        if metrics is not None:
            if isinstance(error, DeadlineExceeded):
                metrics.deadline_expired.labels(self.model).inc()
            elif isinstance(error, Cancelled):
                metrics.cancelled.labels(self.model).inc()
            metrics.queue_depth.labels(self.model).set(self.rows)
        if call.event is not None:
            call.event.set()
        return True

    def _unqueue_locked(self, t: _Ticket) -> None:
        t.queued = False
        self.rows -= t.rows
        left = self.group_rows[t.key] - t.rows
        if left:
            self.group_rows[t.key] = left
        else:
            del self.group_rows[t.key]

    def _retry_after_locked(self) -> int:
        # Time to drain what is queued at the measured throughput (none measured yet: 1 s).
        return retry_after_s(self.rows / self.rows_per_s if self.rows_per_s > 0 else 0.0)

    def _start_locked(self) -> None:
        for i in range(self.policy.instances):
            th = threading.Thread(target=self._loop, name=f"batcher-{self.model}-{i}", daemon=True)
            th.start()
            self.threads.append(th)

    def _next_batch_locked(self) -> list[_Ticket] | None:
        """Wait for a group that is full or due; take its oldest items. None when closed."""
        while True:
            if self.closed:
                return None
            now = time.monotonic()
            if self.running >= self.policy.instances:
                self.cond.wait()  # an inline caller holds the slot; it notifies when done
                continue
            best: tuple | None = None
            best_age = math.inf
            wake = math.inf
            for key, dq in self.groups.items():
                oldest = dq[0].enqueued
                due = oldest + self.delay_s
                if self.group_rows[key] >= self.max_rows or due <= now:
                    if oldest < best_age:
                        best, best_age = key, oldest
                else:
                    wake = min(wake, due)
            if best is not None:
                batch = self._take_locked(best, now)
                if batch:
                    self.running += 1
                    return batch
                continue  # everything taken had expired; look again
            self.cond.wait(None if wake == math.inf else wake - now)

    def _take_locked(self, key: tuple, now: float) -> list[_Ticket]:
        dq = self.groups[key]
        batch: list[_Ticket] = []
        rows = 0
        while dq:
            t = dq[0]
            if t.call.deadline is not None and t.call.deadline <= now:
                self._fail_locked(t.call, DeadlineExceeded(self.model))  # removes t (and its siblings)
                if key not in self.groups:
                    break
                continue
            if rows + t.rows > self.max_rows:
                break
            dq.popleft()
            self._unqueue_locked(t)
            batch.append(t)
            rows += t.rows
        if key in self.groups and not self.groups[key]:
            del self.groups[key]
        metrics = self.batcher.metrics
        if metrics is not None and batch:
            metrics.queue_depth.labels(self.model).set(self.rows)
            delay = metrics.queue_delay.labels(self.model)
            for t in batch:
                delay.observe(now - t.enqueued)
        return batch

    # -- dispatcher side ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                batch = self._next_batch_locked()
            if batch is None:
                return
            try:
                self._execute(batch)
            finally:
                self._finished_batch()

    def _execute(self, batch: list[_Ticket]) -> None:
        rows = sum(t.rows for t in batch)
        metrics = self.batcher.metrics
        t0 = time.perf_counter()
        try:
            if len(batch) == 1:
                feed = batch[0].inputs
            else:
                feed = {name: np.concatenate([t.inputs[name] for t in batch]) for name in batch[0].inputs}
            outputs = self.batcher.inner.run(self.model, feed)
            bad = [n for n, v in outputs.items() if v.ndim == 0 or v.shape[0] != rows]
            if bad:
                raise BackendError(f"outputs {bad} do not have the batch's {rows} rows")
        except Exception as exc:  # every caller of the batch gets it; the dispatcher survives
            elapsed = time.perf_counter() - t0
            with self.cond:
                for t in batch:
                    err = BackendError(f"{self.model}: inference on a batch of {rows} rows failed: {exc}")
                    err.__cause__ = exc
                    self._fail_locked(t.call, err)
            if metrics is not None:
                metrics.inference_errors.labels(self.model).inc()
                metrics.inference_time.labels(self.model).observe(elapsed)
            return
        elapsed = time.perf_counter() - t0
        slices = [outputs] if len(batch) == 1 else []
        start = 0
        for t in batch if len(batch) > 1 else ():
            slices.append({name: v[start : start + t.rows] for name, v in outputs.items()})
            start += t.rows
        with self.cond:
            for t, out in zip(batch, slices):
                call = t.call
                if call.done:  # abandoned while running: deadline or cancel
                    continue
                t.outputs = out
                call.pending -= 1
                if call.pending == 0:
                    call.done = True
                    if call.event is not None:
                        call.event.set()
            self.batches += 1
            self.batched_rows += rows
            self.largest_batch = max(self.largest_batch, rows)
            rate = rows / max(elapsed, 1e-6)
            self.rows_per_s = rate if self.rows_per_s == 0 else 0.8 * self.rows_per_s + 0.2 * rate
        if metrics is not None:
            metrics.batch_size.labels(self.model).observe(rows)
            metrics.inference_time.labels(self.model).observe(elapsed)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for dq in list(self.groups.values()):
                for t in list(dq):
                    if t.queued:
                        self._fail_locked(t.call, BackendError(f"{self.model}: the batcher was closed"))
            self.cond.notify_all()
            threads = list(self.threads)
        for th in threads:
            if th is not threading.current_thread():
                th.join(timeout=30)
        with self.cond:  # inline callers' batches too, before the inner backend may be closed
            self.cond.wait_for(lambda: self.running == 0, timeout=30)


# ---------------------------------------------------------------------------- the batcher
class MicroBatcher:
    """A `Backend` that batches concurrent `run` calls per model before calling `inner`.

    Models without a policy (and no `default`) are passed straight to `inner`.
    Thread-safe; `run` blocks the calling thread until its rows are back.
    """

    def __init__(
        self,
        inner: Backend,
        policies: Mapping[str, BatchPolicy],
        *,
        default: BatchPolicy | None = None,
        metrics: "Metrics | None" = None,
        owns_inner: bool = True,
    ) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", "backend")
        self.policies = dict(policies)
        self.default = default
        self.metrics = metrics
        self.owns_inner = owns_inner
        self._queues: dict[str, _ModelQueue] = {}
        self._lock = threading.Lock()
        self._closed = False

    def run(
        self, model: str, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        scope = current_scope()
        if deadline is None and scope is not None:
            deadline = scope.deadline
        if scope is not None and scope.cancelled:
            raise Cancelled(model)
        if deadline is not None and deadline <= time.monotonic():
            if self.metrics is not None:
                self.metrics.deadline_expired.labels(model).inc()
            raise DeadlineExceeded(model)
        queue = self._queue(model)
        feed = {k: np.asarray(v) for k, v in inputs.items()}
        rows = _batch_rows(model, feed)
        if queue is None or rows == 0:
            return self.inner.run(model, feed)
        call = queue.submit(feed, rows, _signature(feed), deadline)
        if scope is not None and not scope.register(call):
            call.cancel()
        try:
            if call.inline:
                queue.run_inline(call)
            return queue.wait(call)
        finally:
            if scope is not None:
                scope.unregister(call)

    def stats(self, model: str) -> dict[str, float]:
        """Counters since start: batches, rows, mean/largest batch size, queued rows."""
        q = self._queues.get(model)
        if q is None:
            return {"batches": 0, "rows": 0, "mean_batch": 0.0, "largest_batch": 0, "queued_rows": 0}
        with q.cond:
            return {
                "batches": q.batches,
                "rows": q.batched_rows,
                "mean_batch": q.batched_rows / q.batches if q.batches else 0.0,
                "largest_batch": q.largest_batch,
                "queued_rows": q.rows,
            }

    def close(self) -> None:
        """Fail queued work, stop the dispatchers (running batches finish), close `inner` if owned."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queues = list(self._queues.values())
        for q in queues:
            q.close()
        if self.owns_inner:
            self.inner.close()

    def _queue(self, model: str) -> _ModelQueue | None:
        q = self._queues.get(model)
        if q is not None:
            return q
        policy = self.policies.get(model, self.default)
        if policy is None:
            return None
        with self._lock:
            if self._closed:
                raise BackendError(f"{model}: the batcher is closed")
            q = self._queues.get(model)
            if q is None:
                q = self._queues[model] = _ModelQueue(self, model, policy)
                if self.metrics is not None:
                    self.metrics.add_model(model)
        return q


def _batch_rows(model: str, inputs: Mapping[str, np.ndarray]) -> int:
    if not inputs:
        raise BackendError(f"{model}: no inputs")
    sizes = {v.shape[0] if v.ndim else -1 for v in inputs.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise BackendError(f"{model}: inputs must share one leading batch axis, got {sorted(sizes)}")
    return sizes.pop()


def _signature(inputs: Mapping[str, np.ndarray]) -> tuple:
    """Items are concatenable when every input matches in name, non-batch shape and dtype."""
    return tuple(sorted((name, v.shape[1:], v.dtype.str) for name, v in inputs.items()))


# ---------------------------------------------------------------------------- from settings
# Model names from server/inference/names.py; settings fields use the short stage names.
STAGES = {names.PNET: "pnet", names.RNET: "rnet", names.ONET: "onet", names.YUNET: "yunet", names.EMBEDDER: "embedder"}


def policies_from_settings(settings: "Settings") -> dict[str, BatchPolicy]:
    """BatchPolicy per model from the `batch_<stage>_{size,delay_ms,capacity}`
    and `batch_instances` settings."""
    return {
        model: BatchPolicy(
            max_batch_size=getattr(settings, f"batch_{stage}_size"),
            max_queue_delay_ms=getattr(settings, f"batch_{stage}_delay_ms"),
            queue_capacity=getattr(settings, f"batch_{stage}_capacity"),
            instances=model_instances(settings),
        )
        for model, stage in {**STAGES, **PLUGIN_STAGES}.items()
    }


# the age and gender plugins' models (server/vision/plugins/slots.py): chips coalesce like the embedder's
PLUGIN_STAGES = {names.AGE: "age", names.GENDER: "gender"}


def create_batcher(inner: Backend, settings: "Settings", metrics: "Metrics | None" = None) -> Backend:
    """The backend the pipeline should use: `inner` wrapped in a MicroBatcher unless batching is off."""
    if not settings.batching:
        return inner
    return MicroBatcher(inner, policies_from_settings(settings), metrics=metrics)
