"""dlib CNN MMOD detector: .dat parsing, the ONNX model and parity with real dlib.

tests/data/dlib_mmod_reference.json holds dlib 20.0.1's own detections (upsample 1), written by
tests/tools/make_mmod_reference.py with the real dlib in a scratch virtualenv.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.inference.onnxruntime import OnnxRuntimeBackend
from benchmarks.pipeline import iou
from server.vision.decode import decode_image
from server.modelbuild import repository
from server.modelbuild.dlib_format import DlibFormatError, DlibReader
from server.modelbuild.dlib_mmod import MODEL_NAME, build_mmod_onnx, parse_mmod, read_mmod
from server.modelbuild.sources import MMOD_DAT, dlib_model_file
from server.vision import mmod
from server.vision.mmod import MmodDetector

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "facedata" / "dev"
REFERENCE = json.loads((ROOT / "tests" / "data" / "dlib_mmod_reference.json").read_text())
ASTRONAUT = "skimage:astronaut"
SCORE_TOL = 1e-4  # measured: <= 2e-6 (the folded batch-norm and ORT's conv summation order)


@pytest.fixture(scope="module")
def net():
    return read_mmod()


@pytest.fixture(scope="module")
def detector(tmp_path_factory, net) -> MmodDetector:
    out = tmp_path_factory.mktemp("mmod_repo")
    path = out / MODEL_NAME / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(build_mmod_onnx(net=net).SerializeToString(deterministic=True))
    return MmodDetector(OnnxRuntimeBackend(out, threads=2), upsample=REFERENCE["upsample"])


def test_pipeline_constants_match_the_file(net):
    np.testing.assert_array_equal(net.input.mean, mmod.MEAN)
    assert (net.input.padding, net.input.outer_padding) == (mmod.PADDING, mmod.OUTER_PADDING)
    assert net.input.downsample == mmod.PYRAMID_N
    assert net.options.windows == (mmod.WINDOW,)
    assert (net.options.nms_iou, net.options.nms_covered) == (mmod.NMS_IOU, mmod.NMS_COVERED)
    assert net.output_to_input() == (mmod.STRIDE, mmod.OFFSET)
    assert mmod.MAX_TILED_SIDE == repository.MMOD_MAX_SIDE
    assert repository.MMOD_MIN_SIDE >= mmod.MIN_INPUT


def test_architecture(net):
    shapes = [(c.weights.shape, c.stride, c.pad, a is not None) for c, a in net.convs]
    assert shapes == [
        ((16, 3, 5, 5), (2, 2), (0, 0), True), ((32, 16, 5, 5), (2, 2), (0, 0), True),
        ((32, 32, 5, 5), (2, 2), (0, 0), True), ((45, 32, 5, 5), (1, 1), (2, 2), True),
        ((45, 45, 5, 5), (1, 1), (2, 2), True), ((45, 45, 5, 5), (1, 1), (2, 2), True),
        ((1, 45, 9, 9), (1, 1), (4, 4), False),
    ]


def test_build_is_deterministic(net):
    a = build_mmod_onnx(net=net).SerializeToString(deterministic=True)
    assert a == build_mmod_onnx().SerializeToString(deterministic=True)


def test_malformed_dat_raises_format_error():
    data = dlib_model_file(MMOD_DAT).read_bytes()
    for bad in (data[:100], data[: len(data) // 2], data[:-1], data + b"\x00", b"",
                data[:20] + b"\x7f" + data[21:], data.replace(b"loss_mmod_", b"loss_mmoX_", 1),
                data.replace(b"input_rgb_image_pyramid", b"input_rgb_image_pyramiX", 1)):
        with pytest.raises(DlibFormatError):
            parse_mmod(DlibReader(bad))


def _image(name: str) -> np.ndarray:
    if name == ASTRONAUT:
        from skimage import data

        return np.ascontiguousarray(data.astronaut())
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared dev photos live in ../shared/facedata)")
    return decode_image(path.read_bytes())


@pytest.mark.parametrize("name", sorted(REFERENCE["images"]))
def test_parity_with_dlib(detector, name):
    ref = REFERENCE["images"][name]
    image = _image(name)
    assert list(image.shape) == ref["shape"] and int(image.astype(np.int64).sum()) == ref["sum"], \
        "decoded pixels differ from those dlib was given"
    rects, scores = detector.detect(image)
    want = np.array([d["rect"] for d in ref["detections"]], np.int64).reshape(-1, 4)
    want_scores = np.array([d["confidence"] for d in ref["detections"]], np.float64)
    assert rects.dtype == np.int64 and scores.dtype == np.float32
    assert rects.shape == want.shape, (rects.tolist(), want.tolist())
    np.testing.assert_array_equal(rects, want)  # exact: the pyramid is bit-identical to dlib's
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=SCORE_TOL)
    assert np.all(np.diff(scores) <= 0)


def test_reference_covers_faces_and_no_faces():
    counts = [len(r["detections"]) for r in REFERENCE["images"].values()]
    assert max(counts) >= 3 and 0 in counts and len(counts) >= 12


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 7, 3), (5, 5, 3), (20, 300, 3), (300, 9, 3), (61, 47, 3), (0, 10, 3)])
def test_small_and_odd_images(detector, shape):
    rng = np.random.default_rng(sum(shape))
    rects, scores = detector.detect(rng.integers(0, 256, shape, dtype=np.uint8))
    assert rects.shape == (scores.shape[0], 4) and rects.dtype == np.int64
    assert np.all(rects[:, 2] >= rects[:, 0]) and np.all(rects[:, 3] >= rects[:, 1])


def test_grayscale_input_equals_replicated_rgb(detector):
    from skimage import data

    gray = np.ascontiguousarray(data.astronaut()[::2, ::2].mean(axis=2).astype(np.uint8))
    a = detector.detect(gray)
    b = detector.detect(np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_large_image_is_downscaled_and_mapped_back(detector):
    from skimage import data

    import cv2

    small = np.ascontiguousarray(data.astronaut())
    big = cv2.resize(small, (2048, 2048), interpolation=cv2.INTER_CUBIC)  # 4.2 Mpx > max_pixels
    h, w = detector.detection_size(*big.shape[:2])
    assert h * w <= detector.max_pixels and (h, w) != big.shape[:2]
    rects, _ = detector.detect(big)
    want, _ = detector.detect(small)
    assert rects.shape == want.shape == (1, 4)
    got = rects / 4  # the same face, in the big image's pixels (4x the small one)
    assert iou(got, want.astype(np.float64))[0, 0] > 0.7, (got, want)


def test_resize_matches_dlib_layout():
    # dlib: 92x112 upsampled is 186x225 (pyramid_down<2>::rect_up maps p -> 2p + (2.5, 1.5))
    assert mmod.pyramid_up_size(112, 92) == (225, 186)
    rects, nr, nc = mmod.tiled_pyramid_layout(225, 186)
    assert (nr, nc) == (865, 208) and rects[0] == (11, 11, 196, 235) and len(rects) == 20
    # a constant image stays constant through dlib's bilinear resize (up to its float32 weights)
    flat = np.full((3, 40, 50), 7.0, np.float32)
    np.testing.assert_allclose(mmod.resize_float(flat, 33, 41), 7.0, rtol=0, atol=1e-5)
