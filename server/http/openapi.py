"""The OpenAPI 3.0 document, written by hand from one table of operations.

`tests/test_api.py` (test_openapi_covers_every_route) checks that every route of the app appears here
and vice versa.
"""
from __future__ import annotations

from typing import Any

from server.config import MTCNN_DET_PROB_THRESHOLD, YUNET_DET_PROB_THRESHOLD, Settings
from server.core.subjects import SUBJECT_NAME_MAX

# ------------------------------------------------------------------------------- parameters
_P: dict[str, dict[str, Any]] = {
    "limit": {"schema": {"type": "integer", "minimum": 0, "default": 0},
              "description": "Maximum number of faces, biggest first; 0 = no limit."},
    "prediction_count": {"schema": {"type": "integer", "minimum": 1, "default": 1},
                         "description": "Maximum number of subject predictions per face."},
    "det_prob_threshold": {"schema": {"type": "number", "minimum": 0, "maximum": 1},
                           "description": f"A face is kept only if its probability is greater (default: the detector's, {YUNET_DET_PROB_THRESHOLD} for YuNet, {MTCNN_DET_PROB_THRESHOLD} for MTCNN)."},
    "face_plugins": {"schema": {"type": "string", "default": ""},
                     "description": "Comma-separated plugins: landmarks, calculator, pose, age, gender, mask."},
    "status": {"schema": {"type": "boolean", "default": False},
               "description": "Add execution_time and plugins_versions."},
    "detect_faces": {"schema": {"type": "boolean", "default": True},
                     "description": "false: treat the whole image as one face."},
    "subject": {"schema": {"type": "string"}, "description": "Subject name."},
    "page": {"schema": {"type": "integer", "minimum": 0, "default": 0}, "description": "Page number."},
    "size": {"schema": {"type": "integer", "minimum": 1, "default": 20}, "description": "Page size."},
}


def _query(*names: str, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "required": n in required, **_P[n]} for n in names]


def _path(*names: str) -> list[dict[str, Any]]:
    fmt = {"image_id": {"type": "string", "format": "uuid"}, "api_key": {"type": "string", "format": "uuid"},
           "key": {"type": "string", "format": "uuid"}}
    return [{"name": n, "in": "path", "required": True, "schema": fmt.get(n, {"type": "string"})} for n in names]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _image_body(*parts: str) -> dict[str, Any]:
    props = {p: {"type": "string", "format": "binary"} for p in parts}
    b64 = {p: {"type": "string", "format": "byte", "description": "base64 image"} for p in parts}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": list(parts), "properties": props}},
        "application/json": {"schema": {"type": "object", "required": list(parts), "properties": b64}},
    }}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(schema: dict[str, Any], status: str = "200", description: str = "Success") -> dict[str, Any]:
    return {status: {"description": description, "content": {"application/json": {"schema": schema}}}}


