"""dlib-exact face alignment in numpy: the 5-point shape predictor and get_face_chip.

Ported from dlib 20.0.1 (shape_predictor.h, interpolation.h, image_pyramid.h,
point_transforms.h); see ../shared/docs/models.md section 4. The compiled loops (the predictor's
cascade, the chip's bilinear warp) are in server/vision/_kernels.py, dlib's small linear algebra
(SVD, pseudo-inverse, similarity transform) in server/vision/dlib_linalg.py. Rectangles use
dlib's inclusive convention (left, top, right, bottom); points are (x, y) image pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from server.modelbuild.dlib_shape import load_shape_predictor_npz
from server.vision.dlib_linalg import matmul, pinv, similarity_transform

CHIP_SIZE = 150
CHIP_PADDING = 0.25

# dlib's get_face_chip_details() template for the 5-point model, in a unit square.
_TEMPLATE5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)

Rect = tuple[int, int, int, int]


# ----------------------------------------------------------------------------------------
# shape predictor


class ShapePredictor:
    """dlib's cascade of regression trees (the compiled loop: server/vision/_kernels.py)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.initial_shape = np.asarray(arrays["initial_shape"], np.float32)  # (parts, 2)
        split_idx1 = np.asarray(arrays["split_idx1"], np.intp)  # (L, T, S)
        split_idx2 = np.asarray(arrays["split_idx2"], np.intp)
        self.thresh = np.asarray(arrays["thresh"], np.float32)  # (L, T, S)
        leaves = np.asarray(arrays["leaves"], np.float32)  # (L, T, S+1, 2*parts)
        self.anchor_idx = np.asarray(arrays["anchor_idx"], np.intp)  # (L, P)
        deltas = np.asarray(arrays["deltas"], np.float32)  # (L, P, 2)
        self.n_levels, self.n_trees, self.n_splits = split_idx1.shape
        self.n_leaves = leaves.shape[2]
        self.depth = int(round(math.log2(self.n_leaves)))
        if 2**self.depth != self.n_leaves or self.n_leaves != self.n_splits + 1:
            raise ValueError("shape predictor trees must be full binary trees")
        self.n_parts = self.initial_shape.shape[0]
        self.n_pixels = self.anchor_idx.shape[1]
        self.split_idx1, self.split_idx2 = split_idx1, split_idx2
        self.delta_x = np.ascontiguousarray(deltas[..., 0])
        self.delta_y = np.ascontiguousarray(deltas[..., 1])
        self.leaves = np.ascontiguousarray(leaves)
        self._initial_flat = np.ascontiguousarray(self.initial_shape.reshape(-1))
        # the similarity initial -> current always starts from the same centred shape
        init = self.initial_shape.astype(np.float64)
        self._init_centred = init - init.mean(axis=0)
        self._init_sigma = float(np.sum(self._init_centred**2))

    @classmethod
    def load(cls, npz_path: str | Path) -> "ShapePredictor":
        return cls(load_shape_predictor_npz(npz_path))

    def predict(self, image: np.ndarray, rect: Sequence[int]) -> np.ndarray:
        """(5,2) float64 landmarks for one face; values are dlib's rounded integer pixels."""
        return self.predict_many(image, [rect])[0]

    def predict_many(self, image: np.ndarray, rects: Sequence[Sequence[int]]) -> np.ndarray:
        """(n,5,2) float64 landmarks for n rects (left, top, right, bottom) in one image.

        image: HxWx3 uint8 RGB (or HxW uint8 gray, which dlib reads as its intensity).
        Values are dlib's integer part positions (floor(x + 0.5)) as float64.
        """
        from server.vision._kernels import predict_shapes

        rect_arr = np.ascontiguousarray(np.asarray(rects, dtype=np.float64).reshape(-1, 4))
        if rect_arr.shape[0] == 0:
            return np.zeros((0, self.n_parts, 2), np.float64)
        img = np.ascontiguousarray(image if image.ndim == 3 else image[:, :, None])  # one compiled signature
        return predict_shapes(img, rect_arr, self._initial_flat, self._init_centred, self._init_sigma,
                              self.anchor_idx, self.delta_x, self.delta_y, self.split_idx1, self.split_idx2,
                              self.thresh, self.leaves, self.depth)


