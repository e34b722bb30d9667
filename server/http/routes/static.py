"""GET /api/v1/static/{apiKey}/images/{image_id}: an example's image, the key in the path.

Exempt from the x-api-key header (CompreFace's filter skips /api/v1/static): an unknown key,
a key of another service or an unknown id all give an empty body, as CompreFace does.
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.http import params
from server.http.gate import UUID_TEXT
from server.http.routes.recognition import image_response
from server.http.state import app_state, blocking


async def static_image(request: Request) -> Response:
    image_id = params.parse_uuid("image_id", request.path_params["image_id"])
    key_text = request.path_params["api_key"]
    state = app_state(request)
    if not UUID_TEXT.match(key_text):
        return image_response(None)
    key = await state.keys.find(key_text.lower())
    if key is None or key.type != "recognition":
        return image_response(None)
    return image_response(await blocking(state.storage.get_image, key.collection, image_id))


routes = [Route("/api/v1/static/{api_key}/images/{image_id}", static_image, methods=["GET"])]
