"""Hostile input corpus: every case over real HTTP against a real server (real models).

Each case is one test: broken, truncated, empty and zero-pixel images, decompression bombs,
animated and multi-page images, wrong content types, invalid base64, bodies over the limits,
malformed and deeply nested JSON, missing and duplicate parameters, NaN / inf / out-of-range
numbers, bad embeddings, hostile subject names, unknown and malformed ids and keys.

What every case must show:
- the answer is the one CompreFace gives (status, code, message: ../shared/docs/compreface-behaviour.md),
  a 4xx for garbage, or a 2xx where CompreFace accepts the input (a unicode subject name, the
  first frame of an animated image), never a 5xx;
- no hang: every request has a client timeout;
- nothing was logged at ERROR or above (an unexpected exception is logged by the gate even when
  the client sees CompreFace's generic 400 / code 0, so a hidden crash cannot pass).
The last test checks that the server is still healthy: /health, /ready, a real recognize, and no
5xx in its request metrics.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.api_server import astronaut, blank, encode, live_server

R, D, V = "/api/v1/recognition", "/api/v1/detection", "/api/v1/verification"
TIMEOUT_S = 30.0  # per request: a hang is a failure, never a stuck test
BODY_TIMEOUT_S = 2.0  # between two chunks of a body (Settings.body_read_timeout_s)
CASE_BOUND_S = 10.0  # what one case may take at most (the slowest takes ~2 s on 2 busy cores)
MB = 1024 * 1024


# ------------------------------------------------------------------------------- server, log watch
class LogWatch(logging.Handler):
    """Every record at WARNING or above, from every logger (the server runs in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors_since(self, start: int) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records[start:] if r.levelno >= logging.ERROR]


@dataclass
class Ctx:
    http: httpx.Client
    base_url: str
    rkey: str
    dkey: str
    vkey: str
    image_id: str  # a stored example of subject "Seed" in rkey's collection
    embedding: list[float]


@pytest.fixture(scope="module")
def logwatch():
    watch = LogWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    yield watch
    root.removeHandler(watch)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, logwatch):
    with live_server(tmp_path_factory.mktemp("hostile"), model_dir, body_read_timeout_s=BODY_TIMEOUT_S) as srv:
        yield srv


