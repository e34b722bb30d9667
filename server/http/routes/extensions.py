"""Our extensions of CompreFace's recognition API (CompreFace has no such routes; /openapi.json
tags them "extensions"). Both take the recognition service's x-api-key.

    POST /api/v1/recognition/embeddings/faces
        [{"subject": "Bob", "embedding": [128 numbers]}, ...]  (at most MAX_BULK_FACES)
        -> 201 [{"image_id": uuid, "subject": "Bob"}, ...] in request order; all stored in one
        transaction (all or nothing). Embeddings are L2-normalised like the pipeline's; the face
        has no image (GET /faces/{id}/img answers an empty body).

    POST /api/v1/recognition/subjects/{subject}/verify?limit=&det_prob_threshold=&face_plugins=&status=
        an image, as POST /faces/{image_id}/verify -> per face of the image, the best similarity
        to ANY example of the subject, with the image_id of that example:
        {"result": [{"box", "subject", "similarity", "image_id", ...plugins}], "plugins_versions"?}
        Unknown subject: 404 code 42; a subject without examples: 400 code 0.
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import errors, params
from server.http.images import read_faces_request
from server.http.responses import JSONResponse
from server.http.state import api_key, app_state, blocking
from server.core.service import check_embeddings, l2_normalise, round5
from server.storage import NewFace

PREFIX = "/api/v1/recognition"
MAX_BULK_FACES = 1000  # ~2.5 MB of JSON: well inside the 10 MB body limit, one short transaction


async def add_embeddings(request: Request) -> Response:
    body = await params.read_json(request)
    if not isinstance(body, list):
        raise errors.unreadable_body('expected a JSON array like [{"subject": "name", "embedding": [...]}]')
    if len(body) > MAX_BULK_FACES:
        raise errors.too_many_items(MAX_BULK_FACES, len(body))
    subjects: list[str] = []
    rows: list[list[float]] = []
    for item in body:
        subjects.append(params.validate_subject_dto(item))  # same rules as POST /subjects
        rows.extend(params.embedding_matrix(item, "embedding", single=True))
    if not rows:
        return JSONResponse([], status_code=201)
    vectors = l2_normalise(check_embeddings(rows))
    faces = [NewFace(subject=s, embedding=v) for s, v in zip(subjects, vectors)]
    state = app_state(request)
    stored = await blocking(state.service.store_faces, api_key(request).collection, faces)
    # as POST /faces: the subject as sent, not as stored
    return JSONResponse([{"image_id": f.image_id, "subject": s} for f, s in zip(stored, subjects)], status_code=201)


async def verify_subject(request: Request) -> Response:
    state = app_state(request)
    subject = params.require_not_blank(request.path_params["subject"])
    q = await read_faces_request(request)
    analysis = await q.analyse(q.images[0])
    # as faces/{image_id}/verify: the faces are found first (code 28), then the subject (code 42)
    name, best_ids, sims = await blocking(state.service.subject_similarities, api_key(request).collection,
                                          subject, analysis.embeddings())
    matches = [{"subject": name, "similarity": round5(sim), "image_id": image_id}
               for image_id, sim in zip(best_ids, sims)]
    return JSONResponse(q.with_versions({"result": q.faces(analysis, matches, box_first=True)}, analysis))


routes = [
    Route(PREFIX + "/embeddings/faces", add_embeddings, methods=["POST"]),
    Route(PREFIX + "/subjects/{subject}/verify", verify_subject, methods=["POST"]),
]
