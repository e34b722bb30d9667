"""Execute an ONNX graph with PyTorch: the op set of our model repository, node by node.

The torch backend (server/inference/torch.py) needs our models as torch computations. They exist
only as ONNX files (made by `python -m server models build` from the pip-installed weights), so
rather than a second converter per model this module interprets the ONNX graph itself: each
node becomes one torch call on tensors kept on the target device, the initializers become
device tensors once, and the result is the same graph with the same weights. It covers the
operators the repository's models use (opset 17); any other operator, or an attribute value
it does not implement, is refused when the model is loaded, naming it, never silently approximated.

Semantics follow the ONNX operator specification; where torch differs, the difference is
handled here: asymmetric or oversized pads are applied with `F.pad` first (torch pools and
convolutions only take symmetric pads), `Pad`'s begin/end list is reordered into torch's
last-axis-first pairs, `PRelu` broadcasts its slope as ONNX does, `Resize` (nearest) maps each
output index to its source index with ONNX's coordinate transformation and rounding rule in
float32 (as onnxruntime does) and gathers, `Reshape`'s 0 copies the input's dimension, and `Cast`
to a floating type gives the graph's float type (float16 when the weights are).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}
# Cast's targets: integer and boolean types keep their exact type; floating ones become the graph's float
_CAST_TYPES = {
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}
_CAST_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_HOST_MAX_SIZE = 16  # float initializers up to this size also get a host copy (Resize's scales, roi)


class UnsupportedModel(ValueError):
    """The graph uses an operator or attribute this interpreter does not implement."""


class TorchGraph:
    """One ONNX model as a torch callable: `graph({input: tensor}) -> {output: tensor}`.

    Weights live on `device` in `dtype` (float32, or float16 on a GPU); integer initializers
    (shapes, pads) stay integer. Thread-safe: running the graph only reads its state.
    """

    def __init__(self, model: onnx.ModelProto, device: "torch.device", dtype: "torch.dtype") -> None:  # noqa: F821
        import torch

        self.torch = torch
        self.device = device
        self.dtype = dtype
        graph = model.graph
        self.consts: dict[str, object] = {}
        # integers and small constants, read on the host (pads, pad value, shapes, Resize's scales)
        self.host: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind in "iub" or arr.size <= _HOST_MAX_SIZE:
                self.host[init.name] = arr
            t = torch.from_numpy(np.array(arr, copy=True))  # writable, contiguous
            self.consts[init.name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        initialised = set(self.consts)
        self.inputs = {i.name: _TORCH_DTYPES.get(i.type.tensor_type.elem_type, "float32")
                       for i in graph.input if i.name not in initialised}
        self.outputs = [o.name for o in graph.output]
        self.steps: list[tuple[Callable, list[str], list[str]]] = []
        for node in graph.node:
            make = _OPS.get(node.op_type)
            if make is None:
                raise UnsupportedModel(f"ONNX operator {node.op_type!r} (node {node.name!r}) is not supported "
                                       f"by the torch backend")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            self.steps.append((make(self, attrs, list(node.input)), list(node.input), list(node.output)))

    def __call__(self, feeds: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:  # noqa: F821
        values: dict[str, object] = dict(self.consts)
        values.update(feeds)
        for fn, ins, outs in self.steps:
            result = fn(*[values[name] if name else None for name in ins])
            if len(outs) == 1:
                values[outs[0]] = result
            else:
                for name, value in zip(outs, result):
                    values[name] = value
        return {name: values[name] for name in self.outputs}


# ---------------------------------------------------------------- operators
# Each entry: (graph, attributes, input names) -> function of the input tensors.


def _spatial_pads(attrs: dict, rank: int = 2) -> tuple[list[int], list[int]]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedModel("auto_pad is not supported by the torch backend")
    pads = list(attrs.get("pads", [0] * (2 * rank)))
    return pads[:rank], pads[rank:]


def _pre_pad(begin: list[int], end: list[int], kernel: list[int] | None, value: float):
    """(torch's symmetric padding, None) or (zeros, F.pad's arguments for an explicit pad first).
    Pools take at most half the kernel as padding (`kernel`); convolutions any (`None`)."""
    if begin == end and (kernel is None or all(2 * p <= k for p, k in zip(begin, kernel))):
        return tuple(begin), None
    explicit = []
    for b, e in zip(reversed(begin), reversed(end)):  # F.pad: last axis first
        explicit += [b, e]
    return (0,) * len(begin), (explicit, value)


def _conv(g: TorchGraph, attrs: dict, ins: list[str]):
    F = g.torch.nn.functional
    begin, end = _spatial_pads(attrs)
    padding, explicit = _pre_pad(begin, end, None, 0.0)
    stride = tuple(attrs.get("strides", [1, 1]))
    dilation = tuple(attrs.get("dilations", [1, 1]))
    groups = int(attrs.get("group", 1))

    def conv(x, w, b=None):
        if explicit:
            x = F.pad(x, explicit[0], value=explicit[1])
        return F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return conv


def _pool(kind: str):
    def make(g: TorchGraph, attrs: dict, ins: list[str]):
        F = g.torch.nn.functional
        kernel = list(attrs["kernel_shape"])
        if list(attrs.get("dilations", [1, 1])) != [1, 1]:
            raise UnsupportedModel(f"{kind} pooling with dilations is not supported by the torch backend")
        begin, end = _spatial_pads(attrs)
        stride = tuple(attrs.get("strides", [1, 1]))
        ceil = bool(attrs.get("ceil_mode", 0))
        # max pools pad with -inf; average pools with zeros, which the explicit pad can only count
        if kind == "max":
            op, value, options, padded_options = F.max_pool2d, float("-inf"), {}, {}
        else:
            include = bool(attrs.get("count_include_pad", 0))
            op, value = F.avg_pool2d, 0.0
            options, padded_options = {"count_include_pad": include}, {"count_include_pad": True}
        padding, explicit = _pre_pad(begin, end, kernel, value)
        if explicit and kind == "avg" and not include:
            raise UnsupportedModel("asymmetric AveragePool pads without count_include_pad are not supported")

        def pool(x):
            if not explicit:
                return op(x, tuple(kernel), stride, padding, ceil_mode=ceil, **options)
            size = _pool_size(x.shape[2:], kernel, stride, begin, end, ceil)
            y = op(F.pad(x, explicit[0], value=explicit[1]), tuple(kernel), stride, ceil_mode=ceil, **padded_options)
            return y[:, :, :size[0], :size[1]]
        return pool
    return make


def _pool_size(shape, kernel, stride, begin, end, ceil: bool) -> list[int]:
    """Output size of an ONNX pool (as onnxruntime computes it): with ceil_mode, a last window
    that would start inside the end padding is dropped. torch, given the padding already applied
    to its input, cannot tell padding from image and would keep that window."""
    out = []
    for n, k, s, b, e in zip(shape, kernel, stride, begin, end):
        span = int(n) + b + e - k
        size = (-(-span // s) if ceil else span // s) + 1
        if ceil and (size - 1) * s >= int(n) + b:
            size -= 1
        out.append(size)
    return out


def _batch_norm(g: TorchGraph, attrs: dict, ins: list[str]):
    eps = float(attrs.get("epsilon", 1e-5))
    if not all(n in g.consts for n in ins[1:5]):
        raise UnsupportedModel("BatchNormalization needs constant scale, bias, mean and variance")
    scale, bias, mean, var = (g.consts[n] for n in ins[1:5])
    a = (scale / g.torch.sqrt(var + eps)).reshape(1, -1, 1, 1)
    b = (bias - mean * a.flatten()).reshape(1, -1, 1, 1)
    return lambda x, *_: x * a + b


def _gemm(g: TorchGraph, attrs: dict, ins: list[str]):
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

    def gemm(a, b, c=None):
        y = (a.T if ta else a) @ (b.T if tb else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y
    return gemm


def _pad(g: TorchGraph, attrs: dict, ins: list[str]):
    F = g.torch.nn.functional
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise UnsupportedModel(f"Pad mode {mode!r} is not supported by the torch backend")
    if ins[1] not in g.host or (len(ins) > 3 and ins[3]):
        raise UnsupportedModel("Pad needs constant pads and no axes input in the torch backend")
    pads = [int(p) for p in g.host[ins[1]]]
    rank = len(pads) // 2
    torch_pads = []
    for axis in reversed(range(rank)):
        torch_pads += [pads[axis], pads[axis + rank]]
    value = float(g.host[ins[2]]) if len(ins) > 2 and ins[2] else 0.0
    return lambda x, *_: F.pad(x, torch_pads, value=value)


def _flatten(g: TorchGraph, attrs: dict, ins: list[str]):
    axis = int(attrs.get("axis", 1))

    def flatten(x):
        lead = int(np.prod(x.shape[:axis])) if axis else 1
        return x.reshape(lead, -1)
    return flatten


def _softmax(g: TorchGraph, attrs: dict, ins: list[str]):
    axis = int(attrs.get("axis", -1))
    return lambda x: g.torch.softmax(x, dim=axis)


def _transpose(g: TorchGraph, attrs: dict, ins: list[str]):
    perm = list(attrs["perm"])
    return lambda x: x.permute(*perm)


def _binary(name: str):
    def make(g: TorchGraph, attrs: dict, ins: list[str]):
        op = getattr(g.torch, name)
        return lambda a, b: op(a, b)
    return make


def _prelu(g: TorchGraph, attrs: dict, ins: list[str]):
    return lambda x, slope: g.torch.where(x >= 0, x, x * slope)


def _attr_str(attrs: dict, key: str, default: str) -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _cast(g: TorchGraph, attrs: dict, ins: list[str]):
    to = int(attrs["to"])
    if to in _CAST_FLOATS:
        dtype = g.dtype  # float32, or float16 when the whole graph runs in half precision
    elif to in _CAST_TYPES:
        dtype = getattr(g.torch, _CAST_TYPES[to])
    else:
        raise UnsupportedModel(f"Cast to {onnx.TensorProto.DataType.Name(to)} is not supported by the torch backend")
    if int(attrs.get("saturate", 1)) != 1:
        raise UnsupportedModel("Cast with saturate=0 is not supported by the torch backend")
    # float -> integer truncates toward zero, as onnxruntime's static_cast does
    return lambda x: x.to(dtype)


def _reshape(g: TorchGraph, attrs: dict, ins: list[str]):
    allowzero = int(attrs.get("allowzero", 0))
    if allowzero not in (0, 1):
        raise UnsupportedModel(f"Reshape allowzero={allowzero} is not supported by the torch backend")
    constant = [int(d) for d in g.host[ins[1]]] if ins[1] in g.host else None

    def reshape(x, shape):
        dims = constant if constant is not None else [int(d) for d in shape.tolist()]
        if not allowzero:  # 0 copies the input's dimension at that index
            dims = [int(x.shape[i]) if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)
    return reshape


def _sigmoid(g: TorchGraph, attrs: dict, ins: list[str]):
    return g.torch.sigmoid


# Resize (opsets 11-18), nearest: source coordinate of output index i along an axis, in float32 as
# onnxruntime computes it (scale: the given scale, or output / input size when `sizes` was given)
_RESIZE_COORDINATES: dict[str, Callable] = {
    "asymmetric": lambda i, scale, n_in, n_out: i / scale,
    "half_pixel": lambda i, scale, n_in, n_out: (i + np.float32(0.5)) / scale - np.float32(0.5),
    "pytorch_half_pixel": lambda i, scale, n_in, n_out: (
        (i + np.float32(0.5)) / scale - np.float32(0.5) if n_out > 1 else np.zeros_like(i)),
    "align_corners": lambda i, scale, n_in, n_out: (
        i * np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.zeros_like(i)),
}
# (float32 x -> integral float); the fraction x - floor(x) is exact, so halves are recognised exactly
# (floor(x + 0.5) would round 0.49999997 up). Negative coordinates are clamped to 0 afterwards.
_RESIZE_ROUNDING: dict[str, Callable] = {
    "round_prefer_floor": lambda x: np.floor(x) + (x - np.floor(x) > np.float32(0.5)),
    "round_prefer_ceil": lambda x: np.floor(x) + (x - np.floor(x) >= np.float32(0.5)),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _resize(g: TorchGraph, attrs: dict, ins: list[str]):
    mode = _attr_str(attrs, "mode", "nearest")
    if mode != "nearest":
        raise UnsupportedModel(f"Resize mode {mode!r} is not supported by the torch backend (only 'nearest')")
    transform = _attr_str(attrs, "coordinate_transformation_mode", "half_pixel")
    if transform not in _RESIZE_COORDINATES:
        raise UnsupportedModel(f"Resize coordinate_transformation_mode {transform!r} is not supported "
                               f"by the torch backend")
    rounding = _attr_str(attrs, "nearest_mode", "round_prefer_floor")
    if rounding not in _RESIZE_ROUNDING:
        raise UnsupportedModel(f"Resize nearest_mode {rounding!r} is not supported by the torch backend")
    for key, default in (("antialias", 0), ("exclude_outside", 0)):
        if int(attrs.get(key, default)) != default:
            raise UnsupportedModel(f"Resize {key}={attrs[key]} is not supported by the torch backend")
    if "axes" in attrs:
        raise UnsupportedModel("Resize with axes is not supported by the torch backend")
    if _attr_str(attrs, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedModel(f"Resize keep_aspect_ratio_policy "
                               f"{_attr_str(attrs, 'keep_aspect_ratio_policy', '')!r} is not supported")
    scales_in = ins[2] if len(ins) > 2 and ins[2] else None
    sizes_in = ins[3] if len(ins) > 3 and ins[3] else None
    # an empty scales tensor counts as absent (graphs that give sizes pass an empty scales)
    if scales_in and scales_in in g.host and g.host[scales_in].size == 0:
        scales_in = None
    if (scales_in is None) == (sizes_in is None) or any(n and n not in g.host for n in (scales_in, sizes_in)):
        raise UnsupportedModel("Resize needs exactly one of constant scales or constant sizes in the torch backend")
    scales = g.host[scales_in].astype(np.float32) if scales_in else None
    sizes = g.host[sizes_in].astype(np.int64) if sizes_in else None
    indices: dict[tuple[int, ...], list] = {}  # input shape -> per axis: device indices, or None (identity)

    def plan(shape: tuple[int, ...]) -> list:
        rank = len(shape)
        if len(scales if scales is not None else sizes) != rank:
            raise RuntimeError(f"Resize: {rank}-d input but {len(scales if scales is not None else sizes)} "
                               f"scales / sizes")
        axes = []
        for axis, n_in in enumerate(shape):
            if scales is not None:
                scale = scales[axis]
                n_out = int(np.floor(scale * np.float32(n_in)))
            else:
                n_out = int(sizes[axis])
                scale = np.float32(n_out) / np.float32(n_in) if n_in else np.float32(1)
            out = np.arange(n_out, dtype=np.float32)
            source = _RESIZE_COORDINATES[transform](out, np.float32(scale), n_in, n_out).astype(np.float32)
            index = np.clip(_RESIZE_ROUNDING[rounding](source), 0, max(n_in - 1, 0)).astype(np.int64)
            if n_out == n_in and np.array_equal(index, np.arange(n_in)):
                axes.append(None)
            else:
                axes.append(g.torch.from_numpy(index).to(g.device))
        return axes

    def resize(x, *_):
        shape = tuple(int(d) for d in x.shape)
        axes = indices.get(shape)
        if axes is None:
            if len(indices) >= 256:
                indices.clear()  # a graph fed ever new shapes; YuNet sees a few canvases
            axes = indices[shape] = plan(shape)
        for axis, index in enumerate(axes):
            if index is not None:
                x = x.index_select(axis, index)
        return x
    return resize


_OPS: dict[str, Callable] = {
    "Add": _binary("add"),
    "Sub": _binary("sub"),
    "Mul": _binary("mul"),
    "MatMul": _binary("matmul"),
    "Conv": _conv,
    "Relu": lambda g, attrs, ins: g.torch.relu,
    "PRelu": _prelu,
    "BatchNormalization": _batch_norm,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda g, attrs, ins: (lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Gemm": _gemm,
    "Pad": _pad,
    "Flatten": _flatten,
    "Softmax": _softmax,
    "Transpose": _transpose,
    "Cast": _cast,
    "Reshape": _reshape,
    "Sigmoid": _sigmoid,
    "Resize": _resize,
}
