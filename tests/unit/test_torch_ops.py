"""The torch backend's ONNX operators (server/inference/onnx_torch.py) on tiny graphs, against
onnxruntime: Resize, Cast / Reshape / Sigmoid, pads, and the errors that name an unsupported operator
or attribute. The real models through it are tests/integration/test_torch_backend.py."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.inference import BackendError

torch = pytest.importorskip("torch", reason="PyTorch is not installed (./dev.sh test installs torch==2.13.0)")

from server.inference.torch import TorchBackend  # noqa: E402


def test_unsupported_operator_is_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="s")], "g", [x], [y]))
    (tmp_path / "odd" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "odd" / "1" / "model.onnx"))
    with pytest.raises(BackendError, match="'Erf'"):
        TorchBackend(tmp_path, device="cpu").run("odd", {"x": np.zeros((1, 4), np.float32)})


def _save(tmp_path, name: str, nodes, inputs, inits=()) -> None:
    graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / name / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / name / "1" / "model.onnx"))


_RESIZE_MODES = [(t, r) for t in ("asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners")
                 for r in ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")]


@pytest.mark.parametrize("transform,rounding", _RESIZE_MODES)
def test_resize_nearest_matches_onnxruntime(tmp_path, transform, rounding):
    """Resize (nearest) as ONNX defines it, checked against onnxruntime: YuNet's 2x asymmetric floor
    upsampling and the other coordinate transformations and rounding rules, with scales (up, down,
    fractional: exact halves occur) and with sizes."""
    from server.inference.onnxruntime import OnnxRuntimeBackend

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"])
    attrs = {"mode": "nearest", "coordinate_transformation_mode": transform, "nearest_mode": rounding}
    variants = {
        "up2": ([1, 1, 2, 2], None), "down": ([1, 1, 0.5, 0.75], None), "odd": ([1, 1, 1.5, 2.5], None),
        "third": ([1, 1, 1 / 3, 3.0], None), "sizes": (None, [2, 3, 7, 4]),
    }
    rng = np.random.default_rng(11)
    for label, (scales, sizes) in variants.items():
        name = f"resize_{label}"
        inits = [helper.make_tensor("roi", TensorProto.FLOAT, [0], [])]
        if scales is not None:
            inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [4], scales))
            ins = ["x", "roi", "scales"]
        else:
            inits += [helper.make_tensor("scales", TensorProto.FLOAT, [0], []),
                      helper.make_tensor("sizes", TensorProto.INT64, [4], sizes)]
            ins = ["x", "roi", "scales", "sizes"]
        _save(tmp_path, name, [helper.make_node("Resize", ins, ["y"], **attrs)], [x], inits)
    ours, ref = TorchBackend(tmp_path, device="cpu"), OnnxRuntimeBackend(tmp_path)
    for label, (scales, sizes) in variants.items():
        for shape in ((1, 2, 5, 6), (2, 3, 7, 4), (1, 1, 1, 9)):
            if sizes is not None and shape[:2] != tuple(sizes[:2]):
                continue
            feed = {"x": rng.normal(size=shape).astype(np.float32)}
            want, got = ref.run(f"resize_{label}", feed)["y"], ours.run(f"resize_{label}", feed)["y"]
            assert got.shape == want.shape, (label, shape)
            np.testing.assert_array_equal(got, want, err_msg=f"{label} {shape}")


def test_cast_reshape_sigmoid_match_onnxruntime(tmp_path):
    """uint8 -> float Cast (YuNet's input), float -> int truncation, Reshape's 0 (copy the input's
    dimension) and -1, Sigmoid: against onnxruntime."""
    from server.inference.onnxruntime import OnnxRuntimeBackend

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", "H", "W", 3])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, -1, 3])
    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["f", "shape"], ["r"]),
             helper.make_node("Sigmoid", ["r"], ["y"])]
    _save(tmp_path, "crs", nodes, [x], [shape])
    v = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    trunc = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
             helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)]
    _save(tmp_path, "trunc", trunc, [v])
    ours, ref = TorchBackend(tmp_path, device="cpu"), OnnxRuntimeBackend(tmp_path)
    rng = np.random.default_rng(4)
    for n, h, w in ((1, 4, 5), (3, 2, 7)):
        feed = {"x": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)}
        want, got = ref.run("crs", feed)["y"], ours.run("crs", feed)["y"]
        assert got.shape == want.shape == (n, h * w, 3)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    feed = {"x": np.array([[-2.7, -0.5, 0.5, 2.7], [1e3, -1e3, 0.0, 3.999]], np.float32)}
    np.testing.assert_array_equal(ours.run("trunc", feed)["y"], ref.run("trunc", feed)["y"])


@pytest.mark.parametrize("op,attrs,inits,match", [
    ("Resize", {"mode": "linear"}, ("scales",), "Resize mode 'linear'"),
    ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "tf_crop_and_resize"}, ("scales",),
     "coordinate_transformation_mode 'tf_crop_and_resize'"),
    ("Resize", {"mode": "nearest", "exclude_outside": 1}, ("scales",), "exclude_outside=1"),
    ("Resize", {"mode": "nearest"}, (), "exactly one of constant scales or constant sizes"),
    ("Cast", {"to": TensorProto.STRING}, (), "Cast to STRING"),
    ("Reshape", {"allowzero": 2}, ("shape",), "allowzero=2"),
])
def test_unsupported_attributes_are_named(tmp_path, op, attrs, inits, match):
    consts = {"scales": helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]),
              "shape": helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])}
    ins = {"Resize": ["x", "", "scales" if "scales" in inits else ""], "Cast": ["x"], "Reshape": ["x", "shape"]}[op]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])
    graph = helper.make_graph([helper.make_node(op, ins, ["y"], name="n", **attrs)], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [consts[k] for k in inits])
    (tmp_path / "odd" / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "odd" / "1" / "model.onnx"))
    with pytest.raises(BackendError, match=match):
        TorchBackend(tmp_path, device="cpu").run("odd", {"x": np.zeros((1, 1, 2, 2), np.float32)})


def test_asymmetric_pads_and_pad_operator(tmp_path):
    """Conv and pools with begin != end pads (ceil mode included) and Pad's begin/end order:
    checked against onnxruntime."""
    from server.inference.onnxruntime import OnnxRuntimeBackend

    rng = np.random.default_rng(5)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 3, 3], rng.normal(size=54).astype(np.float32))
    pads = helper.make_tensor("p", TensorProto.INT64, [8], [0, 0, 1, 0, 0, 0, 2, 3])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[0, 1, 2, 0], strides=[2, 1]),
             helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[3, 3], pads=[1, 0, 0, 2], strides=[2, 2],
                              ceil_mode=1),
             helper.make_node("Pad", ["m", "p"], ["q"], mode="constant"),
             helper.make_node("AveragePool", ["q"], ["y"], kernel_shape=[2, 3], pads=[0, 1, 1, 0], strides=[2, 2],
                              ceil_mode=1, count_include_pad=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, pads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "pads" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "pads" / "1" / "model.onnx"))
    ours, ref = TorchBackend(tmp_path, device="cpu"), OnnxRuntimeBackend(tmp_path)
    for shape in ((1, 3, 11, 9), (2, 3, 16, 15), (1, 3, 20, 21)):
        x = {"x": rng.normal(size=shape).astype(np.float32)}
        want, got = ref.run("pads", x)["y"], ours.run("pads", x)["y"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
