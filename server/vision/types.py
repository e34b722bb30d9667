"""The plain data the vision modules hand each other: a detector's `Detections`, the pipeline's `Face`.

The detectors (mtcnn.py, yunet.py, the MMOD fallback through pipeline.py) return `Detections`;
`FacePipeline.faces` turns them into `Face`s, which the plugins (server/vision/plugins/) and the
use cases (server/core/service.py) read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_F32 = np.float32


@dataclass(frozen=True)
class Detections:
    """Faces of one image in original-image pixels, sorted by probability (descending).

    boxes: (n,4) x_min, y_min, x_max, y_max; probs: (n,); landmarks: (n,5,2) (x, y) of left eye,
    right eye, nose, mouth left, mouth right.
    """

    boxes: np.ndarray
    probs: np.ndarray
    landmarks: np.ndarray
    # (n,4) dlib rects (left, top, right, bottom) for the shape predictor, when the detector gives
    # them itself (the MMOD fallback); None: re-mapped from the detector's output (its dlib_rect)
    rects: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def select(self, keep: np.ndarray) -> "Detections":
        """The detections where the boolean mask `keep` is true (self when it keeps them all)."""
        if keep.all():
            return self
        rects = None if self.rects is None else self.rects[keep]
        return Detections(self.boxes[keep], self.probs[keep], self.landmarks[keep], rects=rects)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), _F32), np.zeros((0,), _F32), np.zeros((0, 5, 2), _F32))


@dataclass
class Face:
    """One face in original image pixels."""

    box: tuple[int, int, int, int]  # x_min, y_min, x_max, y_max
    probability: float
    # (5, 2) the detector's points, CompreFace's order: image-left eye, image-right eye, nose, mouth
    # corner on the image's left, on its right
    landmarks: np.ndarray
    embedding: np.ndarray | None = None  # (128,) raw dlib descriptor, not normalised
    # (5, 2) dlib 5-point shape the embedder's chip was cut from (set with the embedding); the age
    # and gender plugins cut their chips from it (PluginRegistry.face_shapes fills it when unset)
    shape: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # stage -> ms, shared by the request

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])
