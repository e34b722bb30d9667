"""CompreFace's REST API on Starlette: the wire format, and nothing below it.

    app.py           create_app / run_server: routes, middleware, exception handlers, the lifespan
    admin_token.py   the admin token at start: explicit, else the data dir's (made on a first run); the page's URL
    gate.py          the ASGI middleware: trailing slashes, body limits, x-api-key, error logging, last resort
    errors.py        CompreFace's error table (ApiError) and EXCEPTIONS: each lower layer's exception -> its answer
    params.py        Spring-compatible parameter parsing; multipart and JSON bodies; base64; subject-name mapping
    images.py        image requests in both forms, and the image endpoints' one sequence (FacesRequest)
    responses.py     orjson responses and CompreFace's face shapes
    state.py         AppState (the parts the lifespan fills), API key cache, inference admission and scope
    openapi.py       the OpenAPI document served at /openapi.json
    routes/          one module per service: recognition.py, detection.py, verification.py,
                     extensions.py (ours), static.py, admin.py (admin token only), system.py (health, docs)
    ui/              the web console's static files under /ui/
"""
