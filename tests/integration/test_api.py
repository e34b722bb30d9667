"""End-to-end tests of the CompreFace REST API over real HTTP (uvicorn on 127.0.0.1, real models).

One server for the whole module; every test that writes faces uses its own API key (collection).
Expected codes and messages come from ../shared/docs/compreface-behaviour.md (CompreFace 1.2.0).
"""
from __future__ import annotations

import base64
import math
import uuid

import httpx
import numpy as np
import pytest
from starlette.routing import Route
from server.config import Settings
from tests.support.api_server import ADMIN_TOKEN, astronaut, blank, chunks, encode, live_server, side_by_side

R, D, V = "/api/v1/recognition", "/api/v1/detection", "/api/v1/verification"


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("api-data"), model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture
def rkey(server) -> str:
    """A fresh recognition key: an empty collection of this test's own."""
    return server.create_key("recognition")


@pytest.fixture(scope="module")
def dkey(server) -> str:
    return server.create_key("detection")


@pytest.fixture(scope="module")
def vkey(server) -> str:
    return server.create_key("verification")


@pytest.fixture(scope="module")
def face_jpg() -> bytes:
    return encode(astronaut(), "JPEG", quality=95)


@pytest.fixture(scope="module")
def face_png() -> bytes:
    return encode(astronaut(), "PNG")


@pytest.fixture(scope="module")
def two_faces_jpg() -> bytes:
    return encode(side_by_side(astronaut(), astronaut()[:, ::-1]), "JPEG", quality=95)


@pytest.fixture(scope="module")
def no_face_jpg() -> bytes:
    return encode(blank(), "JPEG")


@pytest.fixture(scope="module")
def shifted_face_jpg() -> bytes:
    """The astronaut, mirrored and brighter: the same person, not the same pixels."""
    img = astronaut()[:, ::-1].astype(np.int16) + 25
    return encode(np.clip(img, 0, 255).astype(np.uint8), "JPEG", quality=90)


