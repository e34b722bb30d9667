"""Face detection service: POST /api/v1/detection/detect."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import params
from server.http.images import read_image_request
from server.http.responses import JSONResponse, add_execution_time, face_fields, plugins_versions, wants_embedding
from server.http.state import app_state, inference
from server.vision.plugins import parse_face_plugins


async def detect(request: Request) -> Response:
    state = app_state(request)
    req = await read_image_request(request, {"file": "content"})
    p = params.image_params(req.params)
    image = req.images()[0]
    selected = parse_face_plugins(p.face_plugins)
    # The detection service asks the core for the calculator only when face_plugins names it.
    embed = "calculator" in selected
    analysis = await inference(request, state.service.analyse, image.data, det_prob_threshold=p.det_prob_threshold,
                               limit=p.limit, plugins=selected, embed=embed)
    with_embedding = embed and wants_embedding(p.face_plugins)
    result = [
        # CompreFace does not round the box probability of the detection service.
        add_execution_time(face_fields(face, extra, rounded=False, embedding=with_embedding, status=p.status),
                           face, extra, p.status)
        for face, extra in zip(analysis.faces, analysis.extras)
    ]
    body: dict[str, Any] = {"result": result}
    if p.status:
        body["plugins_versions"] = plugins_versions(analysis.versions)
    return JSONResponse(body)


routes = [Route("/api/v1/detection/detect", detect, methods=["POST"])]
