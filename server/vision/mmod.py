"""dlib's CNN MMOD face detector over an inference backend.

Reproduces ``dlib.cnn_face_detection_model_v1(dat)(image, upsample)`` (what face_recognition's
``face_locations(img, upsample, model="cnn")`` calls) on top of the ONNX model of
server/modelbuild/dlib_mmod.py:

1. ``upsample`` times dlib's ``pyramid_up`` with ``pyramid_down<2>`` (uint8 RGB bilinear resize to
   the size ``rect_up`` gives; note dlib's pyramid_down<2> maps p -> 2p + (2.5, 1.5));
2. ``input_rgb_image_pyramid<pyramid_down<6>>``: the image and its 5/6, 25/36, ... levels tiled
   into one image (``compute_tiled_image_pyramid_details``), each level resized from the
   previous one with dlib's bilinear ``resize_image``, padding = the input means;
3. the network -> one score per 8x8 cell;
4. ``loss_mmod_::to_label``: every score > threshold is an 80x80 window around
   ``output_point * 8 + 14``, mapped back through its pyramid level, rounded, sorted by score
   and greedily suppressed (dlib's ``test_box_overlap``);
5. ``pyramid_down<2>::rect_down`` undoes the upsampling.

The resizes replay dlib's arithmetic operation by operation (float32 SIMD lanes with their
accumulated x positions, float64 rows, truncation to uint8), so the pyramid is bit-identical to
dlib's and detections match exactly; scores differ only by the network's float rounding.

Images larger than ``max_pixels`` (before upsampling), or whose tiled pyramid would be wider or
taller than MAX_TILED_SIDE, are first downscaled (cv2 INTER_AREA) and the rectangles scaled back;
dlib would take many seconds and gigabytes on them. Only there do results differ from dlib's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from server.inference.base import Backend
from server.inference.names import MMOD as MODEL, MMOD_INPUT as _INPUT, MMOD_OUTPUT as _OUTPUT

# Constants of mmod_human_face_detector.dat (tests/integration/test_mmod.py checks them against the parsed file).
MEAN = np.array([122.782, 117.001, 104.298], dtype=np.float32)  # input_rgb_image_pyramid's avg_red/green/blue
PYRAMID_N = 6  # pyramid_down<6>
PADDING = 10
OUTER_PADDING = 11
WINDOW = (80, 80)  # detector window (width, height)
NMS_IOU = 0.3382761351109955
NMS_COVERED = 1.0
STRIDE = 8  # output point p -> input point p * STRIDE + OFFSET
OFFSET = 14
MIN_INPUT = 29  # smallest tiled-image side for which the network yields an output cell

DEFAULT_MAX_PIXELS = 2_000_000
MAX_TILED_SIDE = 8192  # = repository.MMOD_MAX_SIDE, the TensorRT profile's largest image
_MIN_LEVEL_HEIGHT = 5  # compute_tiled_image_pyramid_details stops below this


# ---------------------------------------------------------------------------------------------
# dlib's bilinear resize_image, replayed exactly
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Columns:
    simd: int  # columns [0, simd) take the float32 SIMD path, the rest the scalar path
    lo: np.ndarray
    hi: np.ndarray
    frac32: np.ndarray  # float32 lr_frac of every column (SIMD: from float lanes; scalar: float(x - left))
    frac64: np.ndarray  # float64 lr_frac of the scalar columns (the RGB tail computes in double)


def _rows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """top, bottom, tb_frac (float64) for each output row: y starts at -scale, += scale per row."""
    scale = (n_in - 1) / max(n_out - 1, 1)
    y = np.empty(n_out, np.float64)
    y[0] = -scale + scale
    if n_out > 1:
        # sequential float64 adds, as in the C loop (add.accumulate does not pair-sum)
        y[1:] = np.add.accumulate(np.concatenate(([y[0]], np.full(n_out - 1, scale))))[1:]
    top = np.floor(y).astype(np.int64)
    bottom = np.minimum(top + 1, n_in - 1)
    return top, bottom, y - top


def _columns(n_in: int, n_out: int) -> _Columns:
    scale = (n_in - 1) / max(n_out - 1, 1)
    # SIMD part: 4 float lanes start at x = -4*scale (+0, +1, +2, +3 scale) and add float(4*scale) per group
    groups = n_out // 4 + 2
    x0 = -4 * scale
    steps = np.empty((groups + 1, 4), np.float32)
    steps[0] = np.array([x0, x0 + scale, x0 + 2 * scale, x0 + 3 * scale], np.float64).astype(np.float32)
    steps[1:] = np.float32(4 * scale)
    lanes = np.add.accumulate(steps, axis=0, dtype=np.float32)[1:]  # (groups, 4): sequential float32 adds
    left = np.trunc(lanes).astype(np.int64)  # _mm_cvttps_epi32; x >= 0
    stop = np.flatnonzero(left[:, 3] + 1 >= n_in)
    n_groups = int(stop[0]) if stop.size else groups
    simd = min(4 * n_groups, n_out)  # the loop never stops early with a full group past n_out: see below
    x_simd = lanes[:n_groups].reshape(-1)[:simd]
    lo_simd = left[:n_groups].reshape(-1)[:simd]
    frac_simd = (x_simd - lo_simd.astype(np.float32)).astype(np.float32)
    # scalar tail: x = -scale + c*scale, then += scale per column (float64)
    n_tail = n_out - simd
    if 4 * n_groups > n_out:  # pragma: no cover - a group writes past the row end only if no lane is out of range
        raise AssertionError("dlib's SIMD resize would write past the row")
    xt = np.add.accumulate(np.concatenate(([-scale + simd * scale], np.full(n_tail, scale))))[1:]
    lo_tail = np.floor(xt).astype(np.int64)
    frac_tail = xt - lo_tail
    lo = np.concatenate((lo_simd, lo_tail))
    hi = np.concatenate((lo_simd + 1, np.minimum(lo_tail + 1, n_in - 1)))
    frac32 = np.concatenate((frac_simd, frac_tail.astype(np.float32)))
    return _Columns(simd=simd, lo=lo, hi=hi, frac32=frac32, frac64=frac_tail)


def _simd_columns(upper: np.ndarray, lower: np.ndarray, tb: np.ndarray, cols: _Columns) -> np.ndarray:
    """The SIMD columns: ((tlf*tl + trf*tr) + blf*bl) + brf*br in float32 (in place, to spare temporaries)."""
    s = cols.simd
    itb32 = (1 - tb).astype(np.float32)[:, None]
    tb32 = tb.astype(np.float32)[:, None]
    lr = cols.frac32[None, :s]
    ilr = np.float32(1) - lr
    lo, hi = cols.lo[:s], cols.hi[:s]
    acc = np.take(upper, lo, axis=2)
    acc *= itb32 * ilr
    tmp = np.take(upper, hi, axis=2)
    tmp *= itb32 * lr
    acc += tmp
    np.take(lower, lo, axis=2, out=tmp)
    tmp *= tb32 * ilr
    acc += tmp
    np.take(lower, hi, axis=2, out=tmp)
    tmp *= tb32 * lr
    acc += tmp
    return acc


def resize_float(src: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """dlib::resize_image(float image, out, interpolate_bilinear) for each channel of src (C,H,W) float32."""
    c_in, h, w = src.shape
    if h == 0 or w == 0 or n_rows == 0 or n_cols == 0:
        return np.zeros((c_in, n_rows, n_cols), np.float32)
    top, bottom, tb = _rows(h, n_rows)
    cols = _columns(w, n_cols)
    out = np.empty((c_in, n_rows, n_cols), np.float32)
    upper = np.take(src, top, axis=1)  # (C, n_rows, w)
    lower = np.take(src, bottom, axis=1)
    s = cols.simd
    if s:
        out[:, :, :s] = _simd_columns(upper, lower, tb, cols)
    if s < n_cols:
        lr = cols.frac32[None, s:]
        ilr = np.float32(1) - lr
        lo, hi = cols.lo[s:], cols.hi[s:]
        up = ilr * upper[:, :, lo] + lr * upper[:, :, hi]  # float32
        down = ilr * lower[:, :, lo] + lr * lower[:, :, hi]
        out[:, :, s:] = ((1 - tb)[:, None] * up + tb[:, None] * down).astype(np.float32)  # double, stored as float
    return out


def resize_rgb(src: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """dlib::resize_image(rgb_pixel image, out, interpolate_bilinear) on an HxWx3 uint8 array."""
    h, w = src.shape[:2]
    if h == 0 or w == 0 or n_rows == 0 or n_cols == 0:
        return np.zeros((n_rows, n_cols, 3), np.uint8)
    top, bottom, tb = _rows(h, n_rows)
    cols = _columns(w, n_cols)
    planes = src.transpose(2, 0, 1).astype(np.float32)
    upper = np.take(planes, top, axis=1)
    lower = np.take(planes, bottom, axis=1)
    out = np.empty((n_rows, n_cols, 3), np.uint8)
    s = cols.simd
    if s:
        # _mm_cvttps_epi32 then unsigned char: values are in [0, 255], so truncation is a plain cast
        out[:, :s] = _simd_columns(upper, lower, tb, cols).astype(np.uint8).transpose(1, 2, 0)
    if s < n_cols:  # the scalar tail computes in double, then static_cast<unsigned char>
        lr = cols.frac64[None, :]
        lo, hi = cols.lo[s:], cols.hi[s:]
        up64, low64 = upper.astype(np.float64), lower.astype(np.float64)
        up = (1 - lr) * up64[:, :, lo] + lr * up64[:, :, hi]
        down = (1 - lr) * low64[:, :, lo] + lr * low64[:, :, hi]
        v = (1 - tb)[:, None] * up + tb[:, None] * down
        out[:, s:] = v.astype(np.uint8).transpose(1, 2, 0)
    return out


# ---------------------------------------------------------------------------------------------
# pyramid_down<2> (the upsampling) and the tiled pyramid of pyramid_down<6>
# ---------------------------------------------------------------------------------------------
_UP_SHIFT = (1.25, 0.75)  # dlib's pyramid_down<2>: point_up(p) = (p + (1.25, 0.75)) * 2


def _lround(x: np.ndarray | float) -> np.ndarray:
    """std::lround: halves away from zero."""
    x = np.asarray(x, np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def pyramid_up_size(h: int, w: int) -> tuple[int, int]:
    """(rows, cols) of dlib's pyramid_up: rect_up of the image rect, bottom + 1 and right + 1."""
    if h == 0 or w == 0:
        return 0, 0
    return int(_lround((h - 1 + _UP_SHIFT[1]) * 2)) + 1, int(_lround((w - 1 + _UP_SHIFT[0]) * 2)) + 1


