"""Which plugins this server runs, their plugins_versions, and running them on a request's faces.

Built in (always available)
    landmarks   the detector's 5 points as [[x, y], ...] ints (rounded), MTCNN order
    calculator  the embedding; computed by the pipeline, listed here only for versions/status
    pose        {pitch, roll, yaw} in degrees, from the 5 landmarks (server/vision/plugins/pose.py)

Model slots (age, gender, mask): server/vision/plugins/slots.py.

Timings: each face dict carries "execution_time" {plugin: ms}. Batched model plugins report the
batch's wall time divided by the number of faces (their share); pose is timed per face. Landmarks
are not timed (CompreFace's ExecutionTimeDto drops them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from server.config import Settings
from server.inference.base import Backend, BackendError
from server.vision.plugins.crops import as_rgb, face_crops
from server.vision.plugins.pose import estimate_pose
from server.vision.plugins.slots import MODEL_NAMES, MODEL_PLUGINS, SlotModel, SlotModelError
from server.vision.types import Face

# CompreFace slugs in the order they are listed in its docs; `landmarks2d106` is insightface-only.
KNOWN_PLUGINS: tuple[str, ...] = ("age", "gender", "landmarks", "calculator", "mask", "pose")
# CompreFace skips these when detect_faces=false (embedding-calculator/src/constants.py SKIPPED_PLUGINS).
SKIPPED_WITHOUT_DETECTION: frozenset[str] = frozenset({"pose", "mask"})

# The fields of CompreFace's PluginsVersionsDto (since 1.1, which added pose), in its order:
# `plugins_versions` has exactly these keys, when set; its Java layer drops the others (landmarks).
VERSION_KEYS: tuple[str, ...] = ("age", "gender", "pose", "detector", "calculator", "mask")
# CompreFace's ExecutionTimeDto has the same fields, in the same order (landmarks are not timed).
EXECUTION_TIME_KEYS: tuple[str, ...] = VERSION_KEYS
# The one list that differs on purpose: PluginsVersionsDto as CompreFace 1.0 had it, before the pose
# plugin. PluginRegistry.versions() keeps only these unless asked for all (include_all=True, which
# FaceService asks for, leaving the choice of keys to the response layer and VERSION_KEYS).
VERSION_KEYS_1_0: tuple[str, ...] = tuple(k for k in VERSION_KEYS if k != "pose")

# plugins_versions.detector per FR_DETECTOR (CompreFace's facenet build says "facenet.FaceDetector" for MTCNN)
DETECTOR_VERSIONS: dict[str, str] = {"mtcnn": "mtcnn.FaceDetector", "yunet": "yunet.FaceDetector"}
DETECTOR_VERSION = DETECTOR_VERSIONS["mtcnn"]
BUILTIN_VERSIONS: dict[str, str] = {
    "calculator": "dlib.Calculator@resnet_v1",
    "landmarks": "mtcnn.LandmarksDetector",
    "pose": "opencv.PoseEstimator",
}


@dataclass(frozen=True)
class PluginState:
    available: bool
    version: str | None
    reason: str | None = None

    def as_dict(self) -> dict:
        d: dict = {"available": self.available, "version": self.version}
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class PluginRegistry:
    """Which plugins this server can run, their versions, and running them on a request's faces."""

    settings: Settings
    backend: Backend
    # dlib's 5-point predictor (the pipeline's), for faces whose shape the pipeline did not compute;
    # loaded from <model_dir>/shape_predictor_5.npz when first needed if not given
    shape_predictor: object = None
    slots: dict[str, SlotModel] = field(init=False, default_factory=dict)
    states: dict[str, PluginState] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        for name, version in BUILTIN_VERSIONS.items():
            if name == "landmarks":  # the detector's own points
                version = f"{self.settings.detector}.LandmarksDetector"
            self.states[name] = PluginState(True, version)
        for plugin in MODEL_PLUGINS:
            path = Path(self.settings.model_dir) / MODEL_NAMES[plugin] / "1" / "model.onnx"
            if not path.is_file():
                self.states[plugin] = PluginState(False, None, f"no model installed at {path}")
                continue
            try:
                slot = SlotModel.inspect(plugin, path)
            except SlotModelError as exc:
                self.states[plugin] = PluginState(False, None, str(exc))
                continue
            self.slots[plugin] = slot
            self.states[plugin] = PluginState(True, slot.version)

    def available(self, plugin: str) -> bool:
        state = self.states.get(plugin)
        return bool(state and state.available)

    def status(self) -> dict[str, dict]:
        """{plugin: {"available", "version", ["reason"]}} for every known plugin."""
        return {p: self.states[p].as_dict() for p in KNOWN_PLUGINS}

    def versions(self, selected: Iterable[str], *, include_all: bool = False) -> dict[str, str]:
        """CompreFace `plugins_versions`: the detector plus each selected, available plugin.

        Only the keys of VERSION_KEYS_1_0 (no pose, no landmarks) unless include_all=True.
        """
        out = {"detector": DETECTOR_VERSIONS.get(self.settings.detector, DETECTOR_VERSION)}
        for plugin in selected:
            if self.available(plugin) and (include_all or plugin in VERSION_KEYS_1_0):
                out[plugin] = self.states[plugin].version  # type: ignore[assignment]
        return out

    def needs_shapes(self, selected: Iterable[str]) -> bool:
        """True when a selected, available plugin cuts dlib chips (the pipeline then keeps each face's shape)."""
        return any(self.slots[p].face_input == "dlib_chip" for p in selected if p in self.slots)

    def run(self, image: np.ndarray, faces: Sequence[Face], selected: Iterable[str]) -> list[dict]:
        """Per face: the selected, available plugin fields in CompreFace shapes + "execution_time".

        `calculator` is ignored here (the pipeline owns the embedding). One backend call per slot
        model for all faces. A failing or misbehaving model raises BackendError: it never yields a value.
        """
        chosen = [p for p in dict.fromkeys(selected) if p != "calculator" and self.available(p)]
        results: list[dict] = [{"execution_time": {}} for _ in faces]
        if not faces:
            return results
        if "landmarks" in chosen:
            for res, face in zip(results, faces):
                res["landmarks"] = _landmarks_json(face.landmarks)
        if "pose" in chosen:
            h, w = image.shape[:2]
            for res, face in zip(results, faces):
                t0 = time.perf_counter()
                pose = estimate_pose(face.landmarks, (w, h)) if _has_landmarks(face.landmarks) else None
                if pose is not None:
                    res["pose"] = pose
                    res["execution_time"]["pose"] = (time.perf_counter() - t0) * 1000.0
        for plugin in MODEL_PLUGINS:
            if plugin in chosen:
                self._run_slot(self.slots[plugin], image, faces, results)
        return results

    def _run_slot(self, slot: SlotModel, image: np.ndarray, faces: Sequence[Face], results: list[dict]) -> None:
        t0 = time.perf_counter()
        if slot.face_input == "dlib_chip":
            from server.vision.alignment import face_chips

            crops = face_chips(as_rgb(image), self.face_shapes(image, faces), slot.size_hw[0], slot.chip_padding)
        else:
            crops = face_crops(image, [f.box for f in faces], slot.size_hw)
        out = self.backend.run(slot.model_name, {slot.input_name: crops.astype(slot.input_dtype, copy=False)})
        if slot.output not in out:
            raise BackendError(f"{slot.model_name}: backend returned no {slot.output!r} output")
        try:
            values = slot.decode(out[slot.output])
        except SlotModelError as exc:  # a server-side fault, not the request's
            raise BackendError(str(exc)) from exc
        if len(values) != len(faces):
            raise BackendError(f"{slot.model_name}: {len(values)} results for {len(faces)} faces")
        share_ms = (time.perf_counter() - t0) * 1000.0 / len(faces)
        for res, value in zip(results, values):
            res[slot.plugin] = value
            res["execution_time"][slot.plugin] = share_ms

    def face_shapes(self, image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        """(n, 5, 2) dlib 5-point shapes: the pipeline's (Face.shape, set where it embeds), else
        predicted now (and kept on the face, so a request's age and gender share one prediction)
        from the rect dlib's detector would give for the face (dlib_rect_for; the pipeline's own
        comes from the unclipped detector box, so ask it: faces(shapes=True)); a face
        without landmarks (detect_faces=false: the whole image) uses its whole box, as dlib's
        pipeline does for a face crop."""
        missing = [f for f in faces if getattr(f, "shape", None) is None]
        if missing:
            rects = [dlib_rect_for(self.settings.detector, f) if _has_landmarks(f.landmarks)
                     else (f.box[0], f.box[1], f.box[2] - 1, f.box[3] - 1) for f in missing]
            for face, shape in zip(missing, self._predictor().predict_many(image, rects)):
                face.shape = shape
        return np.stack([np.asarray(f.shape, np.float64).reshape(5, 2) for f in faces])

    def _predictor(self):
        if self.shape_predictor is None:
            from server.vision.pipeline import SHAPE_PREDICTOR_FILE
            from server.vision.alignment import ShapePredictor

            self.shape_predictor = ShapePredictor.load(Path(self.settings.model_dir) / SHAPE_PREDICTOR_FILE)
        return self.shape_predictor


def dlib_rect_for(detector: str, face: Face) -> tuple[int, int, int, int]:
    """The rect dlib's HOG detector would give for a face found by `detector` (FR_DETECTOR): the
    detector's own mapping (its `dlib_rect`), as the pipeline applies it."""
    from server.vision.pipeline import detector_class

    return detector_class(detector).dlib_rect(face.box, face.landmarks)


def _has_landmarks(landmarks) -> bool:
    return landmarks is not None and np.asarray(landmarks).size > 0


def _landmarks_json(landmarks) -> list[list[int]]:
    if not _has_landmarks(landmarks):
        return []  # detect_faces=false: CompreFace returns an empty list
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    return [[int(round(x)), int(round(y))] for x, y in pts if np.isfinite(x) and np.isfinite(y)]
