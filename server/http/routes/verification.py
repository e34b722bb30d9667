"""Face verification service: /api/v1/verification/verify and /embeddings/verify."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.core.service import check_embeddings, round5
from server.core.subjects import single_face
from server.http import errors, params
from server.http.images import read_faces_request
from server.http.responses import JSONResponse
from server.http.routes.recognition import ranked
from server.http.state import app_state

PARTS = {"source_image": "sourceImageBase64", "target_image": "targetImageBase64"}


async def verify(request: Request) -> Response:
    """The one face of source_image against every face of target_image."""
    state = app_state(request)
    q = await read_faces_request(request, PARTS)
    source, target = q.images
    src = await q.analyse(source)
    single_face(src.faces)  # TooManyFaces (code 31) before the target is analysed
    tgt = await q.analyse(target)
    sims = state.service.similarities(src.embeddings()[0], tgt.embeddings())
    (source_face,) = q.faces(src)
    matches = q.faces(tgt, [{"similarity": round5(sim)} for sim in sims])
    item: dict[str, Any] = {"source_image_face": source_face, "face_matches": matches}
    # here plugins_versions sits inside the result item (VerifyFacesResponse)
    return JSONResponse({"result": [q.with_versions(item, src)]})


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
