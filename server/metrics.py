"""Prometheus metrics of the server, in a registry of their own (tests may create several).

    metrics = Metrics()
    batcher = MicroBatcher(inner, policies, metrics=metrics)      # records the per-model series
    app = RequestMetricsMiddleware(app, metrics)                 # or call metrics.observe_request
    body, content_type = metrics.render()                        # for GET /metrics

Series (prefix `facerec_`):
- per model (label `model`): `batch_queue_delay_seconds` (histogram, time from enqueue to
  dispatch, per item), `batch_size_rows` (histogram, rows per inference call),
  `inference_seconds` (histogram, per inference call), `batch_queue_depth_rows` (gauge, rows
  waiting), `batch_rejected_total` (calls refused as overloaded), `batch_deadline_expired_total`
  (calls whose deadline passed before their inference finished), `batch_cancelled_total`,
  `inference_errors_total` (failed inference calls);
- per endpoint: `http_request_duration_seconds` (histogram; labels `method`, `route` = the
  route template such as `/api/v1/recognition/faces/{image_id}`, `status`);
- errors: `http_errors_total` (labels `route`, `status`, `code` = the CompreFace code of the JSON
  error body, e.g. 503 with 60 overloaded / 61 deadline passed; the gate and the exception handlers
  mark the code in the ASGI scope under ERROR_CODE_SCOPE);
- `detector_info` (gauge, label `detector`: yunet | mtcnn, value 1): the face detector serving;
- read at scrape time (`watch_admission`, `watch_index`): `inference_requests_running`,
  `inference_requests_waiting`, `inference_slots` (request-level admission, the inference limiter of
  server/http/state.py), and per loaded collection (label `collection`, the opaque collection id, never
  an API key): `index_faces`, `index_memory_bytes`, `index_mode` (label `mode`: flat | graph, value 1).
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Inference on CPU spans 0.1 ms (R-Net, one crop) to about a second (embedder, big batch).
_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED_ROUTE = "<unmatched>"  # no route matched: never label with the raw path (unbounded)
ERROR_CODE_SCOPE = "facerec.error_code"  # the CompreFace code of the error answer, set in the ASGI scope

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "facerec") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        ns, r = namespace, self.registry
        self.queue_delay = Histogram(
            "batch_queue_delay_seconds", "Time an item waited in the batch queue before dispatch",
            ["model"], namespace=ns, registry=r, buckets=_TIME_BUCKETS,
        )
        self.batch_size = Histogram(
            "batch_size_rows", "Rows per inference call", ["model"], namespace=ns, registry=r, buckets=_ROW_BUCKETS,
        )
        self.inference_time = Histogram(
            "inference_seconds", "Duration of one inference call (one batch)",
            ["model"], namespace=ns, registry=r, buckets=_TIME_BUCKETS,
        )
        self.queue_depth = Gauge(
            "batch_queue_depth_rows", "Rows waiting in the batch queue", ["model"], namespace=ns, registry=r,
        )
        self.rejected = Counter(
            "batch_rejected", "Calls refused because the model's queue was full", ["model"],
            namespace=ns, registry=r,
        )
        self.deadline_expired = Counter(
            "batch_deadline_expired", "Calls whose request deadline passed before inference finished",
            ["model"], namespace=ns, registry=r,
        )
        self.cancelled = Counter(
            "batch_cancelled", "Calls withdrawn because their request was cancelled", ["model"],
            namespace=ns, registry=r,
        )
        self.inference_errors = Counter(
            "inference_errors", "Inference calls that failed", ["model"], namespace=ns, registry=r,
        )
        self.request_latency = Histogram(
            "http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route", "status"], namespace=ns, registry=r, buckets=_REQUEST_BUCKETS,
        )
        self.http_errors = Counter(
            "http_errors", "Error answers by route template, HTTP status and CompreFace error code",
            ["route", "status", "code"], namespace=ns, registry=r,
        )
        self.detector_info = Gauge(
            "detector_info", "The face detector in use (FR_DETECTOR), value 1", ["detector"],
            namespace=ns, registry=r,
        )
        self._scraped = _ScrapeTime(ns)
        r.register(self._scraped)

    def watch_admission(self, stats: Callable[[], tuple[int, int, int]]) -> None:
        """Export (running, waiting, slots) of request-level admission, read at each scrape."""
        self._scraped.admission = stats

    def watch_index(self, stats: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Export each loaded collection's index stats ({collection: {"faces", "mode",
        "memory_bytes", ...}}, IndexRegistry.loaded_stats), read at each scrape."""
        self._scraped.index = stats

    def set_detector(self, name: str) -> None:
        self.detector_info.labels(name).set(1)

    def add_model(self, model: str) -> None:
        """Create the model's series at zero, so that rates and ratios exist before the first event."""
        for metric in (self.queue_delay, self.batch_size, self.inference_time, self.queue_depth,
                       self.rejected, self.deadline_expired, self.cancelled, self.inference_errors):
            metric.labels(model)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.request_latency.labels(method, route, str(status)).observe(seconds)

    def observe_error(self, route: str, status: int, code: int) -> None:
        self.http_errors.labels(route, str(status), str(code)).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every series, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ScrapeTime:
    """A collector for state that lives elsewhere: asked for its numbers at each scrape."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.admission: Callable[[], tuple[int, int, int]] | None = None
        self.index: Callable[[], dict[str, dict[str, Any]]] | None = None

    def collect(self):
        ns = self.ns
        if self.admission is not None:
            running, waiting, slots = self.admission()
            yield GaugeMetricFamily(f"{ns}_inference_requests_running",
                                    "Requests holding an inference slot", value=running)
            yield GaugeMetricFamily(f"{ns}_inference_requests_waiting",
                                    "Requests waiting for an inference slot", value=waiting)
            yield GaugeMetricFamily(f"{ns}_inference_slots",
                                    "Requests that may run inference at once", value=slots)
        if self.index is not None:
            faces = GaugeMetricFamily(f"{ns}_index_faces", "Faces in the collection's index", labels=["collection"])
            memory = GaugeMetricFamily(f"{ns}_index_memory_bytes", "Estimated memory of the collection's index",
                                       labels=["collection"])
            mode = GaugeMetricFamily(f"{ns}_index_mode", "Search mode of the collection's index, value 1",
                                     labels=["collection", "mode"])
            for collection, stats in sorted(self.index().items()):
                faces.add_metric([collection], stats["faces"])
                memory.add_metric([collection], stats["memory_bytes"])
                mode.add_metric([collection, str(stats["mode"])], 1)
            yield from (faces, memory, mode)


def route_template(scope: dict[str, Any]) -> str:
    """The matched route's path template (Starlette sets scope["route"]), or UNMATCHED_ROUTE."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED_ROUTE
    # Inside a Mount, root_path has grown by the mount's prefix (already resolved, e.g. "/api").
    prefix = scope.get("root_path", "")[len(scope.get("_metrics_root_path", "")):]
    return prefix + path


class RequestMetricsMiddleware:
    """Pure ASGI middleware: observes every HTTP request's latency by method, route template, status.

    Latency runs until the response's last body chunk is sent; an exception with no response
    started counts as status 500. Wrap the whole Starlette app so routing has set scope["route"].
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope["_metrics_root_path"] = scope.get("root_path", "")
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_template(scope)
            self.metrics.observe_request(scope["method"], route, status, time.perf_counter() - start)
            code = scope.get(ERROR_CODE_SCOPE)
            if code is not None:
                self.metrics.observe_error(route, status, code)
