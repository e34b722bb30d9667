"""Metrics: own registries, the batcher's series after real traffic, request latency by route template."""
from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from server.inference.onnxruntime import OnnxRuntimeBackend
from server.inference.batcher import BatchPolicy, MicroBatcher
from server.inference.scope import DeadlineExceeded, Overloaded
from server.metrics import UNMATCHED_ROUTE, Metrics, RequestMetricsMiddleware


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def ort(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_repo")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "neg", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "neg" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "neg" / "1" / "model.onnx"))
    backend = OnnxRuntimeBackend(root, threads=1)
    yield backend
    backend.close()


class Gate:
    """The real backend behind a gate the test opens, to hold the dispatcher busy."""

    name = "gate"

    def __init__(self, inner) -> None:
        self.inner, self.open, self.entered = inner, threading.Event(), threading.Event()
        self.open.set()

    def run(self, model, inputs):
        self.entered.set()
        assert self.open.wait(20)
        return self.inner.run(model, inputs)

    def close(self) -> None:
        pass


def test_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.rejected.labels("m").inc(3)
    assert _get(_samples(a), "facerec_batch_rejected_total", model="m") == 3
    assert ("facerec_batch_rejected_total", frozenset({("model", "m")})) not in _samples(b)


def test_batcher_series_after_traffic(ort):
    metrics = Metrics()
    gate = Gate(ort)
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_ms=20, queue_capacity=12)  # 4 callers x 3 rows fit
    batcher = MicroBatcher(gate, {"neg": policy}, metrics=metrics, owns_inner=False)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                x = np.full((1 + (k + i) % 3, 3), k * 100 + i, np.float32)
                assert np.array_equal(batcher.run("neg", {"x": x})["y"], -x)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert not errors, errors[0]
    items, rows = 40, sum(1 + (k + i) % 3 for k in range(4) for i in range(10))
    stats = batcher.stats("neg")

    # overload once and let one deadline expire, with the dispatcher held busy
    gate.open.clear()
    gate.entered.clear()
    holder = threading.Thread(target=batcher.run, args=("neg", {"x": np.ones((1, 3), np.float32)}))
    holder.start()
    assert gate.entered.wait(5)
    with pytest.raises(DeadlineExceeded):
        batcher.run("neg", {"x": np.ones((2, 3), np.float32)}, deadline=time.monotonic() + 0.05)
    # 12 rows fill the queue, in two chunks of 8 + 4 rows
    filler = threading.Thread(target=batcher.run, args=("neg", {"x": np.ones((12, 3), np.float32)}))
    filler.start()
    end = time.monotonic() + 5
    while batcher.stats("neg")["queued_rows"] < 12 and time.monotonic() < end:
        time.sleep(0.002)
    queued_sample = _samples(metrics)
    with pytest.raises(Overloaded):
        batcher.run("neg", {"x": np.ones((1, 3), np.float32)})
    gate.open.set()
    holder.join(5)
    filler.join(5)
    batcher.close()

    s = _samples(metrics)
    assert _get(queued_sample, "facerec_batch_queue_depth_rows", model="neg") == 12
    assert _get(s, "facerec_batch_queue_depth_rows", model="neg") == 0
    assert _get(s, "facerec_batch_size_rows_count", model="neg") == stats["batches"] + 3
    assert _get(s, "facerec_batch_size_rows_sum", model="neg") == rows + 1 + 12
    assert stats["batches"] < items  # traffic was batched, so the histograms saw fewer calls than items
    assert _get(s, "facerec_batch_size_rows_bucket", model="neg", le="+Inf") == stats["batches"] + 3
    assert _get(s, "facerec_batch_queue_delay_seconds_count", model="neg") == items + 3
    # a single caller waits at most ~the 20 ms window (plus a busy dispatcher); 0 <= delay < 5 s
    delay_sum = _get(s, "facerec_batch_queue_delay_seconds_sum", model="neg")
    assert 0 < delay_sum < 5 * (items + 3)
    assert _get(s, "facerec_batch_queue_delay_seconds_bucket", model="neg", le="1.0") >= items
    assert _get(s, "facerec_inference_seconds_count", model="neg") == stats["batches"] + 3
    assert 0 < _get(s, "facerec_inference_seconds_sum", model="neg") < 30
    assert _get(s, "facerec_batch_rejected_total", model="neg") == 1
    assert _get(s, "facerec_batch_deadline_expired_total", model="neg") == 1
    assert _get(s, "facerec_inference_errors_total", model="neg") == 0  # present from the start
    assert _get(s, "facerec_batch_cancelled_total", model="neg") == 0


def _app(metrics: Metrics) -> RequestMetricsMiddleware:
    async def item(request):
        return PlainTextResponse(next(iter(request.path_params.values())))

    async def boom(request):
        raise RuntimeError("boom")

    async def created(request):
        return Response(status_code=201)

    routes = [
        Route("/items/{item_id}", item),
        Route("/boom", boom),
        Route("/things", created, methods=["POST"]),
        Mount("/api", routes=[Route("/faces/{face_id}", item)]),
    ]
    return RequestMetricsMiddleware(Starlette(routes=routes), metrics)


def test_request_latency_by_route_template():
    metrics = Metrics()
    client = TestClient(_app(metrics), raise_server_exceptions=False)
    assert client.get("/items/1").text == "1"
    assert client.get("/items/2").status_code == 200
    assert client.post("/things").status_code == 201
    assert client.get("/things").status_code == 405
    assert client.get("/boom").status_code == 500
    assert client.get("/nowhere/42").status_code == 404
    assert client.get("/api/faces/abc").status_code == 200
    s = _samples(metrics)
    count = "facerec_http_request_duration_seconds_count"
    assert _get(s, count, method="GET", route="/items/{item_id}", status="200") == 2
    assert _get(s, count, method="POST", route="/things", status="201") == 1
    assert _get(s, count, method="GET", route="/things", status="405") == 1
    assert _get(s, count, method="GET", route="/boom", status="500") == 1
    assert _get(s, count, method="GET", route=UNMATCHED_ROUTE, status="404") == 1
    assert _get(s, count, method="GET", route="/api/faces/{face_id}", status="200") == 1
    total = _get(s, "facerec_http_request_duration_seconds_sum", method="GET", route="/items/{item_id}", status="200")
    assert 0 < total < 10
    assert not any("/items/1" in dict(labels).get("route", "") for _, labels in s)  # no raw paths


def test_observe_request_directly():
    metrics = Metrics()
    metrics.observe_request("GET", "/x", 503, 0.2)
    s = _samples(metrics)
    assert _get(s, "facerec_http_request_duration_seconds_bucket", method="GET", route="/x", status="503", le="0.25") == 1
    assert _get(s, "facerec_http_request_duration_seconds_bucket", method="GET", route="/x", status="503", le="0.1") == 0


def test_admission_gauges_read_the_apps_inference_limiter(tmp_path):
    """create_app's state exports the inference limiter's statistics at scrape time."""
    import anyio

    from server.config import Settings
    from server.http.app import create_app

    app = create_app(Settings.from_env(data_dir=tmp_path, max_inflight_inference=2))
    state = app.state.core
    s = _samples(state.metrics)
    assert (_get(s, "facerec_inference_requests_running"), _get(s, "facerec_inference_requests_waiting"),
            _get(s, "facerec_inference_slots")) == (0, 0, 2)
    assert not any(name.startswith("facerec_index_") and labels for name, labels in s)  # no index opened yet

    async def scenario() -> dict:
        limiter = state.inference_limiter
        holders = [object(), object()]
        for holder in holders:
            await limiter.acquire_on_behalf_of(holder)
        async with anyio.create_task_group() as group:
            group.start_soon(limiter.acquire_on_behalf_of, object())  # waits: both slots are taken
            while limiter.statistics().tasks_waiting < 1:
                await anyio.sleep(0.001)
            busy = _samples(state.metrics)
            group.cancel_scope.cancel()
        for holder in holders:
            limiter.release_on_behalf_of(holder)
        return busy

    busy = anyio.run(scenario)
    assert (_get(busy, "facerec_inference_requests_running"), _get(busy, "facerec_inference_requests_waiting")) == (2, 1)
    assert _get(_samples(state.metrics), "facerec_inference_requests_running") == 0


def test_error_codes_by_route():
    """An answer that leaves a CompreFace code in the scope (server/http/errors.ErrorResponse) is counted."""
    from server.http import errors

    async def refused(request):
        return errors.error_response(errors.overloaded(3))

    metrics = Metrics()
    app = RequestMetricsMiddleware(Starlette(routes=[Route("/work", refused), Route("/ok", _ok)]), metrics)
    client = TestClient(app)
    assert client.get("/work").status_code == 503
    assert client.get("/work").json()["code"] == 60
    assert client.get("/ok").status_code == 200
    s = _samples(metrics)
    assert _get(s, "facerec_http_errors_total", route="/work", status="503", code="60") == 2
    assert not any(name == "facerec_http_errors_total" and ("route", "/ok") in labels for name, labels in s)


async def _ok(request):
    return PlainTextResponse("ok")
