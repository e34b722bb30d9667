"""The face pipeline: detect -> align -> embed, behind one small interface the API calls.

    pipeline = FacePipeline.from_settings(settings)
    faces = pipeline.faces(rgb, det_prob_threshold=0.85, limit=0)   # list[Face], biggest first
    vec = pipeline.embed_chip(rgb)                                   # detect_faces=false

Models are reached only through a Backend (server/inference), so a micro-batcher or a remote
Triton server can stand in for in-process ONNX Runtime without this module changing.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from server.inference.base import Backend
from server.inference.names import EMBEDDER, EMBEDDER_INPUT, EMBEDDER_OUTPUT, EMBEDDING_DIM
from server.config import Settings
from server.vision.types import Detections, Face

SHAPE_PREDICTOR_FILE = "shape_predictor_5.npz"
CHIP_SIZE = 150
_MAX_PADDED_SIDE = 4096  # the padded retry is for crops; a larger image has room for its faces


FALLBACKS = ("none", "mmod")
DETECTORS = ("yunet", "mtcnn")


class FacePipeline:
    def __init__(self, backend: Backend, shape_predictor, detector, pad_retry: float = 0.0,
                 fallback=None) -> None:
        self.backend = backend
        self.shape_predictor = shape_predictor
        self.detector = detector
        self.pad_retry = pad_retry  # see detect()
        self.fallback = fallback  # an MmodDetector, or None (see detect())

    @classmethod
    def from_settings(cls, settings: Settings, backend: Backend | None = None) -> "FacePipeline":
        from server.inference import create_backend
        from server.vision.alignment import ShapePredictor
        detector_class(settings.detector)  # an unknown name is refused before anything loads
        backend = backend or create_backend(settings)
        from server.vision._kernels import warm_up

        sp = ShapePredictor.load(Path(settings.model_dir) / SHAPE_PREDICTOR_FILE)
        warm_up(sp)  # the alignment loops compile now, not in the first request
        det = create_detector(settings, backend)
        if settings.detect_fallback not in FALLBACKS:
            raise ValueError(f"detect_fallback must be one of {FALLBACKS}, not {settings.detect_fallback!r}")
        fallback = None
        if settings.detect_fallback == "mmod":
            from server.vision.mmod import MmodDetector

            fallback = MmodDetector(backend, upsample=1, max_pixels=settings.detect_fallback_max_pixels)
        return cls(backend, sp, det, pad_retry=settings.detect_pad_retry, fallback=fallback)

    @property
    def detector_name(self) -> str:
        """'yunet' or 'mtcnn': the detector that finds this pipeline's faces (FR_DETECTOR)."""
        return self.detector.name

    def detect(self, image: np.ndarray, det_prob_threshold: float) -> Detections:
        """The detector on the image; when no face passes the threshold, once more on the image padded by
        `pad_retry` x its longest side on every side (black), with the results mapped back; then,
        when configured, the MMOD fallback (detect_fallback).

        Neither detector sees a face well that fills the whole image: MTCNN's pyramid stops when the
        image is 12 px at P-Net's scale, so a face that fills a tight crop (the kind of photo people
        enrol) is cut off on every side, and YuNet learnt faces with surroundings. The padding gives
        such a face room; images with a face found the first
        time cost nothing more. Boxes may then extend past the image (the API clips them). The retry
        keeps only faces the detector's `retry_min_face` (a fraction of the shorter side) allows."""
        det = self.detector.detect(image)
        if _passes(det, det_prob_threshold):
            return det
        h, w = image.shape[:2]
        pad = max(1, round(self.pad_retry * max(h, w)))
        if self.pad_retry > 0 and max(h, w) + 2 * pad <= _MAX_PADDED_SIDE:  # only small crops need it
            padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            again = _at_least(self.detector.detect(padded), self.detector.retry_min_face * min(h, w))
            if _passes(again, det_prob_threshold):
                return type(det)(again.boxes - np.float32(pad), again.probs, again.landmarks - np.float32(pad))
        if self.fallback is not None:
            extra = self.detect_fallback(image)
            if _passes(extra, det_prob_threshold):
                return extra
        return det

    def detect_fallback(self, image: np.ndarray) -> Detections:
        """dlib's CNN MMOD detector (FR_DETECT_FALLBACK=mmod), for when the detector finds no face: it sees
        faces the detectors miss (profiles, heavy pose), at a cost (docs/benchmarks.md, MMOD fallback).

        Its rects go to the shape predictor as they are (dlib's own pipeline); the landmarks are
        MTCNN-style points placed by the 5-point shape (alignment.mtcnn_points), and the
        probability is sigmoid(4 * confidence): 0.5 at MMOD's own threshold (confidence 0), about
        0.98 for a clear face (confidence ~1). A choice that keeps det_prob_threshold meaningful,
        not a calibrated probability."""
        from server.vision.alignment import mtcnn_points

        rects, scores = self.fallback.detect(image)
        if len(rects) == 0:
            return Detections.empty()
        shapes = self.shape_predictor.predict_many(image, [tuple(int(v) for v in r) for r in rects])
        probs = (1.0 / (1.0 + np.exp(-4.0 * scores.astype(np.float64)))).astype(np.float32)
        marks = np.stack([mtcnn_points(s) for s in shapes])
        return Detections(rects.astype(np.float32), probs, marks, rects=np.asarray(rects, np.int64))

    def faces(self, image: np.ndarray, *, det_prob_threshold: float = 0.85, limit: int = 0,
              embed: bool = True, shapes: bool = False) -> list[Face]:
        """Faces with probability > det_prob_threshold, biggest box first, at most `limit` (0: all).

        embed: compute each face's embedding (and its dlib shape); shapes: the dlib 5-point shapes
        (Face.shape) even without embeddings (the age and gender plugins cut their chips from them)."""
        t0 = time.perf_counter()
        det = self.detect(image, det_prob_threshold)
        keep = det.probs > det_prob_threshold  # CompreFace keeps a face only if strictly greater
        boxes, probs, marks = det.boxes[keep], det.probs[keep], det.landmarks[keep]
        h, w = image.shape[:2]
        int_boxes = _int_boxes(boxes, w, h)
        areas = (int_boxes[:, 2] - int_boxes[:, 0]) * (int_boxes[:, 3] - int_boxes[:, 1])
        order = np.argsort(-areas, kind="stable")
        if limit > 0:
            order = order[:limit]
        timings = {"detector": (time.perf_counter() - t0) * 1000.0}
        faces = [
            Face(box=tuple(int(v) for v in int_boxes[i]), probability=float(probs[i]),
                 landmarks=marks[i].astype(np.float32), timings_ms=timings)
            for i in order
        ]
        if (embed or shapes) and faces:
            t1 = time.perf_counter()
            from server.vision.alignment import face_chips

            if det.rects is None:  # dlib-exact alignment: the detections re-mapped to dlib's rects
                rects = self.dlib_rects(boxes[order], marks[order])
            else:  # the fallback's dlib rects go to the predictor as they are
                rects = [tuple(int(v) for v in r) for r in det.rects[keep][order]]
            face_shapes = self.shape_predictor.predict_many(image, rects)
            for face, s in zip(faces, face_shapes):
                face.shape = s
            if embed:
                for face, d in zip(faces, self.embed_chips(face_chips(image, face_shapes))):
                    face.embedding = d
                timings["calculator"] = (time.perf_counter() - t1) * 1000.0
        return faces

    def dlib_rects(self, boxes: np.ndarray, landmarks: np.ndarray) -> list[tuple[int, int, int, int]]:
        """The rects dlib's HOG detector would give for these detections (the detector's own
        fitted mapping, `dlib_rect`): where the 5-point shape predictor starts."""
        return [self.detector.dlib_rect(b, m) for b, m in zip(boxes, landmarks)]

    def face_chips(self, image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(n,150,150,3) dlib chips of detections: dlib_rects(), then align()."""
        return self.align(image, self.dlib_rects(boxes, landmarks))

    def align(self, image: np.ndarray, rects) -> np.ndarray:
        """(n,150,150,3) chips of dlib rects (left, top, right, bottom): 5-point predictor, chip warp."""
        from server.vision.alignment import face_chips

        return face_chips(image, self.shape_predictor.predict_many(image, rects))

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """(n,150,150,3) uint8 RGB chips -> (n,128) float32 descriptors, one backend call."""
        if len(chips) == 0:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        return self.backend.run(EMBEDDER, {EMBEDDER_INPUT: chips})[EMBEDDER_OUTPUT]

    def embed_chip(self, image: np.ndarray) -> np.ndarray:
        """CompreFace's detect_faces=false: the whole image is the face, resized to 150x150."""
        chip = cv2.resize(image, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_AREA)
        return self.embed_chips(chip[None])[0]


def detector_class(name: str) -> type:
    """The detector class FR_DETECTOR names ('yunet' or 'mtcnn')."""
    if name not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, not {name!r}")
    if name == "mtcnn":
        from server.vision.mtcnn import MtcnnDetector

        return MtcnnDetector
    from server.vision.yunet import YunetDetector

    return YunetDetector


def create_detector(settings: Settings, backend: Backend):
    """The detector FR_DETECTOR names, over `backend`."""
    cls = detector_class(settings.detector)
    if settings.detector == "mtcnn":
        return cls(backend, min_face_size=settings.min_face_size, max_side=settings.max_detect_side)
    return cls(backend, max_side=settings.max_detect_side, max_upscale=settings.detect_max_upscale,
               onet_veto=settings.yunet_onet_veto)


def _at_least(det: Detections, side: float) -> Detections:
    """The detections whose box is at least `side` px wide (all of them when side <= 0)."""
    if side <= 0 or len(det.boxes) == 0:
        return det
    return det.select((det.boxes[:, 2] - det.boxes[:, 0]) >= side)


def _passes(det: Detections, threshold: float) -> bool:
    return bool((det.probs > threshold).any())


def _int_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Float detector boxes -> integer pixel boxes clipped to the image."""
    out = np.rint(boxes).astype(np.int64).reshape(-1, 4)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width - 1)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height - 1)
    return out
