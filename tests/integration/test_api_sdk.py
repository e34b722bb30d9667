"""The official CompreFace Python SDK (`compreface-sdk` 0.6.0 from PyPI) against our server, unchanged.

Install: `pip install requests 'requests-toolbelt>=1.0' && pip install --no-deps compreface-sdk==0.6.0`
(the SDK pins requests-toolbelt==0.9.1, which cannot import with urllib3 2, and urllib3 2 is
what tritonclient needs; toolbelt 1.0 keeps the MultipartEncoder the SDK uses).

The SDK builds URLs like `...?&limit=0&status=True`, sends multipart via requests-toolbelt and
names base64-less uploads `image.jpg`: everything here must work as it does against CompreFace.
"""
from __future__ import annotations

import pytest

from tests.support.api_server import astronaut, encode, live_server, side_by_side

try:
    import compreface
except ImportError as exc:  # absent, or its pinned requests-toolbelt 0.9.1 next to urllib3 2 (see below)
    pytest.skip(f"compreface-sdk 0.6.0 cannot be imported ({exc}); install it with "
                "`pip install requests 'requests-toolbelt>=1.0' && pip install --no-deps compreface-sdk==0.6.0`",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("sdk-data"), model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    # the SDK joins domain + ':' + port + path
    return compreface.CompreFace(domain="http://127.0.0.1", port=str(server.port),
                                 options={"limit": 0, "det_prob_threshold": 0.8, "prediction_count": 1,
                                          "face_plugins": "calculator,landmarks", "status": True})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sdk-images")
    paths = {}
    for name, img in {"one.jpg": astronaut(), "two.jpg": side_by_side(astronaut(), astronaut()[:, ::-1])}.items():
        path = folder / name
        path.write_bytes(encode(img, "JPEG", quality=95))
        paths[name] = str(path)
    return paths


def test_sdk_recognition_service(server, sdk, images):
    recognition = sdk.init_face_recognition(server.create_key("recognition"))
    subjects = recognition.get_subjects()
    collection = recognition.get_face_collection()

    assert subjects.add("Bob") == {"subject": "Bob"}
    assert subjects.list() == {"subjects": ["Bob"]}
    assert subjects.update("Bob", "Robert") == {"updated": True}

    added = collection.add(images["one.jpg"], "Eileen")
    assert added["subject"] == "Eileen" and len(added["image_id"]) == 36
    raw = open(images["one.jpg"], "rb").read()
    assert collection.add(raw, "Eileen")["subject"] == "Eileen"  # bytes are sent as image.jpg
    listed = collection.list()
    assert listed["total_elements"] == 2 and {f["subject"] for f in listed["faces"]} == {"Eileen"}

    result = recognition.recognize(images["one.jpg"])
    face = result["result"][0]
    assert face["subjects"][0]["subject"] == "Eileen"
    assert len(face["embedding"]) == 128 and len(face["landmarks"]) == 5
    assert "execution_time" in face and "plugins_versions" in result

    verified = collection.verify(images["two.jpg"], added["image_id"])
    assert len(verified["result"]) == 2 and all(r["subject"] == "Eileen" for r in verified["result"])

    assert collection.delete(added["image_id"]) == {"image_id": added["image_id"], "subject": "Eileen"}
    assert collection.delete_all("Eileen") == {"deleted": 1}
    assert subjects.delete("Robert") == {"subject": "Robert"}
    assert subjects.delete_all() == {"deleted": 0}
    assert subjects.list() == {"subjects": []}


def test_sdk_detection_and_verification(server, sdk, images):
    detection = sdk.init_face_detection(server.create_key("detection"))
    detected = detection.detect(images["two.jpg"])
    assert len(detected["result"]) == 2 and "plugins_versions" in detected
    assert len(detected["result"][0]["embedding"]) == 128

    verification = sdk.init_face_verification(server.create_key("verification"))
    verified = verification.verify(images["one.jpg"], images["two.jpg"])
    (item,) = verified["result"]
    assert len(item["face_matches"]) == 2 and "plugins_versions" in item
    assert all(0 <= m["similarity"] <= 1 for m in item["face_matches"])


def test_sdk_sees_compreface_errors(server, sdk, images):
    recognition = sdk.init_face_recognition(server.create_key("detection"))  # wrong service type
    answer = recognition.get_subjects().list()
    assert answer["code"] == 10 and "Recognition service with API Key" in answer["message"]