# ----------------------------------------------------------------------------------------
# MTCNN box -> dlib HOG rect


def mtcnn_box_to_rect(box: Sequence[float]) -> Rect:
    """The rect dlib's HOG detector would give for an MTCNN box (x1, y1, x2, y2[, ...]).

    ../shared/docs/models.md section 4: centre x unchanged, centre y moved down by 0.068*h, width x1.023,
    height x0.763 (w = x2 - x1, h = y2 - y1); corners rounded half up like dlib's points.
    """
    x1, y1, x2, y2 = (float(v) for v in list(box)[:4])
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2.0
    cy = (y1 + y2) / 2.0 + 0.068 * h
    half_w = 1.023 * w / 2.0
    half_h = 0.763 * h / 2.0
    return (
        int(math.floor(cx - half_w + 0.5)),
        int(math.floor(cy - half_h + 0.5)),
        int(math.floor(cx + half_w + 0.5)),
        int(math.floor(cy + half_h + 0.5)),
    )


# Where MTCNN's five points (left eye, right eye, nose, mouth left, mouth right) fall in dlib's
# 150-px chip (padding 0.25): least-squares fit on the reference faces (../shared/docs/models.md,
# section 4). Used to give faces found without MTCNN (the MMOD fallback) MTCNN-style landmarks.
MTCNN_POINTS_IN_CHIP = np.array(
    [[45.27, 41.57], [102.78, 41.23], [73.63, 75.08], [48.34, 102.2], [101.29, 102.0]], dtype=np.float64
)


def mtcnn_points(shape5: np.ndarray) -> np.ndarray:
    """(5,2) float32 MTCNN-style landmarks in image pixels for a dlib 5-point shape: the fitted
    template above mapped through the chip transform dlib's get_face_chip uses for that shape."""
    m, b = _chip_transform(shape5, CHIP_SIZE, CHIP_PADDING)
    return (MTCNN_POINTS_IN_CHIP @ np.asarray(m).T + np.asarray(b)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# face chip (dlib get_face_chip / extract_image_chip)


class _DRect:
    """dlib drectangle: inclusive edges, width = right - left + 1."""

    __slots__ = ("l", "t", "r", "b")

    def __init__(self, l: float, t: float, r: float, b: float) -> None:
        self.l, self.t, self.r, self.b = l, t, r, b

    def is_empty(self) -> bool:
        return self.t > self.b or self.l > self.r

    def area(self) -> float:
        if self.is_empty():
            return 0.0
        return (self.r - self.l + 1) * (self.b - self.t + 1)

    def center(self) -> tuple[float, float]:
        return (self.l + self.r) / 2.0, (self.t + self.b) / 2.0

    def pyr_down(self) -> "_DRect":
        # pyramid_down<2>::rect_down: point_down(p) = p/2 - (1.25, 0.75) on both corners
        return _DRect(self.l / 2.0 - 1.25, self.t / 2.0 - 0.75, self.r / 2.0 - 1.25, self.b / 2.0 - 0.75)

    def translated(self, dx: float, dy: float) -> "_DRect":
        return _DRect(self.l + dx, self.t + dy, self.r + dx, self.b + dy)


def _rotate(center: tuple[float, float], p: tuple[float, float], cos_a: float, sin_a: float) -> tuple[float, float]:
    """dlib rotate_point(center, p, angle) with point_rotator's arithmetic."""
    dx, dy = p[0] - center[0], p[1] - center[1]
    return cos_a * dx - sin_a * dy + center[0], sin_a * dx + cos_a * dy + center[1]


def _lround(v: float) -> int:
    """std::lround: half away from zero."""
    return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))


def _chip_transform(shape5: np.ndarray, size: int, padding: float) -> tuple[list[list[float]], list[float]]:
    """get_face_chip_details' similarity transform (m, b): chip pixels -> image pixels for the shape."""
    k = 1.0 / (2 * padding + 1)  # dlib: (padding + p) / (2*padding + 1) on a matrix multiplies by 1/x
    template = [((padding + x) * k * size, (padding + y) * k * size) for x, y in _TEMPLATE5.tolist()]
    points = [(float(x), float(y)) for x, y in np.asarray(shape5, np.float64).reshape(-1, 2)]
    return similarity_transform(template, points)


