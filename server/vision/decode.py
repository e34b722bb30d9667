"""Image bytes -> validated RGB uint8 array (EXIF orientation applied).

Every failure raises an `ImageError` subclass, which the API renders as CompreFace's
error 28; nothing here may crash or hang on hostile bytes.
"""
from __future__ import annotations

import io
import struct
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats CompreFace accepts (by file extension, checked by the API).
ALLOWED_EXTENSIONS = frozenset({"tif", "tiff", "jpg", "jpeg", "png", "bmp", "ico", "gif", "webp"})
# Formats Pillow may open for us: anything else (PSD, EPS, ...) is refused before decoding.
# PPM/PGM is not accepted by the API's extension rule but is decoded for evaluation data.
Image.init()
_PIL_FORMATS = [f for f in ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "ICO", "MPO", "PPM")
                if f in Image.OPEN]

MAX_PIXELS = 100_000_000  # decompression-bomb guard
MAX_ASPECT_RATIO = 50  # 1 x 10000 strips are not photos of faces

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own guard would warn at MAX_PIXELS and fail at twice that; we check ourselves first.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """The bytes are not an image we can use."""


class EmptyImage(ImageError):
    pass


class UnsupportedImage(ImageError):
    pass


class CorruptImage(ImageError):
    pass


class ImageTooLarge(ImageError):
    pass


def image_pixels(data: bytes) -> int:
    """Width x height from the image header alone (no decoding); 0 when it cannot be read (the
    decoder then reports why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
                w, h = img.size
        return max(0, int(w)) * max(0, int(h))
    except Exception:  # noqa: BLE001 - any failure here is decode_image's to report
        return 0


class PixelBudget:
    """Bounds the pixels of images held decoded at once, across all requests.

    A decoded image costs ~3 bytes per pixel plus the pipeline's working copies, and the per-image
    limit (MAX_PIXELS) alone lets N concurrent requests hold N x 100 MP: a flood of small files that
    decode to huge images (a 8 KB PNG can be 8000x8000) would otherwise run the server out of memory.
    Requests wait (respecting their deadline and cancellation, see server.inference.scope.RequestScope)
    until their image fits; an image larger than the whole budget runs alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if self.limit <= 0 or pixels <= 0:
            yield
            return
        from server.inference.scope import Cancelled, DeadlineExceeded, current_scope

        need = min(pixels, self.limit)
        scope = current_scope()
        with self._cond:
            while self.held + need > self.limit:
                if scope is not None and scope.cancelled:
                    raise Cancelled("image decoding")
                remaining = scope.remaining_s() if scope is not None else None
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("image decoding")
                self._cond.wait(0.1 if remaining is None else min(0.1, remaining))
            self.held += need
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._cond:
                self.held -= need
                self._cond.notify_all()
            if pixels >= _TRIM_ABOVE_PIXELS:
                _release_free_memory()


_TRIM_ABOVE_PIXELS = 10_000_000


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS. Pillow decodes into 16 MB blocks that glibc serves from
    per-thread arenas and keeps after they are freed, so without this every worker thread that once
    decoded a huge image would hold on to its size for good (measured: peak RSS stays high)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def extension_allowed(filename: str | None) -> bool:
    """CompreFace's rule: the file name must end in an allowed extension."""
    if not filename or "." not in filename:
        return False
    return filename.rsplit(".", 1)[1].lower() in ALLOWED_EXTENSIONS


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array (first frame, EXIF orientation applied)."""
    if not data:
        raise EmptyImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
            _check_size(img.size)
            fast = _decode_jpeg_fast(img, data)
            if fast is not None:
                return fast
            img.seek(0)  # animated / multi-page: the first frame
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage("the data is not a supported image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error, MemoryError) as exc:
        raise CorruptImage(f"the image cannot be decoded: {exc}") from exc
    _check_size(img.size)
    return to_rgb_array(img)


def _decode_jpeg_fast(img: Image.Image, data: bytes) -> np.ndarray | None:
    """A complete colour JPEG through OpenCV's decoder: faster than Pillow's path here
    (docs/benchmarks.md, JPEG decoding), and pixel-identical to it (the same libjpeg-turbo
    settings; checked on every JPEG of the dev set, EXIF orientation included, which IMREAD_COLOR
    applies). Anything else (grayscale, CMYK, a file without its end marker, which Pillow reports
    as truncated) goes the Pillow way: None."""
    if img.format != "JPEG" or img.mode != "RGB" or not data.endswith(b"\xff\xd9"):
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode (palette, RGBA, grayscale, 16/32-bit, CMYK) -> HxWx3 uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            # 16-bit samples: keep the top 8 bits; 32-bit integer images are treated as 16-bit data
            arr = np.clip(arr.astype(np.int64) >> 8 if arr.max(initial=0) > 255 else arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if img.mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _check_size(size: tuple[int, int]) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise EmptyImage(f"the image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageTooLarge(f"the image has {w}x{h} pixels, more than {MAX_PIXELS}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h) and max(w, h) > 64:
        raise UnsupportedImage(f"the image's aspect ratio {w}x{h} is not plausible for a photo")

