"""Face detection service: POST /api/v1/detection/detect."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http.images import read_faces_request
from server.http.responses import JSONResponse


async def detect(request: Request) -> Response:
    q = await read_faces_request(request)
    # The detection service asks the core for the calculator only when face_plugins names it.
    embed = "calculator" in q.plugins
    analysis = await q.analyse(q.images[0], embed=embed)
    # CompreFace does not round the box probability of the detection service.
    return JSONResponse(q.with_versions({"result": q.faces(analysis, rounded=False, embedding=embed)}, analysis))


routes = [Route("/api/v1/detection/detect", detect, methods=["POST"])]