def hdr(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def assert_error(r: httpx.Response, status: int, code: int, message: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["message", "code"], body  # CompreFace's ExceptionResponseDto order
    assert body["code"] == code, body
    if message is not None:
        assert body["message"] == message


def add_face(http, key: str, data: bytes, subject: str, name: str = "face.jpg", **params) -> httpx.Response:
    return http.post(R + "/faces", params={"subject": subject, **params}, files={"file": (name, data)},
                     headers=hdr(key))


def decimals(x: float) -> int:
    text = repr(float(x))
    return 0 if "." not in text or "e" in text else len(text.split(".")[1])


def similarity(settings: Settings, a, b) -> float:
    a = np.asarray(a, np.float64) / np.linalg.norm(a)
    b = np.asarray(b, np.float64) / np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    c0, c1 = settings.similarity_coefficients()
    return (math.tanh((c0 - d) * c1) + 1) / 2


# ------------------------------------------------------------------------------- system
def test_health_ready_config_consistence(http):
    assert http.get("/health").json() == {"status": "OK"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "OK"
    assert http.get("/api/v1/config").json() == {"clientMaxFileSize": 5242880, "clientMaxBodySize": 10485760}
    assert http.get("/api/v1/consistence/status").json() == {
        "demoFaceCollectionIsInconsistent": False, "dbIsInconsistent": False, "saveImagesToDB": True,
        "status": "OK"}
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "facerec_http_request_duration_seconds" in metrics.text


def test_openapi_covers_every_route(server, http):
    doc = http.get("/openapi.json").json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(m, r.path) for r in server.app.routes if isinstance(r, Route) for m in r.methods if m != "HEAD"}
    assert served == documented
    for (method, path) in documented:
        op = doc["paths"][path][method.lower()]
        assert op["responses"] and op["summary"]
        names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
        assert names == {seg.strip("{}") for seg in path.split("/") if seg.startswith("{")}
    recognize = doc["paths"][R + "/recognize"]["post"]
    assert {p["name"] for p in recognize["parameters"]} == {
        "limit", "prediction_count", "det_prob_threshold", "face_plugins", "status", "detect_faces"}
    page = http.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/openapi.json" in page.text and 'src="http' not in page.text  # self-contained: no CDN


# ------------------------------------------------------------------------------- auth
def test_missing_malformed_unknown_key(http, rkey, dkey, vkey):
    assert_error(http.get(R + "/subjects"), 400, 20, "Missing header: x-api-key")
    assert_error(http.get(R + "/faces"), 400, 20, "Missing header: x-api-key")
    assert_error(http.get(R + "/subjects", headers=hdr("short")), 400, 26, "Service API key should be UUID")
    assert_error(http.get(R + "/subjects", headers=hdr("")), 400, 26, "Service API key should be UUID")
    assert_error(http.get(R + "/subjects", headers=hdr("x" * 36)), 400, 26, "Service API key should be UUID")
    unknown = str(uuid.uuid4())
    assert_error(http.get(R + "/subjects", headers=hdr(unknown)), 404, 10,
                 f"Recognition service with API Key {unknown} not found")


def test_key_of_the_wrong_service(http, rkey, dkey, vkey):
    assert_error(http.get(R + "/subjects", headers=hdr(dkey)), 404, 10,
                 f"Recognition service with API Key {dkey} not found")
    assert_error(http.post(D + "/detect", headers=hdr(rkey), json={"file": ""}), 404, 10,
                 f"Detection service with API Key {rkey} not found")
    assert_error(http.post(V + "/verify", headers=hdr(rkey), json={}), 404, 10,
                 f"Verification service with API Key {rkey} not found")
    assert_error(http.post(V + "/embeddings/verify", headers=hdr(dkey), json={}), 404, 10,
                 f"Verification service with API Key {dkey} not found")


def test_exempt_paths_need_no_key(http):
    assert http.get("/api/v1/config").status_code == 200
    assert http.get("/api/v1/consistence/status").status_code == 200
    r = http.get(f"/api/v1/static/{uuid.uuid4()}/images/{uuid.uuid4()}")
    assert r.status_code == 200 and r.content == b""


def test_auth_comes_before_routing(http, rkey):
    # CompreFace's filter runs before dispatch: no key -> 20 even for a wrong method or route.
    assert_error(http.patch(R + "/subjects"), 400, 20)
    assert_error(http.get(R + "/nothing-here"), 400, 20)
    assert_error(http.get(R + "/nothing-here", headers=hdr(rkey)), 404, 0)


# ------------------------------------------------------------------------------- routing
def test_wrong_method_is_404_code_0(http, rkey):
    assert_error(http.patch(R + "/subjects", headers=hdr(rkey)), 404, 0, "Request method 'PATCH' not supported")
    assert_error(http.get(R + "/recognize", headers=hdr(rkey)), 404, 0, "Request method 'GET' not supported")
    assert_error(http.put(R + "/faces", headers=hdr(rkey)), 404, 0, "Request method 'PUT' not supported")
    assert_error(http.post("/api/v1/config"), 404, 0, "Request method 'POST' not supported")


def test_unknown_route_is_json_404(http):
    assert_error(http.get("/api/v1/unknown"), 404, 0)
    assert_error(http.get("/"), 404, 0)


def test_trailing_slash_is_ignored(http, rkey):
    assert http.get(R + "/subjects/", headers=hdr(rkey)).json() == {"subjects": []}


# ------------------------------------------------------------------------------- subjects
def test_subject_lifecycle(http, rkey):
    h = hdr(rkey)
    r = http.post(R + "/subjects", json={"subject": "Alice"}, headers=h)
    assert r.status_code == 201 and r.json() == {"subject": "Alice"}
    assert_error(http.post(R + "/subjects", json={"subject": "alice"}, headers=h), 400, 43, "Subject already exists")
    assert http.post(R + "/subjects", json={"subject": "Bob"}, headers=h).status_code == 201
    assert http.get(R + "/subjects", headers=h).json() == {"subjects": ["Alice", "Bob"]}
    # rename (case-insensitive lookup of the old name)
    assert http.put(R + "/subjects/alice", json={"subject": "Carol"}, headers=h).json() == {"updated": True}
    assert sorted(http.get(R + "/subjects", headers=h).json()["subjects"]) == ["Bob", "Carol"]
    # unchanged name: false, even before looking the subject up
    assert http.put(R + "/subjects/Carol", json={"subject": "Carol"}, headers=h).json() == {"updated": False}
    assert_error(http.put(R + "/subjects/Nobody", json={"subject": "X"}, headers=h), 404, 42, "Subject Nobody not found")
    # delete one (stored spelling returned), then a missing one
    assert http.delete(R + "/subjects/carol", headers=h).json() == {"subject": "Carol"}
    assert_error(http.delete(R + "/subjects/carol", headers=h), 404, 42, "Subject carol not found")
    assert http.delete(R + "/subjects", headers=h).json() == {"deleted": 1}
    assert http.get(R + "/subjects", headers=h).json() == {"subjects": []}


@pytest.mark.parametrize("body, code, message", [
    ({"subject": ""}, 26, "Subject name cannot be empty"),
    ({"subject": "   "}, 26, "Subject name cannot be empty"),
    ({}, 26, "Subject name cannot be empty"),
    ({"subject": None}, 26, "Subject name cannot be empty"),
    ({"subject": "x" * 51}, 26, "Subject name size must be between 1 and 50"),
    ({"subject": "a;b"}, 36, "The name cannot contain the following special characters: ';', '/', '\\'"),
    ({"subject": "a/b"}, 36, None),
    ({"subject": "a\\b"}, 36, None),
])
def test_subject_name_validation(http, rkey, body, code, message):
    assert_error(http.post(R + "/subjects", json=body, headers=hdr(rkey)), 400, code, message)
    http.post(R + "/subjects", json={"subject": "Dave"}, headers=hdr(rkey))
    assert_error(http.put(R + "/subjects/Dave", json=body, headers=hdr(rkey)), 400, code, message)


def test_subject_name_of_50_characters_is_fine(http, rkey):
    assert http.post(R + "/subjects", json={"subject": "y" * 50}, headers=hdr(rkey)).status_code == 201


def test_blank_path_subject(http, rkey):
    assert_error(http.delete(R + "/subjects/%20", headers=hdr(rkey)), 400, 26, "Subject name is empty; ")


@pytest.mark.parametrize("content", [b"{bad json", b"", b"[1,2]", b'"text"'])
def test_unreadable_subject_body_is_400_json(http, rkey, content):
    r = http.post(R + "/subjects", content=content, headers={**hdr(rkey), "content-type": "application/json"})
    assert_error(r, 400, 0)


# ------------------------------------------------------------------------------- faces: add
def test_add_face_multipart_and_base64(http, rkey, face_jpg):
    r = add_face(http, rkey, face_jpg, "Eileen")
    assert r.status_code == 201, r.text
    body = r.json()
    assert list(body) == ["image_id", "subject"] and body["subject"] == "Eileen"
    assert str(uuid.UUID(body["image_id"])) == body["image_id"]
    # the subject was created on the fly
    assert http.get(R + "/subjects", headers=hdr(rkey)).json() == {"subjects": ["Eileen"]}
    # base64 JSON form; the subject is matched case-insensitively and echoed as sent
    r = http.post(R + "/faces", params={"subject": "EILEEN"}, json={"file": b64(face_jpg)}, headers=hdr(rkey))
    assert r.status_code == 201 and r.json()["subject"] == "EILEEN"
    assert http.get(R + "/subjects", headers=hdr(rkey)).json() == {"subjects": ["Eileen"]}
    faces = http.get(R + "/faces", headers=hdr(rkey)).json()
    assert faces["total_elements"] == 2 and {f["subject"] for f in faces["faces"]} == {"Eileen"}


def test_add_face_subject_as_form_field(http, rkey, face_png):
    r = http.post(R + "/faces", data={"subject": "Form"}, files={"file": ("a.PNG", face_png)}, headers=hdr(rkey))
    assert r.status_code == 201 and r.json()["subject"] == "Form"


def test_add_face_errors(http, rkey, face_jpg, two_faces_jpg, no_face_jpg):
    h = hdr(rkey)
    assert_error(add_face(http, rkey, no_face_jpg, "x"), 400, 28, "No face is found in the given image")
    assert_error(add_face(http, rkey, two_faces_jpg, "x"), 400, 31, "More than one face in the source image")
    assert_error(add_face(http, rkey, face_jpg, "x", name="face.txt"), 400, 21,
                 "File [face.txt] has an unavailable extension")
    assert_error(add_face(http, rkey, face_jpg, "x", name="noextension"), 400, 21,
                 "File [noextension] has an unavailable extension")
    assert_error(add_face(http, rkey, b"not an image", "x", name="fake.jpg"), 400, 28)
    assert_error(add_face(http, rkey, b"", "x", name="empty.png"), 400, 28)
    assert_error(http.post(R + "/faces", params={"subject": "x"}, files={"other": ("a.jpg", face_jpg)}, headers=h),
                 400, 34, "Required part file is missing")
    assert_error(http.post(R + "/faces", files={"file": ("a.jpg", face_jpg)}, headers=h),
                 400, 33, "Required parameter subject is missing")
    assert_error(add_face(http, rkey, face_jpg, "  "), 400, 26, "Subject name is empty; ")
    assert_error(http.post(R + "/faces", params={"subject": "x"}, json={"file": "not base64!"}, headers=h),
                 400, 21, "Provided value is not Base64")
    assert_error(http.post(R + "/faces", params={"subject": "x"}, json={"file": None}, headers=h),
                 400, 5, "Field content cannot be empty")
    assert_error(http.post(R + "/faces", params={"subject": "x"}, json={}, headers=h),
                 400, 5, "Field content cannot be empty")
    assert_error(http.post(R + "/faces", params={"subject": "x"}, content=b"raw", headers=h), 415, 0)
    # det_prob_threshold: out of [0, 1] is the core's 400 (code 28); 1 keeps no face; not a number: 400
    assert_error(add_face(http, rkey, face_jpg, "x", det_prob_threshold="1.5"), 400, 28)
    assert_error(add_face(http, rkey, face_jpg, "x", det_prob_threshold="1"), 400, 28)
    assert_error(add_face(http, rkey, face_jpg, "x", det_prob_threshold="abc"), 400, 26)
    assert add_face(http, rkey, face_jpg, "x", det_prob_threshold="0.5").status_code == 201
    # nothing else was stored
    assert http.get(R + "/faces", headers=h).json()["total_elements"] == 1


def test_large_file_and_body_limits(http, rkey, face_jpg):
    h = hdr(rkey)
    # a file over 5 MB in a body under 10 MB: CompreFace's MaxUploadSizeExceeded -> 400, code 0
    big = face_jpg + b"\0" * (5 * 1024 * 1024 + 1 - len(face_jpg))
    assert_error(add_face(http, rkey, big, "big"), 400, 0, "Something went wrong, please try again")
    # exactly 5 MB is accepted (a JPEG with trailing bytes still decodes)
    ok = face_jpg + b"\0" * (5 * 1024 * 1024 - len(face_jpg))
    assert add_face(http, rkey, ok, "ok").status_code == 201
    # Content-Length over 10 MB: 413 before the body is read
    huge = b"x" * (10 * 1024 * 1024 + 1)
    r = http.post(R + "/recognize", content=huge, headers={**h, "content-type": "application/json"})
    assert_error(r, 413, 0)
    # the same without Content-Length (chunked): cut off while streaming
    r = http.post(R + "/recognize", content=chunks(huge), headers={**h, "content-type": "application/json"})
    assert_error(r, 413, 0)
    # a JSON body just over 10 MB with a small image still fails on size, not on the image
    padded = {"file": b64(face_jpg), "pad": "p" * (10 * 1024 * 1024)}
    assert_error(http.post(R + "/recognize", json=padded, headers=h), 413, 0)


# ------------------------------------------------------------------------------- faces: list, download, delete
def test_list_faces_paging_and_filter(http, rkey, face_jpg):
    ids = [add_face(http, rkey, face_jpg, s).json()["image_id"] for s in ("Ann", "Ann", "Ann", "Ben", "ann")]
    h = hdr(rkey)
    page = http.get(R + "/faces", params={"page": 1, "size": 2}, headers=h).json()
    assert list(page) == ["faces", "page_number", "page_size", "total_pages", "total_elements"]
    assert page["page_number"] == 1 and page["page_size"] == 2
    assert page["total_pages"] == 3 and page["total_elements"] == 5
    assert [f["image_id"] for f in page["faces"]] == ids[2:4]
    # the subject filter is exact (case-sensitive), unlike everything else
    ann = http.get(R + "/faces", params={"subject": "Ann"}, headers=h).json()
    assert ann["total_elements"] == 4 and {f["subject"] for f in ann["faces"]} == {"Ann"}
    assert http.get(R + "/faces", params={"subject": "ann"}, headers=h).json()["total_elements"] == 0
    assert http.get(R + "/faces", params={"subject": ""}, headers=h).json()["total_elements"] == 0
    # Spring Pageable: bad values fall back to the defaults, sizes are capped at 2000
    dflt = http.get(R + "/faces", params={"page": "x", "size": "-3"}, headers=h).json()
    assert dflt["page_number"] == 0 and dflt["page_size"] == 20 and len(dflt["faces"]) == 5
    assert http.get(R + "/faces", params={"size": 5000}, headers=h).json()["page_size"] == 2000
    assert http.get(R + "/faces", params={"page": 9}, headers=h).json()["faces"] == []


def test_download_image_by_id_and_static_url(http, rkey, dkey, face_jpg):
    image_id = add_face(http, rkey, face_jpg, "Img").json()["image_id"]
    r = http.get(f"{R}/faces/{image_id}/img", headers=hdr(rkey))
    assert r.status_code == 200 and r.content == face_jpg
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["cache-control"] == "public, max-age=31536000"
    s = http.get(f"/api/v1/static/{rkey}/images/{image_id}")
    assert s.status_code == 200 and s.content == face_jpg and s.headers["cache-control"] == "public, max-age=31536000"
    # unknown id, other key, key of another service, malformed key: empty body
    missing = str(uuid.uuid4())
    assert http.get(f"{R}/faces/{missing}/img", headers=hdr(rkey)).content == b""
    assert http.get(f"/api/v1/static/{rkey}/images/{missing}").content == b""
    assert http.get(f"/api/v1/static/{dkey}/images/{image_id}").content == b""
    assert http.get(f"/api/v1/static/not-a-key/images/{image_id}").content == b""
    other = http.post("/api/v1/admin/keys", json={"type": "recognition"},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["key"]
    assert http.get(f"{R}/faces/{image_id}/img", headers=hdr(other)).content == b""
    # a non-UUID id is a 400
    assert_error(http.get(f"{R}/faces/not-a-uuid/img", headers=hdr(rkey)), 400, 26)
    assert_error(http.get(f"/api/v1/static/{rkey}/images/not-a-uuid"), 400, 26)


def test_delete_faces(http, rkey, face_jpg):
    h = hdr(rkey)
    ids = [add_face(http, rkey, face_jpg, s).json()["image_id"] for s in ("A", "A", "B", "B", "C")]
    # by id
    assert http.delete(f"{R}/faces/{ids[0]}", headers=h).json() == {"image_id": ids[0], "subject": "A"}
    assert_error(http.delete(f"{R}/faces/{ids[0]}", headers=h), 404, 44, f"Image {ids[0]} not found")
    assert_error(http.delete(f"{R}/faces/xyz", headers=h), 400, 26)
    # by id in bulk: an array, unknown ids skipped
    missing = str(uuid.uuid4())
    r = http.post(R + "/faces/delete", json=[ids[1], missing, ids[2]], headers=h)
    assert r.json() == [{"image_id": ids[1], "subject": "A"}, {"image_id": ids[2], "subject": "B"}]
    assert http.post(R + "/faces/delete", json=[], headers=h).json() == []
    assert_error(http.post(R + "/faces/delete", json=["nope"], headers=h), 400, 0)
    assert_error(http.post(R + "/faces/delete", json={"ids": []}, headers=h), 400, 0)
    # subject A has no faces left but still exists; deleting by subject deletes the subject too
    assert "A" in http.get(R + "/subjects", headers=h).json()["subjects"]
    assert http.delete(R + "/faces", params={"subject": "b"}, headers=h).json() == {"deleted": 1}
    assert "B" not in http.get(R + "/subjects", headers=h).json()["subjects"]
    assert http.delete(R + "/faces", params={"subject": "nobody"}, headers=h).json() == {"deleted": 0}
    # without a subject: every face (and subject) of the collection
    assert http.delete(R + "/faces", headers=h).json() == {"deleted": 1}
    assert http.get(R + "/faces", headers=h).json()["total_elements"] == 0
    assert http.get(R + "/subjects", headers=h).json() == {"subjects": []}


def test_rename_merges_faces(http, rkey, face_jpg):
    h = hdr(rkey)
    add_face(http, rkey, face_jpg, "First")
    add_face(http, rkey, face_jpg, "Second")
    assert http.put(R + "/subjects/first", json={"subject": "SECOND"}, headers=h).json() == {"updated": True}
    assert http.get(R + "/subjects", headers=h).json() == {"subjects": ["Second"]}
    faces = http.get(R + "/faces", headers=h).json()["faces"]
    assert [f["subject"] for f in faces] == ["Second", "Second"]
    # recognition follows the merge
    rec = http.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)}, params={"prediction_count": 2},
                    headers=h).json()
    assert [s["subject"] for s in rec["result"][0]["subjects"]] == ["Second", "Second"]
    assert http.delete(R + "/subjects/second", headers=h).json() == {"subject": "Second"}
    assert http.get(R + "/faces", headers=h).json()["total_elements"] == 0


