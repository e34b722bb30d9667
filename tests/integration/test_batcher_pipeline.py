"""The micro-batcher in front of the real models: the pipeline through it gives what it gives alone,
and concurrent requests' detector and embedder calls are batched together (tests/unit/test_batching.py
tests the batcher itself on a tiny model)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from server.config import Settings
from server.inference.batcher import MicroBatcher, policies_from_settings
from server.metrics import Metrics


def _faces_equal(a, b, atol: float) -> None:
    assert len(a) == len(b) > 0
    for fa, fb in zip(a, b):
        assert fa.box == fb.box
        np.testing.assert_allclose(fa.probability, fb.probability, rtol=0, atol=atol)
        np.testing.assert_allclose(fa.landmarks, fb.landmarks, rtol=0, atol=100 * atol)
        np.testing.assert_allclose(fa.embedding, fb.embedding, rtol=0, atol=atol)


@pytest.mark.parametrize("detector", ["yunet", "mtcnn"])
def test_pipeline_through_batcher_matches_direct(model_dir, backend, detector):
    from skimage.data import astronaut

    from server.vision.pipeline import FacePipeline

    image = astronaut()
    pipeline = FacePipeline.from_settings(Settings(model_dir=model_dir, detector=detector), backend=backend)
    expected = pipeline.faces(image)
    metrics = Metrics()
    # a window long enough that the concurrent requests below surely meet in the detector and the embedder
    settings = Settings(model_dir=model_dir, detector=detector, batch_pnet_delay_ms=100, batch_yunet_delay_ms=100,
                        batch_embedder_delay_ms=300)
    batcher = MicroBatcher(backend, policies_from_settings(settings), metrics=metrics, owns_inner=False)
    batched = FacePipeline.from_settings(settings, backend=batcher)
    _faces_equal(batched.faces(image), expected, atol=0.0)  # alone: the very same model calls
    flipped = np.ascontiguousarray(image[:, ::-1])
    expected_flipped = pipeline.faces(flipped)

    results: dict[int, list] = {}
    start = threading.Barrier(4)

    def worker(k: int) -> None:
        start.wait()
        results[k] = batched.faces(flipped if k % 2 else image)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    batcher.close()
    for k in range(4):
        # batched with other requests: the same faces, float noise at most
        _faces_equal(results[k], expected_flipped if k % 2 else expected, atol=1e-4)
    assert batcher.stats("face_embedder")["rows"] == 5
    # same-size pyramid levels (MTCNN) / same-canvas images (YuNet) of concurrent requests share calls
    first = "face_detector_pnet" if detector == "mtcnn" else "face_detector_yunet"
    assert batcher.stats(first)["mean_batch"] > 1.0
    assert batcher.stats("face_embedder")["batches"] < 5
