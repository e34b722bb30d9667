"""The decode pixel budget: concurrent requests never hold more decoded pixels than configured
(a flood of small files that decode to huge images cannot exhaust memory), and waiting for the
budget respects the request's deadline and cancellation."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from server.inference.scope import Cancelled, DeadlineExceeded, request_scope
from server.vision.decode import PixelBudget, image_pixels
from tests.support.api_server import live_server


def test_holds_never_exceed_the_limit_and_oversize_runs_alone():
    budget = PixelBudget(100)
    inside, worst = [0], [0]
    lock = threading.Lock()

    def work(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                inside[0] += min(pixels, 100)
                worst[0] = max(worst[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= min(pixels, 100)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, [30, 60, 250, 40, 10, 90, 55, 100] * 3))
    assert worst[0] <= 100 and budget.peak <= 100 and budget.held == 0
    assert budget.peak >= 90  # it did let several small ones run together


def test_waiting_respects_deadline_and_cancellation():
    budget = PixelBudget(100)
    with budget.hold(80):
        with request_scope(timeout_s=0.3):
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                with budget.hold(50):
                    pass
            assert 0.25 < time.monotonic() - started < 2
        with request_scope() as scope:
            threading.Timer(0.2, scope.cancel).start()
            with pytest.raises(Cancelled):
                with budget.hold(50):
                    pass
        with budget.hold(20):  # fits beside the 80
            pass
    assert budget.held == 0


def test_header_size_without_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (6000, 5000), (200, 200, 200)).save(buf, "PNG")
    assert image_pixels(buf.getvalue()) == 30_000_000
    assert image_pixels(b"not an image") == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("pixels"), model_dir, decode_pixel_budget=30_000_000,
                     max_inflight_inference=4) as srv:
        yield srv


def test_concurrent_huge_images_are_decoded_within_the_budget(server):
    """Four requests of small PNG files that decode to 20 MP each (60 MB as RGB): all answered as
    CompreFace does (no face: 400, code 28), but never two decoded at once under a 30 MP budget."""
    buf = io.BytesIO()
    Image.fromarray(np.full((4000, 5000, 3), 180, np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    assert len(png) < 1_000_000
    key = server.create_key("detection")

    def post(_: int):
        with server.client() as c:
            return c.post("/api/v1/detection/detect", headers={"x-api-key": key},
                          files={"file": ("big.png", png, "image/png")})

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(post, range(4)))
    assert [r.status_code for r in replies] == [400] * 4, [r.text for r in replies]
    assert all(r.json()["code"] == 28 for r in replies)
    budget = server.state.service.pixels
    assert budget.peak == 20_000_000  # one at a time: two would have been 40 MP
    assert budget.held == 0
