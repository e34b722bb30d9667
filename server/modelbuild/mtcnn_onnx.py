"""MTCNN P-Net, R-Net and O-Net as ONNX graphs, built from the `mtcnn` pip package's weights.

The weights (`mtcnn/assets/weights/{pnet,rnet,onet}.lz4`, joblib lists of float32 arrays in
Keras layout) are the original MTCNN weights, numerically identical to facenet-pytorch's.
Layer order follows `mtcnn/network/{pnet,rnet,onet}.py` (TensorFlow is not imported).

Graph contract (opset 17, all float32):

- Input ``image``: **NCHW** [N,3,H,W], RGB, raw pixel values 0-255 (the
  ``(x - 127.5) * 0.0078125`` normalisation is inside the graph). Batch is dynamic; P-Net also
  has dynamic H and W, R-Net expects 24x24 and O-Net 48x48. (NCHW because the detector's
  resampler produces planar data for free, and the convolutions want it.)
- ``face_detector_pnet`` outputs ``reg`` [N,4,H',W'] (box offsets) and ``prob`` [N,2,H',W']
  (softmax over channel 1: index 1 = face), H' = ceil((H-2)/2) - 4.
- ``face_detector_rnet`` outputs ``reg`` [N,4] and ``prob`` [N,2].
- ``face_detector_onet`` outputs ``reg`` [N,4], ``landmarks`` [N,10] (x1..x5, y1..y5, relative
  to the crop) and ``prob`` [N,2].

Keras specifics: ``padding="same"`` max-pools with stride 2 equal torch's ``ceil_mode=True``
here (no padding at the start, a partial window at the end); the spatial PReLUs (slopes [C,1,1])
are written as Relu(x) - slope * Relu(-x) with BatchNormalization scales: bit-identical to PRelu
and faster in ONNX Runtime's CPU provider (see _Graph.prelu); the ``Permute((2,1,3))``
before ``Flatten`` (a (W,H,C) flattening order) is folded into the rows of the first dense
layer, so the graph flattens NCHW directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import joblib
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.inference import names
from server.modelbuild.sources import mtcnn_weights_file

OPSET = 17
MODEL_NAMES = names.MTCNN_MODELS
INPUT_NAME = names.MTCNN_INPUT
REG, PROB, LANDMARKS = names.MTCNN_REG, names.MTCNN_PROB, names.MTCNN_LANDMARKS


@dataclass
class _Graph:
    """A tiny ONNX graph writer with deterministic names."""

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def conv(self, x: str, name: str, kernel_hwio: np.ndarray, bias: np.ndarray) -> str:
        w = self.const(f"{name}.weight", kernel_hwio.transpose(3, 2, 0, 1))  # HWIO -> OIHW
        b = self.const(f"{name}.bias", bias)
        kh, kw = kernel_hwio.shape[:2]
        return self.node("Conv", [x, w, b], name, kernel_shape=[kh, kw], strides=[1, 1], pads=[0, 0, 0, 0])

    def prelu(self, x: str, name: str, slope: np.ndarray) -> str:
        """Channel-wise PReLU of an NCHW tensor as Relu(x) + s * Relu(-x) with s = -slope.

        The negations and the per-channel scale are BatchNormalization nodes (mean 0, var 1,
        eps 0, so exactly a multiply) and ONNX Runtime turns BatchNormalization + Relu and the
        final Add into blocked (NCHWc) depthwise convolutions with fused activation and sum.
        The result is bit-identical to PRelu (one of the two terms is exactly zero) and faster end
        to end than a PRelu node (docs/benchmarks.md, MTCNN PReLU), whose [C,1,1]-broadcast CPU
        kernel is slow and forces layout reorders. Keras shared_axes=[1,2] slopes are (1,1,C).
        """
        c = slope.size
        pos = self.node("Relu", [x], f"{name}.pos")
        neg = self.node("Relu", [self.channel_scale(x, f"{name}.neg", -np.ones(c, np.float32))], f"{name}.relu_neg")
        scaled = self.channel_scale(neg, f"{name}.scaled", -slope.reshape(-1))
        return self.node("Add", [pos, scaled], name)

    def channel_scale(self, x: str, name: str, scale: np.ndarray) -> str:
        """x * scale[c] (NCHW) as an exact BatchNormalization: (x - 0) / sqrt(1 + 0) * scale + 0."""
        zeros, ones = np.zeros(scale.size, np.float32), np.ones(scale.size, np.float32)
        inputs = [x, self.const(f"{name}.scale", scale), self.const(f"{name}.bias", zeros)]
        inputs += [self.const(f"{name}.mean", zeros), self.const(f"{name}.var", ones)]
        return self.node("BatchNormalization", inputs, name, epsilon=0.0)

    def dense_prelu(self, x: str, name: str, slope: np.ndarray) -> str:
        return self.node("PRelu", [x, self.const(f"{name}.slope", slope.reshape(-1))], name)

    def conv_prelu(self, x: str, name: str, kernel_hwio: np.ndarray, bias: np.ndarray, slope: np.ndarray) -> str:
        return self.prelu(self.conv(x, name, kernel_hwio, bias), name.replace("conv", "prelu"), slope)

    def maxpool(self, x: str, name: str, size: int, same: bool) -> str:
        return self.node(
            "MaxPool", [x], name, kernel_shape=[size, size], strides=[2, 2], pads=[0, 0, 0, 0], ceil_mode=int(same)
        )

    def dense(self, x: str, name: str, kernel: np.ndarray, bias: np.ndarray) -> str:
        return self.node("Gemm", [x, self.const(f"{name}.weight", kernel), self.const(f"{name}.bias", bias)], name)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="face-server-mtcnn",
            producer_version="1",
        )
        model.ir_version = 8  # readable by every onnxruntime >= 1.10
        model.doc_string = "MTCNN (original weights via the mtcnn pip package); input NCHW RGB 0-255"
        onnx.checker.check_model(model, full_check=True)
        return model


def _prologue(g: _Graph) -> str:
    """(x - 127.5) * 0.0078125 on the 0-255 input, exactly as facenet-pytorch's detect_face."""
    x = g.node("Sub", [INPUT_NAME, g.const("mean", np.array(127.5, np.float32))], "centred")
    return g.node("Mul", [x, g.const("scale", np.array(0.0078125, np.float32))], "normalised")


