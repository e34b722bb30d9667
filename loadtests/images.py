"""Test images for the load tests, made from scikit-image's astronaut (Eileen Collins, public domain).

Nothing is downloaded: skimage ships the picture. Variants (mirrored, brighter, rescaled,
two faces side by side) give the server different pixels and sizes, as real traffic would.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class TestImage:
    name: str  # file name sent in multipart (the extension matters to the API)
    data: bytes
    faces: int  # faces a detector should find


def encode(pixels: np.ndarray, fmt: str = "JPEG", **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save_args)
    return buf.getvalue()


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _brighter(pixels: np.ndarray, delta: int) -> np.ndarray:
    return np.clip(pixels.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def _resized(pixels: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR))


@lru_cache(maxsize=1)
def face_images() -> tuple[TestImage, ...]:
    """One-face images of a few sizes and encodings (the examples and recognize probes)."""
    a = astronaut()
    return (
        TestImage("astronaut.jpg", encode(a, quality=90), 1),
        TestImage("mirrored.jpg", encode(a[:, ::-1].copy(), quality=85), 1),
        TestImage("brighter.png", encode(_brighter(a, 25), "PNG"), 1),
        TestImage("small.jpg", encode(_resized(a, 320), quality=90), 1),
        TestImage("large.jpg", encode(_resized(a, 1024), quality=90), 1),
    )


@lru_cache(maxsize=1)
def two_faces_image() -> TestImage:
    a = astronaut()
    return TestImage("two.jpg", encode(np.concatenate([a, a[:, ::-1]], axis=1), quality=90), 2)


# ------------------------------------------------------------------------------- multipart
BOUNDARY = "----facerec-load-boundary-7f3a9c"


def multipart(files: dict[str, tuple[str, bytes]], fields: dict[str, str] | None = None,
              boundary: str = BOUNDARY) -> tuple[bytes, str]:
    """A multipart/form-data body built once and reused (as CompreFace's k6 FormData does).

    Returns (body, content type). `fields` become text parts, as the k6 tests send limit and
    prediction_count.
    """
    out = bytearray()
    for name, value in (fields or {}).items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    for part, (filename, data) in files.items():
        ctype = "image/png" if filename.endswith(".png") else "image/jpeg"
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