_BINARY = {"200": {"description": "The image bytes; empty when the id is unknown.",
                   "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_ERRORS = {"400": {"description": "CompreFace error", "content": {"application/json": {"schema": _ref("Error")}}},
           "404": {"description": "Unknown key / subject / image, or wrong method",
                   "content": {"application/json": {"schema": _ref("Error")}}},
           "413": {"description": "Request body larger than the server's limit (code 0)",
                   "content": {"application/json": {"schema": _ref("Error")}}}}
# Answers of the gate and the inference admission, added by document() where they can occur.
_UNSUPPORTED = {"415": {"description": "Neither multipart/form-data nor JSON (code 0)",
                        "content": {"application/json": {"schema": _ref("Error")}}}}
_UNAUTHORIZED = {"401": {"description": "Missing or wrong admin token (code 0)",
                         "content": {"application/json": {"schema": _ref("Error")}}}}
_UNAVAILABLE = {"503": {"description": "Not ready yet (code 0), inference overloaded (code 60, with Retry-After), "
                                       "timed out (code 61) or the database unreachable (code 64, with Retry-After)",
                        "headers": {"Retry-After": {"description": "Seconds to wait (codes 60 and 64)",
                                                    "schema": {"type": "integer"}}},
                        "content": {"application/json": {"schema": _ref("Error")}}}}

_IMAGE_PARAMS = ("limit", "det_prob_threshold", "face_plugins", "status")
_EMBEDDINGS = {"type": "object", "required": ["embeddings"],
               "properties": {"embeddings": {"type": "array", "items": _ref("Embedding")}}}
_SUBJECT = {"type": "object", "required": ["subject"],
            "properties": {"subject": {"type": "string", "maxLength": SUBJECT_NAME_MAX}}}

# (method, path, tag, summary, security, parameters, requestBody, responses)
R, D, V, A, N = "recognition", "detection", "verification", "admin", None
OPERATIONS: list[tuple[str, str, str, str, str | None, list, dict | None, dict]] = [
    ("post", "/api/v1/recognition/subjects", "subjects", "Add a subject", R, [], _json_body(_SUBJECT),
     _ok(_SUBJECT, "201", "Created")),
    ("get", "/api/v1/recognition/subjects", "subjects", "List subjects", R, [], None,
     _ok({"type": "object", "properties": {"subjects": {"type": "array", "items": {"type": "string"}}}})),
    ("delete", "/api/v1/recognition/subjects", "subjects", "Delete all subjects", R, [], None,
     _ok({"type": "object", "properties": {"deleted": {"type": "integer"}}})),
    ("put", "/api/v1/recognition/subjects/{subject}", "subjects", "Rename a subject (merges into an existing one)",
     R, _path("subject"), _json_body(_SUBJECT),
     _ok({"type": "object", "properties": {"updated": {"type": "boolean"}}})),
    ("delete", "/api/v1/recognition/subjects/{subject}", "subjects", "Delete a subject and its faces", R,
     _path("subject"), None, _ok(_SUBJECT)),
    ("post", "/api/v1/recognition/faces", "faces", "Add an example of a subject (exactly one face)", R,
     _query("subject", "det_prob_threshold", required=("subject",)), _image_body("file"),
     _ok(_ref("FaceRef"), "201", "Created")),
    ("get", "/api/v1/recognition/faces", "faces", "List saved examples", R, _query("page", "size", "subject"), None,
     _ok(_ref("FacePage"))),
    ("delete", "/api/v1/recognition/faces", "faces", "Delete all examples of a subject (all, without subject)", R,
     _query("subject"), None, _ok({"type": "object", "properties": {"deleted": {"type": "integer"}}})),
    ("post", "/api/v1/recognition/faces/delete", "faces", "Delete several examples by id", R, [],
     _json_body({"type": "array", "items": {"type": "string", "format": "uuid"}}),
     _ok({"type": "array", "items": _ref("FaceRef")})),
    ("delete", "/api/v1/recognition/faces/{image_id}", "faces", "Delete an example by id", R, _path("image_id"),
     None, _ok(_ref("FaceRef"))),
    ("get", "/api/v1/recognition/faces/{image_id}/img", "faces", "Download an example's image", R,
     _path("image_id"), None, _BINARY),
    ("post", "/api/v1/recognition/faces/{image_id}/verify", "recognition", "Verify the faces of an image against an example",
     R, _path("image_id") + _query(*_IMAGE_PARAMS), _image_body("file"), _ok(_ref("VerifyResult"))),
    ("post", "/api/v1/recognition/recognize", "recognition", "Recognize the faces of an image", R,
     _query("limit", "prediction_count", "det_prob_threshold", "face_plugins", "status", "detect_faces"),
     _image_body("file"), _ok(_ref("RecognizeResult"))),
    ("post", "/api/v1/recognition/embeddings/recognize", "embeddings", "Recognize embeddings", R,
     _query("prediction_count"), _json_body(_EMBEDDINGS), _ok({"type": "object"})),
    ("post", "/api/v1/recognition/embeddings/faces/{image_id}/verify", "embeddings",
     "Verify embeddings against an example", R, _path("image_id"), _json_body(_EMBEDDINGS),
     _ok(_ref("EmbeddingSimilarities"))),
    ("post", "/api/v1/recognition/embeddings/faces", "extensions",
     "Add many examples from precomputed embeddings, in one transaction (our extension, not in CompreFace)", R, [],
     _json_body({"type": "array", "maxItems": 1000, "items": {"type": "object", "required": ["subject", "embedding"],
                 "properties": {"subject": {"type": "string", "maxLength": SUBJECT_NAME_MAX},
                                "embedding": _ref("Embedding")}}}),
     _ok({"type": "array", "items": _ref("FaceRef")}, "201", "Created, in request order")),
    ("post", "/api/v1/recognition/subjects/{subject}/verify", "extensions",
     "Verify the faces of an image against every example of a subject: the best similarity and its "
     "image_id (our extension, not in CompreFace)", R, _path("subject") + _query(*_IMAGE_PARAMS), _image_body("file"),
     _ok({"type": "object", "properties": {"result": {"type": "array", "items": {"allOf": [
         _ref("Face"), {"type": "object", "properties": {"subject": {"type": "string"}, "similarity": {"type": "number"},
                                                         "image_id": {"type": "string", "format": "uuid"}}}]}},
         "plugins_versions": {"type": "object"}}})),
    ("post", "/api/v1/detection/detect", "detection", "Detect faces", D, _query(*_IMAGE_PARAMS),
     _image_body("file"), _ok(_ref("DetectResult"))),
    ("post", "/api/v1/verification/verify", "verification", "Verify the face of source_image against target_image",
     V, _query(*_IMAGE_PARAMS), _image_body("source_image", "target_image"), _ok({"type": "object"})),
    ("post", "/api/v1/verification/embeddings/verify", "embeddings", "Verify a source embedding against targets", V, [],
     _json_body({"type": "object", "required": ["source", "targets"],
                 "properties": {"source": _ref("Embedding"), "targets": {"type": "array", "items": _ref("Embedding")}}}),
     _ok(_ref("EmbeddingSimilarities"))),
    ("get", "/api/v1/static/{api_key}/images/{image_id}", "faces", "Download an example's image (key in the path)",
     N, _path("api_key", "image_id"), None, _BINARY),
    ("get", "/api/v1/config", "system", "Upload limits", N, [], None,
     _ok({"type": "object", "properties": {"clientMaxFileSize": {"type": "integer"},
                                           "clientMaxBodySize": {"type": "integer"}}})),
    ("get", "/api/v1/consistence/status", "system", "CompreFace's consistency status", N, [], None,
     _ok({"type": "object"})),
    ("get", "/health", "system", "Liveness", N, [], None, _ok({"type": "object"})),
    ("get", "/ready", "system", "Readiness: models loaded, storage open (503 otherwise)", N, [], None,
     _ok({"type": "object"})),
    ("get", "/metrics", "system", "Prometheus metrics", N, [], None,
     {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}),
    ("get", "/openapi.json", "system", "This document", N, [], None, _ok({"type": "object"})),
    ("get", "/docs", "system", "API documentation page", N, [], None,
     {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}),
    ("get", "/ui", "system", "Web console (static page under /ui/)", N, [], None,
     {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
      "307": {"description": "Redirect to /ui/"}}),
    ("get", "/api/v1/admin/keys", "admin", "List API keys", A, [], None, _ok({"type": "object"})),
    ("post", "/api/v1/admin/keys", "admin", "Create an API key", A, [],
     _json_body({"type": "object", "required": ["type"], "properties": {
         "type": {"type": "string", "enum": ["recognition", "detection", "verification"]},
         "name": {"type": "string", "maxLength": 200}, "key": {"type": "string", "format": "uuid"}}}),
     _ok(_ref("ApiKey"), "201", "Created")),
    ("patch", "/api/v1/admin/keys/{key}", "admin", "Rename an API key", A, _path("key"),
     _json_body({"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "maxLength": 200}}}),
     _ok(_ref("ApiKey"))),
    ("delete", "/api/v1/admin/keys/{key}", "admin", "Delete an API key and its collection", A, _path("key"), None,
     _ok(_ref("ApiKey"))),
    ("get", "/api/v1/admin/stats", "admin", "Keys and collection sizes", A, [], None, _ok({"type": "object"})),
]

_BOX = {"type": "object", "properties": {k: {"type": "integer"} for k in ("x_max", "y_max", "x_min", "y_min")}
        | {"probability": {"type": "number"}}}
_FACE = {"type": "object", "properties": {
    "box": _BOX, "embedding": _ref("Embedding"),
    "landmarks": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    "age": {"type": "object"}, "gender": {"type": "object"}, "pose": {"type": "object"}, "mask": {"type": "object"},
    "execution_time": {"type": "object", "additionalProperties": {"type": "number"}}}}
SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "properties": {"message": {"type": "string"}, "code": {"type": "integer"}}},
    "Embedding": {"type": "array", "items": {"type": "number"}, "minItems": 128, "maxItems": 128},
    "FaceRef": {"type": "object", "properties": {"image_id": {"type": "string", "format": "uuid"},
                                                 "subject": {"type": "string"}}},
    "FacePage": {"type": "object", "properties": {
        "faces": {"type": "array", "items": _ref("FaceRef")}, "page_number": {"type": "integer"},
        "page_size": {"type": "integer"}, "total_pages": {"type": "integer"}, "total_elements": {"type": "integer"}}},
    "Face": _FACE,
    "DetectResult": {"type": "object", "properties": {"result": {"type": "array", "items": _ref("Face")},
                                                      "plugins_versions": {"type": "object"}}},
    "RecognizeResult": {"type": "object", "properties": {"result": {"type": "array", "items": {"allOf": [
        _ref("Face"), {"type": "object", "properties": {"subjects": {"type": "array", "items": {
            "type": "object", "properties": {"subject": {"type": "string"}, "similarity": {"type": "number"}}}}}}]}},
        "plugins_versions": {"type": "object"}}},
    "VerifyResult": {"type": "object", "properties": {"result": {"type": "array", "items": {"allOf": [
        _ref("Face"), {"type": "object", "properties": {"subject": {"type": "string"},
                                                        "similarity": {"type": "number"}}}]}},
        "plugins_versions": {"type": "object"}}},
    "EmbeddingSimilarities": {"type": "object", "properties": {"result": {"type": "array", "items": {
        "type": "object", "properties": {"embedding": _ref("Embedding"), "similarity": {"type": "number"}}}}}},
    "ApiKey": {"type": "object", "properties": {k: {"type": "string"} for k in ("key", "type", "name", "created")}},
}


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.split("/") if w and w not in ("api", "v1")]
    return "_".join([method, *words]).replace(".", "_")


def document(settings: Settings, *, admin: bool) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, tag, summary, security, parameters, body, responses in OPERATIONS:
        if security == "admin" and not admin:
            continue
        failures = dict(_ERRORS)
        if body is not None and "multipart/form-data" in body["content"]:  # image endpoints check the type
            failures.update(_UNSUPPORTED)
        if security == "admin":
            failures.update(_UNAUTHORIZED)
        if security is not None:  # keys and storage may not be ready; inference may be overloaded
            failures.update(_UNAVAILABLE)
        op: dict[str, Any] = {"tags": [tag], "summary": summary, "operationId": _operation_id(method, path),
                              "parameters": parameters, "responses": {**responses, **failures}}
        if body is not None:
            op["requestBody"] = body
        if security in ("recognition", "detection", "verification"):
            op["security"] = [{"apiKey": []}]
            op["description"] = f"Needs an API key of the {security} service in the x-api-key header."
        elif security == "admin":
            op["security"] = [{"adminToken": []}]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Face recognition server (CompreFace REST API)", "version": "1.2.0",
                 "description": "CompreFace 1.2 compatible REST API. Upload limits: "
                                f"{settings.max_file_size} bytes per file, {settings.max_body_size} per request."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                                "adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }
