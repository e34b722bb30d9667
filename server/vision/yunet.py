"""YuNet face detection over an inference backend: letterbox to a fixed canvas, one network call, decode.

    det = YunetDetector(backend)               # FR_DETECTOR=yunet (the default)
    detections = det.detect(rgb)               # Detections: boxes, probabilities, 5 landmarks
    many = det.detect_batch([rgb1, rgb2])      # images of one canvas size share one call

Unlike MTCNN's image pyramid, YuNet sees every image at one of a few fixed canvas sizes
(CANVASES: landscape, portrait, square; H and W multiples of 32), so the micro-batcher stacks the
images of concurrent requests into one network call, and a TensorRT engine needs no size profiles.

1. Letterbox: an image whose longest side exceeds `max_side` (CompreFace's 640) is scaled down to
   it (INTER_AREA); a smaller one is enlarged towards it, by at most `max_upscale` (2x by default,
   INTER_LINEAR): faces under ~15 px are found far more often at twice their size
   (docs/benchmarks.md, YuNet upscale). The image goes in the top-left corner of the smallest
   canvas that holds it, the rest is black.
2. The network (server/modelbuild/yunet.py) gives per stride s in (8, 16, 32) and per cell (row r,
   column c): cls, obj, box (dx, dy, log w, log h) and 5 landmark offsets, in stride units.
   score = sqrt(cls * obj); centre = ((c + dx) s, (r + dy) s), size = (exp(lw) s, exp(lh) s);
   landmark k = ((c + kx) s, (r + ky) s). These are the decoding rules of OpenCV's FaceDetectorYN.
3. Cells with score >= `score_floor` are kept, then greedy NMS (IoU > 0.3 suppressed, OpenCV's
   default), then boxes and points are mapped back to the original image (divide by the scale).
4. With `onet_veto` > 0 (FR_YUNET_ONET_VETO, 0.005 in the server), MTCNN's last stage (O-Net, one
   fixed-shape 48x48 network, batched like YuNet) looks at every box once more
   (MtcnnDetector.face_probability) and a box it gives a face probability under `onet_veto` is
   dropped: YuNet scores a dog's face 0.994 on the dev set, O-Net 0.0025, while the lowest of the 106
   labelled faces there gets 0.019 (docs/benchmarks.md, YuNet O-Net veto).
5. `Detections.probs` is the calibrated probability (`calibrate`): the precision measured on the
   dev detection ground truth at that raw score, so CompreFace's det_prob_threshold keeps its
   meaning, "probability that a found face is actually a face".

Landmarks come in YuNet's order, which is CompreFace's / MTCNN's: the eye on the image's left, the
eye on the image's right, nose tip, mouth corner on the image's left, on the image's right.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from server.inference.base import Backend
from server.inference.names import YUNET as MODEL_NAME, YUNET_INPUT as INPUT_NAME, YUNET_STRIDES as STRIDES
from server.vision.types import Detections

_F32 = np.float32
# Canvas sizes (height, width), smallest first: an image goes to the first that holds it.
CANVASES: tuple[tuple[int, int], ...] = ((320, 320), (480, 640), (640, 480), (640, 640))
NMS_IOU = 0.3
SCORE_FLOOR = 0.3  # raw scores below this are never faces worth reporting (probability ~0)

# Raw YuNet score -> probability that the box is a face: piecewise-linear through these knots,
# the precision measured on ../shared/facedata/dev/detection_gt.json at each score
# (docs/benchmarks.md, YuNet calibration).
CALIBRATION_SCORES = (0.30, 0.40, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.00)
CALIBRATION_PROBS = (0.3889, 0.8374, 0.8374, 0.9366, 0.9366, 0.9516, 0.9516, 0.9655, 0.9741, 0.9937, 0.9959, 1.0, 1.0)


def calibrate(scores: np.ndarray, knots: Sequence[float] = CALIBRATION_SCORES,
              probs: Sequence[float] = CALIBRATION_PROBS) -> np.ndarray:
    """Monotone piecewise-linear map of raw scores to calibrated probabilities (float32)."""
    return np.interp(np.asarray(scores, np.float64), knots, probs).astype(_F32)


@dataclass(frozen=True)
class Letterbox:
    """Where an image went on its canvas: canvas pixels = image pixels * scale."""

    canvas: np.ndarray  # (H, W, 3) uint8 RGB
    scale: float


class YunetDetector:
    name = "yunet"
    # The pipeline's padded retry (FacePipeline.detect) is for a face that fills a tight crop; on the
    # padded canvas YuNet also scores small textures high (10-11 px "faces" at 0.96-0.97 on a pizza
    # photo of the dev set), so there only faces at least this fraction of the image's shorter side
    # count (docs/benchmarks.md, YuNet threshold)
    retry_min_face = 0.2

    def __init__(self, backend: Backend, *, max_side: int = 640, score_floor: float = SCORE_FLOOR,
                 nms_iou: float = NMS_IOU, canvases: Sequence[tuple[int, int]] = CANVASES,
                 calibration: tuple[Sequence[float], Sequence[float]] | None = None,
                 max_upscale: float = 2.0, onet_veto: float = 0.0) -> None:
        big = max(max(c) for c in canvases)
        if not 32 <= max_side <= big or any(h % 32 or w % 32 for h, w in canvases):
            raise ValueError(f"max_side must be 32..{big} and canvas sides multiples of 32")
        if not 0.0 <= onet_veto < 1.0:
            raise ValueError("onet_veto must be in [0, 1)")
        self.onet_veto = float(onet_veto)
        self._second_opinion = None
        if self.onet_veto > 0:
            from server.vision.mtcnn import MtcnnDetector

            self._second_opinion = MtcnnDetector(backend, max_side=max_side)
        self.backend = backend
        self.max_side = max_side
        self.max_upscale = float(max_upscale)
        self.score_floor = float(score_floor)
        self.nms_iou = float(nms_iou)
        self.canvases = tuple(sorted(canvases, key=lambda c: (c[0] * c[1], c)))
        self.calibration = calibration or (CALIBRATION_SCORES, CALIBRATION_PROBS)
        self._grids: dict[tuple[int, int], list[np.ndarray]] = {}

    # ------------------------------------------------------------------ public API
    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[Detections]:
        found = [self._finish(raw) for raw in self._raw_batch(images)]
        return self._veto(images, found) if self._second_opinion is not None else found

    def _veto(self, images: list[np.ndarray], found: list[Detections]) -> list[Detections]:
        """Drops the boxes that O-Net gives a face probability under onet_veto (step 4)."""
        if not any(len(d) for d in found):
            return found
        opinions = self._second_opinion.face_probability(images, [d.boxes for d in found])
        return [d.select(p >= self.onet_veto) for d, p in zip(found, opinions)]

    def raw_scores(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes in image pixels, raw scores) after NMS, before calibration (for calibrating)."""
        (boxes, scores, _), scale = self._raw_batch([image])[0]
        return boxes / _F32(scale), scores

    def _raw_batch(self, images: list[np.ndarray]) -> list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]]:
        """Per image: decode()'s canvas-pixel boxes, raw scores and points, and its letterbox scale.
        Images of one canvas size share one network call."""
        boxes = [self.letterbox(img) for img in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lb in enumerate(boxes):
            groups.setdefault(lb.canvas.shape[:2], []).append(i)
        results: list = [None] * len(images)
        for size, members in groups.items():
            batch = np.stack([boxes[i].canvas for i in members])
            out = self.backend.run(MODEL_NAME, {INPUT_NAME: batch})
            for k, i in enumerate(members):
                results[i] = (self.decode({name: v[k] for name, v in out.items()}, size), boxes[i].scale)
        return results

    @staticmethod
    def dlib_rect(box: Sequence[float], landmarks: np.ndarray) -> tuple[int, int, int, int]:
        """The rect dlib's HOG detector would give for this face (landmarks_to_rect)."""
        return landmarks_to_rect(landmarks)

    # ------------------------------------------------------------------ steps
    def letterbox(self, image: np.ndarray) -> Letterbox:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("expected an HxWx3 uint8 RGB image")
        h, w = image.shape[:2]
        (ph, pw), scale = self._scaled_size(h, w)
        pixels = np.ascontiguousarray(image)
        if (ph, pw) != (h, w):
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            pixels = cv2.resize(pixels, (pw, ph), interpolation=interpolation)
        ch, cw = self.canvas_for(h, w)
        canvas = np.zeros((ch, cw, 3), np.uint8)
        canvas[:ph, :pw] = pixels[:ch, :cw]
        return Letterbox(canvas, scale)

    def _scaled_size(self, h: int, w: int) -> tuple[tuple[int, int], float]:
        """An image's (height, width) on its canvas, and the scale (canvas pixels per image pixel)."""
        scale = min(self.max_upscale, self.max_side / max(h, w))
        if scale == 1.0:
            return (h, w), 1.0
        ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
        return (ph, pw), (pw / w if w >= h else ph / h)

    def canvas_for(self, height: int, width: int) -> tuple[int, int]:
        """The canvas (height, width) an image of this size is letterboxed into: the smallest that holds
        it once scaled, else the largest (the image is then cut to it)."""
        (ph, pw), _ = self._scaled_size(height, width)
        return next(((ch, cw) for ch, cw in self.canvases if ph <= ch and pw <= cw), self.canvases[-1])

    def _grid(self, size: tuple[int, int]) -> list[np.ndarray]:
        """Per stride: (A, 2) float32 cell (column, row) of each anchor, row-major."""
        grid = self._grids.get(size)
        if grid is None:
            grid = []
            for s in STRIDES:
                rows, cols = size[0] // s, size[1] // s
                r, c = np.meshgrid(np.arange(rows, dtype=_F32), np.arange(cols, dtype=_F32), indexing="ij")
                grid.append(np.stack([c.ravel(), r.ravel()], axis=1))
            self._grids[size] = grid
        return grid

    def decode(self, out: dict[str, np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's network outputs -> (boxes (n,4) x1,y1,x2,y2, raw scores (n,), landmarks (n,5,2))
        in canvas pixels, after the score floor and NMS, by descending score."""
        all_boxes, all_scores, all_marks = [], [], []
        for s, cells in zip(STRIDES, self._grid(size)):
            cls = np.clip(out[f"cls_{s}"][:, 0], 0.0, 1.0)
            obj = np.clip(out[f"obj_{s}"][:, 0], 0.0, 1.0)
            score = np.sqrt(cls * obj)
            idx = np.nonzero(score >= self.score_floor)[0]
            if len(idx) == 0:
                continue
            c = cells[idx]
            bb = out[f"bbox_{s}"][idx]
            centre = (c + bb[:, 0:2]) * _F32(s)
            wh = np.exp(bb[:, 2:4]) * _F32(s)
            all_boxes.append(np.concatenate([centre - wh / 2, centre + wh / 2], axis=1))
            kps = out[f"kps_{s}"][idx].reshape(-1, 5, 2)
            all_marks.append((kps + c[:, None, :]) * _F32(s))
            all_scores.append(score[idx])
        if not all_scores:
            return np.zeros((0, 4), _F32), np.zeros((0,), _F32), np.zeros((0, 5, 2), _F32)
        boxes = np.concatenate(all_boxes).astype(_F32)
        scores = np.concatenate(all_scores).astype(_F32)
        marks = np.concatenate(all_marks).astype(_F32)
        rects = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float64)
        keep = np.asarray(cv2.dnn.NMSBoxes(rects, scores, 0.0, self.nms_iou), np.int64).reshape(-1)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return boxes[keep], scores[keep], marks[keep]

    def _finish(self, raw: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]) -> Detections:
        (boxes, scores, marks), scale = raw
        if len(scores) == 0:
            return Detections.empty()
        inv = _F32(1.0 / scale)
        return Detections(
            np.ascontiguousarray(boxes * inv, _F32),
            calibrate(scores, *self.calibration),
            np.ascontiguousarray(marks * inv, _F32),
        )


# YuNet's five points -> the rect dlib's HOG detector gives for the face (the 5-point shape predictor's
# start): centre = eye centre + (DX, DY) x the eye-centre-to-mouth-centre distance, side = SIDE x that
# distance. Median ratios over the 298 of dlib's 302 reference faces (../shared/reference) that YuNet
# finds, fitted before small images were enlarged 2x; as good as a 44-parameter linear fit of box and
# points, better than a box-only mapping, and a refit today gains little (docs/benchmarks.md, YuNet rect
# fit). The similarity coefficients were fitted with these, so they stay.
RECT_DX, RECT_DY, RECT_SIDE = -0.0332, 0.4571, 2.2842


def landmarks_to_rect(landmarks: np.ndarray, dx: float = RECT_DX, dy: float = RECT_DY,
                      side: float = RECT_SIDE) -> tuple[int, int, int, int]:
    """dlib rect (left, top, right, bottom) for YuNet's 5 points; corners rounded half up like dlib's."""
    p = np.asarray(landmarks, np.float64).reshape(5, 2)
    eyes = (p[0] + p[1]) / 2.0
    mouth = (p[3] + p[4]) / 2.0
    scale = float(np.hypot(*(mouth - eyes)))
    cx, cy = eyes[0] + dx * scale, eyes[1] + dy * scale
    half = side * scale / 2.0
    return (int(math.floor(cx - half + 0.5)), int(math.floor(cy - half + 0.5)),
            int(math.floor(cx + half + 0.5)), int(math.floor(cy + half + 0.5)))

