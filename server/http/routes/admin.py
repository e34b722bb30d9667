"""Admin HTTP API under /api/v1/admin (ours; CompreFace manages keys in its UI).

Mounted only when `settings.admin_token` is set (explicitly, or by run_server from the data dir:
server/http/admin_token.py). Every request must carry the token, as
`Authorization: Bearer <token>` or `x-admin-token: <token>`; it is compared in constant time.

    GET    /api/v1/admin/keys            {"keys": [{key, type, name, created}]}
    POST   /api/v1/admin/keys            {"type": "recognition"|"detection"|"verification", "name"?, "key"?}
                                         -> 201 {key, type, name, created}
    PATCH  /api/v1/admin/keys/{key}      {"name": "..."} -> {key, type, name, created}
    DELETE /api/v1/admin/keys/{key}      -> {key, type, name, created, faces_deleted}
    GET    /api/v1/admin/stats           {"keys": n, "collections": [{key, name, subjects, faces}], "indexes": {key: {...}}}

Keys created here work at once (API key lookups do not cache misses).
"""
from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import errors, params
from server.http.responses import JSONResponse
from server.http.state import AppState, app_state, blocking
from server.storage import KEY_TYPES, KeyNotFound, StorageError

PREFIX = "/api/v1/admin"


def _authorize(request: Request) -> AppState:
    state = app_state(request)
    expected = state.settings.admin_token.encode("utf-8")
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-admin-token")
    if token is None:
        raise errors.admin_unauthorized("Missing admin token: send 'Authorization: Bearer <token>'")
    if not expected or not hmac.compare_digest(token.encode("utf-8"), expected):
        raise errors.admin_unauthorized("Invalid admin token")
    if state.storage is None:
        raise errors.not_ready(state.not_ready_reason)
    return state


KEY_NAME_MAX = 200  # a key's name is a label for people


def _key_name(name: str) -> str:
    name = name.strip()
    if len(name) > KEY_NAME_MAX:
        raise errors.ApiError(400, 26, f"name must be at most {KEY_NAME_MAX} characters")
    return name


def _key_json(key) -> dict[str, Any]:
    return {"key": key.key, "type": key.type, "name": key.name, "created": key.created}


async def list_keys(request: Request) -> Response:
    state = _authorize(request)
    keys = await blocking(state.storage.list_keys)
    return JSONResponse({"keys": [_key_json(k) for k in keys]})


async def create_key(request: Request) -> Response:
    state = _authorize(request)
    body = await params.read_json(request)
    if not isinstance(body, dict):
        raise errors.unreadable_body("expected a JSON object like {\"type\": \"recognition\"}")
    key_type, name, chosen = body.get("type"), body.get("name") or "", body.get("key")
    if key_type not in KEY_TYPES:
        raise errors.ApiError(400, 26, f"type must be one of {', '.join(KEY_TYPES)}")
    if not isinstance(name, str) or (chosen is not None and not isinstance(chosen, str)):
        raise errors.unreadable_body("'name' and 'key' must be strings")
    name = _key_name(name)
    if chosen is not None:
        chosen = params.parse_uuid("key", chosen)
    try:
        key = await blocking(state.storage.create_key, key_type, name, chosen)
    except StorageError as exc:
        raise errors.ApiError(400, 26, str(exc)) from None
    return JSONResponse(_key_json(key), status_code=201)


async def rename_key(request: Request) -> Response:
    state = _authorize(request)
    body = await params.read_json(request)
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise errors.unreadable_body("expected a JSON object like {\"name\": \"front door\"}")
    name = _key_name(name)
    key_text = request.path_params["key"]
    try:
        key = await blocking(state.storage.rename_key, key_text.lower(), name)
    except KeyNotFound:
        raise errors.ApiError(404, 10, f"API Key {key_text} not found") from None
    state.keys.evict(key.key)
    return JSONResponse(_key_json(key))


async def delete_key(request: Request) -> Response:
    state = _authorize(request)
    key_text = request.path_params["key"]
    try:
        deleted = await blocking(state.storage.delete_key, key_text.lower())
    except KeyNotFound:
        raise errors.ApiError(404, 10, f"API Key {key_text} not found") from None
    state.keys.evict(deleted.key.key)
    await blocking(state.service.drop_collection, deleted.key.collection)
    return JSONResponse({**_key_json(deleted.key), "faces_deleted": deleted.faces_deleted})


async def stats(request: Request) -> Response:
    state = _authorize(request)

    def collect() -> dict[str, Any]:
        keys = state.storage.list_keys()
        collections = []
        indexes: dict[str, Any] = {}
        for k in keys:
            if k.type == "recognition":
                counts = state.storage.subject_face_counts(k.collection)
                collections.append({"key": k.key, "name": k.name, "subjects": len(counts),
                                    "faces": sum(counts.values())})
                # the index's own view (faces, mode, memory_bytes, bytes_per_face, building,
                # sequence), per key; null until the collection's index is loaded
                indexes[k.key] = state.index.stats(k.collection)
        return {"keys": len(keys), "collections": collections, "indexes": indexes}

    return JSONResponse(await blocking(collect))


routes = [
    Route(PREFIX + "/keys", list_keys, methods=["GET"]),
    Route(PREFIX + "/keys", create_key, methods=["POST"]),
    Route(PREFIX + "/keys/{key}", rename_key, methods=["PATCH"]),
    Route(PREFIX + "/keys/{key}", delete_key, methods=["DELETE"]),
    Route(PREFIX + "/stats", stats, methods=["GET"]),
]
