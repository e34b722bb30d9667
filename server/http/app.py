"""The Starlette application: `create_app(settings)` and `run_server(settings)`.

Start-up, in the lifespan:
1. storage opens (and CompreFace's demo keys are seeded when asked), then the index registry;
   a failure here stops the server: without them nothing can be answered;
2. the models load in the background (building the model repository on first start), so
   /health answers at once and /ready says 503 until the pipeline is there.
Shutdown closes the index (snapshots), the storage and the inference backend.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from server.http import errors
from server.http.routes import admin, detection, extensions, recognition, static, system, verification
from server.http.gate import Gate, answer_exception, mask_key
from server.http.state import AppState, KeyCache
from server.config import Settings
from server.metrics import Metrics, RequestMetricsMiddleware
from server.http.ui import ui_routes

log = logging.getLogger(__name__)

INDEX_DIR = "index"
SNAPSHOT_CHECK_S = 5.0


def create_app(settings: Settings) -> Starlette:
    state = AppState(settings=settings, metrics=Metrics())
    _watch(state)
    routes = recognition.routes + detection.routes + verification.routes + static.routes + system.routes
    routes = routes + extensions.routes  # ours, not CompreFace's: bulk embeddings, verify against a subject
    routes = routes + ui_routes()  # the web console under /ui/ (static files, uses the public API)
    if settings.admin_token:
        routes = routes + admin.routes
    app = Starlette(
        routes=routes,
        # metrics outermost, so it times and counts every answer, the gate's errors included
        middleware=[Middleware(RequestMetricsMiddleware, metrics=state.metrics), Middleware(Gate, state=state)],
        # the lower layers' exceptions (errors.EXCEPTIONS) in CompreFace's shape; the gate answers the rest
        exception_handlers={HTTPException: _http_exception, **{cls: answer_exception for cls in errors.EXCEPTIONS}},
        lifespan=_lifespan,
    )
    app.state.core = state
    return app


def _watch(state: AppState) -> None:
    """The series read at scrape time: request admission (the inference limiter) and the loaded indexes."""

    def admission() -> tuple[int, int, int]:
        stats = state.inference_limiter.statistics()
        return int(stats.borrowed_tokens), stats.tasks_waiting, int(stats.total_tokens)

    state.metrics.watch_admission(admission)
    state.metrics.watch_index(lambda: state.index.loaded_stats() if state.index is not None else {})


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Routing errors in CompreFace's shape: a wrong method is a 404 (handleHttpRequestMethodNotSupported)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    if status == 405:
        return errors.error_response(errors.method_not_supported(request.method))
    if status == 404:
        return errors.error_response(errors.route_not_found(request.method, request.url.path))
    return errors.error_response(errors.ApiError(status, 0, str(getattr(exc, "detail", exc))))


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    state: AppState = app.state.core
    settings = state.settings
    if not settings.admin_token:
        log.warning("admin API disabled: no admin token configured (--admin-token, FR_ADMIN_TOKEN, or a token in "
                    "<data_dir>/admin-token, which a first start on an empty data dir makes); "
                    "/api/v1/admin/* answers 404")
    await anyio.to_thread.run_sync(_open_data, state)
    loader = threading.Thread(target=_load_models, args=(state,), name="model-loader", daemon=True)
    loader.start()
    stop = threading.Event()
    snapshotter = threading.Thread(target=_snapshots, args=(state, stop), name="index-snapshots", daemon=True)
    snapshotter.start()
    try:
        yield
    finally:
        state.ready = False
        state.not_ready_reason = "shutting down"
        stop.set()
        await anyio.to_thread.run_sync(snapshotter.join)
        await anyio.to_thread.run_sync(loader.join)
        await anyio.to_thread.run_sync(_close, state)


def _snapshots(state: AppState, stop: threading.Event) -> None:
    """Index upkeep off the event loop: first load every collection's index (so no request waits
    for a snapshot load), then snapshots by change count or age, so restarts replay little."""
    try:
        collections = [k.collection for k in state.storage.list_keys() if k.type == "recognition"]
    except Exception:  # noqa: BLE001 - indexes then load on first use
        log.exception("listing the collections to load failed")
        collections = []
    for collection in collections:
        if stop.is_set():
            return
        state.index.warm([collection])
    period = min(SNAPSHOT_CHECK_S, max(0.05, state.settings.index_snapshot_interval_s))
    while not stop.wait(period):
        try:
            state.index.maybe_snapshot()
        except Exception:  # noqa: BLE001 - a failed snapshot only costs a longer replay
            log.exception("index snapshot failed")


def _open_data(state: AppState) -> None:
    from index import IndexRegistry
    from server.core.service import FaceService
    from server.storage import open_storage

    settings = state.settings
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    state.storage = open_storage(settings)
    if settings.seed_demo_keys:
        seeded = state.storage.seed_demo_keys()
        log.info("CompreFace demo keys: %s", ", ".join(f"{mask_key(k.key)} ({k.type})" for k in seeded))
    state.index = IndexRegistry(
        Path(settings.data_dir) / INDEX_DIR, state.storage, exact_below=settings.index_exact_below,
        M=settings.index_m, ef_construction=settings.index_ef_construction, ef_search=settings.index_ef_search,
        escalate_distance=settings.index_escalate_distance, escalate_ef=settings.index_escalate_ef,
        snapshot_every=settings.index_snapshot_every, snapshot_interval_s=settings.index_snapshot_interval_s,
        build_threads=settings.index_build_threads,
    )
    # several replicas on one database (PostgreSQL): follow the changes the others commit
    state.storage.start_follower(state.index.catch_up, state.index.drop)
    state.keys = KeyCache(state.storage)
    # Collection calls (subjects, lists, deletes) work from here on; images wait for the models.
    state.service = FaceService(settings, state.storage, state.index, pipeline=None, plugins=None)
    state.not_ready_reason = "loading models"


def _load_models(state: AppState) -> None:
    from server.wiring import build_inference

    settings = state.settings
    try:
        # builds the model repository on first start; the micro-batcher (unless settings.batching is
        # off) coalesces concurrent requests' calls
        inference = build_inference(settings, state.metrics)
        state.backend, pipeline, plugins = inference.backend, inference.pipeline, inference.plugins
        state.service.pipeline, state.service.plugins = pipeline, plugins
        state.pipeline, state.plugins = pipeline, plugins
    except Exception as exc:  # noqa: BLE001 - reported by /ready and the log; liveness stays up
        log.exception("loading the models from %s failed", settings.model_dir)
        state.not_ready_reason = f"loading the models failed: {exc}"
        return
    state.ready = True
    state.not_ready_reason = ""
    log.info("models loaded from %s; ready", settings.model_dir)


def _close(state: AppState) -> None:
    if state.storage is not None:  # before the index closes: no catch-up during its final snapshot
        state.storage.stop_follower()
    for name in ("index", "storage", "backend"):
        part = getattr(state, name)  # None when start-up did not get that far
        if part is None:
            continue
        try:
            part.close()
        except Exception:  # noqa: BLE001 - keep closing the others
            log.exception("closing the %s failed", name)


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int) -> bool:
    """At most `arenas` glibc malloc arenas from now on (call before the server starts its threads).

    Worker threads come and go with the load (anyio's pool grows to 40 under a burst of requests and
    shrinks when idle); with glibc's default of 8 arenas per core, each new thread may get an arena of
    its own, and every arena that once held a decoded image keeps its pages: under repeated slow-client
    attacks RSS grew ~17 MB per attack and did not level off; with 2 it levels off (test_slow_clients).
    A no-op (False) for 0, where MALLOC_ARENA_MAX is set (glibc already read it), or off glibc."""
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1


def run_server(settings: Settings) -> None:
    """Serve on settings.host:settings.port with uvicorn, one process (the models live in it).

    The admin token is resolved first (admin_token.prepare: explicit, else the data dir's, else made
    on a first run), so the admin routes exist when it comes from the data dir."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from server.http import admin_token
    from server.http.connections import guarded_protocol

    limit_malloc_arenas(settings.malloc_arenas)
    settings = admin_token.prepare(settings)
    # slow, idle and surplus connections are cut by server/http/connections.py; slow bodies by the gate
    protocol = guarded_protocol(AutoHTTPProtocol, header_timeout_s=settings.header_read_timeout_s,
                                max_header_bytes=settings.max_header_bytes, max_connections=settings.max_connections)
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, workers=1, http=protocol,
        log_level="info", access_log=False, server_header=False, proxy_headers=True,
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        h11_max_incomplete_event_size=settings.max_header_bytes or None,
    )
    uvicorn.Server(config).run()