# ------------------------------------------------------------------------------- recognize
def test_recognize(server, http, rkey, face_jpg, shifted_face_jpg):
    h = hdr(rkey)
    # empty collection: faces are found, subjects are []
    empty = http.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)}, headers=h).json()
    assert len(empty["result"]) == 1 and empty["result"][0]["subjects"] == []
    add_face(http, rkey, face_jpg, "Eileen")
    r = http.post(R + "/recognize", files={"file": ("b.jpg", shifted_face_jpg)}, headers=h)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert list(r.json()) == ["result"]  # no plugins_versions without status
    face = result[0]
    assert set(face) == {"box", "subjects"}
    assert set(face["box"]) == {"probability", "x_max", "y_max", "x_min", "y_min"}
    assert all(isinstance(face["box"][k], int) for k in ("x_max", "y_max", "x_min", "y_min"))
    assert 0.85 < face["box"]["probability"] <= 1 and decimals(face["box"]["probability"]) <= 5
    (hit,) = face["subjects"]
    assert hit["subject"] == "Eileen" and decimals(hit["similarity"]) <= 5
    # the similarity is CompreFace's formula on the L2-normalised embeddings
    emb_query = http.post(D + "/detect", files={"file": ("b.jpg", shifted_face_jpg)},
                          params={"face_plugins": "calculator"}, headers=hdr(server.create_key("detection")))
    emb_stored = http.post(D + "/detect", files={"file": ("a.jpg", face_jpg)},
                           params={"face_plugins": "calculator"}, headers=hdr(server.create_key("detection")))
    expected = similarity(server.settings, emb_query.json()["result"][0]["embedding"],
                          emb_stored.json()["result"][0]["embedding"])
    assert hit["similarity"] == pytest.approx(expected, abs=2e-5)
    assert hit["similarity"] < 1.0 or expected > 0.999995


