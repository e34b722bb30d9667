"""The benchmark's lean load generator against a real server: its requests are valid CompreFace
requests, its response reader counts what the server answered (200s and errors alike)."""
from __future__ import annotations

import asyncio

import pytest

from benchmarks.server import level_ratios, load, sample_jpeg
from tests.support.api_server import live_server

R = "/api/v1/recognition"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("bench"), model_dir) as srv:
        yield srv


@pytest.mark.parametrize("client", ["lean", "httpx"])
def test_load_generator_counts_answers(server, client):
    jpeg = sample_jpeg()
    key = server.create_key("recognition")
    with server.client() as c:
        assert c.post(R + "/faces", params={"subject": "astronaut"}, files={"file": ("a.jpg", jpeg)},
                      headers={"x-api-key": key}).status_code == 201
    row = asyncio.run(load(server.base_url, key, jpeg, 3, 1.5, client))
    assert row["requests"] >= 3 and row["ok"] == row["requests"] and row["errors"] == 0
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    # a wrong key: every answer is a 401 JSON error, counted as an error, none as ok
    bad = asyncio.run(load(server.base_url, "00000000-0000-0000-0000-000000000000", jpeg, 2, 0.5, client))
    assert bad["requests"] >= 2 and bad["ok"] == 0 and bad["errors"] == bad["requests"]


def test_level_ratios_are_medians_of_ratios_within_a_round():
    def row(rnd, clients, rps, one, raw_best, raw_one):
        return {"round": rnd, "clients": clients, "req_per_s": rps, "one_client": one, "raw_best": raw_best,
                "raw_one_stream": raw_one}

    rows = [row(0, 1, 10, 10, 20, 15), row(0, 32, 18, 9, 20, 15),   # a fast round
            row(1, 1, 5, 5, 10, 8), row(1, 32, 9.5, 5, 10, 8),        # the machine at half speed
            row(2, 1, 10, 10, 20, 15), row(2, 32, 20, 10, 21, 15)]
    r = level_ratios(rows)
    assert r[32]["rounds"] == 3 and r[32]["req_per_s"] == 18
    # within-round ratios 1.8, 1.9, 2.0: the median is 1.9, though no round has 18 req/s against 9.5
    assert r[32]["vs_1_client"] == pytest.approx(1.9)
    assert r[32]["vs_1_client_adjacent"] == pytest.approx(2.0)  # 2.0, 1.9, 2.0
    assert r[32]["vs_raw_best"] == pytest.approx(0.95)  # 0.9, 0.95, 0.952
    assert r[1]["vs_1_client"] == 1.0
