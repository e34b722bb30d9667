"""Face verification service: /api/v1/verification/verify and /embeddings/verify."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import errors, params
from server.http.images import read_image_request
from server.http.routes.recognition import ranked
from server.http.responses import JSONResponse, add_execution_time, face_fields, plugins_versions, wants_embedding
from server.http.state import app_state, inference
from server.vision.plugins import parse_face_plugins
from server.core.service import check_embeddings, round5

PARTS = {"source_image": "sourceImageBase64", "target_image": "targetImageBase64"}


async def verify(request: Request) -> Response:
    """The one face of source_image against every face of target_image."""
    state = app_state(request)
    req = await read_image_request(request, PARTS)
    p = params.image_params(req.params)
    source, target = req.images()
    selected = parse_face_plugins(p.face_plugins)
    kwargs = dict(det_prob_threshold=p.det_prob_threshold, limit=p.limit, plugins=selected)
    src = await inference(request, state.service.analyse, source.data, **kwargs)
    if len(src.faces) > 1:
        raise errors.too_many_faces()
    tgt = await inference(request, state.service.analyse, target.data, **kwargs)
    sims = state.service.similarities(src.embeddings()[0], tgt.embeddings())
    with_embedding = wants_embedding(p.face_plugins)

    def fields(face, extra) -> dict[str, Any]:
        return face_fields(face, extra, rounded=True, embedding=with_embedding, status=p.status)

    source_face = add_execution_time(fields(src.faces[0], src.extras[0]), src.faces[0], src.extras[0], p.status)
    matches = []
    for face, extra, sim in zip(tgt.faces, tgt.extras, sims):
        item = fields(face, extra)
        item["similarity"] = round5(sim)
        matches.append(add_execution_time(item, face, extra, p.status))
    item: dict[str, Any] = {"source_image_face": source_face, "face_matches": matches}
    if p.status:  # here plugins_versions sits inside the result item (VerifyFacesResponse)
        item["plugins_versions"] = plugins_versions(src.versions)
    return JSONResponse({"result": [item]})


async def verify_embeddings(request: Request) -> Response:
    """{"source": [..], "targets": [[..], ..]} -> targets ranked by similarity, highest first."""
    body = await params.read_json(request)
    source = params.embedding_matrix(body, "source", single=True)
    targets = params.embedding_matrix(body, "targets")
    if not targets:  # EmbeddingsVerificationProcessServiceImpl: source + targets must be >= 2
        raise errors.wrong_embedding_count(2, 1)
    vectors = check_embeddings(source + targets)
    sims = app_state(request).service.similarities(vectors[0], vectors[1:])
    return JSONResponse({"result": ranked(targets, sims)})


routes = [
    Route("/api/v1/verification/verify", verify, methods=["POST"]),
    Route("/api/v1/verification/embeddings/verify", verify_embeddings, methods=["POST"]),
]
