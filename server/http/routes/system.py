"""Unauthenticated endpoints: CompreFace's config and consistence status, health, readiness,
Prometheus metrics, the OpenAPI document and its page."""
from __future__ import annotations

import html

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from server.http import openapi
from server.http.responses import JSONResponse
from server.http.state import app_state


async def config(request: Request) -> Response:
    settings = app_state(request).settings
    return JSONResponse({"clientMaxFileSize": settings.max_file_size, "clientMaxBodySize": settings.max_body_size})


async def consistence_status(request: Request) -> Response:
    # One embedding model, images always kept: nothing can be inconsistent (VersionConsistenceDto).
    return JSONResponse({"demoFaceCollectionIsInconsistent": False, "dbIsInconsistent": False,
                         "saveImagesToDB": True, "status": "OK"})


async def health(request: Request) -> Response:
    """Liveness: the process serves HTTP."""
    return JSONResponse({"status": "OK"})


async def ready(request: Request) -> Response:
    """Readiness: models loaded and storage open and answering; 503 until then (or after a failed
    start), and while the database cannot be reached (PostgreSQL down: the replica takes no traffic)."""
    state = app_state(request)
    storage_ok = state.storage is not None and (not state.ready or await run_in_threadpool(state.storage.ping))
    ready = state.ready and storage_ok
    body = {"status": "OK" if ready else "NOT_READY", "models": state.pipeline is not None, "storage": storage_ok}
    if not state.ready:
        body["reason"] = state.not_ready_reason
    elif not ready:
        body["reason"] = "database not reachable"
    elif state.plugins is not None:
        body["detector"] = state.settings.detector
        body["plugins"] = state.plugins.status()
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text exposition (server/metrics.py): inference batching, request latency and errors,
    admission and the loaded indexes (the last two read at scrape time)."""
    body, content_type = app_state(request).metrics.render()
    return Response(body, media_type=content_type)


async def openapi_json(request: Request) -> Response:
    state = app_state(request)
    return JSONResponse(openapi.document(state.settings, admin=bool(state.settings.admin_token)))


async def docs(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE.replace("{title}", html.escape("Face recognition server API")))


# A self-contained page (no CDN is reachable where this runs): it reads /openapi.json and lists
# every operation with its parameters, body and responses.
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;text-transform:capitalize}
details{border:1px solid #ddd;border-radius:6px;margin:.4rem 0;padding:.4rem .8rem}
summary{cursor:pointer}.m{display:inline-block;width:4.5rem;font-weight:bold;text-transform:uppercase}
.get{color:#1565c0}.post{color:#2e7d32}.put{color:#ef6c00}.delete{color:#c62828}
code{background:#f4f4f4;padding:0 .2rem}table{border-collapse:collapse;margin:.4rem 0}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
pre{background:#f7f7f7;padding:.5rem;overflow:auto;font-size:.85em}
</style></head><body>
<h1>{title}</h1><p>OpenAPI document: <a href="/openapi.json">/openapi.json</a></p><div id="ops">Loading...</div>
<script>
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;"}[c]));
fetch("/openapi.json").then(r => r.json()).then(doc => {
  const byTag = {};
  for (const [path, ops] of Object.entries(doc.paths))
    for (const [method, op] of Object.entries(ops))
      (byTag[op.tags[0]] = byTag[op.tags[0]] || []).push([method, path, op]);
  let out = "";
  for (const [tag, ops] of Object.entries(byTag)) {
    out += `<h2>${esc(tag)}</h2>`;
    for (const [method, path, op] of ops) {
      out += `<details><summary><span class="m ${method}">${method}</span><code>${esc(path)}</code> ${esc(op.summary)}</summary>`;
      if (op.description) out += `<p>${esc(op.description)}</p>`;
      if (op.parameters.length) {
        out += "<table><tr><th>name</th><th>in</th><th>type</th><th>required</th><th>description</th></tr>";
        for (const p of op.parameters)
          out += `<tr><td>${esc(p.name)}</td><td>${p.in}</td><td>${esc(p.schema.type)}</td><td>${p.required}</td><td>${esc(p.description || "")}</td></tr>`;
        out += "</table>";
      }
      if (op.requestBody) out += `<p>Body: ${Object.keys(op.requestBody.content).map(esc).join(" or ")}</p><pre>${esc(JSON.stringify(Object.values(op.requestBody.content)[0].schema, null, 1))}</pre>`;
      out += `<p>Responses: ${Object.entries(op.responses).map(([c, r]) => `<b>${c}</b> ${esc(r.description)}`).join("; ")}</p></details>`;
    }
  }
  document.getElementById("ops").innerHTML = out;
}).catch(e => { document.getElementById("ops").textContent = "Cannot load /openapi.json: " + e; });
</script></body></html>
"""

routes = [
    Route("/api/v1/config", config, methods=["GET"]),
    Route("/api/v1/consistence/status", consistence_status, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]
