"""MTCNN face detection cascade (P-Net -> R-Net -> O-Net) over an inference backend.

A faithful port of facenet-pytorch's ``detect_face`` (the reference behaviour; see
../shared/docs/models.md section 3), restructured for speed:

- torch's ``interpolate(mode="area")`` is an adaptive average pool; it is computed exactly from
  one integer integral image per input image (window sums of uint8 pixels are exact integers),
  both for the pyramid levels and for the R-Net / O-Net crops;
- box generation and NMS are vectorised numpy; box arithmetic is float32 like torch's;
- the models are only called through ``backend.run(model, {"image": batch})``. In
  ``detect_batch`` pyramid levels of identical size are stacked into one P-Net call, and the
  R-Net and O-Net crops of all images go into a single call each.

Models (see server/modelbuild/mtcnn_onnx.py): input ``image`` NCHW float32 RGB 0-255.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from server.inference.base import Backend
from server.inference.names import MTCNN_INPUT as _INPUT, MTCNN_LANDMARKS as _LANDMARKS, MTCNN_PROB as _PROB
from server.inference.names import MTCNN_REG as _REG, ONET, PNET, RNET
from server.vision.types import Detections

_F32 = np.float32
_MAX_SIDE = 2896  # keeps the detection image's int32 integral exact (2896**2 * 255 < 2**31)


@dataclass
class _Image:
    """Per-image working state of one detect_batch call."""

    pixels: np.ndarray  # uint8 HxWx3, possibly downscaled to max_side
    integral: _Integral
    scale_x: float  # detection pixels -> original pixels
    scale_y: float
    candidates: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (scale, P-Net boxes)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), _F32))  # x1,y1,x2,y2,score
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), _F32))

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


class MtcnnDetector:
    name = "mtcnn"
    retry_min_face = 0.0  # the padded retry takes any face (CompreFace's facenet-build behaviour, unchanged)

    def __init__(
        self,
        backend: Backend,
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        max_side: int = 640,
    ) -> None:
        if min_face_size <= 0 or not 0.0 < factor < 1.0 or not 12 <= max_side <= _MAX_SIDE:
            raise ValueError(f"min_face_size > 0, 0 < factor < 1 and 12 <= max_side <= {_MAX_SIDE} are required")
        self.backend = backend
        self.min_face_size = min_face_size
        self.thresholds = tuple(_F32(t) for t in thresholds)
        self.factor = factor
        self.max_side = max_side

    # ------------------------------------------------------------------ public API
    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_batch([image])[0]

    @staticmethod
    def dlib_rect(box: Sequence[float], landmarks=None) -> tuple[int, int, int, int]:
        """The rect dlib's HOG detector would give for this box (alignment.mtcnn_box_to_rect);
        MTCNN's box alone places it best (../shared/docs/models.md section 4), the landmarks are not used."""
        from server.vision.alignment import mtcnn_box_to_rect

        return mtcnn_box_to_rect(box)

    def detect_batch(self, images: list[np.ndarray]) -> list[Detections]:
        work = [self._prepare(img) for img in images]
        self._stage_pnet(work)
        self._stage_rnet(work)
        self._stage_onet(work)
        return [self._result(w) for w in work]

    def face_probability(self, images: list[np.ndarray], boxes: list[np.ndarray], grow: float = 0.2) -> list[np.ndarray]:
        """O-Net's probability that each given box holds a face: a second opinion on another detector's
        boxes (YunetDetector's veto).

        `boxes[i]` are (n, 4) x_min, y_min, x_max, y_max in image i's pixels. Each box is grown by `grow`
        x its width and height, squared around its centre (the cascade's own boxes are looser than
        YuNet's) and area-resampled to 48x48 from the image as the cascade sees it (at most `max_side`),
        exactly like the cascade's last stage; the boxes of all images go into one O-Net call. A box
        with no pixels inside the image gets 1.0 (no opinion)."""
        out = [np.ones(len(b), _F32) for b in boxes]
        crops, owners = [], []
        for i, (image, b) in enumerate(zip(images, boxes)):
            if len(b) == 0:
                continue
            pixels, scale_x, scale_y = self._detection_pixels(image)
            b = np.asarray(b, _F32).reshape(-1, 4).copy()
            b[:, [0, 2]] /= _F32(scale_x)
            b[:, [1, 3]] /= _F32(scale_y)
            margin = (b[:, 2:4] - b[:, 0:2]) * _F32(grow / 2)
            b[:, 0:2] -= margin
            b[:, 2:4] += margin
            x0, y0, x1, y1, valid = _clip_boxes(_rerec(b), pixels.shape[1], pixels.shape[0])
            if not valid.any():
                continue
            x0, y0, x1, y1 = x0[valid], y0[valid], x1[valid], y1[valid]
            # window sums need the integral of the part of the image the boxes cover only: this call takes
            # 0.6 ms for a 640x480 photo with one face, 5.9 ms with the whole image's integral
            left, top = int(x0.min()), int(y0.min())
            region = _Integral(np.ascontiguousarray(pixels[top : int(y1.max()), left : int(x1.max())]))
            crops.append(region.crops(x0 - left, y0 - top, x1 - left, y1 - top, 48).transpose(1, 0, 2, 3))
            owners.append((i, np.flatnonzero(valid)))
        if crops:
            prob = self.backend.run(ONET, {_INPUT: np.concatenate(crops)})[_PROB][:, 1]
            start = 0
            for i, where in owners:
                out[i][where] = prob[start : start + len(where)]
                start += len(where)
        return out

    # ------------------------------------------------------------------ preparation
    def _prepare(self, image: np.ndarray) -> _Image:
        pixels, scale_x, scale_y = self._detection_pixels(image)
        return _Image(pixels, _Integral(pixels), scale_x, scale_y)

    def _detection_pixels(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The image as the cascade sees it (longest side at most max_side), and its scale back."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("expected an HxWx3 uint8 RGB image")
        h, w = image.shape[:2]
        pixels = np.ascontiguousarray(image)  # OpenCV rejects negative strides (flipped views)
        if max(h, w) > self.max_side:
            ratio = self.max_side / max(h, w)
            size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        dh, dw = pixels.shape[:2]
        return pixels, w / dw, h / dh

    def _scales(self, h: int, w: int) -> list[float]:
        # Same float64 recurrence as facenet-pytorch (the level sizes depend on it).
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        scales, scale = [], m
        while minl >= 12:
            scales.append(scale)
            scale *= self.factor
            minl *= self.factor
        return scales

    # ------------------------------------------------------------------ stage 1
    def _stage_pnet(self, work: list[_Image]) -> None:
        groups: dict[tuple[int, int], list[tuple[int, float]]] = {}
        for i, im in enumerate(work):
            for scale in self._scales(im.height, im.width):
                size = (int(im.height * scale + 1), int(im.width * scale + 1))
                groups.setdefault(size, []).append((i, scale))
        for (oh, ow), members in groups.items():
            batch = np.stack([work[i].integral.resize(oh, ow) for i, _ in members])
            out = self.backend.run(PNET, {_INPUT: batch})
            reg, prob = out[_REG], out[_PROB]
            for k, (i, scale) in enumerate(members):
                boxes = _generate_boxes(reg[k], prob[k, 1], scale, self.thresholds[0])
                keep = nms(boxes[:, :4], boxes[:, 4], 0.5)
                work[i].candidates.append((scale, boxes[keep]))
        for im in work:
            # facenet concatenates the levels in pyramid order before the cross-scale NMS.
            levels = [b for _, b in sorted(im.candidates, key=lambda sb: -sb[0])]
            im.candidates = []
            boxes = np.concatenate(levels) if levels else np.zeros((0, 9), _F32)
            boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
            # P-Net regression uses the box size without +1.
            wh = np.concatenate([boxes[:, 2:4] - boxes[:, 0:2]] * 2, axis=1)
            coords = boxes[:, :4] + boxes[:, 5:9] * wh
            im.boxes = _rerec(np.concatenate([coords, boxes[:, 4:5]], axis=1))

    # ------------------------------------------------------------------ stage 2
    def _stage_rnet(self, work: list[_Image]) -> None:
        crops, owners = self._crops(work, 24)
        if not crops:
            return
        out = self.backend.run(RNET, {_INPUT: np.concatenate(crops)})
        reg, score = out[_REG], out[_PROB][:, 1]
        start = 0
        for im, n in zip(work, owners):
            s, r = score[start : start + n], reg[start : start + n]
            start += n
            passed = s > self.thresholds[1]
            boxes = np.concatenate([im.boxes[passed, :4], s[passed, None]], axis=1)
            r = r[passed]
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
            im.boxes = _rerec(_bbreg(boxes[keep], r[keep]))

    # ------------------------------------------------------------------ stage 3
    def _stage_onet(self, work: list[_Image]) -> None:
        crops, owners = self._crops(work, 48)
        if not crops:
            return
        out = self.backend.run(ONET, {_INPUT: np.concatenate(crops)})
        reg, marks, score = out[_REG], out[_LANDMARKS], out[_PROB][:, 1]
        start = 0
        for im, n in zip(work, owners):
            s, r, p = score[start : start + n], reg[start : start + n], marks[start : start + n]
            start += n
            passed = s > self.thresholds[2]
            boxes = np.concatenate([im.boxes[passed, :4], s[passed, None]], axis=1)
            r, p = r[passed], p[passed]
            # Landmarks are relative to the O-Net input box (before its regression), +1 sizes.
            w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
            h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
            px = w * p[:, :5] + boxes[:, 0:1] - 1
            py = h * p[:, 5:] + boxes[:, 1:2] - 1
            landmarks = np.stack([px, py], axis=2)
            boxes = _bbreg(boxes, r)
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7, mode="min")
            im.boxes, im.landmarks = boxes[keep], landmarks[keep]

    def _crops(self, work: list[_Image], size: int) -> tuple[list[np.ndarray], list[int]]:
        """Area-resampled crops of every image's current boxes; drops boxes that have no pixels."""
        crops, owners = [], []
        for im in work:
            x0, y0, x1, y1, valid = _clip_boxes(im.boxes, im.width, im.height)
            if not valid.all():
                # facenet would misalign crops and boxes here; dropping the box is the intended result.
                im.boxes = im.boxes[valid]
                x0, y0, x1, y1 = x0[valid], y0[valid], x1[valid], y1[valid]
            owners.append(len(im.boxes))
            if len(im.boxes):
                crops.append(im.integral.crops(x0, y0, x1, y1, size).transpose(1, 0, 2, 3))
        return crops, owners

    def _result(self, im: _Image) -> Detections:
        if len(im.boxes) == 0:
            return Detections.empty()
        order = np.argsort(-im.boxes[:, 4], kind="stable")
        boxes = im.boxes[order]
        scale = np.array([im.scale_x, im.scale_y], _F32)
        coords = (boxes[:, :4].reshape(-1, 2, 2) * scale).reshape(-1, 4)
        marks = im.landmarks[order] * scale
        return Detections(
            np.ascontiguousarray(coords, _F32),
            np.ascontiguousarray(boxes[:, 4], _F32),
            np.ascontiguousarray(marks, _F32),
        )


