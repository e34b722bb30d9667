"""Reading the image endpoints' requests in both forms: multipart parts or base64 JSON fields."""
from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from server.http import errors, params
from server.http.params import ImageInput, Params, Upload
from server.http.state import app_state


@dataclass
class ImageRequest:
    params: Params
    _raw: list[Upload | tuple[str, str]]  # multipart uploads, or (part, base64 text)

    def images(self) -> list[ImageInput]:
        """Extension / base64 checks (code 21), in part order. Call after parameter validation,
        as CompreFace validates files in the method body, after @Min and friends."""
        out = []
        for item in self._raw:
            if isinstance(item, Upload):
                out.append(params.check_upload(item))
            else:
                out.append(params.decode_base64(*item))
        return out


async def read_image_request(request: Request, parts: dict[str, str]) -> ImageRequest:
    """`parts`: multipart part name -> Java field name of the JSON form (for code 5 messages)."""
    settings = app_state(request).settings
    if params.is_multipart(request):
        form = await params.read_multipart(request, settings.max_file_size)
        raw: list = []
        for part in parts:
            upload = form.files.get(part)
            if upload is None:
                raise errors.missing_part(part)
            raw.append(upload)
        return ImageRequest(Params.of(request, form), raw)
    if params.is_json(request):
        body = await params.read_json(request)
        raw = [(part, params.json_string_field(body, part, java)) for part, java in parts.items()]
        return ImageRequest(Params.of(request), raw)
    raise errors.unsupported_media_type(request.headers.get("content-type", ""))
