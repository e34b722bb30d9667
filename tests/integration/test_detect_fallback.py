"""FR_DETECT_FALLBACK=mmod end to end: a real server finds, through the API, the profile face that
MTCNN misses (orl s2/6), answers it in CompreFace's shape, and recognises the person; images
with no face are still answered 400 / code 28."""
from __future__ import annotations

import pytest

from server.vision.decode import decode_image
from tests.support.api_server import blank, encode, live_server

R = "/api/v1/recognition"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("fallback"), model_dir, detect_fallback="mmod",
                     detector="mtcnn") as srv:
        yield srv


def test_profile_face_found_enrolled_and_recognised(server, facedata):
    s2 = facedata / "orl-att-faces/att_faces/s2"

    def png(i: int) -> bytes:  # CompreFace takes no .pgm: send the photos as PNG
        return encode(decode_image((s2 / f"{i}.pgm").read_bytes()), "PNG")

    profile = png(6)
    dkey, rkey = server.create_key("detection"), server.create_key("recognition")
    with server.client() as c:
        r = c.post("/api/v1/detection/detect", files={"file": ("6.png", profile)},
                   params={"face_plugins": "landmarks"}, headers={"x-api-key": dkey})
        assert r.status_code == 200, r.text
        (face,) = r.json()["result"]
        assert face["box"] == {"probability": pytest.approx(0.98, abs=0.01), "x_min": 11, "y_min": 33,
                               "x_max": 58, "y_max": 81}
        assert len(face["landmarks"]) == 5 and all(11 - 5 <= x <= 58 + 5 for x, _ in face["landmarks"])
        for i in (1, 2, 3):  # enrol the person from frontal photos (found by MTCNN)
            r = c.post(R + "/faces", params={"subject": "s2"}, files={"file": (f"{i}.png", png(i))},
                       headers={"x-api-key": rkey})
            assert r.status_code == 201, r.text
        r = c.post(R + "/recognize", files={"file": ("6.png", profile)}, headers={"x-api-key": rkey})
        assert r.status_code == 200, r.text
        best = r.json()["result"][0]["subjects"][0]
        assert best["subject"] == "s2" and best["similarity"] > 0.5
        r = c.post("/api/v1/detection/detect", files={"file": ("b.jpg", encode(blank()))}, headers={"x-api-key": dkey})
        assert r.status_code == 400 and r.json()["code"] == 28
