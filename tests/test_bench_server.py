"""The benchmark's lean load generator against a real server: its requests are valid CompreFace
requests, its response reader counts what the server answered (200s and errors alike)."""
from __future__ import annotations

import asyncio

import pytest

from server.bench_server import load, sample_jpeg
from tests.api_server import live_server

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
