"""dlib's ResNet face descriptor (`dlib_face_recognition_resnet_model_v1.dat`) -> ONNX.

The .dat file stores no graph: tags and skips leave only a version int, so the reader walks
the known architecture (dlib's `dnn_face_recognition_ex.cpp`, ../shared/docs/models.md sections
1-2) and checks every record against it. The builder then replays dlib's forward pass as an
ONNX graph, folding each affine layer into the convolution before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.inference import names
from server.modelbuild.dlib_format import DlibFormatError, DlibReader
from server.modelbuild.sources import EMBEDDER_DAT, dlib_model_file

MODEL_NAME = names.EMBEDDER
INPUT_NAME = names.EMBEDDER_INPUT
OUTPUT_NAME = names.EMBEDDER_OUTPUT
CHIP_SIZE = 150
DESCRIPTOR_SIZE = names.EMBEDDING_DIM
OPSET = 17
IR_VERSION = 8  # fixed (not onnx.IR_VERSION) so the bytes do not depend on the installed onnx
PRODUCER_NAME = "face-server.dlib_resnet"
PRODUCER_VERSION = "1"


# ---------------------------------------------------------------------------------------------
# Parsed layers (forward order)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputLayer:
    mean: np.ndarray  # (3,) RGB means subtracted before dividing by 256
    size: tuple[int, int]  # (nr, nc)


@dataclass(frozen=True)
class LossMetric:
    margin: float
    distance_threshold: float


@dataclass(frozen=True)
class ConvLayer:
    weights: np.ndarray  # (out, in, kh, kw) float32, cross-correlation like ONNX Conv
    bias: np.ndarray  # (out,) float32
    stride: tuple[int, int]
    pad: tuple[int, int]
    relu: bool = False  # con_6 can fuse a relu


@dataclass(frozen=True)
class AffineLayer:
    gamma: np.ndarray  # (C,) float32
    beta: np.ndarray  # (C,) float32


@dataclass(frozen=True)
class ReluLayer:
    pass


@dataclass(frozen=True)
class PoolLayer:
    kind: str  # "max" | "avg"
    size: tuple[int, int]  # (0, 0): global pooling over the whole plane
    stride: tuple[int, int]
    pad: tuple[int, int]

    @property
    def is_global(self) -> bool:
        return self.size == (0, 0)


@dataclass(frozen=True)
class TagLayer:
    tag: int


@dataclass(frozen=True)
class SkipLayer:
    tag: int


@dataclass(frozen=True)
class AddPrevLayer:
    tag: int


@dataclass(frozen=True)
class FcLayer:
    weights: np.ndarray  # (in, out) float32: y = x @ W
    bias: np.ndarray | None  # (out,) or None


Layer = Union[ConvLayer, AffineLayer, ReluLayer, PoolLayer, TagLayer, SkipLayer, AddPrevLayer, FcLayer]


@dataclass
class DlibResNet:
    loss: LossMetric
    input: InputLayer
    layers: list[Layer] = field(default_factory=list)

    def parameter_count(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, ConvLayer):
                total += layer.weights.size + layer.bias.size
            elif isinstance(layer, FcLayer):
                total += layer.weights.size + (0 if layer.bias is None else layer.bias.size)
        return total


# ---------------------------------------------------------------------------------------------
# The known architecture, forward order (dnn_face_recognition_ex.cpp)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    kind: str  # con | affine | relu | max_pool | avg_pool | add_prev | fc | tag | skip
    args: tuple = ()

    @property
    def is_wrapper_only(self) -> bool:
        """tag/skip wrappers are serialized as a bare version int, no layer record."""
        return self.kind in ("tag", "skip")


def _con(n: int, k: int, stride: int) -> _Spec:
    pad = 0 if stride != 1 else k // 2  # dlib's default padding for con<>
    return _Spec("con", (n, k, stride, pad))


def _block(n: int, stride: int) -> list[_Spec]:
    return [_con(n, 3, stride), _Spec("affine"), _Spec("relu"), _con(n, 3, 1), _Spec("affine")]


def _ares(n: int) -> list[_Spec]:
    # relu<add_prev1<block<tag1<x>>>>
    return [_Spec("tag", (1,)), *_block(n, 1), _Spec("add_prev", (1,)), _Spec("relu")]


def _ares_down(n: int) -> list[_Spec]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<stride 2, tag1<x>>>>>>>>
    return [
        _Spec("tag", (1,)),
        *_block(n, 2),
        _Spec("tag", (2,)),
        _Spec("skip", (1,)),
        _Spec("avg_pool", (2, 2)),
        _Spec("add_prev", (2,)),
        _Spec("relu"),
    ]


def _architecture() -> list[_Spec]:
    specs = [_con(32, 7, 2), _Spec("affine"), _Spec("relu"), _Spec("max_pool", (3, 2))]
    specs += _ares(32) * 3
    specs += _ares_down(64) + _ares(64) * 3
    specs += _ares_down(128) + _ares(128) * 2
    specs += _ares_down(256) + _ares(256) * 2
    specs += _ares_down(256)
    specs += [_Spec("avg_pool", (0, 0)), _Spec("fc", (DESCRIPTOR_SIZE,))]
    return specs


ARCHITECTURE: tuple[_Spec, ...] = tuple(_architecture())


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------
def read_resnet(path: Path | str | None = None) -> DlibResNet:
    """Parse the .dat file; raises DlibFormatError if it is not this exact network."""
    path = Path(path) if path is not None else dlib_model_file(EMBEDDER_DAT)
    reader = DlibReader.from_file(path)
    return parse_resnet(reader)


def parse_resnet(r: DlibReader) -> DlibResNet:
    _expect_version(r, (1,), "add_loss_layer")
    loss = _read_loss(r)

    # All wrapper version ints come first, outermost -> innermost: reversed forward order.
    versions: list[int] = []
    for i, spec in enumerate(reversed(ARCHITECTURE)):
        innermost = i == len(ARCHITECTURE) - 1
        if spec.is_wrapper_only:
            allowed: tuple[int, ...] = (1,)
        elif innermost:
            allowed = (2, 3)  # add_layer over the input layer
        else:
            allowed = (1, 2)
        versions.append(_expect_version(r, allowed, f"{spec.kind} wrapper #{i}"))
    versions.reverse()  # now in forward order, aligned with ARCHITECTURE

    input_layer = _read_input(r)
    layers: list[Layer] = []
    for spec, version in zip(ARCHITECTURE, versions):
        if spec.kind == "tag":
            layers.append(TagLayer(spec.args[0]))
            continue
        if spec.kind == "skip":
            layers.append(SkipLayer(spec.args[0]))
            continue
        layers.append(_read_layer(r, spec))
        is_input_wrapper = not layers[:-1]
        _read_add_layer_tail(r, version, is_input_wrapper)

    if not r.at_end():
        raise DlibFormatError(f"{len(r.data) - r.pos} unexpected trailing bytes at byte {r.pos}")
    return DlibResNet(loss=loss, input=input_layer, layers=layers)


def _expect_version(r: DlibReader, allowed: tuple[int, ...], what: str) -> int:
    at = r.pos
    v = r.integer()
    if v not in allowed:
        raise DlibFormatError(f"{what}: version {v} at byte {at}, expected one of {allowed}")
    return v


def _read_loss(r: DlibReader) -> LossMetric:
    r.expect_string("loss_metric_2", "loss_metric_")
    return LossMetric(margin=r.real(), distance_threshold=r.real())


def _read_input(r: DlibReader) -> InputLayer:
    r.expect_string("input_rgb_image_sized")
    mean = np.array([r.real(), r.real(), r.real()], dtype=np.float64)
    nr, nc = r.integer(), r.integer()
    if (nr, nc) != (CHIP_SIZE, CHIP_SIZE):
        raise DlibFormatError(f"input is {nr}x{nc}, expected {CHIP_SIZE}x{CHIP_SIZE}")
    return InputLayer(mean=mean, size=(nr, nc))


def _read_add_layer_tail(r: DlibReader, version: int, is_input_wrapper: bool) -> None:
    """3 bools, then the (empty) gradient/output tensors of the add_layer wrapper."""
    for _ in range(3):
        r.boolean()
    n_tensors = 3 if (is_input_wrapper or version >= 2) else 2
    for _ in range(n_tensors):
        r.tensor()
    if is_input_wrapper and version >= 3:
        r.integer()  # sample_expansion_factor


def _read_layer(r: DlibReader, spec: _Spec) -> Layer:
    if spec.kind == "con":
        return _read_con(r, spec)
    if spec.kind == "affine":
        return _read_affine(r)
    if spec.kind == "relu":
        if r.expect_string("relu_", "relu_2") == "relu_2" and r.boolean():
            raise DlibFormatError("disabled relu layers are not supported")
        return ReluLayer()
    if spec.kind in ("max_pool", "avg_pool"):
        return _read_pool(r, spec)
    if spec.kind == "add_prev":
        r.expect_string("add_prev_")
        return AddPrevLayer(spec.args[0])
    if spec.kind == "fc":
        return _read_fc(r, spec)
    raise AssertionError(spec.kind)


def _read_con(r: DlibReader, spec: _Spec) -> ConvLayer:
    version = r.expect_string("con_4", "con_5", "con_6")
    params = r.tensor().reshape(-1)
    num_filters, nr, nc = r.integer(), r.integer(), r.integer()
    stride = (r.integer(), r.integer())
    pad = (r.integer(), r.integer())
    fshape = r.alias_tensor()
    bshape = r.alias_tensor()
    for _ in range(4):  # learning-rate / weight-decay multipliers
        r.real()
    use_bias = r.boolean() if version in ("con_5", "con_6") else True
    use_relu = r.boolean() if version == "con_6" else False

    n, k, stride_, pad_ = spec.args
    if (num_filters, nr, nc, stride, pad) != (n, k, k, (stride_, stride_), (pad_, pad_)):
        raise DlibFormatError(
            f"con layer is {num_filters} filters {nr}x{nc} stride {stride} pad {pad}; "
            f"expected {n} filters {k}x{k} stride {stride_} pad {pad_}"
        )
    if fshape[0] != num_filters or fshape[2:] != (nr, nc):
        raise DlibFormatError(f"con filters alias {fshape} does not match {num_filters}x?x{nr}x{nc}")
    nw = int(np.prod(fshape))
    nb = num_filters if use_bias else 0
    if params.size != nw + nb or (use_bias and int(np.prod(bshape)) != num_filters):
        raise DlibFormatError(f"con params hold {params.size} values, expected {nw + nb}")
    weights = params[:nw].reshape(fshape)
    bias = params[nw:].copy() if use_bias else np.zeros(num_filters, np.float32)
    return ConvLayer(weights=weights, bias=bias, stride=stride, pad=pad, relu=use_relu)


def _read_affine(r: DlibReader) -> AffineLayer:
    version = r.expect_string("affine_", "affine_2", "bn_con2")
    if version == "bn_con2":
        return _read_bn_con(r)
    params = r.tensor().reshape(-1)
    gshape = r.alias_tensor()
    bshape = r.alias_tensor()
    mode = r.integer()
    disabled = r.boolean() if version == "affine_2" else False
    if mode != 0:  # CONV_MODE: one gamma/beta per channel
        raise DlibFormatError(f"affine layer in mode {mode}, expected CONV_MODE (0)")
    c = int(np.prod(gshape))
    if gshape != bshape or params.size != 2 * c:
        raise DlibFormatError(f"affine params {params.size} do not match alias {gshape}")
    if disabled:
        return AffineLayer(gamma=np.ones(c, np.float32), beta=np.zeros(c, np.float32))
    return AffineLayer(gamma=params[:c].copy(), beta=params[c:].copy())


def _read_bn_con(r: DlibReader) -> AffineLayer:
    """Batch-norm record stored in place of affine: use its running statistics."""
    params = r.tensor().reshape(-1)
    gshape = r.alias_tensor()
    r.alias_tensor()
    r.tensor()  # means of the last batch
    r.tensor()  # invstds of the last batch
    running_mean = r.tensor().reshape(-1).astype(np.float64)
    running_var = r.tensor().reshape(-1).astype(np.float64)
    r.integer()  # num_updates
    r.integer()  # running_stats_window_size
    for _ in range(4):
        r.real()
    eps = r.real()
    c = int(np.prod(gshape))
    if params.size != 2 * c or running_mean.size != c or running_var.size != c:
        raise DlibFormatError("bn_con2 tensors do not match its channel count")
    g = params[:c].astype(np.float64) / np.sqrt(running_var + eps)
    b = params[c:].astype(np.float64) - g * running_mean
    return AffineLayer(gamma=g.astype(np.float32), beta=b.astype(np.float32))


def _read_pool(r: DlibReader, spec: _Spec) -> PoolLayer:
    r.expect_string(f"{spec.kind}_2")
    size = (r.integer(), r.integer())
    stride = (r.integer(), r.integer())
    pad = (r.integer(), r.integer())
    k, s = spec.args
    if size != (k, k) or (k and stride != (s, s)) or (k and pad != (0, 0)):
        raise DlibFormatError(f"{spec.kind} {size} stride {stride} pad {pad}; expected {k}x{k} stride {s}")
    return PoolLayer(kind=spec.kind.split("_")[0], size=size, stride=stride, pad=pad)


def _read_fc(r: DlibReader, spec: _Spec) -> FcLayer:
    r.expect_string("fc_2")
    n_out, n_in = r.integer(), r.integer()
    params = r.tensor().reshape(-1)
    wshape = r.alias_tensor()
    bshape = r.alias_tensor()
    bias_mode = r.integer()
    for _ in range(4):
        r.real()
    if n_out != spec.args[0]:
        raise DlibFormatError(f"fc has {n_out} outputs, expected {spec.args[0]}")
    if wshape[:2] != (n_in, n_out):
        raise DlibFormatError(f"fc weight alias {wshape} does not match {n_in}x{n_out}")
    has_bias = bias_mode == 0  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    expected = n_in * n_out + (n_out if has_bias else 0)
    if params.size != expected or (has_bias and int(np.prod(bshape)) != n_out):
        raise DlibFormatError(f"fc params hold {params.size} values, expected {expected}")
    weights = params[: n_in * n_out].reshape(n_in, n_out).copy()
    bias = params[n_in * n_out :].copy() if has_bias else None
    return FcLayer(weights=weights, bias=bias)


# ---------------------------------------------------------------------------------------------
# ONNX builder
# ---------------------------------------------------------------------------------------------
@dataclass
class _Value:
    name: str
    shape: tuple[int, int, int]  # (C, H, W); the batch axis is implicit


class _GraphBuilder:
    """Collects nodes and initializers with stable, sequential names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    def _name(self, prefix: str) -> str:
        i = self._counts.get(prefix, 0)
        self._counts[prefix] = i + 1
        return f"{prefix}{i}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, output: str | None = None, **attrs) -> str:
        name = self._name(prefix)
        out = output or name
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def _fold_affine(conv: ConvLayer, affine: AffineLayer | None) -> tuple[np.ndarray, np.ndarray]:
    """affine(conv(x)) = conv'(x) with W' = W*gamma[o], b' = b*gamma + beta (in float64)."""
    w = conv.weights.astype(np.float64)
    b = conv.bias.astype(np.float64)
    if affine is not None:
        g = affine.gamma.astype(np.float64)
        w = w * g[:, None, None, None]
        b = b * g + affine.beta.astype(np.float64)
    return w.astype(np.float32), b.astype(np.float32)