def pyramid_up(image: np.ndarray) -> np.ndarray:
    """dlib::pyramid_up(img, pyramid_down<2>) on an HxWx3 uint8 image."""
    rows, cols = pyramid_up_size(*image.shape[:2])
    if rows == 0:
        return np.zeros((0, 0, 3), np.uint8)
    return resize_rgb(image, rows, cols)


def rect_down(rects: np.ndarray, levels: int) -> np.ndarray:
    """pyramid_down<2>::rect_down(rect, levels) on (n,4) int64 l,t,r,b, then lround like dlib's rectangle."""
    v = rects.astype(np.float64)
    shift = np.array([_UP_SHIFT[0], _UP_SHIFT[1], _UP_SHIFT[0], _UP_SHIFT[1]])
    for _ in range(levels):
        v = v / 2.0 - shift
    return _lround(v)


def tiled_pyramid_layout(nr: int, nc: int) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """dlib's impl::compute_tiled_image_pyramid_details: level rects (l, t, r, b) and the tiled image size."""
    if nr * nc == 0:
        return [], 0, 0
    sizes = [(nc, nr)]  # (width, height)
    rate = (PYRAMID_N - 1.0) / PYRAMID_N
    while True:
        nr, nc = math.floor(rate * nr), math.floor(rate * nc)
        if nr * nc == 0 or nr < _MIN_LEVEL_HEIGHT:
            break
        sizes.append((nc, nr))
    total_height = sum(h + PADDING for _, h in sizes) - PADDING * 2
    height = 0
    prev_width = 0
    w0, h0 = sizes[0]
    for w, h in sizes:
        if w <= w0 - prev_width - PADDING and (height - h0) * 2 >= total_height - h0:
            break
        height += h + PADDING
        prev_width = w
    height -= PADDING
    out_nr, out_nc = height + OUTER_PADDING * 2, w0 + OUTER_PADDING * 2

    rects: list[tuple[int, int, int, int]] = []
    y = OUTER_PADDING
    i = 0
    while y < height + OUTER_PADDING and i < len(sizes):
        w, h = sizes[i]
        rects.append((OUTER_PADDING, y, OUTER_PADDING + w - 1, y + h - 1))
        y += h + PADDING
        i += 1
    y -= PADDING
    l0, t0, r0, b0 = rects[0]
    while i < len(sizes):
        w, h = sizes[i]
        # p1 = (outer + width - 1, y - 1); rect(p1, p1 - (w-1, h-1)) normalised to l<=r, t<=b
        x1, y1 = OUTER_PADDING + w0 - 1, y - 1
        rect = (x1 - (w - 1), y1 - (h - 1), x1, y1)
        if not (rect[0] > r0 or rect[2] < l0 or rect[1] > b0 or rect[3] < t0):
            break  # would overlap the full-size image
        rects.append(rect)
        y -= h + PADDING
        i += 1
    return rects, out_nr, out_nc