def test_recognize_prediction_count_limit_and_forms(http, rkey, face_jpg, two_faces_jpg, shifted_face_jpg):
    h = hdr(rkey)
    add_face(http, rkey, face_jpg, "One")
    add_face(http, rkey, shifted_face_jpg, "One")
    add_face(http, rkey, shifted_face_jpg, "Two")
    # stored embeddings are ranked, so a subject can repeat
    r = http.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)}, params={"prediction_count": 3}, headers=h)
    subjects = r.json()["result"][0]["subjects"]
    assert len(subjects) == 3 and subjects[0]["subject"] == "One"
    assert sorted(s["subject"] for s in subjects) == ["One", "One", "Two"]
    sims = [s["similarity"] for s in subjects]
    assert sims == sorted(sims, reverse=True)
    # more predictions than faces: all of them
    assert len(http.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)}, params={"prediction_count": 50},
                         headers=h).json()["result"][0]["subjects"]) == 3
    # two faces, biggest first; limit keeps the biggest; limit and prediction_count as form fields
    both = http.post(R + "/recognize", files={"file": ("t.jpg", two_faces_jpg)}, headers=h).json()["result"]
    assert len(both) == 2
    areas = [(f["box"]["x_max"] - f["box"]["x_min"]) * (f["box"]["y_max"] - f["box"]["y_min"]) for f in both]
    assert areas == sorted(areas, reverse=True)
    one = http.post(R + "/recognize", files={"file": ("t.jpg", two_faces_jpg)},
                    data={"limit": "1", "prediction_count": "2"}, headers=h).json()["result"]
    assert len(one) == 1 and one[0]["box"] == both[0]["box"] and len(one[0]["subjects"]) == 2
    # base64 JSON form, and the Python SDK's URL style (?&limit=0&status=True)
    j = http.post(R + "/recognize?&limit=0&prediction_count=1&status=True", json={"file": b64(face_jpg)}, headers=h)
    assert j.status_code == 200 and "plugins_versions" in j.json()
    assert j.json()["result"][0]["subjects"][0]["subject"] == "One"


