"""The image endpoints' requests and their one sequence.

`read_image_request` reads both forms of an image request (multipart parts or base64 JSON fields).
The five endpoints that analyse images (recognize, detect, faces/{id}/verify, verification/verify,
subjects/{subject}/verify) share one sequence, `FacesRequest`: read the request -> validate the
parameters -> check the images -> analyse each (in the inference pool) -> per face: plugin fields,
embedding, box, landmarks, the endpoint's own fields, execution_time -> plugins_versions.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable

from starlette.requests import Request

from server.core.service import Analysis
from server.http import errors, params
from server.http.params import ImageInput, ImageParams, Params, Upload
from server.http.responses import add_execution_time, face_fields, plugins_versions, wants_embedding
from server.http.state import app_state, inference
from server.vision.plugins import parse_face_plugins

FILE = {"file": "content"}  # the one image of most endpoints: multipart part -> Java field name


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


@dataclass
class FacesRequest:
    """An image endpoint's request, read and checked: its parameters, images and face plugins."""

    request: Request
    params: ImageParams
    images: list[ImageInput]
    plugins: list[str]  # parse_face_plugins(params.face_plugins)

    async def analyse(self, image: ImageInput, *, embed: bool = True) -> Analysis:
        """FaceService.analyse with the request's parameters, under its inference admission and scope."""
        p = self.params
        return await inference(self.request, app_state(self.request).service.analyse, image.data,
                               det_prob_threshold=p.det_prob_threshold, limit=p.limit, plugins=self.plugins,
                               embed=embed, detect_faces=p.detect_faces)

    def faces(self, analysis: Analysis, fields: Iterable[dict[str, Any]] | None = None, *, box_first: bool = False,
              rounded: bool = True, embedding: bool = True) -> list[dict[str, Any]]:
        """Per face: plugin fields, embedding (if face_plugins asks and `embedding`), box, landmarks,
        then that face's entry of `fields`, then its execution_time (status=true). `box_first`: box,
        then `fields`, then the rest (the shape of the verify-against-stored answers)."""
        status = self.params.status
        with_embedding = embedding and wants_embedding(self.params.face_plugins)
        out = []
        own_fields = itertools.repeat({}) if fields is None else fields
        for face, extra, own in zip(analysis.faces, analysis.extras, own_fields):
            base = face_fields(face, extra, rounded=rounded, embedding=with_embedding, status=status)
            item = {"box": base.pop("box"), **own, **base} if box_first else {**base, **own}
            out.append(add_execution_time(item, face, extra, status))
        return out

    def with_versions(self, body: dict[str, Any], analysis: Analysis) -> dict[str, Any]:
        """`body` with the analysis' plugins_versions added when status=true."""
        if self.params.status:
            body["plugins_versions"] = plugins_versions(analysis.versions)
        return body


async def read_faces_request(request: Request, parts: dict[str, str] = FILE, *, prediction_count: bool = False,
                             detect_faces: bool = False) -> FacesRequest:
    """Read the image request, validate its parameters (@Min: codes 26), then check its images (code 21),
    in CompreFace's order. `prediction_count` / `detect_faces`: the endpoint takes those parameters."""
    req = await read_image_request(request, parts)
    p = params.image_params(req.params, prediction_count=prediction_count, detect_faces=detect_faces)
    images = req.images()
    return FacesRequest(request, p, images, parse_face_plugins(p.face_plugins))