def _fold_permute(kernel: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """Reorder dense rows from Keras' (W,H,C) flattening to ONNX's NCHW (C,H,W) flattening."""
    k = kernel.reshape(w, h, c, -1)  # Permute((2,1,3)) then Flatten: index = (w*H + h)*C + c
    return k.transpose(2, 1, 0, 3).reshape(c * h * w, -1)


def _image_input(h: int | str, w: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, h, w])


def _out(name: str, *dims: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *dims])


def _weights(net: str) -> list[np.ndarray]:
    arrays = joblib.load(mtcnn_weights_file(net))
    return [np.asarray(a, dtype=np.float32) for a in arrays]


def build_pnet() -> onnx.ModelProto:
    w = _weights("pnet")
    g = _Graph("mtcnn_pnet")
    x = _prologue(g)
    x = g.conv_prelu(x, "conv1", w[0], w[1], w[2])
    x = g.maxpool(x, "pool1", 2, same=True)
    x = g.conv_prelu(x, "conv2", w[3], w[4], w[5])
    x = g.conv_prelu(x, "conv3", w[6], w[7], w[8])
    g.conv(x, REG, w[9], w[10])
    g.node("Softmax", [g.conv(x, "conv4_2", w[11], w[12])], PROB, axis=1)
    return g.model([_image_input("H", "W")], [_out(REG, 4, "Ho", "Wo"), _out(PROB, 2, "Ho", "Wo")])


def build_rnet() -> onnx.ModelProto:
    w = _weights("rnet")
    g = _Graph("mtcnn_rnet")
    x = _prologue(g)
    x = g.conv_prelu(x, "conv1", w[0], w[1], w[2])
    x = g.maxpool(x, "pool1", 3, same=True)  # 22 -> 11
    x = g.conv_prelu(x, "conv2", w[3], w[4], w[5])
    x = g.maxpool(x, "pool2", 3, same=False)  # 9 -> 4
    x = g.conv_prelu(x, "conv3", w[6], w[7], w[8])  # 64 x 3 x 3
    x = g.node("Flatten", [x], "flat", axis=1)
    x = g.dense(x, "fc4", _fold_permute(w[9], 64, 3, 3), w[10])
    x = g.dense_prelu(x, "prelu4", w[11])
    g.dense(x, REG, w[12], w[13])
    g.node("Softmax", [g.dense(x, "fc5_2", w[14], w[15])], PROB, axis=1)
    return g.model([_image_input(24, 24)], [_out(REG, 4), _out(PROB, 2)])


def build_onet() -> onnx.ModelProto:
    w = _weights("onet")
    g = _Graph("mtcnn_onet")
    x = _prologue(g)
    x = g.conv_prelu(x, "conv1", w[0], w[1], w[2])
    x = g.maxpool(x, "pool1", 3, same=True)  # 46 -> 23
    x = g.conv_prelu(x, "conv2", w[3], w[4], w[5])
    x = g.maxpool(x, "pool2", 3, same=False)  # 21 -> 10
    x = g.conv_prelu(x, "conv3", w[6], w[7], w[8])
    x = g.maxpool(x, "pool3", 2, same=True)  # 8 -> 4
    x = g.conv_prelu(x, "conv4", w[9], w[10], w[11])  # 128 x 3 x 3
    x = g.node("Flatten", [x], "flat", axis=1)
    x = g.dense(x, "fc5", _fold_permute(w[12], 128, 3, 3), w[13])
    x = g.dense_prelu(x, "prelu5", w[14])
    g.dense(x, REG, w[15], w[16])
    g.dense(x, LANDMARKS, w[17], w[18])
    g.node("Softmax", [g.dense(x, "fc6_3", w[19], w[20])], PROB, axis=1)
    return g.model([_image_input(48, 48)], [_out(REG, 4), _out(LANDMARKS, 10), _out(PROB, 2)])


def build_mtcnn_onnx() -> dict[str, onnx.ModelProto]:
    """The three MTCNN stages keyed by their model-repository names."""
    return {names.PNET: build_pnet(), names.RNET: build_rnet(), names.ONET: build_onet()}