def test_recognize_status_and_plugins(http, rkey, face_jpg):
    h = hdr(rkey)
    add_face(http, rkey, face_jpg, "Eileen")
    r = http.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)},
                  params={"status": "true", "face_plugins": "landmarks, calculator,pose,bogus"}, headers=h).json()
    face = r["result"][0]
    assert {"box", "subjects", "landmarks", "embedding", "pose", "execution_time"} <= set(face)
    assert "bogus" not in face
    assert len(face["embedding"]) == 128 and all(isinstance(x, float) for x in face["embedding"])
    assert len(face["landmarks"]) == 5 and all(len(p) == 2 and all(isinstance(v, int) for v in p)
                                               for p in face["landmarks"])
    assert set(face["pose"]) == {"pitch", "roll", "yaw"}
    times = face["execution_time"]
    assert {"detector", "calculator"} <= set(times) and set(times) <= {"age", "gender", "pose", "detector",
                                                                     "calculator", "mask"}
    assert all(isinstance(v, float) and v >= 0 for v in times.values())
    versions = r["plugins_versions"]
    assert {"detector", "calculator", "pose"} <= set(versions) and set(versions) <= {"age", "gender", "pose", "detector",
                                                                           "calculator", "mask"}
    # without status: no execution_time, no plugins_versions; without calculator: no embedding
    plain = http.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)}, params={"face_plugins": "landmarks"},
                      headers=h).json()
    assert "plugins_versions" not in plain and set(plain["result"][0]) == {"box", "subjects", "landmarks"}
    # landmarks lie inside the box
    box = face["box"]
    assert all(box["x_min"] <= x <= box["x_max"] and box["y_min"] <= y <= box["y_max"] for x, y in face["landmarks"])


def test_recognize_detect_faces_false(http, rkey, face_jpg):
    h = hdr(rkey)
    add_face(http, rkey, face_jpg, "Eileen")
    r = http.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)},
                  params={"detect_faces": "false", "face_plugins": "landmarks,pose", "status": "true"}, headers=h)
    (face,) = r.json()["result"]
    assert face["box"] == {"probability": 1.0, "x_max": 512, "y_max": 512, "x_min": 0, "y_min": 0}
    assert face["landmarks"] == [] and "pose" not in face  # pose is skipped without detection
    assert face["subjects"][0]["subject"] == "Eileen"
    assert "detector" not in face["execution_time"] and "calculator" in face["execution_time"]


def test_recognize_errors(http, rkey, face_jpg, no_face_jpg):
    h = hdr(rkey)
    assert_error(http.post(R + "/recognize", files={"file": ("a.jpg", no_face_jpg)}, headers=h), 400, 28,
                 "No face is found in the given image")
    assert_error(http.post(R + "/recognize", params={"limit": -1}, files={"file": ("a.jpg", face_jpg)}, headers=h),
                 400, 26, "Limit should be equal or greater than 0; ")
    assert_error(http.post(R + "/recognize", params={"prediction_count": 0}, files={"file": ("a.jpg", face_jpg)},
                           headers=h), 400, 26, "prediction_count should be equal or greater than 1; ")
    assert_error(http.post(R + "/recognize", params={"prediction_count": -1}, json={"file": b64(face_jpg)},
                           headers=h), 400, 26, "prediction_count should be equal or greater than 1; ")
    assert_error(http.post(R + "/recognize", params={"limit": "abc"}, files={"file": ("a.jpg", face_jpg)}, headers=h),
                 400, 26)
    assert_error(http.post(R + "/recognize", params={"status": "maybe"}, files={"file": ("a.jpg", face_jpg)},
                           headers=h), 400, 26)
    assert_error(http.post(R + "/recognize", params={"det_prob_threshold": "-0.1"},
                           files={"file": ("a.jpg", face_jpg)}, headers=h), 400, 28)
    assert_error(http.post(R + "/recognize", files={"image": ("a.jpg", face_jpg)}, headers=h), 400, 34,
                 "Required part file is missing")
    assert_error(http.post(R + "/recognize", files={"file": ("a.exe", face_jpg)}, headers=h), 400, 21,
                 "File [a.exe] has an unavailable extension")
    assert_error(http.post(R + "/recognize", json={"file": "@@@"}, headers=h), 400, 21, "Provided value is not Base64")
    assert_error(http.post(R + "/recognize", json={"file": b64(b"garbage")}, headers=h), 400, 28)
    assert_error(http.post(R + "/recognize", content=b'{"file": ', headers={**h, "content-type": "application/json"}),
                 400, 0)
    assert_error(http.post(R + "/recognize", content=b"file=x", headers={
        **h, "content-type": "application/x-www-form-urlencoded"}), 415, 0)
    # parameters are checked before the file (Spring's @Min runs before the method body)
    assert_error(http.post(R + "/recognize", params={"limit": -1}, files={"file": ("a.exe", face_jpg)}, headers=h),
                 400, 26)


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"--x\r\n"),  # no boundary parameter
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\nabc"),
    ("multipart/form-data; boundary=x", b"garbage without any boundary"),
])
def test_broken_multipart_is_400_json(http, rkey, content_type, body):
    r = http.post(R + "/recognize", content=body, headers={**hdr(rkey), "content-type": content_type})
    assert r.status_code == 400 and r.json()["code"] in (0, 34), r.text


def test_base64_variants(http, rkey, face_jpg):
    h = hdr(rkey)
    add_face(http, rkey, face_jpg, "Eileen")
    encoded = b64(face_jpg)
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME line breaks
    urlsafe = base64.urlsafe_b64encode(face_jpg).decode().rstrip("=")
    for value in (wrapped, urlsafe):
        r = http.post(R + "/recognize", json={"file": value}, headers=h)
        assert r.status_code == 200 and r.json()["result"][0]["subjects"][0]["subject"] == "Eileen"


