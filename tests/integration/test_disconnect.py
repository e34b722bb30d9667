"""A client that disconnects stops costing inference: its queued batcher work is withdrawn, and a
wait for an inference slot is abandoned.

The server holds detector (YuNet) batches for a long queue delay, so a request's first model call sits in
the batcher's queue for seconds; the client sends a whole recognize request over a raw socket and
closes it while that call waits. Real server (uvicorn on an ephemeral port), real models.
"""
from __future__ import annotations

import logging
import socket
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api_server import astronaut, encode, live_server
from tests.support.pg_cluster import wait_until

HOLD_MS = 6000.0  # detector queue delay: far longer than the test waits for a cancellation
PNET = "face_detector_yunet"  # the default detector's one model call (held below)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = live_server(tmp_path_factory.mktemp("disconnect"), model_dir, batch_yunet_delay_ms=HOLD_MS,
                      batch_yunet_size=512, detector="yunet", max_inflight_inference=1, max_waiting_inference=4)
    with srv:
        yield srv


def metric(server, name: str, **labels: str) -> float:
    with server.client() as c:
        text = c.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def open_request(server, key: str) -> socket.socket:
    """Send a complete multipart recognize request and leave the connection open, unanswered."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + encode(astronaut()) + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/v1/recognition/recognize HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def wait_for(condition, timeout_s: float) -> float:
    took = wait_until(condition, timeout_s, interval=0.05)
    assert took is not None, f"not reached within {timeout_s} s"
    return took


def test_disconnect_withdraws_queued_work_and_slot_waits(server, caplog):
    key = server.create_key("recognition")
    limiter = server.state.inference_limiter
    cancelled_before = metric(server, "facerec_batch_cancelled_total", model=PNET)

    running = open_request(server, key)  # takes the only inference slot; its detector call is held
    wait_for(lambda: limiter.statistics().borrowed_tokens == 1, 5)
    waiting = open_request(server, key)  # waits for the slot
    wait_for(lambda: limiter.statistics().tasks_waiting == 1, 5)

    waiting.close()  # gone while waiting for a slot: the wait ends, nothing is queued for it
    wait_for(lambda: limiter.statistics().tasks_waiting == 0, 2)
    assert limiter.statistics().borrowed_tokens == 1

    running.close()  # gone while its detector call is queued: withdrawn long before the queue delay
    took = wait_for(lambda: limiter.statistics().borrowed_tokens == 0, 2)
    assert took < HOLD_MS / 1000 / 2
    assert metric(server, "facerec_batch_cancelled_total", model=PNET) == cancelled_before + 1
    assert metric(server, "facerec_batch_queue_depth", model=PNET) == 0

    with server.client() as c:  # nothing was logged as a failure, and the server answers
        assert c.get("/health").status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