@pytest.fixture(scope="module")
def ctx(server) -> Ctx:
    rkey, dkey, vkey = (server.create_key(t) for t in ("recognition", "detection", "verification"))
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as http:
        added = http.post(R + "/faces", params={"subject": "Seed"}, files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": rkey})
        assert added.status_code == 201, added.text
        det = http.post(D + "/detect", params={"face_plugins": "calculator"}, files={"file": ("a.jpg", FACE_JPG)},
                        headers={"x-api-key": dkey})
        assert det.status_code == 200, det.text
        yield Ctx(http, server.base_url, rkey, dkey, vkey, added.json()["image_id"],
                  det.json()["result"][0]["embedding"])


# ------------------------------------------------------------------------------- image bytes
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, *, bit_depth: int = 1, color_type: int = 0,
         extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real, valid 1-bit PNG of side x side zero pixels: ~110 KB for 30000 x 30000 (900 Mpx)."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    return _png(side, side, b"".join(parts))


def png_with_chunk(chunk: bytes) -> bytes:
    """The astronaut as PNG with an extra ancillary chunk after IHDR."""
    data = FACE_PNG
    return data[:33] + chunk + data[33:]


def gif_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height, holding one 1x1 frame."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"\x2c"
            + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00\x3b")


def gif_nested_blocks(blocks: int) -> bytes:
    """A GIF whose comment extension is split into `blocks` one-byte sub-blocks before the frame."""
    head = b"GIF89a" + struct.pack("<HHBBB", 64, 64, 0, 0, 0)
    return (head + b"\x21\xfe" + b"\x01a" * blocks + b"\x00" + b"\x2c"
            + struct.pack("<HHHHB", 0, 0, 64, 64, 0) + b"\x02\x02\x44\x01\x00\x3b")


def tiff_header(width: int, height: int, *, ifd_loop: bool = False) -> bytes:
    """A little-endian baseline TIFF IFD claiming width x height 8-bit gray (little or no pixel data)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, min(width * height, 2**32 - 1))]
    ifd = (struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
           + struct.pack("<I", 8 if ifd_loop else 0))
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 marker was patched to claim width x height."""
    data = bytearray(encode(blank(64), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_header(width: int, height: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 0, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0))


def webp_canvas(width: int, height: int) -> bytes:
    vp8x = (b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little"))
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def animated(fmt: str, frames: list[np.ndarray], **args) -> bytes:
    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buf, format=fmt, save_all=True, append_images=images[1:], **args)
    return buf.getvalue()


def jpeg_with_segment(segment: bytes, base: bytes | None = None) -> bytes:
    base = base or FACE_JPG
    return base[:2] + segment + base[2:]


FACE = astronaut()
FACE_JPG = encode(FACE, "JPEG", quality=90)
FACE_PNG = encode(FACE, "PNG")
BLANK_JPG = encode(blank(), "JPEG")
NO_FACE = "No face is found in the given image"
SOMETHING_WRONG = "Something went wrong, please try again"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------------------- the corpus
Send = Callable[[Ctx], httpx.Response]


@dataclass(frozen=True)
class Expect:
    status: int
    code: int | None = None  # None: a success status, no error body
    message: str | None = None  # exact message
    contains: str | None = None  # or a part of it
    body: bytes | None = None  # exact body (success answers)


CASES: list = []


def case(case_id: str, status: int, code: int | None = None, message: str | None = None,
         contains: str | None = None, body: bytes | None = None) -> Callable[[Send], Send]:
    def register(send: Send) -> Send:
        CASES.append(pytest.param(send, Expect(status, code, message, contains, body), id=case_id))
        return send

    return register


def detect_file(ctx: Ctx, data: bytes, name: str = "image.jpg") -> httpx.Response:
    return ctx.http.post(D + "/detect", files={"file": (name, data)}, headers={"x-api-key": ctx.dkey})


def detect_raw(ctx: Ctx, content: bytes, content_type: str | None, **kw) -> httpx.Response:
    headers = {"x-api-key": ctx.dkey, **({"content-type": content_type} if content_type else {})}
    return ctx.http.post(D + "/detect", content=content, headers=headers, **kw)


def rjson(ctx: Ctx, path: str, content: bytes, method: str = "POST", **kw) -> httpx.Response:
    return ctx.http.request(method, R + path, content=content,
                            headers={"x-api-key": ctx.rkey, "content-type": "application/json"}, **kw)


def rec(ctx: Ctx, method: str, path: str, **kw) -> httpx.Response:
    return ctx.http.request(method, R + path, headers={"x-api-key": ctx.rkey, **kw.pop("headers", {})}, **kw)


# --- corrupt, truncated, empty, zero-pixel images (the core's 400 -> code 28)
case("empty-file", 400, 28, NO_FACE)(lambda c: detect_file(c, b""))
case("random-bytes", 400, 28, NO_FACE)(lambda c: detect_file(c, bytes(range(256)) * 64))
case("truncated-jpeg", 400, 28, NO_FACE)(lambda c: detect_file(c, FACE_JPG[: len(FACE_JPG) // 2]))
case("jpeg-header-only", 400, 28, NO_FACE)(lambda c: detect_file(c, FACE_JPG[:200]))
case("truncated-png", 400, 28, NO_FACE)(lambda c: detect_file(c, FACE_PNG[: len(FACE_PNG) // 2], "a.png"))
case("png-bad-ihdr-crc", 400, 28, NO_FACE)(
    lambda c: detect_file(c, FACE_PNG[:29] + b"\0\0\0\0" + FACE_PNG[33:], "a.png"))
case("png-zero-width", 400, 28, NO_FACE)(lambda c: detect_file(c, _png(0, 10, zlib.compress(b"")), "a.png"))
case("png-zero-height", 400, 28, NO_FACE)(lambda c: detect_file(c, _png(10, 0, zlib.compress(b"")), "a.png"))
case("png-1x1", 400, 28, NO_FACE)(lambda c: detect_file(c, encode(blank(1), "PNG"), "a.png"))
case("png-1x10000-strip", 400, 28, NO_FACE)(
    lambda c: detect_file(c, encode(np.zeros((1, 10000, 3), np.uint8), "PNG"), "a.png"))
case("bmp-truncated-pixels", 400, 28, NO_FACE)(lambda c: detect_file(c, bmp_header(64, -64), "a.bmp"))
case("ico-entry-out-of-file", 400, 28, NO_FACE)(
    lambda c: detect_file(c, struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, MB, MB),
                          "a.ico"))
case("psd-named-png", 400, 28, NO_FACE)(
    lambda c: detect_file(c, b"8BPS\0\x01" + b"\0" * 6 + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + b"\0" * 64, "a.png"))
case("svg-named-png", 400, 28, NO_FACE)(
    lambda c: detect_file(c, b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "a.png"))
case("postscript-named-jpg", 400, 28, NO_FACE)(
    lambda c: detect_file(c, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"))
case("pdf-named-jpg", 400, 28, NO_FACE)(lambda c: detect_file(c, b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n"))
case("html-named-gif", 400, 28, NO_FACE)(lambda c: detect_file(c, b"<html><body>hi</body></html>", "a.gif"))
case("16bit-gray-blank", 400, 28, NO_FACE)(
    lambda c: detect_file(c, encode(np.full((64, 64), 40000, np.uint16), "PNG"), "a.png"))
case("cmyk-jpeg-blank", 400, 28, NO_FACE)(
    lambda c: detect_file(c, _save(Image.new("CMYK", (64, 64), (10, 20, 30, 40)), "JPEG")))


def _save(img: Image.Image, fmt: str, **args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **args)
    return buf.getvalue()


# --- decompression bombs: refused from the header, before any pixel is decoded
case("png-bomb-30000x30000", 400, 28, NO_FACE)(lambda c: detect_file(c, PNG_BOMB, "bomb.png"))
case("gif-screen-65535x65535", 400, 28, NO_FACE)(lambda c: detect_file(c, gif_screen(65535, 65535), "bomb.gif"))
case("gif-million-nested-blocks", 400, 28, NO_FACE)(lambda c: detect_file(c, gif_nested_blocks(1_000_000), "n.gif"))
case("tiff-100000x100000", 400, 28, NO_FACE)(lambda c: detect_file(c, tiff_header(100_000, 100_000), "b.tiff"))
case("tiff-ifd-loop", 400, 28, NO_FACE)(lambda c: detect_file(c, tiff_header(16, 16, ifd_loop=True), "l.tif"))
case("jpeg-claims-65500x65500", 400, 28, NO_FACE)(lambda c: detect_file(c, jpeg_claiming(65500, 65500)))
case("bmp-claims-50000x50000", 400, 28, NO_FACE)(lambda c: detect_file(c, bmp_header(50000, 50000), "b.bmp"))
case("webp-canvas-16383x16383", 400, 28, NO_FACE)(lambda c: detect_file(c, webp_canvas(16383, 16383), "b.webp"))
case("png-ztxt-bomb", 400, 28, NO_FACE)(lambda c: detect_file(c, png_with_chunk(
    _png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 50 * MB, 9))), "z.png"))
case("png-iccp-bomb", 400, 28, NO_FACE)(lambda c: detect_file(c, png_with_chunk(
    _png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 50 * MB, 9))), "i.png"))

PNG_BOMB = png_bomb(30000)

# --- animated / multi-page images: the first frame is the image (CompreFace's core reads frame 0)
case("animated-gif-face-first", 200)(
    lambda c: detect_file(c, animated("GIF", [FACE, blank(512)], duration=100, loop=0), "anim.gif"))
case("animated-gif-face-second", 400, 28, NO_FACE)(
    lambda c: detect_file(c, animated("GIF", [blank(512), FACE], duration=100, loop=0), "anim.gif"))
case("gif-3000-frames", 400, 28, NO_FACE)(
    lambda c: detect_file(c, animated("GIF", [np.full((8, 8, 3), i % 250, np.uint8) for i in range(3000)]),
                          "many.gif"))
case("multipage-tiff-face-first", 200)(lambda c: detect_file(c, animated("TIFF", [FACE, blank(64)]), "pages.tiff"))
case("apng-face-first", 200)(lambda c: detect_file(c, animated("PNG", [FACE, blank(512)]), "anim.png"))
case("jpeg-corrupt-exif", 200)(lambda c: detect_file(c, jpeg_with_segment(
    b"\xff\xe1" + struct.pack(">H", 28) + b"Exif\0\0MM\0\x2a\0\0\0\x08\xff\xff" + b"\0" * 10)))

# --- wrong content types, broken multipart
case("content-type-text-plain", 415, 0, "Content type 'text/plain' not supported")(
    lambda c: detect_raw(c, FACE_JPG, "text/plain"))
case("content-type-octet-stream", 415, 0, "Content type 'application/octet-stream' not supported")(
    lambda c: detect_raw(c, FACE_JPG, "application/octet-stream"))
case("content-type-form-urlencoded", 415, 0)(
    lambda c: detect_raw(c, b"file=" + b64(FACE_JPG).encode(), "application/x-www-form-urlencoded"))
case("content-type-missing", 415, 0, "Content type '' not supported")(lambda c: detect_raw(c, FACE_JPG, None))
case("json-body-sent-as-xml", 415, 0)(lambda c: detect_raw(c, json.dumps({"file": b64(FACE_JPG)}).encode(),
                                                          "application/xml"))
case("multipart-without-boundary", 400, 0, contains="without a boundary")(
    lambda c: detect_raw(c, b"--x\r\n\r\n--x--\r\n", "multipart/form-data"))
case("multipart-wrong-boundary", 400, 0)(
    lambda c: detect_raw(c, b"--other\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
                         + FACE_JPG + b"\r\n--other--\r\n", "multipart/form-data; boundary=expected"))
case("multipart-truncated", 400, 0)(
    lambda c: detect_raw(c, b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
                         + FACE_JPG[:1000], "multipart/form-data; boundary=b"))
case("multipart-100-parts", 400, 0, contains="multipart parts")(
    lambda c: detect_raw(c, b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i
                                     for i in range(100)) + b"--b--\r\n", "multipart/form-data; boundary=b"))
case("multipart-file-as-text-field", 400, 34, "Required part file is missing")(
    lambda c: detect_raw(c, b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n" + b"abc\r\n--b--\r\n",
                         "multipart/form-data; boundary=b"))
case("filename-path-traversal", 400, 21, "File [../../../etc/passwd] has an unavailable extension")(
    lambda c: detect_file(c, FACE_JPG, "../../../etc/passwd"))
case("filename-100k-chars", 400, 0, contains="invalid multipart data")(lambda c: detect_file(c, FACE_JPG, "a" * 100_000 + ".exe"))

# --- base64
case("base64-invalid-chars", 400, 21, "Provided value is not Base64")(
    lambda c: c.http.post(D + "/detect", json={"file": "not base64!"}, headers={"x-api-key": c.dkey}))
case("base64-data-uri-prefix", 400, 21, "Provided value is not Base64")(
    lambda c: c.http.post(D + "/detect", json={"file": "data:image/jpeg;base64," + b64(FACE_JPG)},
                          headers={"x-api-key": c.dkey}))
case("base64-non-ascii", 400, 21, "Provided value is not Base64")(
    lambda c: c.http.post(D + "/detect", json={"file": "ÿþ" + b64(FACE_JPG)}, headers={"x-api-key": c.dkey}))
case("base64-padding-only", 400, 28, NO_FACE)(
    lambda c: c.http.post(D + "/detect", json={"file": "===="}, headers={"x-api-key": c.dkey}))
case("base64-one-char", 400, 28, NO_FACE)(
    lambda c: c.http.post(D + "/detect", json={"file": "A"}, headers={"x-api-key": c.dkey}))
case("base64-8mb-of-zeros", 400, 28, NO_FACE)(
    lambda c: c.http.post(D + "/detect", json={"file": "A" * (8 * MB)}, headers={"x-api-key": c.dkey}))
case("base64-file-is-number", 400, 0)(
    lambda c: c.http.post(D + "/detect", json={"file": 12345}, headers={"x-api-key": c.dkey}))
case("base64-file-is-list", 400, 0)(
    lambda c: c.http.post(D + "/detect", json={"file": [b64(FACE_JPG)]}, headers={"x-api-key": c.dkey}))

# --- bodies over the limits (Content-Length checked before reading; chunked counted while streaming)
case("file-over-5mb", 400, 0, SOMETHING_WRONG)(
    lambda c: detect_file(c, FACE_JPG + b"\0" * (5 * MB + 1 - len(FACE_JPG))))
case("body-over-10mb-content-length", 413, 0, "Request body is larger than 10485760 bytes")(
    lambda c: detect_raw(c, b"x" * (10 * MB + 1), "application/json"))
case("body-over-10mb-chunked", 413, 0, "Request body is larger than 10485760 bytes")(
    lambda c: detect_raw(c, (b"x" * MB for _ in range(11)), "application/json"))

# --- malformed and deeply nested JSON
case("json-malformed", 400, 0, contains="malformed JSON")(lambda c: rjson(c, "/subjects", b"{bad json"))
case("json-empty-body", 400, 0, contains="the body is empty")(lambda c: rjson(c, "/subjects", b""))
case("json-trailing-garbage", 400, 0, contains="malformed JSON")(
    lambda c: rjson(c, "/subjects", b'{"subject": "a"} trailing'))
case("json-nested-100k-arrays", 400, 0, contains="malformed JSON")(
    lambda c: rjson(c, "/subjects", b"[" * 100_000 + b"]" * 100_000))
case("json-nested-100k-objects", 400, 0, contains="malformed JSON")(
    lambda c: rjson(c, "/subjects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000))
case("json-nan-literal", 400, 0, contains="malformed JSON")(
    lambda c: rjson(c, "/embeddings/recognize", b'{"embeddings": [[NaN]]}'))
case("json-invalid-utf8", 400, 0, contains="malformed JSON")(
    lambda c: rjson(c, "/subjects", b'{"subject": "\xff\xfe"}'))
case("json-lone-surrogate", 400, 0, contains="malformed JSON")(
    lambda c: rjson(c, "/subjects", b'{"subject": "\\ud800"}'))
case("json-utf8-bom", 400, 0, contains="malformed JSON")(lambda c: rjson(c, "/subjects", b'\xef\xbb\xbf{"subject":"a"}'))
case("json-array-for-object", 400, 0)(lambda c: rjson(c, "/subjects", b'["a"]'))
case("json-subject-is-object", 400, 0)(lambda c: rjson(c, "/subjects", b'{"subject": {"$ne": null}}'))
case("json-subject-is-bool", 400, 0)(lambda c: rjson(c, "/subjects", b'{"subject": true}'))
case("json-ids-not-an-array", 400, 0)(lambda c: rjson(c, "/faces/delete", b'{"ids": []}'))

# --- missing and duplicate parameters
case("missing-subject-param", 400, 33, "Required parameter subject is missing")(
    lambda c: c.http.post(R + "/faces", files={"file": ("a.jpg", FACE_JPG)}, headers={"x-api-key": c.rkey}))
case("missing-file-part", 400, 34, "Required part file is missing")(
    lambda c: c.http.post(R + "/recognize", files={"image": ("a.jpg", FACE_JPG)}, headers={"x-api-key": c.rkey}))
case("missing-target-image", 400, 34, "Required part target_image is missing")(
    lambda c: c.http.post(V + "/verify", files={"source_image": ("a.jpg", FACE_JPG)}, headers={"x-api-key": c.vkey}))
case("missing-base64-file", 400, 5, "Field content cannot be empty")(
    lambda c: c.http.post(R + "/recognize", json={}, headers={"x-api-key": c.rkey}))
case("missing-embeddings", 400, 5, "Field embeddings cannot be empty")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embedding": []}, headers={"x-api-key": c.rkey}))
case("duplicate-limit-first-wins", 400, 26, "Limit should be equal or greater than 0; ")(
    lambda c: c.http.post(D + "/detect?limit=-1&limit=5", files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": c.dkey}))
case("duplicate-subject-first-empty", 400, 26, "Subject name is empty; ")(
    lambda c: c.http.post(R + "/faces?subject=&subject=Real", files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": c.rkey}))
case("duplicate-file-part-first-wins", 400, 28, NO_FACE)(
    lambda c: c.http.post(D + "/detect", files=[("file", ("a.jpg", BLANK_JPG)), ("file", ("b.jpg", FACE_JPG))],
                          headers={"x-api-key": c.dkey}))
case("duplicate-api-key-first-garbage", 400, 26, "Service API key should be UUID")(
    lambda c: c.http.get(R + "/subjects", headers=[("x-api-key", "garbage"), ("x-api-key", c.rkey)]))

# --- NaN / inf / out-of-range numbers
for _value in ("NaN", "Infinity", "-Infinity", "-0.1", "1.0000001", "1e309"):
    case(f"det-prob-threshold-{_value}", 400, 28, NO_FACE)(
        lambda c, v=_value: c.http.post(D + "/detect", params={"det_prob_threshold": v},
                                        files={"file": ("a.jpg", FACE_JPG)}, headers={"x-api-key": c.dkey}))
for _value in ("2147483648", "-2147483649", "NaN", "1e3", "1.5", "9" * 5000):
    case(f"limit-{_value[:12]}", 400, 26, contains="Parameter 'limit' must be an integer")(
        lambda c, v=_value: c.http.post(D + "/detect", params={"limit": v}, files={"file": ("a.jpg", FACE_JPG)},
                                        headers={"x-api-key": c.dkey}))
case("prediction-count-zero", 400, 26, "prediction_count should be equal or greater than 1; ")(
    lambda c: c.http.post(R + "/recognize", params={"prediction_count": 0}, files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": c.rkey}))
case("prediction-count-int-max", 200)(
    lambda c: c.http.post(R + "/recognize", params={"prediction_count": 2**31 - 1},
                          files={"file": ("a.jpg", FACE_JPG)}, headers={"x-api-key": c.rkey}))
case("status-not-boolean", 400, 26, contains="Parameter 'status' must be a boolean")(
    lambda c: c.http.post(D + "/detect", params={"status": "maybe"}, files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": c.dkey}))

# --- embeddings: wrong length, non-numeric, NaN (above), huge, zero
EMB_LEN = "Embeddings must have 128 values, got"
case("embedding-127-values", 400, 0, contains=f"{EMB_LEN} 127")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [[0.1] * 127]},
                          headers={"x-api-key": c.rkey}))
case("embedding-100k-values", 400, 0, contains=f"{EMB_LEN} 100000")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [[0.1] * 100_000]},
                          headers={"x-api-key": c.rkey}))
case("embedding-strings", 400, 0, contains="numbers only")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [["0.1"] * 128]},
                          headers={"x-api-key": c.rkey}))
case("embedding-nulls", 400, 0, contains="numbers only")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [[None] * 128]},
                          headers={"x-api-key": c.rkey}))
case("embedding-booleans", 400, 0, contains="numbers only")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [[True] * 128]},
                          headers={"x-api-key": c.rkey}))
case("embedding-1e308", 400, 0, "Embeddings must have a finite, non-zero length")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [[1e308] * 128]},
                          headers={"x-api-key": c.rkey}))