# ------------------------------------------------------------------------------- verify against a saved image
def test_verify_face_by_image_id(http, rkey, face_jpg, two_faces_jpg, no_face_jpg):
    h = hdr(rkey)
    image_id = add_face(http, rkey, face_jpg, "Eileen").json()["image_id"]
    r = http.post(f"{R}/faces/{image_id}/verify", files={"file": ("t.jpg", two_faces_jpg)},
                  params={"status": "true", "face_plugins": "calculator"}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["result"]) == 2 and "plugins_versions" in body
    for item in body["result"]:
        assert item["subject"] == "Eileen" and 0 <= item["similarity"] <= 1
        assert decimals(item["similarity"]) <= 5 and decimals(item["box"]["probability"]) <= 5
        assert len(item["embedding"]) == 128 and "execution_time" in item
    plain = http.post(f"{R}/faces/{image_id}/verify", json={"file": b64(face_jpg)}, params={"limit": 1},
                      headers=h).json()
    assert list(plain) == ["result"] and set(plain["result"][0]) == {"box", "subject", "similarity"}
    assert plain["result"][0]["similarity"] > 0.99
    missing = str(uuid.uuid4())
    assert_error(http.post(f"{R}/faces/{missing}/verify", files={"file": ("a.jpg", face_jpg)}, headers=h),
                 404, 44, "Image Id is incorrect")
    assert_error(http.post(f"{R}/faces/xyz/verify", files={"file": ("a.jpg", face_jpg)}, headers=h), 400, 26)
    assert_error(http.post(f"{R}/faces/{image_id}/verify", files={"file": ("a.jpg", no_face_jpg)}, headers=h),
                 400, 28)


# ------------------------------------------------------------------------------- detection service
def test_detect(http, dkey, face_jpg, two_faces_jpg, no_face_jpg):
    h = hdr(dkey)
    r = http.post(D + "/detect", files={"file": ("a.jpg", face_jpg)}, headers=h)
    assert r.status_code == 200, r.text
    (face,) = r.json()["result"]
    assert list(r.json()) == ["result"] and set(face) == {"box"}
    # the detection service does not round the probability (CompreFace leaves it as the core sent it)
    assert 0.85 < face["box"]["probability"] <= 1
    full = http.post(D + "/detect", json={"file": b64(face_jpg)},
                     params={"face_plugins": "landmarks,calculator", "status": "true"}, headers=h).json()
    item = full["result"][0]
    assert len(item["embedding"]) == 128 and len(item["landmarks"]) == 5 and "execution_time" in item
    assert item["box"] == face["box"]
    assert full["plugins_versions"]["calculator"] and full["plugins_versions"]["detector"]
    no_calc = http.post(D + "/detect", files={"file": ("a.jpg", face_jpg)}, params={"status": "true"},
                        headers=h).json()
    assert "calculator" not in no_calc["plugins_versions"] and "calculator" not in no_calc["result"][0][
        "execution_time"]
    two = http.post(D + "/detect", files={"file": ("t.jpg", two_faces_jpg)}, headers=h).json()["result"]
    assert len(two) == 2
    assert len(http.post(D + "/detect", files={"file": ("t.jpg", two_faces_jpg)}, params={"limit": 1},
                         headers=h).json()["result"]) == 1
    assert_error(http.post(D + "/detect", files={"file": ("a.jpg", no_face_jpg)}, headers=h), 400, 28)
    assert_error(http.post(D + "/detect", files={"file": ("a.jpg", face_jpg)}, params={"limit": -2}, headers=h),
                 400, 26, "Limit should be equal or greater than 0; ")


# ------------------------------------------------------------------------------- verification service
def test_verification_service(http, vkey, face_jpg, two_faces_jpg, shifted_face_jpg, no_face_jpg):
    h = hdr(vkey)
    r = http.post(V + "/verify", files={"source_image": ("s.jpg", face_jpg), "target_image": ("t.jpg", two_faces_jpg)},
                  headers=h)
    assert r.status_code == 200, r.text
    (item,) = r.json()["result"]
    assert set(item) == {"source_image_face", "face_matches"}
    assert set(item["source_image_face"]) == {"box"} and len(item["face_matches"]) == 2
    for m in item["face_matches"]:
        assert set(m) == {"box", "similarity"} and decimals(m["similarity"]) <= 5
    # base64, with status: plugins_versions sits inside the result item
    j = http.post(V + "/verify", json={"source_image": b64(face_jpg), "target_image": b64(shifted_face_jpg)},
                  params={"status": "true", "face_plugins": "calculator"}, headers=h).json()
    (item,) = j["result"]
    assert "plugins_versions" in item and "plugins_versions" not in j
    assert len(item["source_image_face"]["embedding"]) == 128 and "execution_time" in item["face_matches"][0]
    assert item["face_matches"][0]["similarity"] > 0.5
    # errors
    assert_error(http.post(V + "/verify", files={"source_image": ("s.jpg", two_faces_jpg),
                                                  "target_image": ("t.jpg", face_jpg)}, headers=h),
                 400, 31, "More than one face in the source image")
    assert_error(http.post(V + "/verify", files={"source_image": ("s.jpg", no_face_jpg),
                                                  "target_image": ("t.jpg", face_jpg)}, headers=h), 400, 28)
    assert_error(http.post(V + "/verify", files={"source_image": ("s.jpg", face_jpg),
                                                  "target_image": ("t.jpg", no_face_jpg)}, headers=h), 400, 28)
    assert_error(http.post(V + "/verify", files={"source_image": ("s.jpg", face_jpg)}, headers=h), 400, 34,
                 "Required part target_image is missing")
    assert_error(http.post(V + "/verify", files={"source_image": ("s.jpg", face_jpg),
                                                  "target_image": ("t.gifx", face_jpg)}, headers=h), 400, 21,
                 "File [t.gifx] has an unavailable extension")
    assert_error(http.post(V + "/verify", json={"source_image": b64(face_jpg)}, headers=h), 400, 5,
                 "Field targetImageBase64 cannot be empty")


