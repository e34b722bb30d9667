"""MTCNN ONNX conversion (server/modelbuild/mtcnn_onnx.py) and the detection cascade (server/vision/mtcnn.py).

Uses the real weights of the `mtcnn` pip package, converted by our builder into a temporary model
repository and run with ONNX Runtime. Reference numbers are facenet-pytorch's (../shared/docs/models.md §3).
Its numeric building blocks (area resampling, NMS) are tests/unit/test_mtcnn_blocks.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import joblib
import numpy as np
import onnx
import pytest

from benchmarks.pipeline import iou
from server.inference.onnxruntime import OnnxRuntimeBackend
from server.modelbuild.mtcnn_onnx import MODEL_NAMES, build_mtcnn_onnx
from server.modelbuild.sources import mtcnn_weights_file
from server.vision.mtcnn import MtcnnDetector
from server.vision.types import Detections

FACEDATA = Path(__file__).resolve().parents[2].parent / "shared" / "facedata" / "dev"

ASTRONAUT_BOX = np.array([181.05, 62.16, 267.75, 172.05])
ASTRONAUT_PROB = 0.99999774
ASTRONAUT_LANDMARKS = np.array([[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]])


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    return build_mtcnn_onnx()


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mtcnn_repo")
    for name, model in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(model.SerializeToString(deterministic=True))
    return root


@pytest.fixture(scope="module")
def backend(repo):
    b = OnnxRuntimeBackend(repo)
    yield b
    b.close()


@pytest.fixture(scope="module")
def detector(backend) -> MtcnnDetector:
    return MtcnnDetector(backend)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skdata.astronaut())


@pytest.fixture(scope="module")
def facedata() -> Path:
    if not FACEDATA.is_dir():
        pytest.skip(f"dev photos not found at {FACEDATA} (shared/ is not next to this checkout)")
    return FACEDATA


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class RecordingBackend:
    """Passes every call to the real backend and records (model, batch size, input shape)."""

    name = "recording"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def run(self, model, inputs):
        assert list(inputs) == ["image"]
        self.calls.append((model, inputs["image"].shape))
        return self.inner.run(model, inputs)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- the ONNX graphs
def test_build_is_deterministic_and_valid(models):
    assert set(models) == set(MODEL_NAMES)
    again = build_mtcnn_onnx()
    for name, model in models.items():
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 17
        assert model.SerializeToString(deterministic=True) == again[name].SerializeToString(deterministic=True)
        (inp,) = model.graph.input
        assert inp.name == "image"
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert dims[0] == "N" and dims[1] == 3  # NCHW
    assert [o.name for o in models["face_detector_pnet"].graph.output] == ["reg", "prob"]
    assert [o.name for o in models["face_detector_rnet"].graph.output] == ["reg", "prob"]
    assert [o.name for o in models["face_detector_onet"].graph.output] == ["reg", "landmarks", "prob"]
    pnet_dims = [d.dim_param or d.dim_value for d in models["face_detector_pnet"].graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(pnet_dims[2], str) and isinstance(pnet_dims[3], str)  # dynamic H and W


# A float64 numpy implementation of the Keras networks (mtcnn/network/*.py semantics, NHWC),
# written independently of the ONNX graphs: 'same' pools pad with -inf the TensorFlow way,
# Permute((2,1,3)) + Flatten is done literally.
def _k_conv(x, k, b):
    win = np.lib.stride_tricks.sliding_window_view(x, k.shape[:2], axis=(1, 2))  # N,H',W',C,kh,kw
    return np.einsum("nhwcij,ijco->nhwo", win, k.astype(np.float64)) + b


def _k_prelu(x, a):
    return np.where(x > 0, x, a.reshape(-1) * x)


def _k_pool(x, k, same):
    n, h, w, c = x.shape
    if same:
        oh, ow = -(-h // 2), -(-w // 2)
        ph, pw = max((oh - 1) * 2 + k - h, 0), max((ow - 1) * 2 + k - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::2, ::2]
    return win.max(axis=(4, 5))


def _k_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _keras_forward(net: str, image: np.ndarray) -> dict[str, np.ndarray]:
    w = joblib.load(mtcnn_weights_file(net))
    x = (image.astype(np.float64) - 127.5) * 0.0078125
    x = _k_prelu(_k_conv(x, w[0], w[1]), w[2])
    x = _k_pool(x, 2 if net == "pnet" else 3, same=True)
    x = _k_prelu(_k_conv(x, w[3], w[4]), w[5])
    if net == "pnet":
        x = _k_prelu(_k_conv(x, w[6], w[7]), w[8])
        return {"reg": _k_conv(x, w[9], w[10]), "prob": _k_softmax(_k_conv(x, w[11], w[12]))}
    x = _k_pool(x, 3, same=False)
    x = _k_prelu(_k_conv(x, w[6], w[7]), w[8])
    i = 9
    if net == "onet":
        x = _k_pool(x, 2, same=True)
        x = _k_prelu(_k_conv(x, w[9], w[10]), w[11])
        i = 12
    x = x.transpose(0, 2, 1, 3).reshape(len(x), -1)  # Permute((2, 1, 3)), Flatten
    x = _k_prelu(x @ w[i] + w[i + 1], w[i + 2])
    out = {"reg": x @ w[i + 3] + w[i + 4]}
    if net == "onet":
        out["landmarks"] = x @ w[i + 5] + w[i + 6]
    out["prob"] = _k_softmax(x @ w[-2] + w[-1])
    return out


@pytest.mark.parametrize(
    "net,shape", [("pnet", (2, 37, 52, 3)), ("pnet", (1, 12, 12, 3)), ("rnet", (5, 24, 24, 3)), ("onet", (4, 48, 48, 3))]
)
def test_each_net_matches_a_numpy_keras_reference(backend, net, shape):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=shape).astype(np.float32)  # NHWC, as Keras takes it
    got = backend.run(f"face_detector_{net}", {"image": image.transpose(0, 3, 1, 2)})
    want = _keras_forward(net, image)
    assert set(got) == set(want)
    for name, ref in want.items():
        out = got[name]
        if net == "pnet":
            out = out.transpose(0, 2, 3, 1)  # the graph is NCHW, Keras NHWC
        assert out.shape == ref.shape, name
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=f"{net}.{name}")
    np.testing.assert_allclose(got["prob"].sum(axis=1), 1.0, atol=1e-5)


def test_pnet_output_size(backend):
    out = backend.run("face_detector_pnet", {"image": np.full((1, 3, 50, 61), 128, np.float32)})
    assert out["prob"].shape == (1, 2, 20, 26) and out["reg"].shape == (1, 4, 20, 26)


# ---------------------------------------------------------------------------- the cascade
def test_astronaut_matches_facenet_pytorch(detector, astronaut):
    det = detector.detect(astronaut)
    assert isinstance(det, Detections) and len(det) == 1
    assert det.boxes.dtype == det.probs.dtype == det.landmarks.dtype == np.float32
    assert det.boxes.shape == (1, 4) and det.landmarks.shape == (1, 5, 2)
    np.testing.assert_allclose(det.boxes[0], ASTRONAUT_BOX, atol=0.5)
    assert abs(float(det.probs[0]) - ASTRONAUT_PROB) < 1e-5
    np.testing.assert_allclose(det.landmarks[0], ASTRONAUT_LANDMARKS, atol=0.5)


def test_large_image_is_downscaled_and_mapped_back(detector, astronaut):
    big = cv2.resize(astronaut, (1536, 1536), interpolation=cv2.INTER_CUBIC)
    det = detector.detect(big)
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes[0] / 3.0, ASTRONAUT_BOX, atol=3.0)
    np.testing.assert_allclose(det.landmarks[0] / 3.0, ASTRONAUT_LANDMARKS, atol=3.0)
    # Exactly what detecting on the 640-px image (INTER_AREA, as documented) gives, scaled by 1536/640.
    small = detector.detect(cv2.resize(big, (640, 640), interpolation=cv2.INTER_AREA))
    np.testing.assert_allclose(det.boxes, small.boxes * 2.4, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(det.landmarks, small.landmarks * 2.4, rtol=1e-6, atol=1e-3)
    np.testing.assert_array_equal(det.probs, small.probs)


def test_non_square_downscale_maps_each_axis(detector, astronaut):
    wide = cv2.resize(astronaut, (1300, 650), interpolation=cv2.INTER_CUBIC)  # detected at 640 x 320
    det = detector.detect(wide)
    small = detector.detect(cv2.resize(wide, (640, 320), interpolation=cv2.INTER_AREA))
    assert len(det) == len(small) >= 1
    np.testing.assert_allclose(det.boxes, small.boxes * np.float32([1300 / 640, 650 / 320] * 2), rtol=1e-5, atol=1e-3)


def test_detect_batch_equals_detect_and_batches_calls(backend, astronaut):
    images = [
        astronaut,
        np.ascontiguousarray(astronaut[:, ::-1]),  # same size: shares every P-Net level with the first
        np.ascontiguousarray(astronaut[40:400, 100:500]),
        cv2.resize(astronaut, (300, 200), interpolation=cv2.INTER_AREA),
        np.zeros((100, 120, 3), np.uint8),
    ]
    rec = RecordingBackend(backend)
    det = MtcnnDetector(rec)
    singles = [det.detect(img) for img in images]
    rec.calls.clear()
    batch = det.detect_batch(images)
    assert len(batch) == len(images)
    for one, many in zip(singles, batch):
        assert len(one) == len(many)
        np.testing.assert_allclose(many.boxes, one.boxes, atol=1e-3)
        np.testing.assert_allclose(many.probs, one.probs, atol=1e-5)
        np.testing.assert_allclose(many.landmarks, one.landmarks, atol=1e-3)
    assert sum(len(d) for d in batch) >= 3  # the astronaut is found in the first four
    by_model = [m for m, _ in rec.calls]
    assert by_model.count("face_detector_rnet") == 1 and by_model.count("face_detector_onet") == 1
    pnet_shapes = [s[2:4] for m, s in rec.calls if m == "face_detector_pnet"]
    assert len(pnet_shapes) == len(set(pnet_shapes))  # one call per distinct level size
    assert any(s[0] == 2 for m, s in rec.calls if m == "face_detector_pnet")


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 5, 3), (11, 40, 3), (480, 640, 3)])
def test_tiny_and_blank_images_have_no_faces(detector, shape):
    det = detector.detect(np.zeros(shape, np.uint8))
    assert len(det) == 0
    assert det.boxes.shape == (0, 4) and det.probs.shape == (0,) and det.landmarks.shape == (0, 5, 2)
    assert detector.detect_batch([]) == []


def test_rejects_bad_input(detector, backend):
    with pytest.raises(ValueError):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError):
        MtcnnDetector(backend, max_side=10_000)


# ---------------------------------------------------------------------------- real photos
def test_multi_face_photos_find_every_labelled_face(detector, facedata):
    gt = json.loads((facedata / "detection_gt.json").read_text())
    # dlib's hand-labelled PASCAL VOC group photos (tight boxes: match at IoU >= 0.3).
    names = [k for k, v in gt.items() if v.get("boxes") and "pascal_voc" in v.get("tags", []) and len(v["boxes"]) >= 3]
    if not names:
        pytest.skip("no labelled multi-face photo in detection_gt.json")
    for name in names:
        truth = np.asarray(gt[name]["boxes"], np.float64)
        det = detector.detect(_read_rgb(facedata / name))
        found = det.boxes[det.probs > 0.85]
        matched = (iou(truth, found).max(axis=1) >= 0.3).sum() if len(found) else 0
        assert matched >= len(truth), f"{name}: {matched} of {len(truth)} faces found"


def test_zero_face_photos_false_positive_rate(detector, facedata, record_property):
    gt = json.loads((facedata / "detection_gt.json").read_text())
    names = [k for k, v in gt.items() if v.get("face_count") == 0]
    if not names:
        pytest.skip("no zero-face photo in detection_gt.json")
    images = [_read_rgb(facedata / n) for n in names]
    results = detector.detect_batch(images)
    with_fp = [n for n, d in zip(names, results) if (d.probs > 0.85).any()]
    rate = len(with_fp) / len(names)
    record_property("zero_face_fp_rate", rate)
    print(f"\nzero-face images with a face above p=0.85: {len(with_fp)}/{len(names)} {with_fp}")
    assert rate <= 0.15
