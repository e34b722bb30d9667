"""Shared fixtures: the real model repository, the backend, the pipeline, the dev photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FACEDATA = SHARED / "facedata" / "dev"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real model repository, built from the pip-installed weights (no-op when current)."""
    from server.modelbuild.repository import ensure_built

    out = Path(os.environ.get("FR_TEST_MODEL_DIR", ROOT / "model_repository"))
    ensure_built(out)
    return out


@pytest.fixture(scope="session")
def backend(model_dir):
    from server.inference.onnxruntime import OnnxRuntimeBackend

    b = OnnxRuntimeBackend(model_dir)
    yield b
    b.close()


@pytest.fixture(scope="session")
def pipeline(model_dir, backend):
    """The default pipeline (YuNet), or the detector FR_DETECTOR names."""
    from server.config import Settings
    from server.vision.pipeline import FacePipeline

    return FacePipeline.from_settings(Settings.from_env(model_dir=model_dir), backend=backend)


@pytest.fixture(scope="session")
def mtcnn_pipeline(model_dir, backend):
    """FR_DETECTOR=mtcnn: CompreFace's facenet-build detector, for the tests of MTCNN's own behaviour."""
    from server.config import Settings
    from server.vision.pipeline import FacePipeline

    return FacePipeline.from_settings(Settings.from_env(model_dir=model_dir, detector="mtcnn"), backend=backend)


@pytest.fixture(scope="session")
def yunet_pipeline(model_dir, backend):
    from server.config import Settings
    from server.vision.pipeline import FacePipeline

    return FacePipeline.from_settings(Settings.from_env(model_dir=model_dir, detector="yunet"), backend=backend)


@pytest.fixture(scope="session")
def facedata() -> Path:
    if not FACEDATA.is_dir():
        pytest.skip(f"dev photos not found at {FACEDATA} (shared/ is not next to this checkout)")
    return FACEDATA


@pytest.fixture(scope="session")
def reference_faces():
    path = REFERENCE / "dlib_reference_faces.npz"
    if not path.is_file():
        pytest.skip(f"dlib reference outputs not found at {path}")
    import numpy as np

    return dict(np.load(path, allow_pickle=False))
