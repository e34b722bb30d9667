"""dlib's CNN MMOD face detector (`mmod_human_face_detector.dat`) -> ONNX.

The network (dlib's `tools/python/src/cnn_face_detector.cpp`):

    loss_mmod< con<1,9,9,1,1, rcon5<rcon5<rcon5< downsampler< input_rgb_image_pyramid<pyramid_down<6>> >>>> >>
    downsampler = 3x (con 5x5 stride 2 -> affine -> relu) with 16, 32, 32 filters
    rcon5       = con 45 5x5 stride 1 -> affine -> relu

The affine layers are stored as `bn_con2` records and folded into the convolutions. The ONNX
model is fully convolutional: it takes the tiled pyramid image that dlib's input layer would
build (see server/vision/mmod.py, which also owns the loss layer's decoding and NMS) as raw
RGB 0-255 and does the input layer's `(x - mean) / 256` itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from server.modelbuild.dlib_format import DlibFormatError, DlibReader
from server.modelbuild.dlib_resnet import (
    AffineLayer,
    ConvLayer,
    _con,
    _expect_version,
    _finish_model,
    _fold_affine,
    _GraphBuilder,
    _read_add_layer_tail,
    _read_affine,
    _read_con,
)
from server.inference import names
from server.modelbuild.sources import MMOD_DAT, dlib_model_file

MODEL_NAME = names.MMOD
INPUT_NAME = names.MMOD_INPUT
OUTPUT_NAME = names.MMOD_OUTPUT
PRODUCER_NAME = "face-server.dlib_mmod"

# (filters, kernel, stride) of each convolution, forward order; all but the last are followed by
# affine + relu. dlib's default padding applies: 0 for stride 2, kernel // 2 for stride 1.
_CONVS: tuple[tuple[int, int, int], ...] = (
    (16, 5, 2), (32, 5, 2), (32, 5, 2), (45, 5, 1), (45, 5, 1), (45, 5, 1), (1, 9, 1),
)


@dataclass(frozen=True)
class MmodOptions:
    """The parts of dlib's mmod_options that matter at detection time."""

    windows: tuple[tuple[int, int], ...]  # detector windows (width, height)
    nms_iou: float  # test_box_overlap(iou, percent_covered) used for non-max suppression
    nms_covered: float


@dataclass(frozen=True)
class PyramidInput:
    """input_rgb_image_pyramid<pyramid_down<N>>."""

    mean: np.ndarray  # (3,) float32 RGB means; the layer computes (x - mean) / 256
    downsample: int  # N of pyramid_down<N>: each level is (N-1)/N of the previous one
    padding: int  # between pyramid levels
    outer_padding: int  # around the whole tiled image


@dataclass
class DlibMmod:
    options: MmodOptions
    input: PyramidInput
    convs: list[tuple[ConvLayer, AffineLayer | None]] = field(default_factory=list)

    def output_to_input(self) -> tuple[int, int]:
        """(scale, offset): output point p maps to input point p*scale + offset (dlib's map_output_to_input)."""
        scale, offset = 1, 0
        for conv, _ in reversed(self.convs):  # from the output back to the input
            (sy, sx), (py, px) = conv.stride, conv.pad
            k = conv.weights.shape[3]
            if (sy, py) != (sx, px) or conv.weights.shape[2] != k:
                raise DlibFormatError("non-square convolutions are not supported")
            # p_in = p_out * s - pad + k // 2
            offset = offset * sx - px + k // 2
            scale *= sx
        return scale, offset


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------
def read_mmod(path: Path | str | None = None) -> DlibMmod:
    """Parse the .dat file; raises DlibFormatError if it is not this exact network."""
    path = Path(path) if path is not None else dlib_model_file(MMOD_DAT)
    return parse_mmod(DlibReader.from_file(path))


def parse_mmod(r: DlibReader) -> DlibMmod:
    _expect_version(r, (1,), "add_loss_layer")
    r.expect_string("loss_mmod_")
    options = _read_options(r)

    # Wrapper versions outermost -> innermost; the innermost (con over the input) is v2 or v3.
    n_layers = sum(3 for _ in _CONVS) - 2  # conv + affine + relu each, except the last conv
    versions = [_expect_version(r, (1, 2), f"add_layer #{i}") for i in range(n_layers - 1)]
    versions.append(_expect_version(r, (2, 3), "input add_layer"))
    versions.reverse()  # forward order

    pyramid = _read_input(r)
    convs: list[tuple[ConvLayer, AffineLayer | None]] = []
    v = iter(versions)
    first = True
    for i, (n, k, stride) in enumerate(_CONVS):
        conv = _read_con(r, _con(n, k, stride))
        _read_add_layer_tail(r, next(v), first)
        first = False
        affine = None
        if i < len(_CONVS) - 1:
            affine = _read_affine(r)
            _read_add_layer_tail(r, next(v), False)
            if r.expect_string("relu_", "relu_2") == "relu_2" and r.boolean():
                raise DlibFormatError("disabled relu layers are not supported")
            _read_add_layer_tail(r, next(v), False)
            if conv.relu:
                raise DlibFormatError("a con layer with a fused relu before its affine layer")
            if affine.gamma.size != n:
                raise DlibFormatError(f"affine layer has {affine.gamma.size} channels, expected {n}")
        convs.append((conv, affine))
    if not r.at_end():
        raise DlibFormatError(f"{len(r.data) - r.pos} unexpected trailing bytes at byte {r.pos}")
    if convs[0][0].weights.shape[1] != 3:
        raise DlibFormatError(f"first conv takes {convs[0][0].weights.shape[1]} channels, expected 3")
    for (prev, _), (conv, _) in zip(convs, convs[1:]):
        if conv.weights.shape[1] != prev.weights.shape[0]:
            raise DlibFormatError("conv channel counts do not chain")
    if len(options.windows) != convs[-1][0].weights.shape[0]:
        raise DlibFormatError(f"{len(options.windows)} detector windows but {convs[-1][0].weights.shape[0]} outputs")
    return DlibMmod(options=options, input=pyramid, convs=convs)


