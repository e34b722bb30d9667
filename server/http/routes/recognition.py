"""Face recognition service: /api/v1/recognition/... (subjects, faces, recognize, embeddings)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import errors, params
from server.http.images import FILE, read_faces_request, read_image_request
from server.http.params import Params
from server.http.responses import JSONResponse
from server.http.state import api_key, app_state, blocking, inference
from server.core.service import check_embeddings, round5

PREFIX = "/api/v1/recognition"
CACHE_CONTROL = "public, max-age=31536000"  # CompreFace's CACHE_CONTROL_HEADER_VALUE


# ------------------------------------------------------------------------------- subjects
async def create_subject(request: Request) -> Response:
    name = params.validate_subject_dto(await params.read_json(request))
    stored = await blocking(app_state(request).service.add_subject, api_key(request).collection, name)
    return JSONResponse({"subject": stored}, status_code=201)


async def list_subjects(request: Request) -> Response:
    names = await blocking(app_state(request).storage.list_subjects, api_key(request).collection)
    return JSONResponse({"subjects": names})


async def rename_subject(request: Request) -> Response:
    old = params.require_not_blank(request.path_params["subject"])
    new = params.validate_subject_dto(await params.read_json(request))
    if new == old:  # SubjectService.updateSubjectName: nothing to do, before any lookup
        return JSONResponse({"updated": False})
    updated = await blocking(app_state(request).service.rename_subject, api_key(request).collection, old, new)
    return JSONResponse({"updated": bool(updated)})


async def delete_subject(request: Request) -> Response:
    name = params.require_not_blank(request.path_params["subject"])
    deleted = await blocking(app_state(request).service.delete_subject, api_key(request).collection, name)
    return JSONResponse({"subject": deleted})


async def delete_all_subjects(request: Request) -> Response:
    count = await blocking(app_state(request).service.delete_all_subjects, api_key(request).collection)
    return JSONResponse({"deleted": count})


# ------------------------------------------------------------------------------- faces
async def add_face(request: Request) -> Response:
    """POST /faces?subject=&det_prob_threshold= with a file (multipart) or {"file": base64}."""
    state = app_state(request)
    req = await read_image_request(request, FILE)
    subject = params.example_subject(req.params.required_string("subject"))
    threshold = req.params.number("det_prob_threshold")
    image = req.images()[0]
    vector = await inference(request, state.service.example_embedding, image.data, threshold)
    face = await blocking(state.service.store_face, api_key(request).collection, subject, vector, image.data)
    # CompreFace answers with the subject as sent, not as stored (EmbeddingController.addEmbedding).
    return JSONResponse({"image_id": face.image_id, "subject": subject}, status_code=201)


async def list_faces(request: Request) -> Response:
    p = Params.of(request)
    page, size = p.page()
    subject = p.string("subject")
    if subject == "":  # CompreFace filters on subjectName = '' then: nothing matches
        faces, total = [], 0
    else:
        faces, total = await blocking(app_state(request).storage.list_faces, api_key(request).collection,
                                      subject, page, size)
    return JSONResponse({
        "faces": [{"image_id": f.image_id, "subject": f.subject} for f in faces],
        "page_number": page,
        "page_size": size,
        "total_pages": math.ceil(total / size) if size else 0,
        "total_elements": total,
    })


async def delete_faces_of_subject(request: Request) -> Response:
    """DELETE /faces?subject=s: the subject's faces and the subject; without a subject, all faces."""
    subject = Params.of(request).string("subject")
    service = app_state(request).service
    collection = api_key(request).collection
    if subject is None or subject == "":
        # The seed documents "absent -> all faces are removed" (SubjectService.removeAllSubjectEmbeddings);
        # CompreFace 1.2's @NotBlank on this parameter would refuse it with code 26 instead.
        deleted = await blocking(service.delete_all_faces, collection)
    else:
        deleted = await blocking(service.delete_subject_faces, collection, subject)
    return JSONResponse({"deleted": deleted})


async def delete_face(request: Request) -> Response:
    image_id = params.parse_uuid("image_id", request.path_params["image_id"])
    face = await blocking(app_state(request).service.delete_face, api_key(request).collection, image_id)
    return JSONResponse({"image_id": face.image_id, "subject": face.subject})


async def delete_faces(request: Request) -> Response:
    """POST /faces/delete ["id", ...]: an array of the deleted faces; unknown ids are skipped."""
    body = await params.read_json(request)
    if not isinstance(body, list) or not all(isinstance(x, str) for x in body):
        raise errors.unreadable_body("expected a JSON array of image ids")
    try:
        ids = [params.parse_uuid("image_id", x) for x in body]
    except errors.ApiError:
        raise errors.unreadable_body("every image id must be a UUID") from None
    faces = await blocking(app_state(request).service.delete_faces, api_key(request).collection, ids)
    return JSONResponse([{"image_id": f.image_id, "subject": f.subject} for f in faces])