def tiled_pyramid(image: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The input layer's tensor as raw RGB (3, NR, NC) float32: background = MEAN (0 after normalisation)."""
    h, w = image.shape[:2]
    rects, nr, nc = tiled_pyramid_layout(h, w)
    tiled = np.empty((3, nr, nc), np.float32)
    tiled[:] = MEAN[:, None, None]
    if not rects:
        return tiled, rects
    l, t, r, b = rects[0]
    level = image.transpose(2, 0, 1).astype(np.float32)
    tiled[:, t : b + 1, l : r + 1] = level
    for l, t, r, b in rects[1:]:
        level = resize_float(level, b - t + 1, r - l + 1)
        tiled[:, t : b + 1, l : r + 1] = level
    return tiled, rects


# ---------------------------------------------------------------------------------------------
# loss_mmod_::to_label
# ---------------------------------------------------------------------------------------------
def _level_of(points: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """dlib's nearest_rect: the first level containing the point, else the nearest (first on ties)."""
    l, t, r, b = (rects[:, i][None, :] for i in range(4))
    x, y = points[:, 0:1], points[:, 1:2]
    inside = (x >= l) & (x <= r) & (y >= t) & (y <= b)
    dx = np.where(x < l, l - x, np.where(x > r, x - r, 0)).astype(np.float64)
    dy = np.where(y < t, t - y, np.where(y > b, y - b, 0)).astype(np.float64)
    dist = np.sqrt(dx * dx + dy * dy)
    return np.where(inside.any(axis=1), inside.argmax(axis=1), dist.argmin(axis=1))


def windows_to_image(points: np.ndarray, rects: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Tensor-space window centres (n,2) -> image-space rects (n,4) int64, as tiled_pyramid_to_image + lround."""
    if points.shape[0] == 0:
        return np.zeros((0, 4), np.int64)
    level_rects = np.asarray(rects, np.int64)
    level = _level_of(points, level_rects)
    half_w, half_h = (WINDOW[0] - 1) / 2, (WINDOW[1] - 1) / 2  # centered_drect: width-- then +-width/2
    p = points.astype(np.float64)
    box = np.stack([p[:, 0] - half_w, p[:, 1] - half_h, p[:, 0] + half_w, p[:, 1] + half_h], axis=1)
    origin = level_rects[level][:, [0, 1, 0, 1]].astype(np.float64)
    box = box - origin
    ratio = PYRAMID_N / (PYRAMID_N - 1.0)
    for k in range(1, int(level.max()) + 1):  # point_up once per level: p * ratio + 0.3
        m = level >= k
        box[m] = box[m] * ratio + 0.3
    return _lround(box)


def _area(r: np.ndarray) -> np.ndarray:
    """dlib rectangle::area with inclusive corners (0 when empty)."""
    w = r[..., 2] - r[..., 0] + 1
    h = r[..., 3] - r[..., 1] + 1
    return np.where((w > 0) & (h > 0), w * h, 0).astype(np.float64)


def nms(rects: np.ndarray, iou: float = NMS_IOU, covered: float = NMS_COVERED) -> np.ndarray:
    """Indices kept by dlib's greedy loop (rects already sorted by score): test_box_overlap against each kept box."""
    kept: list[int] = []
    for i in range(rects.shape[0]):
        if kept:
            a = rects[kept]
            b = rects[i]
            inter = np.stack([np.maximum(a[:, 0], b[0]), np.maximum(a[:, 1], b[1]),
                              np.minimum(a[:, 2], b[2]), np.minimum(a[:, 3], b[3])], axis=1)
            inner = _area(inter)
            union_box = np.stack([np.minimum(a[:, 0], b[0]), np.minimum(a[:, 1], b[1]),
                                  np.maximum(a[:, 2], b[2]), np.maximum(a[:, 3], b[3])], axis=1)
            outer = _area(union_box)  # the bounding box of both, not the union area
            with np.errstate(divide="ignore", invalid="ignore"):
                hit = (inner > 0) & ((inner / outer > iou) | (inner / _area(a) > covered) | (inner / _area(b) > covered))
            if hit.any():
                continue
        kept.append(i)
    return np.asarray(kept, np.int64)


# ---------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------
class MmodDetector:
    """dlib's cnn_face_detection_model_v1 as ONNX + numpy; detect() returns dlib's mmod_rect.rect and confidence."""

    def __init__(self, backend: Backend, upsample: int = 1, threshold: float = 0.0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not 0 <= upsample <= 4:
            raise ValueError(f"upsample must be 0..4, got {upsample}")
        if max_pixels < 1:
            raise ValueError("max_pixels must be positive")
        self.backend = backend
        self.upsample = int(upsample)
        self.threshold = float(threshold)
        self.max_pixels = int(max_pixels)

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rects int64 (n,4) left, top, right, bottom in image pixels; scores float32 (n,)), best first.

        image: HxWx3 uint8 RGB (HxW grayscale is replicated, like dlib's gray -> rgb assign_image).
        """
        empty = (np.zeros((0, 4), np.int64), np.zeros((0,), np.float32))
        image = _as_rgb(image)
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            return empty
        small_h, small_w = self.detection_size(h, w)
        if (small_h, small_w) != (h, w):
            image = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
        for _ in range(self.upsample):
            image = pyramid_up(image)
        tiled, rects = tiled_pyramid(image)
        if not rects or min(tiled.shape[1:]) < MIN_INPUT:
            return empty
        score = self.backend.run(MODEL, {_INPUT: tiled[None]})[_OUTPUT][0, 0]
        rows, cols = np.nonzero(score > self.threshold)
        if rows.size == 0:
            return empty
        conf = score[rows, cols]
        points = np.stack([cols * STRIDE + OFFSET, rows * STRIDE + OFFSET], axis=1)
        boxes = windows_to_image(points, rects)
        order = np.argsort(-conf.astype(np.float64), kind="stable")  # ties keep dlib's scan order
        boxes, conf = boxes[order], conf[order]
        keep = nms(boxes)
        boxes, conf = boxes[keep], conf[keep]
        boxes = rect_down(boxes, self.upsample)
        if (small_h, small_w) != (h, w):  # downscaled for max_pixels: back to original pixels
            sx, sy = w / small_w, h / small_h
            boxes = np.rint(boxes * np.array([sx, sy, sx, sy])).astype(np.int64)
        return boxes, conf.astype(np.float32)

    def detection_size(self, h: int, w: int) -> tuple[int, int]:
        """The size the image is detected at: at most max_pixels, tiled pyramid within MAX_TILED_SIDE."""
        scale = min(1.0, math.sqrt(self.max_pixels / (h * w)))
        while True:
            sh, sw = max(1, int(h * scale)), max(1, int(w * scale))
            uh, uw = sh, sw
            for _ in range(self.upsample):
                uh, uw = pyramid_up_size(uh, uw)
            _, nr, nc = tiled_pyramid_layout(uh, uw)
            if max(nr, nc) <= MAX_TILED_SIDE:
                return sh, sw
            scale *= 0.98 * MAX_TILED_SIDE / max(nr, nc)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return np.ascontiguousarray(image[:, :, :3])
