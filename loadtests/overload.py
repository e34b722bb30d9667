"""Overload probe: offered load at a multiple of the server's measured capacity, open loop.

    python -m loadtests.overload --factor 4 --seconds 10            # starts a local server
    python -m loadtests.overload --host http://127.0.0.1:8000 --key <detection key>

Arrivals come at a fixed rate whatever the answers, as many independent clients would (a closed
loop of N clients would slow down with the server and never overload it). The client is a
minimal HTTP/1.1 writer on asyncio streams with the request encoded once: on a 2-core machine a
general client (httpx) cannot offer more than ~25 requests/s beside the server, this one several
hundred. Used by tests/integration/test_overload.py.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from loadtests.images import face_images, multipart
from tests.support.local_server import LocalServer

DETECT = "/api/v1/detection/detect"
TIMEOUT_S = 30.0


@dataclass
class Reply:
    status: int  # 0: no answer (connection error or timeout)
    latency_s: float
    headers: dict[str, str]
    body: bytes


class RawHttp:
    """Keep-alive connections to one server, one prepared request sent over and over."""

    def __init__(self, base_url: str, request: bytes) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request = request
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @classmethod
    def post(cls, base_url: str, path: str, body: bytes, content_type: str, headers: dict[str, str]) -> "RawHttp":
        head = [f"POST {path} HTTP/1.1", f"Host: {urlsplit(base_url).netloc}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
        return cls(base_url, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    async def send(self) -> Reply:
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(self._exchange(started), TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            return Reply(0, time.perf_counter() - started, {}, b"")

    async def _exchange(self, started: float) -> Reply:
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self.request)
            await writer.drain()
            status = int((await reader.readline()).split(b" ", 2)[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return Reply(status, time.perf_counter() - started, headers, body)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def closed_loop(client: RawHttp, clients: int, per_client: int) -> tuple[list[Reply], float]:
    """`clients` clients sending `per_client` requests each, back to back."""
    out: list[Reply] = []

    async def one() -> None:
        for _ in range(per_client):
            out.append(await client.send())

    started = time.monotonic()
    try:
        await asyncio.gather(*(one() for _ in range(clients)))
    finally:
        client.close()  # connections belong to this event loop
    return out, time.monotonic() - started


async def open_loop(client: RawHttp, rate: float, seconds: float, max_requests: int) -> tuple[list[Reply], float]:
    """Arrivals at `rate` per second for `seconds` (at most `max_requests`), each on a free connection."""
    out: list[Reply] = []

    async def one() -> None:
        out.append(await client.send())

    tasks = []
    started = time.monotonic()
    try:
        while len(tasks) < max_requests and time.monotonic() - started < seconds:
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(max(0.0, started + len(tasks) / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    finally:
        client.close()  # connections belong to this event loop
    return out, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def describe(name: str, replies: list[Reply], elapsed: float) -> str:
    parts = [f"{name}: {len(replies)} requests in {elapsed:.1f} s"]
    for status in sorted({r.status for r in replies}):
        lat = [r.latency_s for r in replies if r.status == status]
        parts.append(f"{status or 'no answer'}: {len(lat)} ({len(lat) / elapsed:.1f}/s) "
                     f"p50 {percentile(lat, .5) * 1000:.0f} ms p99 {percentile(lat, .99) * 1000:.0f} ms")
    return "; ".join(parts)


def detect_request(base_url: str, key: str) -> RawHttp:
    small = next(i for i in face_images() if i.name == "small.jpg")  # 320 px: cheap to send and to refuse
    body, ctype = multipart({"file": (small.name, small.data)})
    return RawHttp.post(base_url, DETECT, body, ctype, {"x-api-key": key})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--factor", type=float, default=4.0, help="offered load / measured capacity (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="overload duration (default 10)")
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--host", default="", help="a running server (else one is started)")
    p.add_argument("--key", default="", help="detection key of --host")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="settings of the started server, e.g. FR_MAX_WAITING_INFERENCE=4")
    args = p.parse_args(argv)
    server = None
    if not args.host:
        server = LocalServer(Path(tempfile.mkdtemp(prefix="facerec-overload-")),
                             env=dict(e.split("=", 1) for e in args.server_env)).start()
    try:
        base_url = args.host or server.base_url
        key = args.key or server.create_key("detection")
        client = detect_request(base_url, key)
        base, base_s = asyncio.run(closed_loop(client, 2, 10))
        capacity = sum(r.status == 200 for r in base) / base_s
        print(describe("baseline (2 clients)", base, base_s) + f"; capacity {capacity:.1f} req/s")
        over, over_s = asyncio.run(open_loop(client, args.factor * capacity, args.seconds, args.max_requests))
        rss = f"; server rss {server.rss_bytes() / 2**20:.0f} MiB" if server else ""
        print(describe(f"overload ({args.factor:g}x)", over, over_s) + rss)
        after, after_s = asyncio.run(closed_loop(client, 2, 5))
        print(describe("after", after, after_s))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