def _out_size(n: int, k: int, s: int, p: int) -> int:
    return 1 + (n + 2 * p - k) // s


def _pad_to(g: _GraphBuilder, v: _Value, shape: tuple[int, int, int]) -> _Value:
    """dlib's add_prev treats missing elements as zero: pad at the end of C, H and W."""
    if v.shape == shape:
        return v
    ends = [t - s for s, t in zip(v.shape, shape)]
    pads = np.array([0, 0, 0, 0, 0, *ends], dtype=np.int64)
    name = g.node("Pad", [v.name, g.const("pads", pads)], "pad", mode="constant")
    return _Value(name, shape)


def build_embedder_onnx(path: Path | str | None = None, net: DlibResNet | None = None) -> onnx.ModelProto:
    """The ResNet as an opset-17 ONNX model: `chips` [N,150,150,3] RGB 0-255 -> `descriptor` [N,128]."""
    net = net if net is not None else read_resnet(path)
    g = _GraphBuilder()

    # dlib's input layer: (x - mean) / 256, computed on NHWC, then one transpose to NCHW.
    mean = g.const("mean", net.input.mean.astype(np.float32))
    scale = g.const("scale", np.array([1.0 / 256.0], dtype=np.float32))
    x = g.node("Sub", [INPUT_NAME, mean], "sub")
    x = g.node("Mul", [x, scale], "mul")
    x = g.node("Transpose", [x], "transpose", perm=[0, 3, 1, 2])
    cur = _Value(x, (3, *net.input.size))

    tags: dict[int, _Value] = {}
    layers = net.layers
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, ConvLayer):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            affine = nxt if isinstance(nxt, AffineLayer) else None
            w, b = _fold_affine(layer, affine)
            if w.shape[1] != cur.shape[0]:
                raise DlibFormatError(f"conv expects {w.shape[1]} channels, gets {cur.shape[0]}")
            kh, kw = w.shape[2:]
            (sy, sx), (py, px) = layer.stride, layer.pad
            name = g.node(
                "Conv",
                [cur.name, g.const("conv_w", w), g.const("conv_b", b)],
                "conv",
                kernel_shape=[kh, kw],
                strides=[sy, sx],
                pads=[py, px, py, px],
            )
            cur = _Value(name, (w.shape[0], _out_size(cur.shape[1], kh, sy, py), _out_size(cur.shape[2], kw, sx, px)))
            if affine is not None:
                i += 1  # consumed by the fold
            if layer.relu:
                cur = _Value(g.node("Relu", [cur.name], "relu"), cur.shape)
        elif isinstance(layer, AffineLayer):
            # not after a conv (never in this network): a per-channel multiply-add
            c = cur.shape[0]
            gamma = g.const("affine_g", layer.gamma.reshape(c, 1, 1))
            beta = g.const("affine_b", layer.beta.reshape(c, 1, 1))
            cur = _Value(g.node("Add", [g.node("Mul", [cur.name, gamma], "mul"), beta], "add"), cur.shape)
        elif isinstance(layer, ReluLayer):
            cur = _Value(g.node("Relu", [cur.name], "relu"), cur.shape)
        elif isinstance(layer, PoolLayer):
            cur = _pool(g, cur, layer)
        elif isinstance(layer, TagLayer):
            tags[layer.tag] = cur
        elif isinstance(layer, SkipLayer):
            cur = tags[layer.tag]
        elif isinstance(layer, AddPrevLayer):
            prev = tags[layer.tag]
            shape = tuple(max(a, b) for a, b in zip(cur.shape, prev.shape))
            a, b = _pad_to(g, cur, shape), _pad_to(g, prev, shape)  # type: ignore[arg-type]
            cur = _Value(g.node("Add", [a.name, b.name], "add"), shape)  # type: ignore[arg-type]
        elif isinstance(layer, FcLayer):
            flat = g.node("Flatten", [cur.name], "flatten", axis=1)
            n_in, n_out = layer.weights.shape
            if n_in != int(np.prod(cur.shape)):
                raise DlibFormatError(f"fc expects {n_in} inputs, gets {cur.shape}")
            is_last = i == len(layers) - 1 and layer.bias is None
            out = g.node("MatMul", [flat, g.const("fc_w", layer.weights)], "matmul", OUTPUT_NAME if is_last else None)
            if layer.bias is not None:
                last = i == len(layers) - 1
                out = g.node("Add", [out, g.const("fc_b", layer.bias)], "add", OUTPUT_NAME if last else None)
            cur = _Value(out, (n_out, 1, 1))
        else:  # pragma: no cover - the reader produces only the types above
            raise TypeError(type(layer))
        i += 1

    if cur.name != OUTPUT_NAME or cur.shape[0] != DESCRIPTOR_SIZE:
        raise DlibFormatError(f"network does not end in a {DESCRIPTOR_SIZE}-d fc layer")

    return _finish_model(
        g, "dlib_resnet_face_descriptor",
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", CHIP_SIZE, CHIP_SIZE, 3]),
        helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", DESCRIPTOR_SIZE]),
        "dlib_face_recognition_resnet_model_v1 (CC0). Input: aligned 150x150 RGB chips, 0-255, NHWC. "
        "Output: 128-d descriptor, not normalised; same person if L2 distance < 0.6.",
    )