def _read_options(r: DlibReader) -> MmodOptions:
    version = _expect_version(r, (1, 2, 3, 4), "mmod_options")
    if version == 1:
        windows = [(r.integer(), r.integer())]
    else:
        windows = []
        for _ in range(_count(r, "detector windows")):
            window_version = _expect_version(r, (1, 2), "detector_window_details")
            w, h = r.integer(), r.integer()
            if window_version == 2:
                r.string()  # label; unused: one face class
            windows.append((w, h))
    r.real()  # loss_per_false_alarm
    r.real()  # loss_per_missed_target
    r.real()  # truth_match_iou_threshold
    nms_iou, nms_covered = r.real(), r.real()
    r.real()  # overlaps_ignore
    r.real()
    if version >= 3:
        r.raw(1)  # assume_image_pyramid: uint8_t is a char type, serialized as one raw byte
    if version >= 4 and r.boolean():
        raise DlibFormatError("bounding box regression is not supported")
    if version >= 4:
        r.real()  # bbr_lambda
    if len(windows) != 1 or min(windows[0]) <= 0:
        raise DlibFormatError(f"expected one detector window, found {windows}")
    if not (0 <= nms_iou <= 1 and 0 <= nms_covered <= 1):
        raise DlibFormatError(f"bad NMS thresholds {nms_iou}, {nms_covered}")
    return MmodOptions(windows=tuple(windows), nms_iou=nms_iou, nms_covered=nms_covered)


def _count(r: DlibReader, what: str) -> int:
    n = r.integer()
    if not 0 <= n <= 1000:
        raise DlibFormatError(f"implausible count {n} of {what} at byte {r.pos}")
    return n


def _read_input(r: DlibReader) -> PyramidInput:
    version = r.expect_string("input_rgb_image_pyramid2", "input_rgb_image_pyramid")
    mean = np.array([r.real(), r.real(), r.real()], dtype=np.float32)
    padding, outer = (r.integer(), r.integer()) if version == "input_rgb_image_pyramid2" else (10, 11)
    if not (0 <= padding <= 1000 and 0 <= outer <= 1000):
        raise DlibFormatError(f"bad pyramid padding {padding} / {outer}")
    if not np.all(np.isfinite(mean)):
        raise DlibFormatError("non-finite input means")
    # The pyramid type is a template argument and leaves no trace in the file: the python
    # binding (the only user of this file) declares pyramid_down<6>.
    return PyramidInput(mean=mean, downsample=6, padding=padding, outer_padding=outer)


# ---------------------------------------------------------------------------------------------
# ONNX builder
# ---------------------------------------------------------------------------------------------
def build_mmod_onnx(path: Path | str | None = None, net: DlibMmod | None = None) -> onnx.ModelProto:
    """`image` [N,3,H,W] RGB 0-255 (the tiled pyramid) -> `score` [N,1,h,w] (positive = face)."""
    net = net if net is not None else read_mmod(path)
    g = _GraphBuilder()
    mean = g.const("mean", net.input.mean.reshape(1, 3, 1, 1))
    scale = g.const("scale", np.array([1.0 / 256.0], dtype=np.float32))  # exact: a power of two
    x = g.node("Mul", [g.node("Sub", [INPUT_NAME, mean], "sub"), scale], "mul")
    for i, (conv, affine) in enumerate(net.convs):
        w, b = _fold_affine(conv, affine)
        kh, kw = w.shape[2:]
        (sy, sx), (py, px) = conv.stride, conv.pad
        last = i == len(net.convs) - 1
        x = g.node(
            "Conv",
            [x, g.const("conv_w", w), g.const("conv_b", b)],
            "conv",
            OUTPUT_NAME if last and affine is None else None,
            kernel_shape=[int(kh), int(kw)],
            strides=[sy, sx],
            pads=[py, px, py, px],
        )
        if affine is not None:
            x = g.node("Relu", [x], "relu", OUTPUT_NAME if last else None)
    return _finish_model(
        g, "dlib_mmod_human_face_detector",
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, "H", "W"]),
        helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1, "Ho", "Wo"]),
        "dlib mmod_human_face_detector (CC0). Input: dlib's tiled image pyramid, NCHW RGB 0-255 "
        "(padding = the input means). Output: detection score per 8x8 cell; > 0 is a face.",
        producer=PRODUCER_NAME,
    )

