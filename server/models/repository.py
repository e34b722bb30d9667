"""Builds the Triton model repository from the pip-installed weights.

    <out>/face_detector_pnet/config.pbtxt + 1/model.onnx   (likewise rnet, onet, face_embedder)
    <out>/shape_predictor_5.npz
    <out>/build.json   fingerprint of the inputs + sha256 of every output (idempotence)

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

from server.models import sources

log = logging.getLogger(__name__)

BUILD_FORMAT = 1
MANIFEST = "build.json"
SHAPE_PREDICTOR_NPZ = "shape_predictor_5.npz"
TARGETS = ("onnxruntime",)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_batch_size: int
    queue_delay_us: int  # Triton's dynamic batching window


MODEL_SPECS = {
    s.name: s
    for s in (
        ModelSpec("face_detector_pnet", 32, 1000),
        ModelSpec("face_detector_rnet", 512, 2000),
        ModelSpec("face_detector_onet", 256, 2000),
        ModelSpec("face_embedder", 64, 2000),
    )
}

_HERE = Path(__file__).resolve().parent
_CONVERTER_SOURCES = ("dlib_format.py", "dlib_resnet.py", "dlib_shape.py", "mtcnn_onnx.py", "repository.py")


def fingerprint() -> str:
    """Hash of every input of the build: weights files and converter code."""
    h = hashlib.sha256(f"format {BUILD_FORMAT} onnx {onnx.__version__}".encode())
    files = [sources.dlib_model_file(sources.EMBEDDER_DAT), sources.dlib_model_file(sources.SHAPE5_DAT)]
    files += [sources.mtcnn_weights_file(n) for n in ("pnet", "rnet", "onet")]
    files += [_HERE / f for f in _CONVERTER_SOURCES]
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256(f).encode())
    return h.hexdigest()


def is_built(out: Path) -> bool:
    """True when `out` holds a complete build of the current inputs, unmodified."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("fingerprint") != fingerprint():
        return False
    outputs = manifest.get("outputs", {})
    return bool(outputs) and all(
        (out / rel).is_file() and _sha256(out / rel) == digest for rel, digest in outputs.items()
    )


def build(out: Path | str, *, target: str = "onnxruntime", force: bool = False) -> bool:
    """Write the repository to `out`. Returns False when it was already up to date (nothing written)."""
    out = Path(out)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if not force and is_built(out):
        log.info("model repository %s is up to date", out)
        return False
    from server.models.dlib_resnet import build_embedder_onnx
    from server.models.dlib_shape import convert_shape_predictor
    from server.models.mtcnn_onnx import build_mtcnn_onnx

    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, onnx.ModelProto] = dict(build_mtcnn_onnx())
    models["face_embedder"] = build_embedder_onnx(sources.dlib_model_file(sources.EMBEDDER_DAT))
    outputs: dict[str, str] = {}
    for name, model in sorted(models.items()):
        spec = MODEL_SPECS[name]
        model_rel = f"{name}/1/model.onnx"
        _atomic_write(out / model_rel, model.SerializeToString(deterministic=True))
        _atomic_write(out / name / "config.pbtxt", triton_config(spec, model, target).encode())
        for rel in (model_rel, f"{name}/config.pbtxt"):
            outputs[rel] = _sha256(out / rel)
    _atomic_replace(out / SHAPE_PREDICTOR_NPZ, lambda tmp: convert_shape_predictor(
        sources.dlib_model_file(sources.SHAPE5_DAT), tmp))
    outputs[SHAPE_PREDICTOR_NPZ] = _sha256(out / SHAPE_PREDICTOR_NPZ)
    manifest = {"format": BUILD_FORMAT, "target": target, "fingerprint": fingerprint(), "outputs": outputs}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return True


def ensure_built(out: Path | str) -> None:
    """Build on first start (the server calls this); a no-op when the repository is current."""
    if build(out):
        log.info("built the model repository in %s", out)


_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


def triton_config(spec: ModelSpec, model: onnx.ModelProto, target: str) -> str:
    """config.pbtxt with the tensors read off the graph; the leading (batch) axis is Triton's."""
    platform = {"onnxruntime": 'platform: "onnxruntime_onnx"'}[target]

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

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    return (
        f'name: "{spec.name}"\n'
        f"{platform}\n"
        f"max_batch_size: {spec.max_batch_size}\n"
        f"input [\n{tensors(inputs)}\n]\n"
        f"output [\n{tensors(model.graph.output)}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {spec.queue_delay_us}\n"
        "}\n"
        "instance_group [\n  {\n    kind: KIND_AUTO\n    count: 1\n  }\n]\n"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
