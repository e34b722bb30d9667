"""MTCNN's numeric building blocks (server/vision/mtcnn.py), no models: the area resampling of the
image pyramid and crops (torch's adaptive_avg_pool2d, literally) and NMS (a greedy reference). The
cascade on the real converted weights is tests/integration/test_detector.py."""
from __future__ import annotations

import numpy as np
import pytest

from server.vision.mtcnn import _Integral, nms


def _adaptive_avg_pool(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """torch.nn.functional.adaptive_avg_pool2d (= interpolate mode 'area'), literally."""
    h, w = img.shape[:2]
    out = np.zeros((oh, ow, img.shape[2]))
    for i in range(oh):
        r0, r1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            c0, c1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            out[i, j] = img[r0:r1, c0:c1].reshape(-1, img.shape[2]).mean(axis=0)
    return out


@pytest.mark.parametrize("size", [(17, 23), (9, 5), (30, 40), (41, 64)])
def test_area_resize_is_torch_adaptive_avg_pool(size):
    img = np.random.default_rng(3).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    got = _Integral(img).resize(*size)
    assert got.shape == (3, *size) and got.dtype == np.float32
    np.testing.assert_allclose(got.transpose(1, 2, 0), _adaptive_avg_pool(img, *size), rtol=1e-6, atol=1e-4)


def test_area_crops_match_per_crop_resampling():
    img = np.random.default_rng(4).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    x0, y0 = np.array([0, 10, 70, 5]), np.array([0, 20, 50, 5])
    x1, y1 = np.array([80, 60, 80, 6]), np.array([60, 33, 60, 40])
    got = _Integral(img).crops(x0, y0, x1, y1, 24)
    assert got.shape == (3, len(x0), 24, 24)
    for k in range(len(x0)):
        want = _adaptive_avg_pool(img[y0[k] : y1[k], x0[k] : x1[k]], 24, 24)
        np.testing.assert_allclose(got[:, k].transpose(1, 2, 0), want, rtol=1e-6, atol=1e-4)


def _greedy_reference(boxes, scores, threshold, mode):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    one = 1.0 if mode == "min" else 0.0
    area = lambda b: (b[2] - b[0] + one) * (b[3] - b[1] + one)
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            bi, bj = boxes[i], boxes[j]
            iw = max(0.0, min(bi[2], bj[2]) - max(bi[0], bj[0]) + one)
            ih = max(0.0, min(bi[3], bj[3]) - max(bi[1], bj[1]) + one)
            inter = iw * ih
            denom = min(area(bi), area(bj)) if mode == "min" else area(bi) + area(bj) - inter
            if denom != 0 and inter / denom > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("mode,threshold", [("union", 0.5), ("union", 0.7), ("min", 0.7)])
def test_nms_matches_greedy_reference(mode, threshold):
    rng = np.random.default_rng(11)
    centres = rng.uniform(0, 200, size=(12, 2))
    xy = centres[rng.integers(0, 12, 400)] + rng.normal(0, 6, size=(400, 2))
    wh = rng.uniform(10, 40, size=(400, 1))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes[:5, 2] = boxes[:5, 0]  # zero-width boxes: IoU 0/NaN under torchvision's rule, always kept
    scores = rng.uniform(0.5, 1.0, 400).astype(np.float32)
    got = nms(boxes, scores, threshold, mode)
    want = _greedy_reference(boxes.astype(np.float64), scores, threshold, mode)
    assert 5 < len(got) < 400
    assert got.tolist() == want