case("embedding-1e400-literal", 400, 0, contains="malformed JSON")(
    lambda c: rjson(c, "/embeddings/recognize", b'{"embeddings": [[' + b",".join([b"1e400"] * 128) + b"]]}"))
case("embedding-all-zero", 400, 0, "Embeddings must have a finite, non-zero length")(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [[0] * 128]},
                          headers={"x-api-key": c.rkey}))
case("embedding-nested-too-deep", 400, 0)(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": [[[0.1]] * 128]},
                          headers={"x-api-key": c.rkey}))
case("embeddings-is-string", 400, 0)(
    lambda c: c.http.post(R + "/embeddings/recognize", json={"embeddings": "0.1,0.2"}, headers={"x-api-key": c.rkey}))
case("verification-source-wrong-length", 400, 0, contains=f"{EMB_LEN} 3")(
    lambda c: c.http.post(V + "/embeddings/verify", json={"source": [1, 2, 3], "targets": [c.embedding]},
                          headers={"x-api-key": c.vkey}))
case("verify-embedding-wrong-length", 400, 0, contains=f"{EMB_LEN} 129")(
    lambda c: c.http.post(f"{R}/embeddings/faces/{c.image_id}/verify", json={"embeddings": [c.embedding + [0.0]]},
                          headers={"x-api-key": c.rkey}))

