"""A slot model fed dlib chips cut with the real 5-point shape predictor of the model repository
(the plugins' other tests, which need no models, are tests/unit/test_plugins.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.unit.test_plugins import MASK_SLOPE, MASK_VALUES, _chip_mask_model, _registry, _scene, _softmax


def test_operator_dlib_chip_model(tmp_path, model_dir):
    """A dlib_chip slot model gets get_face_chip(shape, H, chip_padding) of each face, as uint8."""
    from server.vision.alignment import ShapePredictor, face_chips

    shutil.copy(model_dir / "shape_predictor_5.npz", tmp_path / "shape_predictor_5.npz")
    _chip_mask_model(tmp_path, {"face_input": "dlib_chip", "chip_padding": "0.5", "family": "acme", "version": "m2"})
    registry, backend = _registry(tmp_path)
    assert registry.status()["mask"] == {"available": True, "version": "acme.MaskDetector@m2"}
    assert registry.needs_shapes(["mask"]) and not registry.needs_shapes(["pose"])
    image, faces = _scene()
    out = registry.run(image, faces, ["mask"])
    assert backend.calls == [("face_mask", {"chips": (4, 40, 40, 3)})]
    sp = ShapePredictor.load(tmp_path / "shape_predictor_5.npz")
    shapes = np.stack([f.shape for f in faces])  # predicted on demand and kept on the faces
    from server.vision.plugins import dlib_rect_for

    np.testing.assert_array_equal(shapes, sp.predict_many(image, [dlib_rect_for(registry.settings.detector, f)
                                                                  for f in faces]))
    chips = face_chips(image, shapes, 40, 0.5).astype(np.float64)
    p = _softmax(chips.mean(axis=(1, 2)) * MASK_SLOPE)
    for i, res in enumerate(out):
        k = int(p[i].argmax())
        assert res["mask"]["value"] == MASK_VALUES[k]
        assert res["mask"]["probability"] == pytest.approx(p[i, k], abs=1e-5)
