"""GET /metrics of a real server: the series the Grafana dashboard reads beyond the batcher's.

Index size and mode per collection (read from the IndexRegistry at scrape time, labelled by the
opaque collection id, never the API key), request admission (the inference limiter), and error
answers by route, status and CompreFace code (from the gate and the exception handlers).
"""
from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.inference import inflight_limit
from server.metrics import UNMATCHED_ROUTE
from tests.support.api_server import astronaut, encode, live_server

R = "/api/v1/recognition"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("metrics"), model_dir) as srv:
        yield srv


def scrape(http) -> dict[tuple[str, frozenset], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_index_admission_and_error_series(server):
    key = server.create_key("recognition")
    collection = server.state.storage.find_key(key).collection
    headers = {"x-api-key": key}
    with server.client() as http:
        before = scrape(http)
        r = http.post(R + "/faces", params={"subject": "Eileen"}, files={"file": ("a.jpg", encode(astronaut()))},
                      headers=headers)
        assert r.status_code == 201, r.text
        # a collection's index loads on first use (at start-up for the collections that exist then)
        r = http.post(R + "/recognize", files={"file": ("a.jpg", encode(astronaut()))}, headers=headers)
        assert r.status_code == 200, r.text
        missing = http.get(R + "/subjects")  # no x-api-key
        unknown = http.get(R + "/subjects", headers={"x-api-key": str(uuid.uuid4())})
        no_image = http.delete(f"{R}/faces/{uuid.uuid4()}", headers=headers)
        after = scrape(http)

    assert after[("facerec_index_faces", frozenset({("collection", collection)}))] == 1
    assert after[("facerec_index_mode", frozenset({("collection", collection), ("mode", "flat")}))] == 1
    assert after[("facerec_index_memory_bytes", frozenset({("collection", collection)}))] > 0
    assert not any(key in value for _, labels in after for _, value in labels)  # keys never become labels

    assert after[("facerec_inference_slots", frozenset())] == inflight_limit(server.settings)
    assert after[("facerec_inference_requests_running", frozenset())] == 0
    assert after[("facerec_inference_requests_waiting", frozenset())] == 0

    def errors(samples, route: str, reply) -> float:
        labels = frozenset({("route", route), ("status", str(reply.status_code)), ("code", str(reply.json()["code"]))})
        return samples.get(("facerec_http_errors_total", labels), 0)

    # the gate refuses a key before routing: no route template then, as for the latency histogram
    for route, reply in ((UNMATCHED_ROUTE, missing), (UNMATCHED_ROUTE, unknown), (R + "/faces/{image_id}", no_image)):
        assert reply.status_code in (400, 404), reply.text
        assert errors(after, route, reply) - errors(before, route, reply) >= 1, (route, reply.json())
    assert (missing.json()["code"], unknown.json()["code"], no_image.json()["code"]) == (20, 10, 44)
    # successful answers are not errors
    assert not any(name == "facerec_http_errors_total" and ("status", "201") in labels for name, labels in after)