# ---------------------------------------------------------------------- numeric helpers
def _window_bounds(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch adaptive pooling windows: [floor(i*n/o), ceil((i+1)*n/o)) in exact integers."""
    i = np.arange(n_out, dtype=np.int64)
    return (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out


class _Integral:
    """Exact window sums of one uint8 RGB image, for torch-identical 'area' resampling.

    Planar int32 integral images (3, H+1, W+1): the gathers then copy whole rows or single
    int32s (numpy's fast paths) and the results come out NCHW, the models' input layout.
    """

    # Every window sum (and the integral itself) must fit in int32.
    MAX_PIXELS = (2**31 - 1) // 255

    def __init__(self, pixels: np.ndarray) -> None:
        h, w = pixels.shape[:2]
        if h * w > self.MAX_PIXELS:
            raise ValueError("image too large for the detector's integral image")
        self.height, self.width = h, w
        self.planes = np.stack([cv2.integral(p, sdepth=cv2.CV_32S) for p in cv2.split(pixels)])

    def resize(self, oh: int, ow: int) -> np.ndarray:
        """torch interpolate(mode='area') of the whole image to (oh, ow): (3, oh, ow) float32."""
        r0, r1 = _window_bounds(self.height, oh)
        c0, c1 = _window_bounds(self.width, ow)
        rows = np.take(self.planes, r1, axis=1)
        rows -= np.take(self.planes, r0, axis=1)
        sums = np.take(rows, c1, axis=2)
        sums -= np.take(rows, c0, axis=2)
        counts = (r1 - r0)[:, None] * (c1 - c0)[None, :]
        return np.divide(sums, counts.astype(_F32), dtype=_F32)

    def crops(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, size: int) -> np.ndarray:
        """torch interpolate(mode='area') of the crops [y0:y1, x0:x1] to size x size: (3,K,size,size)."""
        i = np.arange(size, dtype=np.int64)[None, :]
        ch, cw = (y1 - y0)[:, None], (x1 - x0)[:, None]
        r0 = y0[:, None] + (i * ch) // size
        r1 = y0[:, None] + ((i + 1) * ch + size - 1) // size
        c0 = x0[:, None] + (i * cw) // size
        c1 = x0[:, None] + ((i + 1) * cw + size - 1) // size
        flat = self.planes.reshape(3, -1)
        stride = self.width + 1
        top, bottom = (r0 * stride)[:, :, None], (r1 * stride)[:, :, None]
        left, right = c0[:, None, :], c1[:, None, :]
        sums = np.take(flat, bottom + right, axis=1)
        sums -= np.take(flat, top + right, axis=1)
        sums -= np.take(flat, bottom + left, axis=1)
        sums += np.take(flat, top + left, axis=1)
        counts = (r1 - r0)[:, :, None] * (c1 - c0)[:, None, :]
        return np.divide(sums, counts.astype(_F32), dtype=_F32)


def _generate_boxes(reg: np.ndarray, prob: np.ndarray, scale: float, threshold: np.float32) -> np.ndarray:
    """P-Net cells with prob >= threshold -> (k, 9) x1, y1, x2, y2, score, reg[4] (float32)."""
    ys, xs = np.nonzero(prob >= threshold)
    s = _F32(scale)  # torch divides a float32 tensor by the Python scalar in float32
    q1x = np.floor((_F32(2) * xs.astype(_F32) + _F32(1)) / s)
    q1y = np.floor((_F32(2) * ys.astype(_F32) + _F32(1)) / s)
    q2x = np.floor((_F32(2) * xs.astype(_F32) + _F32(12)) / s)
    q2y = np.floor((_F32(2) * ys.astype(_F32) + _F32(12)) / s)
    out = np.empty((len(ys), 9), _F32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = q1x, q1y, q2x, q2y
    out[:, 4] = prob[ys, xs]
    out[:, 5:9] = reg[:, ys, xs].T
    return out


def _bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """R-/O-Net box regression (sizes with +1); keeps column 4 (score)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out = boxes.copy()
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _rerec(boxes: np.ndarray) -> np.ndarray:
    """Square the boxes around their centres (side = the longer side)."""
    out = boxes.copy()
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * _F32(0.5) - side * _F32(0.5)
    out[:, 1] = boxes[:, 1] + h * _F32(0.5) - side * _F32(0.5)
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _clip_boxes(boxes: np.ndarray, w: int, h: int):
    """facenet's pad(): truncate, clip to [1, w] / [1, h]; 0-based slice [y0:y1, x0:x1]."""
    t = np.trunc(boxes[:, :4]).astype(np.int64)
    x0 = np.maximum(t[:, 0], 1) - 1
    y0 = np.maximum(t[:, 1], 1) - 1
    x1 = np.minimum(t[:, 2], w)
    y1 = np.minimum(t[:, 3], h)
    return x0, y0, x1, y1, (x1 > x0) & (y1 > y0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy NMS; indices of the kept boxes, by descending score (ties: lower index first).

    mode 'union': IoU with areas (x2-x1)*(y2-y1), as torchvision.ops.nms;
    mode 'min': intersection / smaller area with +1 sizes, as facenet's nms_numpy 'Min'.
    A box is suppressed when its overlap with a kept higher-scoring box is > threshold.
    Scores must be > 0 (they are probabilities above a detection threshold).
    """
    n = len(scores)
    if n == 0:
        return np.zeros((0,), np.int64)
    if mode == "union":
        keep = _nms_union(boxes, scores, threshold)
    elif mode == "min":
        keep = _nms_min(boxes, scores, threshold)
    else:
        raise ValueError(f"unknown NMS mode {mode!r}")
    return keep[np.lexsort((keep, -scores[keep]))]


def _nms_union(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    # OpenCV's C++ greedy NMS (stable descending sort, IoU without +1) is the torchvision rule and
    # is several times faster than anything vectorised in numpy. Boxes without area have IoU 0
    # (or NaN) with everything under torchvision's rule, so they are always kept; OpenCV is not
    # given them because it treats two empty boxes as identical.
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    proper = np.nonzero((w > 0) & (h > 0))[0]
    degenerate = np.nonzero(~((w > 0) & (h > 0)))[0]
    if len(proper):
        rects = np.stack([boxes[proper, 0], boxes[proper, 1], w[proper], h[proper]], axis=1).astype(np.float64)
        kept = cv2.dnn.NMSBoxes(rects, scores[proper].astype(_F32), 0.0, float(threshold))
        proper = proper[np.asarray(kept, np.int64).reshape(-1)]
    return np.concatenate([proper, degenerate])


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """facenet's nms_numpy(method='Min'): one vectorised pass per kept box (inputs are few)."""
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(_F32)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    remaining = np.arange(len(b))
    keep = []
    while remaining.size:
        i, rest = remaining[0], remaining[1:]
        keep.append(i)
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1, _F32(0))
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1, _F32(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            overlap = iw * ih / np.minimum(area[i], area[rest])
        remaining = rest[~(overlap > _F32(threshold))]
    return order[np.asarray(keep, np.int64)]
