"""CompreFace's REST API on Starlette: routes per service, parameter parsing, the error table.

    errors.py        the one table of CompreFace errors (codes, statuses, messages)
    gate.py          the ASGI middleware: trailing slashes, body limits, x-api-key, last-resort errors
    params.py        Spring-compatible parameter parsing; multipart and JSON bodies; base64
    images.py        reading image requests in both forms (multipart parts / base64 JSON)
    responses.py     orjson responses and CompreFace's face shapes
    recognition.py   /api/v1/recognition/...   detection.py  /api/v1/detection/detect
    verification.py  /api/v1/verification/...  static.py     /api/v1/static/{key}/images/{id}
    admin.py         /api/v1/admin/... (only with an admin token)
    system.py        config, consistence status, /health, /ready, /openapi.json, /docs
"""