def _finish_model(g: _GraphBuilder, name: str, inp, out, doc: str, producer: str = PRODUCER_NAME) -> onnx.ModelProto:
    """The builder's nodes as one checked ONNX model (opset 17, fixed IR version: deterministic bytes)."""
    graph = helper.make_graph(g.nodes, name, [inp], [out], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer,
                              producer_version=PRODUCER_VERSION, ir_version=IR_VERSION, doc_string=doc)
    onnx.checker.check_model(model, full_check=True)
    return model


def _pool(g: _GraphBuilder, cur: _Value, layer: PoolLayer) -> _Value:
    c, h, w = cur.shape
    if layer.is_global:
        op = "GlobalMaxPool" if layer.kind == "max" else "GlobalAveragePool"
        return _Value(g.node(op, [cur.name], "pool"), (c, 1, 1))
    (kh, kw), (sy, sx), (py, px) = layer.size, layer.stride, layer.pad
    if (py, px) != (0, 0):
        # dlib's padded pooling does not match ONNX's defaults exactly; this network has none
        raise DlibFormatError("padded pooling is not supported")
    op = "MaxPool" if layer.kind == "max" else "AveragePool"
    name = g.node(op, [cur.name], "pool", kernel_shape=[kh, kw], strides=[sy, sx])
    return _Value(name, (c, _out_size(h, kh, sy, 0), _out_size(w, kw, sx, 0)))