# ------------------------------------------------------------------------------- embeddings
def test_embedding_endpoints(server, http, rkey, vkey, face_jpg, shifted_face_jpg):
    h = hdr(rkey)
    image_id = add_face(http, rkey, face_jpg, "Eileen").json()["image_id"]
    add_face(http, rkey, shifted_face_jpg, "Other")
    det = http.post(D + "/detect", files={"file": ("a.jpg", face_jpg)}, params={"face_plugins": "calculator"},
                    headers=hdr(server.create_key("detection"))).json()
    emb = det["result"][0]["embedding"]
    shifted = http.post(D + "/detect", files={"file": ("b.jpg", shifted_face_jpg)},
                        params={"face_plugins": "calculator"},
                        headers=hdr(server.create_key("detection"))).json()["result"][0]["embedding"]
    # recognize
    r = http.post(R + "/embeddings/recognize", params={"prediction_count": 2}, json={"embeddings": [emb, shifted]},
                  headers=h).json()
    assert [x["embedding"] for x in r["result"]] == [emb, shifted]
    first = r["result"][0]["similarities"]
    assert [s["subject"] for s in first] == ["Eileen", "Other"]
    assert first[0]["similarity"] == pytest.approx(similarity(server.settings, emb, emb), abs=1e-5)
    assert first[1]["similarity"] == pytest.approx(similarity(server.settings, emb, shifted), abs=2e-5)
    assert r["result"][1]["similarities"][0]["subject"] == "Other"
    one = http.post(R + "/embeddings/recognize", json={"embeddings": [emb]}, headers=h).json()
    assert len(one["result"][0]["similarities"]) == 1
    # verify against a stored face: sorted by similarity, highest first
    v = http.post(f"{R}/embeddings/faces/{image_id}/verify", json={"embeddings": [shifted, emb]}, headers=h).json()
    assert [x["embedding"] for x in v["result"]] == [emb, shifted]
    assert v["result"][0]["similarity"] >= v["result"][1]["similarity"]
    # verification service: source vs targets
    s = http.post(V + "/embeddings/verify", json={"source": emb, "targets": [shifted, emb]}, headers=hdr(vkey)).json()
    assert [x["embedding"] for x in s["result"]] == [emb, shifted]
    assert s["result"][1]["similarity"] == pytest.approx(similarity(server.settings, emb, shifted), abs=2e-5)
    # errors
    assert_error(http.post(R + "/embeddings/recognize", params={"prediction_count": 0}, json={"embeddings": [emb]},
                           headers=h), 400, 26, "prediction_count should be equal or greater than 1; ")
    assert_error(http.post(R + "/embeddings/recognize", json={}, headers=h), 400, 5, "Field embeddings cannot be empty")
    assert_error(http.post(R + "/embeddings/recognize", json={"embeddings": [[0.1] * 127]}, headers=h), 400, 0)
    assert_error(http.post(R + "/embeddings/recognize", json={"embeddings": [["a"] * 128]}, headers=h), 400, 0)
    assert http.post(R + "/embeddings/recognize", json={"embeddings": []}, headers=h).json() == {"result": []}
    missing = str(uuid.uuid4())
    assert_error(http.post(f"{R}/embeddings/faces/{missing}/verify", json={"embeddings": [emb]}, headers=h), 404, 44,
                 "Image Id is incorrect")
    assert_error(http.post(f"{R}/embeddings/faces/{image_id}/verify", json={"embeddings": []}, headers=h), 400, 37,
                 "1 embeddings were expected, but 0 were provided")
    assert_error(http.post(f"{R}/embeddings/faces/{image_id}/verify", json={"embeddings": None}, headers=h), 400, 5,
                 "Field embeddings cannot be empty")
    assert_error(http.post(V + "/embeddings/verify", json={"source": emb, "targets": []}, headers=hdr(vkey)), 400, 37,
                 "2 embeddings were expected, but 1 were provided")
    assert_error(http.post(V + "/embeddings/verify", json={"targets": [emb]}, headers=hdr(vkey)), 400, 5,
                 "Field source cannot be empty")
    assert_error(http.post(V + "/embeddings/verify", json={"source": emb}, headers=hdr(vkey)), 400, 5,
                 "Field targets cannot be empty")
    # an empty collection answers with no similarities
    empty = server.create_key("recognition")
    assert http.post(R + "/embeddings/recognize", json={"embeddings": [emb]}, headers=hdr(empty)).json() == {
        "result": [{"embedding": emb, "similarities": []}]}


# ------------------------------------------------------------------------------- admin
def test_admin_api(server, http, face_jpg):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert_error(http.get("/api/v1/admin/keys"), 401, 0)
    assert_error(http.get("/api/v1/admin/keys", headers={"Authorization": "Bearer wrong"}), 401, 0,
                 "Invalid admin token")
    assert http.get("/api/v1/admin/keys", headers={"x-admin-token": ADMIN_TOKEN}).status_code == 200
    r = http.post("/api/v1/admin/keys", json={"type": "recognition", "name": "temp"}, headers=admin)
    assert r.status_code == 201
    created = r.json()
    assert set(created) == {"key", "type", "name", "created"} and created["name"] == "temp"
    key = created["key"]
    # usable at once
    assert add_face(http, key, face_jpg, "Temp").status_code == 201
    assert any(k["key"] == key for k in http.get("/api/v1/admin/keys", headers=admin).json()["keys"])
    stats = http.get("/api/v1/admin/stats", headers=admin).json()
    assert {"key": key, "name": "temp", "subjects": 1, "faces": 1} in stats["collections"]
    # rename: the name changes, nothing else; the key keeps working
    renamed = http.patch(f"/api/v1/admin/keys/{key.upper()}", json={"name": " front door "}, headers=admin)
    assert renamed.status_code == 200 and renamed.json() == {**created, "name": "front door"}
    assert {**created, "name": "front door"} in http.get("/api/v1/admin/keys", headers=admin).json()["keys"]
    assert http.get(R + "/subjects", headers=hdr(key)).json() == {"subjects": ["Temp"]}
    assert_error(http.patch(f"/api/v1/admin/keys/{key}", json={"name": "x"}), 401, 0)
    assert_error(http.patch(f"/api/v1/admin/keys/{uuid.uuid4()}", json={"name": "x"}, headers=admin), 404, 10)
    assert_error(http.patch(f"/api/v1/admin/keys/{key}", json={"type": "x"}, headers=admin), 400, 0)
    assert_error(http.patch(f"/api/v1/admin/keys/{key}", json={"name": "x" * 201}, headers=admin), 400, 26)
    # a chosen key, bad types
    chosen = str(uuid.uuid4())
    assert http.post("/api/v1/admin/keys", json={"type": "detection", "key": chosen}, headers=admin).json()["key"] == chosen
    assert_error(http.post("/api/v1/admin/keys", json={"type": "other"}, headers=admin), 400, 26)
    assert_error(http.post("/api/v1/admin/keys", json={"type": "detection", "key": chosen}, headers=admin), 400, 26)
    # delete: the key stops working at once, its collection is gone
    gone = http.delete(f"/api/v1/admin/keys/{key}", headers=admin).json()
    assert gone["key"] == key and gone["faces_deleted"] == 1
    assert_error(http.get(R + "/subjects", headers=hdr(key)), 404, 10)
    assert_error(http.delete(f"/api/v1/admin/keys/{key}", headers=admin), 404, 10)