async def face_image(request: Request) -> Response:
    image_id = params.parse_uuid("image_id", request.path_params["image_id"])
    data = await blocking(app_state(request).storage.get_image, api_key(request).collection, image_id)
    return image_response(data)


def image_response(data: bytes | None) -> Response:
    """CompreFace: the stored bytes as octet-stream, or an empty body when the id is unknown."""
    return Response(data or b"", media_type="application/octet-stream", headers={"Cache-Control": CACHE_CONTROL})


# ------------------------------------------------------------------------------- recognize / verify
async def recognize(request: Request) -> Response:
    state = app_state(request)
    q = await read_faces_request(request, prediction_count=True, detect_faces=True)
    analysis = await q.analyse(q.images[0])
    matches = await blocking(state.service.recognize, api_key(request).collection, analysis.embeddings(),
                             q.params.prediction_count)
    subjects = [{"subjects": [{"subject": s, "similarity": round5(sim)} for s, sim in hits]} for hits in matches]
    return JSONResponse(q.with_versions({"result": q.faces(analysis, subjects)}, analysis))


async def verify_face(request: Request) -> Response:
    """POST /faces/{image_id}/verify: each face of the image against one stored face."""
    state = app_state(request)
    image_id = params.parse_uuid("image_id", request.path_params["image_id"])
    q = await read_faces_request(request)
    analysis = await q.analyse(q.images[0])
    # As CompreFace: the faces are found first (code 28), then the id is looked up (code 44).
    stored = await blocking(state.service.stored_face, api_key(request).collection, image_id)
    sims = state.service.similarities(stored.embedding, analysis.embeddings())
    matches = [{"subject": stored.subject, "similarity": round5(sim)} for sim in sims]
    return JSONResponse(q.with_versions({"result": q.faces(analysis, matches, box_first=True)}, analysis))


# ------------------------------------------------------------------------------- embeddings
async def recognize_embeddings(request: Request) -> Response:
    """POST /embeddings/recognize?prediction_count= {"embeddings": [[..], ..]}."""
    count = params.prediction_count(Params.of(request))
    body = await params.read_json(request)
    rows = params.embedding_matrix(body, "embeddings")
    if not rows:
        return JSONResponse({"result": []})
    vectors = check_embeddings(rows)
    state = app_state(request)
    matches = await blocking(state.service.recognize, api_key(request).collection, vectors, count)
    return JSONResponse({"result": [
        {"embedding": row, "similarities": [{"subject": s, "similarity": round5(sim)} for s, sim in hits]}
        for row, hits in zip(rows, matches)
    ]})


async def verify_embeddings(request: Request) -> Response:
    """POST /embeddings/faces/{image_id}/verify {"embeddings": [[..], ..]}: sorted, most similar first."""
    image_id = params.parse_uuid("image_id", request.path_params["image_id"])
    body = await params.read_json(request)
    rows = params.embedding_matrix(body, "embeddings")
    if not rows:  # SubjectService.verifyEmbedding: at least one target
        raise errors.wrong_embedding_count(1, 0)
    vectors = check_embeddings(rows)
    state = app_state(request)
    stored = await blocking(state.service.stored_face, api_key(request).collection, image_id)
    sims = state.service.similarities(stored.embedding, vectors)
    return JSONResponse({"result": ranked(rows, sims)})


def ranked(rows: list[list[float]], sims: np.ndarray) -> list[dict[str, Any]]:
    """[{"embedding", "similarity"}], highest first. Sorted on the unrounded similarity: near-identical
    faces all round to 1.0 and must still come out in their true order."""
    order = sorted(range(len(rows)), key=lambda i: -float(sims[i]))
    return [{"embedding": rows[i], "similarity": round5(sims[i])} for i in order]


routes = [
    Route(PREFIX + "/subjects", create_subject, methods=["POST"]),
    Route(PREFIX + "/subjects", list_subjects, methods=["GET"]),
    Route(PREFIX + "/subjects", delete_all_subjects, methods=["DELETE"]),
    Route(PREFIX + "/subjects/{subject}", rename_subject, methods=["PUT"]),
    Route(PREFIX + "/subjects/{subject}", delete_subject, methods=["DELETE"]),
    Route(PREFIX + "/faces", add_face, methods=["POST"]),
    Route(PREFIX + "/faces", list_faces, methods=["GET"]),
    Route(PREFIX + "/faces", delete_faces_of_subject, methods=["DELETE"]),
    Route(PREFIX + "/faces/delete", delete_faces, methods=["POST"]),
    Route(PREFIX + "/faces/{image_id}", delete_face, methods=["DELETE"]),
    Route(PREFIX + "/faces/{image_id}/img", face_image, methods=["GET"]),
    Route(PREFIX + "/faces/{image_id}/verify", verify_face, methods=["POST"]),
    Route(PREFIX + "/recognize", recognize, methods=["POST"]),
    Route(PREFIX + "/embeddings/recognize", recognize_embeddings, methods=["POST"]),
    Route(PREFIX + "/embeddings/faces/{image_id}/verify", verify_embeddings, methods=["POST"]),
]