def _chip_details(shape5: np.ndarray, size: int, padding: float) -> tuple[_DRect, float]:
    """get_face_chip_details + chip_details(chip_points, img_points): (rect, angle)."""
    m, b = _chip_transform(shape5, size, padding)
    px, py = m[0][0], m[1][0]  # tform.get_m() * (1, 0)
    angle = math.atan2(py, px)
    scale = math.sqrt(px * px + py * py)  # dlib length(), not hypot (last-bit differences)
    half = size / 2.0
    cx = m[0][0] * half + m[0][1] * half + b[0]
    cy = m[1][0] * half + m[1][1] * half + b[1]
    # centered_drect(p, width, height) shrinks width and height by one (inclusive edges)
    extent = size * scale - 1
    return _DRect(cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2), angle


_PYR_KERNEL = np.array([1, 4, 6, 4, 1], np.float32)


def pyramid_down2(image: np.ndarray) -> np.ndarray:
    """dlib pyramid_down<2> on a uint8 image: 5-tap [1 4 6 4 1] filter, drop every other row/column.

    Output pixel (r, c) is centred on input row 2r+2 and column 2c+2; the value is the
    integer 2-D sum divided by 256 and truncated, as dlib does.  cv2 filters in float32,
    which is exact here (sums stay below 2**16), and is several times faster than numpy.
    """
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0) + image.shape[2:], image.dtype)
    out_w = (w - 3) // 2
    out_h = (h - 3) // 2
    full = cv2.sepFilter2D(np.ascontiguousarray(image), cv2.CV_32F, _PYR_KERNEL, _PYR_KERNEL,
                           anchor=(-1, -1), delta=0, borderType=cv2.BORDER_CONSTANT)
    picked = full[2 : 2 + 2 * out_h : 2, 2 : 2 + 2 * out_w : 2]  # only interior taps: no border effects
    if picked.ndim == 2 and image.ndim == 3:
        picked = picked[..., None]
    return (picked.astype(np.int32) >> 8).astype(image.dtype)


_PINV_CACHE: dict[tuple[int, int], list[list[float]]] = {}


def _affine_from_corners(rows: int, cols: int, tl, tr, bl) -> tuple[np.ndarray, np.ndarray]:
    """dlib find_affine_transform for chip (0,0)->tl, (cols-1,0)->tr, (0,rows-1)->bl: Q * pinv(P)."""
    key = (rows, cols)
    if key not in _PINV_CACHE:  # P depends only on the chip size
        _PINV_CACHE[key] = pinv([[0.0, cols - 1.0, 0.0], [0.0, 0.0, rows - 1.0], [1.0, 1.0, 1.0]])
    q = [[tl[0], tr[0], bl[0]], [tl[1], tr[1], bl[1]]]
    m = matmul(q, _PINV_CACHE[key])
    return np.array([[m[0][0], m[0][1]], [m[1][0], m[1][1]]]), np.array([m[0][2], m[1][2]])


def _sample_bilinear(src: np.ndarray, m: np.ndarray, b: np.ndarray, rows: int, cols: int,
                     origin: tuple[int, int] = (0, 0), size: tuple[int, int] | None = None) -> np.ndarray:
    """dlib transform_image with interpolate_bilinear: truncated values, 0 unless the 2x2 cell is inside.

    Coordinates are relative to the window of `src` at origin (top, left) of shape `size`
    (default: all of src), so a crop of a C-contiguous image is never copied (other layouts are,
    once, so that the compiled loop has one signature).
    """
    from server.vision._kernels import sample_bilinear

    h, w = size if size is not None else src.shape[:2]
    src = np.ascontiguousarray(src if src.ndim == 3 else src[:, :, None])  # one compiled signature
    if h < 2 or w < 2:  # no 2x2 cell at all (e.g. a pyramid level of a sliver of image)
        return np.zeros((rows, cols, src.shape[2]), np.uint8)
    top0, left0 = origin
    return sample_bilinear(src, float(m[0, 0]), float(m[0, 1]), float(m[1, 0]), float(m[1, 1]), float(b[0]),
                           float(b[1]), int(rows), int(cols), int(top0), int(left0), int(h), int(w))