def test_admin_routes_absent_without_token(tmp_path, model_dir, caplog):
    with caplog.at_level("WARNING", logger="server.http.app"), live_server(tmp_path, model_dir, admin_token="") as srv:
        assert not [r for r in srv.app.routes if r.path.startswith("/api/v1/admin")]
        with srv.client() as c:
            assert_error(c.get("/api/v1/admin/keys", headers={"Authorization": "Bearer x"}), 404, 0)
            assert "/api/v1/admin/keys" not in c.get("/openapi.json").json()["paths"]
    assert any("admin API disabled" in rec.getMessage() for rec in caplog.records)


def test_inference_deadline_is_503(tmp_path, model_dir, face_jpg):
    # a deadline that has passed before inference starts: the micro-batcher refuses (code 61)
    with live_server(tmp_path, model_dir, request_timeout_s=1e-9) as srv:
        key = srv.create_key("detection")
        with srv.client() as c:
            r = c.post(D + "/detect", files={"file": ("a.jpg", face_jpg)}, headers=hdr(key))
            assert_error(r, 503, 61, "Request timed out waiting for inference")


# ------------------------------------------------------------------------------- persistence
def test_restart_keeps_keys_faces_and_index(tmp_path, model_dir, face_jpg):
    with live_server(tmp_path, model_dir, seed_demo_keys=True) as first:
        key = first.create_key("recognition")
        with first.client() as c:
            image_id = add_face(c, key, face_jpg, "Kept").json()["image_id"]
    with live_server(tmp_path, model_dir) as second:
        with second.client() as c:
            r = c.post(R + "/recognize", files={"file": ("a.jpg", face_jpg)}, headers=hdr(key)).json()
            assert r["result"][0]["subjects"][0]["subject"] == "Kept"
            assert c.get(f"{R}/faces/{image_id}/img", headers=hdr(key)).content == face_jpg
            # CompreFace's demo keys were seeded by the first start
            demo = "00000000-0000-0000-0000-000000000002"
            assert c.get(R + "/subjects", headers=hdr(demo)).json() == {"subjects": []}
            assert_error(c.get(R + "/subjects", headers=hdr("00000000-0000-0000-0000-000000000003")), 404, 10)


# ------------------------------------------------------------------------------- real photos (../shared/facedata)
def _photo(facedata, rel: str) -> tuple[str, bytes]:
    path = facedata / rel
    if not path.is_file():
        pytest.skip(f"{rel} is not in the dev photos at {facedata}")
    return path.name, path.read_bytes()


def test_real_photos_recognition(http, rkey, facedata):
    sample = "CompreFace/embedding-calculator/sample_images/"
    h = hdr(rkey)
    for n in ("001_A.jpg", "002_A.jpg"):
        name, data = _photo(facedata, sample + n)
        assert add_face(http, rkey, data, "person_a", name=name).status_code == 201
    name, data = _photo(facedata, "face_recognition/examples/obama-720p.jpg")
    assert add_face(http, rkey, data, "obama", name=name).status_code == 201
    for probe, expected in ((sample + "004_A.jpg", "person_a"), (sample + "005_A.jpg", "person_a"),
                            ("face_recognition/examples/obama-480p.jpg", "obama")):
        name, data = _photo(facedata, probe)
        r = http.post(R + "/recognize", files={"file": (name, data)}, params={"prediction_count": 3}, headers=h)
        assert r.status_code == 200, (probe, r.text)
        subjects = r.json()["result"][0]["subjects"]
        assert subjects[0]["subject"] == expected, (probe, subjects)
        others = [s["similarity"] for s in subjects if s["subject"] != expected]
        assert all(o < subjects[0]["similarity"] for o in others)


def test_real_photos_inputs(http, dkey, facedata):
    h = hdr(dkey)
    name, data = _photo(facedata, "CompreFace/embedding-calculator/sample_images/000_5.jpg")
    many = http.post(D + "/detect", files={"file": (name, data)}, headers=h).json()["result"]
    assert len(many) >= 3
    areas = [(f["box"]["x_max"] - f["box"]["x_min"]) * (f["box"]["y_max"] - f["box"]["y_min"]) for f in many]
    assert areas == sorted(areas, reverse=True)
    assert len(http.post(D + "/detect", files={"file": (name, data)}, params={"limit": 2},
                         headers=h).json()["result"]) == 2
    # CompreFace's own broken test files: a clean code 28, never a 500
    for broken in ("corrupted.png", "empty.png"):
        name, data = _photo(facedata, "CompreFace/embedding-calculator/src/services/imgtools/test/files/" + broken)
        assert_error(http.post(D + "/detect", files={"file": (name, data)}, headers=h), 400, 28)
    # an RGBA PNG, and WEBP bytes behind a .jpeg name (the extension decides, the bytes are sniffed)
    for rel in ("face_recognition/tests/test_images/32bit.png", "insightface/cpp-package/inspireface/test_res/data/RD/d1.jpeg"):
        name, data = _photo(facedata, rel)
        r = http.post(D + "/detect", files={"file": (name, data)}, headers=h)
        assert r.status_code == 200 and len(r.json()["result"]) >= 1, (rel, r.text)
    # a PGM: not an allowed extension
    name, data = _photo(facedata, "orl-att-faces/att_faces/s1/1.pgm")
    assert_error(http.post(D + "/detect", files={"file": (name, data)}, headers=h), 400, 21,
                 "File [1.pgm] has an unavailable extension")
