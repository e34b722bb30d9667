"""Overload: at several times the server's capacity, admitted requests keep a bounded latency, the
rest get 503 + Retry-After at once, memory stays flat, and the server recovers as soon as the load
drops. Plus a short smoke run of the locust load test (python -m loadtests.run).

The server is a real child process (`python -m server serve`), so the load generator here does
not share its interpreter, and its memory is read from /proc. Its inference admission is small
(FR_MAX_INFLIGHT_INFERENCE=2 requests running, FR_MAX_WAITING_INFERENCE=2 waiting), which makes
overload cheap to reach on 2 cores; the defaults (server.inference.inflight_limit, 64 waiting) behave the same way at
proportionally higher load (python -m loadtests.overload shows them). Bounded: two 5 s phases of
at most MAX_REQUESTS requests each.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtests.overload import Reply, closed_loop, describe, detect_request, open_loop, percentile
from tests.support.local_server import ROOT, LocalServer

INFLIGHT, WAITING = 2, 2
OVERLOAD_FACTOR = 4.0  # offered load, as a multiple of the measured capacity
PHASE_S = 5.0
MAX_REQUESTS = 800  # per overload phase


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"FR_MAX_INFLIGHT_INFERENCE": str(INFLIGHT), "FR_MAX_WAITING_INFERENCE": str(WAITING),
           "FR_REQUEST_TIMEOUT_S": "20"}
    with LocalServer(tmp_path_factory.mktemp("overload"), env=env) as srv:
        yield srv


def error_code(reply: Reply) -> int | None:
    return json.loads(reply.body).get("code") if reply.status != 200 else None


def test_overload_is_refused_fast_and_recovers(server):
    client = detect_request(server.base_url, server.create_key("detection"))
    # capacity, measured with as many clients as inference slots (also warms the models and allocator)
    base, base_s = asyncio.run(closed_loop(client, INFLIGHT, 10))
    assert {r.status for r in base} == {200}, describe("baseline", base, base_s)
    capacity = len(base) / base_s
    base_p50 = percentile([r.latency_s for r in base], .5)
    rss_warm = server.rss_bytes()

    phases = []
    for _ in range(2):
        replies, elapsed = asyncio.run(open_loop(client, OVERLOAD_FACTOR * capacity, PHASE_S, MAX_REQUESTS))
        phases.append((replies, elapsed, server.rss_bytes()))
    after, after_s = asyncio.run(closed_loop(client, INFLIGHT, 4))

    report = [f"capacity {capacity:.1f} req/s, baseline p50 {base_p50 * 1000:.0f} ms, rss {rss_warm / 2**20:.0f} MiB"]
    report += [describe(f"overload {i + 1} ({OVERLOAD_FACTOR:g}x)", r, e) + f"; rss {m / 2**20:.0f} MiB"
               for i, (r, e, m) in enumerate(phases)]
    report.append(describe("recovery", after, after_s))
    print("\n" + "\n".join(report))

    for replies, elapsed, _ in phases:
        admitted = [r for r in replies if r.status == 200]
        refused = [r for r in replies if r.status == 503]
        # only two answers: served, or refused in CompreFace's shape with code 60 and a Retry-After
        assert len(admitted) + len(refused) == len(replies), report
        assert all(error_code(r) == 60 and int(r.headers["retry-after"]) >= 1 for r in refused), report
        # it was overload: most were refused, yet the server kept serving at a good share of its capacity
        assert len(refused) >= 0.3 * len(replies), report
        assert len(admitted) / elapsed >= 0.4 * capacity, report
        # refusals are quick; admitted requests wait at most for the slots and the queue ahead of them
        assert percentile([r.latency_s for r in refused], .5) < 0.5, report
        assert percentile([r.latency_s for r in refused], .99) < 2.0, report
        bound = (INFLIGHT + WAITING + 1) * base_p50 * 4 + 1.0
        assert percentile([r.latency_s for r in admitted], .99) < bound, (bound, report)
    # memory stays flat: the second overload phase adds nothing to the first, little to the warm server
    (_, _, rss1), (_, _, rss2) = phases
    assert rss2 - rss1 < 64 * 2**20, report
    assert rss2 - rss_warm < 192 * 2**20, report
    # and it recovers at once: every request served, at about the baseline latency
    assert {r.status for r in after} == {200}, report
    assert percentile([r.latency_s for r in after], .5) < 3 * base_p50 + 0.5, report
    # /metrics counted every refusal by its CompreFace code (the Grafana dashboard's "503 refusals")
    refused = sum(r.status == 503 for replies, _, _ in phases for r in replies)
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    counted = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "facerec_http_errors_total" and (s.labels["status"], s.labels["code"]) == ("503", "60"))
    assert counted == refused, report


# ------------------------------------------------------------------------------- locust smoke run
def test_locust_smoke_run(tmp_path):
    """python -m loadtests.run, a few seconds with few users: server, keys, locust, reports, verdict."""
    if importlib.util.find_spec("locust") is None:  # not imported here: locust monkey-patches with gevent
        pytest.skip("locust is not installed (pip install -e .[load])")
    out = tmp_path / "reports"
    cmd = [sys.executable, "-m", "loadtests.run", "--users", "3", "--duration", "6s", "--max-error-ratio", "0",
           "--max-p99-ms", "20000", "--out", str(out), "--name", "smoke", "--seed-faces", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for suffix in ("_stats.csv", "_failures.csv", ".html", "_summary.json", "_server.log"):
        assert (out / f"smoke{suffix}").is_file(), suffix
    result = json.loads((out / "smoke_summary.json").read_text())
    assert result["passed"] and result["requests"] > 5 and result["failures"] == 0
    names = {e["name"] for e in result["per_endpoint"]}
    assert "recognize [multipart]" in names, names
    # the verdict follows the thresholds: the same statistics fail a p99 bound of 1 ms
    from loadtests.run import evaluate, parse_args, read_stats

    total, endpoints = read_stats(out / "smoke")
    strict = evaluate(parse_args(["--users", "3", "--max-p99-ms", "1"]), total, endpoints)
    assert not strict.passed and "p99" in strict.reasons[0]