def face_chip(image: np.ndarray, shape5: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """dlib.get_face_chip(image, shape5, size, padding): (size,size,3) uint8 aligned chip.

    image: HxWx3 uint8 RGB (HxW gray is replicated); shape5: (5,2) points from the 5-point
    predictor (dlib's points are integers; other float points are used as given).  Faces much
    larger than the chip go through dlib's pyramid_down<2> first, as in extract_image_chips.
    """
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    img_h, img_w = image.shape[:2]
    rect, angle = _chip_details(shape5, size, padding)
    rows = cols = size
    chip_area = rows * cols
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    if angle == 0 and rows == rect.b - rect.t + 1 and cols == rect.r - rect.l + 1:
        return _basic_extract(image, rect, rows, cols)

    # extract_image_chips: depth of the image pyramid and the crop it is built from
    depth = 0
    grow = 2.0
    r = rect.pyr_down()
    while r.area() > chip_area:
        r = r.pyr_down()
        depth += 1
        grow = grow * 2 + 2
    cent = rect.center()
    corners = [
        _rotate(cent, p, cos_a, sin_a)
        for p in ((rect.l, rect.t), (rect.r, rect.t), (rect.l, rect.b), (rect.r, rect.b))
    ]
    xs = [p[0] for p in corners]
    ys = [p[1] for p in corners]
    bl_, bt_ = max(min(xs) - grow, 0.0), max(min(ys) - grow, 0.0)
    br_, bb_ = min(max(xs) + grow, img_w - 1.0), min(max(ys) + grow, img_h - 1.0)
    if bt_ > bb_ or bl_ > br_:  # the chip lies wholly outside the image
        return np.zeros((rows, cols, 3), np.uint8)
    # drectangle -> rectangle conversion rounds each edge with lround
    box_l, box_t, box_r, box_b = _lround(bl_), _lround(bt_), _lround(br_), _lround(bb_)

    # which pyramid level to sample from; coordinates are relative to the crop from here on
    level = -1
    rr = rect.translated(-box_l, -box_t)
    while rr.pyr_down().area() > chip_area:
        level += 1
        rr = rr.pyr_down()

    c = rr.center()
    tl = _rotate(c, (rr.l, rr.t), cos_a, sin_a)
    tr = _rotate(c, (rr.r, rr.t), cos_a, sin_a)
    bl = _rotate(c, (rr.l, rr.b), cos_a, sin_a)
    m, b = _affine_from_corners(rows, cols, tl, tr, bl)
    if level < 0:  # sample the crop in place
        crop_size = (box_b - box_t + 1, box_r - box_l + 1)
        return _sample_bilinear(image, m, b, rows, cols, origin=(box_t, box_l), size=crop_size)
    src = image[box_t : box_b + 1, box_l : box_r + 1]
    for _ in range(level + 1):
        src = pyramid_down2(src)
    return _sample_bilinear(src, m, b, rows, cols)


def _basic_extract(image: np.ndarray, rect: _DRect, rows: int, cols: int) -> np.ndarray:
    """dlib basic_extract_image_chip: a plain copy of the (lround-ed) rect, zero outside the image."""
    l, t = _lround(rect.l), _lround(rect.t)
    out = np.zeros((rows, cols, 3), np.uint8)
    h, w = image.shape[:2]
    y0, y1 = max(t, 0), min(t + rows, h)
    x0, x1 = max(l, 0), min(l + cols, w)
    if y0 < y1 and x0 < x1:
        out[y0 - t : y1 - t, x0 - l : x1 - l] = image[y0:y1, x0:x1]
    return out


def face_chips(image: np.ndarray, shapes: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """(n,size,size,3) uint8 chips for (n,5,2) shapes, each exactly as dlib.get_face_chip gives it."""
    shapes = np.asarray(shapes).reshape(-1, 5, 2)
    out = np.empty((len(shapes), size, size, 3), np.uint8)
    for i, s in enumerate(shapes):
        out[i] = face_chip(image, s, size, padding)
    return out
