"""Connection hygiene under uvicorn: slow headers, idle sockets, header floods, too many connections.

uvicorn times out an idle keep-alive connection, but not a connection that was opened and never
sent a byte, nor one that trickles its request line and headers a byte at a time: each holds a file
descriptor, a protocol object and a growing header buffer for as long as the client likes. The
request body is the gate's business (server/http/gate.py: a deadline per chunk and for the whole
body); this wraps uvicorn's own HTTP protocol class (httptools or h11) to bound the rest:

- **header timeout**: a request's line and headers must be complete within `header_timeout_s` of
  the connection opening or of the first byte of a following request; otherwise 408 and close.
- **header size**: more than `max_header_bytes` before the headers are complete: 431 and close.
- **connection cap**: with `max_connections` open, a new connection closes the one that has waited
  longest for its request (idle or still sending headers: those hold no work); when every open
  connection is inside a request, the newcomer is answered 503 (code 60, Retry-After) and closed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

from server.http import errors

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def raw_response(err: errors.ApiError) -> bytes:
    """`err` as a whole HTTP/1.1 response that closes the connection: written straight to the socket,
    below the ASGI app (the body is CompreFace's error JSON, errors.ApiError.body)."""
    body = err.render()
    head = [f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{name.lower()}: {value}" for name, value in (err.headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


HEADER_TIMEOUT = raw_response(errors.headers_timeout())
HEADERS_TOO_LARGE = raw_response(errors.headers_too_large())
TOO_MANY = raw_response(errors.too_many_connections(RETRY_AFTER_S))


def guarded_protocol(base: type, *, header_timeout_s: float, max_header_bytes: int, max_connections: int) -> type:
    """A subclass of uvicorn's HTTP protocol class `base` with the limits above (0 turns one off)."""

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._tail = b""
            self._waiting_since = time.monotonic()

        # ---- state shared by uvicorn's protocols: a request is under way from its headers to its response
        def _in_request(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None and header_timeout_s > 0:
                self._waiting_since = time.monotonic()
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self._header_bytes = 0
            self._tail = b""

        def _refuse(self, answer: bytes) -> None:
            self._disarm()
            if not self.transport.is_closing():
                try:
                    self.transport.write(answer)
                finally:
                    self.transport.close()

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self._in_request():
                self._refuse(HEADER_TIMEOUT)

        # ---- asyncio.Protocol
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()
            if max_connections > 0 and len(self.connections) > max_connections:
                victim = self._longest_waiting()
                if victim is None:
                    self._refuse(TOO_MANY)
                    self.connections.discard(self)
                else:
                    victim._refuse(HEADER_TIMEOUT)

        def _longest_waiting(self) -> "GuardedProtocol | None":
            candidates = [c for c in self.connections if isinstance(c, GuardedProtocol) and c is not self
                          and not c._in_request() and not c.transport.is_closing()]
            return min(candidates, key=lambda c: c._waiting_since) if candidates else None

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._in_request():
                self._arm()
                # the request line and headers end at the first blank line: count up to there, before
                # the parser buffers any of it (one read may hold all of a large header block)
                window = self._tail + data
                end = window.find(b"\r\n\r\n")
                self._header_bytes += len(data) if end < 0 else end + 4 - len(self._tail)
                self._tail = window[-3:]
                if max_header_bytes > 0 and self._header_bytes > max_header_bytes:
                    self._refuse(HEADERS_TOO_LARGE)
                    return
            super().data_received(data)
            if self._in_request():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # idle from here: uvicorn's keep-alive timer runs; the next request's first byte re-arms ours
            self._waiting_since = time.monotonic()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol
