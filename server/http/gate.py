"""The one ASGI middleware in front of the routes: paths, body size, API keys, last-resort errors.

Order, as CompreFace's stack has it (nginx, then the Java SecurityValidationFilter, then Spring):
1. a trailing slash is ignored (Spring 5 matches `/subjects/` as `/subjects`);
2. a request whose Content-Length exceeds `max_body_size` gets 413 before anything is read;
   bodies without a length (chunked) are counted while they stream and cut off at the limit;
3. requests under /api/v1/{recognition,detection,verification} need `x-api-key`: missing -> 20,
   not a UUID -> 26, unknown or of another service type -> 404 code 10;
4. any exception escaping a route becomes a CompreFace JSON error, never a bare 500: the lower
   layers' exceptions that errors.EXCEPTIONS maps are answered by `answer_exception` (Starlette's
   handler for them, installed by create_app); ApiErrors, and as the last resort any other exception
   (400, code 0), are answered here.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import anyio

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http import errors
from server.http.state import API_KEY_SCOPE, AppState
from server.inference.base import BackendError

log = logging.getLogger(__name__)

API_KEY_HEADER = b"x-api-key"
# CompreFace's SecurityValidationFilter skips these; everything else under its prefixes needs a key.
EXEMPT = re.compile(r"^/(swagger|webjars|v2|api/v1/migrate|api/v1/consistence/status|api/v1/static|api/v1/config).*")
SERVICES: tuple[tuple[str, str, str], ...] = (
    # (path prefix, storage key type, name in ModelNotFoundException)
    ("/api/v1/recognition", "recognition", "Recognition"),
    ("/api/v1/detection", "detection", "Detection"),
    ("/api/v1/verification", "verification", "Verification"),
)
# java.util.UUID.fromString after CompreFace's "length >= 36" check: 8-4-4-4-12 hex digits.
UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


_STATIC_KEY = re.compile(r"^(/api/v1/static/)([^/]+)")


def mask_key(key: str) -> str:
    """An API key as logs may show it: its first 8 characters, enough to tell keys apart."""
    return key[:8] + "..." if len(key) > 8 else "***"


def loggable_path(path: str) -> str:
    """A request path for the log: the key in /api/v1/static/{apiKey}/... masked (keys never go to logs)."""
    return _STATIC_KEY.sub(lambda m: m.group(1) + mask_key(m.group(2)), path)


def service_of(path: str) -> tuple[str, str] | None:
    if EXEMPT.match(path):
        return None
    for prefix, key_type, name in SERVICES:
        if path == prefix or path.startswith(prefix + "/"):
            return key_type, name
    return None


class Gate:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            # in place: outer middleware (metrics) reads scope["route"] that routing sets on it
            scope["path"] = path.rstrip("/") or "/"
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            limit = self.state.settings.max_body_size
            length = _content_length(scope)
            if length is not None and length > limit:
                raise errors.body_too_large(limit)
            await self._authenticate(scope)
            settings = self.state.settings
            receive = _guarded(receive, limit, settings.body_read_timeout_s, settings.body_total_timeout_s)
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # nobody left to answer
        except Exception as exc:  # noqa: BLE001 - the last resort: always a JSON error
            err = self._as_api_error(exc, scope)
            if started:
                log.error("error after the response started (%s %s): %r", scope["method"],
                          loggable_path(scope["path"]), exc)
                return
            await errors.error_response(err)(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> None:
        service = service_of(scope["path"])
        if service is None:
            return
        key_type, service_name = service
        values = [v for k, v in scope["headers"] if k == API_KEY_HEADER]
        if not values:
            raise errors.missing_header("x-api-key")
        key = values[0].decode("latin-1")
        if len(key) < 36 or not UUID_TEXT.match(key):
            raise errors.bad_key_format()
        if self.state.keys is None:  # still starting: no storage yet
            raise errors.not_ready(self.state.not_ready_reason)
        found = await self.state.keys.find(key.lower())
        if found is None or found.type != key_type:
            raise errors.model_not_found(key, service_name)
        scope[API_KEY_SCOPE] = found

    @staticmethod
    def _as_api_error(exc: Exception, scope: Scope) -> errors.ApiError:
        err = errors.api_error(exc)
        if err is not None:
            _log_inference(exc, err, scope)
            return err
        # CompreFace's handleUndefinedExceptions: 400, code 0. Log the cause for the operator.
        log.exception("unexpected error on %s %s", scope["method"], loggable_path(scope["path"]))
        return errors.undefined()


async def answer_exception(request: Request, exc: Exception) -> Response:
    """Starlette's exception handler for each class of errors.EXCEPTIONS (create_app installs it)."""
    err = errors.api_error(exc)
    _log_inference(exc, err, request.scope)
    return errors.error_response(err)


def _log_inference(exc: Exception, err: errors.ApiError, scope: Scope) -> None:
    """A refused inference (overload, deadline, client gone) is a warning; a failed one (500) an error."""
    if not isinstance(exc, BackendError):
        return
    failed = err.status == 500
    log.log(logging.ERROR if failed else logging.WARNING, "inference %s on %s %s: %s", "failed" if failed else "refused",
            scope["method"], loggable_path(scope["path"]), exc)


def _content_length(scope: Scope) -> int | None:
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                raise errors.unreadable_body("bad Content-Length header") from None
    return None


def _guarded(receive: Receive, limit: int, timeout_s: float, total_s: float = 0.0) -> Receive:
    """The app's receive: the body is counted against `limit` (413), each of its chunks must arrive
    within `timeout_s` and all of it within `total_s` of the first read (408; 0: no limit). Once the
    body is complete, receive passes straight through: what comes next is http.disconnect, which
    inference waits for without a time limit."""
    received = 0
    complete = False
    deadline: float | None = None

    async def wrapped() -> Message:
        nonlocal received, complete, deadline
        if complete:
            return await receive()
        now = anyio.current_time()
        if deadline is None and total_s > 0:
            deadline = now + total_s
        waits = [(timeout_s, timeout_s)] if timeout_s > 0 else []
        if deadline is not None:
            waits.append((deadline - now, total_s))
        wait, reported = min(waits) if waits else (None, 0.0)
        try:
            with anyio.fail_after(max(0.0, wait) if wait is not None else None):
                message: Any = await receive()
        except TimeoutError:
            raise errors.body_timeout(reported) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise errors.body_too_large(limit)
            complete = not message.get("more_body", False)
        return message

    return wrapped
