"""server.vision.decode: every supported format decodes; hostile bytes raise ImageError, never crash."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from server.vision.decode import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    decode_image,
    extension_allowed,
)

ASTRONAUT = None


def astronaut() -> np.ndarray:
    global ASTRONAUT
    if ASTRONAUT is None:
        from skimage.data import astronaut as load

        ASTRONAUT = load()
    return ASTRONAUT


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "ICO"])
def test_every_supported_format_decodes(fmt):
    img = astronaut()
    out = decode_image(encode(img, fmt))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        assert np.array_equal(out, img)
    elif fmt != "ICO":  # ICO keeps at most 256 px
        assert out.shape == img.shape
        assert np.abs(out.astype(int) - img).mean() < 12


def test_rgba_grayscale_palette_and_16bit_become_rgb():
    img = astronaut()
    rgba = np.dstack([img, np.full(img.shape[:2], 128, np.uint8)])
    assert np.array_equal(decode_image(encode(rgba, "PNG")), img)
    gray = img[:, :, 1]
    out = decode_image(encode(gray, "PNG"))
    assert np.array_equal(out, np.repeat(gray[:, :, None], 3, 2))
    g16 = gray.astype(np.uint16) * 257
    assert np.array_equal(decode_image(encode(g16, "PNG")), np.repeat(gray[:, :, None], 3, 2))
    pal = Image.fromarray(img).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == img.shape


def test_exif_orientation_is_applied():
    img = astronaut()[:, :300]  # not square, so rotation is visible in the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data)
    assert out.shape == (300, 512, 3)
    expected = np.rot90(img, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 6


def test_animated_gif_gives_first_frame():
    img = astronaut()
    frames = [Image.fromarray(img), Image.fromarray(255 - img)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert np.abs(out.astype(int) - img).mean() < 20


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageTooLarge):
        decode_image(_png_header_only(30000, 30000))


@pytest.mark.parametrize("width,height", [(20000, 10), (10, 20000)])
def test_absurd_aspect_ratio_is_refused(width, height):
    with pytest.raises(ImageError):
        decode_image(encode(np.zeros((height, width, 3), np.uint8), "PNG"))


def test_tiny_images_decode():
    assert decode_image(encode(np.zeros((1, 1, 3), np.uint8), "PNG")).shape == (1, 1, 3)


def _corrupt_cases():
    jpeg = encode(astronaut(), "JPEG")
    png = encode(astronaut(), "PNG")
    yield "empty", b""
    yield "text", b"hello, this is not an image"
    yield "zeros", b"\0" * 1000
    yield "jpeg_header_only", jpeg[:20]
    yield "jpeg_truncated_half", jpeg[: len(jpeg) // 2]
    yield "png_truncated", png[: len(png) // 3]
    yield "png_bad_crc", png[:40] + bytes([png[40] ^ 0xFF]) + png[41:]
    yield "png_zero_size", _png_header_only(0, 0)
    yield "pdf", b"%PDF-1.4\n%...."
    yield "svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>"


@pytest.mark.parametrize("name,data", list(_corrupt_cases()), ids=[n for n, _ in _corrupt_cases()])
def test_bad_bytes_raise_image_error(name, data):
    with pytest.raises(ImageError):
        decode_image(data)


def test_compreface_broken_files(facedata):
    folder = facedata / "CompreFace/embedding-calculator/src/services/imgtools/test/files"
    for name in ("corrupted.png", "empty.png"):
        with pytest.raises(ImageError):
            decode_image((folder / name).read_bytes())


def test_every_dev_photo_decodes(facedata):
    broken = {"corrupted.png", "empty.png"}  # CompreFace's own broken test files, checked above
    count = 0
    for path in sorted(facedata.rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".gif", ".webp") and path.name not in broken:
            out = decode_image(path.read_bytes())
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, path
            count += 1
    assert count > 500


def test_same_photo_in_several_formats_decodes_alike():
    img = astronaut()
    ref = decode_image(encode(img, "PNG")).astype(int)
    for fmt in ("BMP", "TIFF", "WEBP", "JPEG", "GIF"):
        assert np.abs(decode_image(encode(img, fmt)).astype(int) - ref).mean() < 12, fmt


@pytest.mark.parametrize("name,ok", [("a.jpg", True), ("A.JPEG", True), ("x.tif", True), ("x.webp", True),
                                     ("x.ico", True), ("x.svg", False), ("noext", False), ("", False),
                                     (None, False), ("x.jpg.exe", False)])
def test_extension_rule(name, ok):
    assert extension_allowed(name) is ok


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_fast_path_equals_pillow(orientation):
    """Colour JPEGs are decoded by OpenCV (faster); the pixels must be Pillow's, EXIF rotation included."""
    from PIL import ImageOps
    from skimage.data import astronaut

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(astronaut()[:200, :300]).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = decode_image(data)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    with pytest.raises(CorruptImage):  # cut short: still refused, as Pillow refuses it
        decode_image(data[: len(data) * 2 // 3])