# --- subject names
NAME_PATTERN = "The name cannot contain the following special characters: ';', '/', '\\'"
case("subject-empty", 400, 26, "Subject name cannot be empty")(lambda c: rec(c, "POST", "/subjects", json={"subject": ""}))
case("subject-whitespace", 400, 26, "Subject name cannot be empty")(
    lambda c: rec(c, "POST", "/subjects", json={"subject": " \t\n"}))
case("subject-10k-chars", 400, 26, "Subject name size must be between 1 and 50")(
    lambda c: rec(c, "POST", "/subjects", json={"subject": "x" * 10_000}))
case("rename-to-10k-chars", 400, 26, "Subject name size must be between 1 and 50")(
    lambda c: rec(c, "PUT", "/subjects/Seed", json={"subject": "x" * 10_000}))
case("add-face-subject-10k-chars", 400, 0, SOMETHING_WRONG)(
    lambda c: c.http.post(R + "/faces", data={"subject": "y" * 10_000}, files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": c.rkey}))
case("subject-sql-injection-semicolon", 400, 36, NAME_PATTERN)(
    lambda c: rec(c, "POST", "/subjects", json={"subject": "x'); DROP TABLE subjects;--"}))
case("subject-path-traversal", 400, 36, NAME_PATTERN)(lambda c: rec(c, "POST", "/subjects", json={"subject": "../../etc"}))
case("subject-backslash-traversal", 400, 36, NAME_PATTERN)(
    lambda c: rec(c, "POST", "/subjects", json={"subject": "..\\..\\win"}))
case("path-subject-traversal-no-route", 404, 0)(lambda c: rec(c, "DELETE", "/subjects/../../faces"))
case("path-subject-invalid-utf8", 404, 42, contains="not found")(
    lambda c: rec(c, "DELETE", "/subjects/%FF%FE"))
case("delete-subject-10k-path", 404, 42, "Subject " + "z" * 10_000 + " not found")(
    lambda c: rec(c, "DELETE", "/subjects/" + "z" * 10_000))


def _stored_verbatim(name: str) -> Send:
    """CompreFace accepts these names (no ; / \\, 1..50 characters): stored and listed byte for byte."""

    def send(c: Ctx) -> httpx.Response:
        r = rec(c, "POST", "/subjects", json={"subject": name})
        assert r.status_code == 201, r.text
        assert r.json() == {"subject": name}
        listed = rec(c, "GET", "/subjects").json()["subjects"]
        assert name in listed and "Seed" in listed
        deleted = rec(c, "DELETE", "/subjects/" + quote(name, safe=""))
        assert deleted.json() == {"subject": name}, deleted.text
        return deleted

    return send


case("subject-sql-quote-stored-verbatim", 200)(_stored_verbatim("x' OR '1'='1"))
case("subject-sql-comment-stored-verbatim", 200)(_stored_verbatim("admin'--"))
case("subject-control-characters", 200)(_stored_verbatim("a\x00b\x07c\x1b[31m"))
case("subject-unicode", 200)(_stored_verbatim("Zoë 王小明 😀"))
case("subject-rtl-zero-width", 200)(_stored_verbatim("\u202eevil\u200b"))

# --- unknown and malformed ids and keys
_UNKNOWN = str(uuid.UUID(int=0x1234))
case("delete-unknown-image-id", 404, 44, f"Image {_UNKNOWN} not found")(
    lambda c: rec(c, "DELETE", f"/faces/{_UNKNOWN}"))
case("delete-non-uuid-image-id", 400, 26, "Parameter 'image_id' must be a UUID, got 'abc'")(
    lambda c: rec(c, "DELETE", "/faces/abc"))
case("delete-sql-image-id", 400, 26)(lambda c: rec(c, "DELETE", "/faces/1' OR '1'='1"))
case("img-unknown-id-empty-body", 200, body=b"")(lambda c: rec(c, "GET", f"/faces/{_UNKNOWN}/img"))
case("img-non-uuid-10k", 400, 26)(lambda c: rec(c, "GET", "/faces/" + "f" * 10_000 + "/img"))
case("verify-unknown-image-id", 404, 44, "Image Id is incorrect")(
    lambda c: c.http.post(f"{R}/faces/{_UNKNOWN}/verify", files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": c.rkey}))
case("verify-non-uuid-image-id", 400, 26)(
    lambda c: c.http.post(f"{R}/faces/not-a-uuid/verify", files={"file": ("a.jpg", FACE_JPG)},
                          headers={"x-api-key": c.rkey}))
case("verify-embeddings-unknown-id", 404, 44, "Image Id is incorrect")(
    lambda c: c.http.post(f"{R}/embeddings/faces/{_UNKNOWN}/verify", json={"embeddings": [c.embedding]},
                          headers={"x-api-key": c.rkey}))
case("bulk-delete-40000-unknown-ids", 200, body=b"[]")(
    lambda c: c.http.post(R + "/faces/delete", json=[str(uuid.UUID(int=i)) for i in range(1, 40_001)],
                          headers={"x-api-key": c.rkey}))
case("bulk-delete-non-uuid", 400, 0)(lambda c: rjson(c, "/faces/delete", b'["../../etc/passwd"]'))
case("static-traversal-key", 404, 0)(lambda c: c.http.get(f"/api/v1/static/..%2F..%2Fetc/images/{c.image_id}"))
case("static-non-uuid-key", 200, body=b"")(lambda c: c.http.get(f"/api/v1/static/{'k' * 36}/images/{c.image_id}"))
case("api-key-10k-chars", 400, 26, "Service API key should be UUID")(
    lambda c: c.http.get(R + "/subjects", headers={"x-api-key": "a" * 10_000}))
case("api-key-latin1-bytes", 400, 26, "Service API key should be UUID")(
    lambda c: c.http.get(R + "/subjects", headers={"x-api-key": b"\xff" * 36}))
case("api-key-sql", 400, 26, "Service API key should be UUID")(
    lambda c: c.http.get(R + "/subjects", headers={"x-api-key": "' OR 1=1 -- " + "x" * 30}))
case("ui-path-traversal", 404)(lambda c: c.http.get("/ui/..%2F..%2Fpyproject.toml"))


# ------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("send, expect", CASES)
def test_hostile_input(ctx, logwatch, send, expect: Expect):
    before = len(logwatch.records)
    started = time.monotonic()
    r = send(ctx)
    assert r.status_code < 500, f"{r.status_code} {r.text[:300]}"
    assert r.status_code == expect.status, r.text[:300]
    if expect.code is not None:
        body = r.json()
        assert list(body) == ["message", "code"], body  # CompreFace's ExceptionResponseDto
        assert body["code"] == expect.code, body
        if expect.message is not None:
            assert body["message"] == expect.message
        if expect.contains is not None:
            assert expect.contains in body["message"], body
    if expect.body is not None:
        assert r.content == expect.body, r.content[:200]
    assert time.monotonic() - started < CASE_BOUND_S
    assert logwatch.errors_since(before) == [], "the server logged errors"


def test_corpus_size():
    assert len(CASES) >= 60


def _read_head(s: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def test_body_over_limit_is_refused_without_reading_it(ctx):
    """Content-Length beyond max_body_size: 413 at once, although no byte of the body was sent."""
    host, port = ctx.base_url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"POST {R}/recognize HTTP/1.1\r\nHost: x\r\nx-api-key: {ctx.rkey}\r\n"
                   "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n").encode())
        started = time.monotonic()
        head = _read_head(s)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert time.monotonic() - started < 5
    assert b'"code":0' in head or b"content-length" in head.lower()


def test_stalled_body_gets_408_and_a_slow_steady_one_is_served(ctx):
    """A client that stops sending its body is answered 408 after body_read_timeout_s (it no longer
    holds the connection for ever); one that sends slowly but keeps sending is served."""
    host, port = ctx.base_url.rsplit("//", 1)[1].split(":")
    body = json.dumps({"file": base64.b64encode(FACE_JPG).decode()}).encode()
    head = (f"POST {R}/recognize HTTP/1.1\r\nHost: x\r\nx-api-key: {ctx.rkey}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body[:100])  # ... and nothing more
        started = time.monotonic()
        reply = _read_head(s)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"Request body was not received within 2 s" in reply
    assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 5

    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head)
        step = len(body) // 4 + 1
        for i in range(0, len(body), step):  # four parts, each well within the timeout of the last
            time.sleep(BODY_TIMEOUT_S * 0.6)
            s.sendall(body[i:i + step])
        reply = _read_head(s)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


def test_stored_examples_survived_the_corpus(ctx):
    """Nothing in the corpus changed the seeded collection beyond what it asked for."""
    faces = ctx.http.get(R + "/faces", headers={"x-api-key": ctx.rkey}).json()
    assert ctx.image_id in {f["image_id"] for f in faces["faces"]}
    assert all(f["subject"] != "y" * 10_000 for f in faces["faces"])


def test_server_is_healthy_afterwards(ctx, server, logwatch):
    assert ctx.http.get("/health").json() == {"status": "OK"}
    assert ctx.http.get("/ready").status_code == 200
    r = ctx.http.post(R + "/recognize", files={"file": ("a.jpg", FACE_JPG)}, headers={"x-api-key": ctx.rkey})
    assert r.status_code == 200, r.text
    assert r.json()["result"][0]["subjects"][0]["subject"] == "Seed"
    metrics = ctx.http.get("/metrics").text
    # every answer the server gave, by route and status; /ready said 503 while the models loaded
    served = re.findall(r'facerec_http_request_duration_seconds_count\{([^}]*)\} (\S+)', metrics)
    assert len(served) > 20
    failed = [labels for labels, n in served if 'status="5' in labels and 'route="/ready"' not in labels]
    assert failed == [], failed
    assert logwatch.errors_since(0) == []
