"""Isolation between API keys, over real HTTP against a real server.

Key A's client must not read, list, download, verify against, rename or delete anything of key
B, through any route (the static image URL included) and with any image id it can guess;
detection and verification keys must not reach recognition data. Secrets are compared in
constant time, and API keys never reach the log in full.
"""
from __future__ import annotations

import hmac
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.local_server import LocalServer, create_key_admin
from server.http.routes import admin
from server.http.gate import loggable_path, mask_key
from tests.support.api_server import ADMIN_TOKEN, astronaut, encode, live_server

R, D, V = "/api/v1/recognition", "/api/v1/detection", "/api/v1/verification"
TIMEOUT_S = 60.0

FACE = astronaut()
FACE_JPG = encode(FACE, "JPEG", quality=90)
MIRRORED_JPG = encode(FACE[:, ::-1].copy(), "JPEG", quality=90)


def hdr(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def error(r: httpx.Response) -> tuple[int, int, str]:
    body = r.json()
    assert list(body) == ["message", "code"], body
    return r.status_code, body["code"], body["message"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("isolation"), model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as c:
        yield c


class Tenant:
    """A recognition key with its own examples."""

    def __init__(self, http: httpx.Client, key: str, examples: dict[str, bytes]) -> None:
        self.key = key
        self.ids: dict[str, str] = {}
        for subject, data in examples.items():
            r = http.post(R + "/faces", params={"subject": subject}, files={"file": ("f.jpg", data)}, headers=hdr(key))
            assert r.status_code == 201, r.text
            self.ids[subject] = r.json()["image_id"]

    def snapshot(self, http: httpx.Client) -> tuple[list[str], list[tuple[str, str]]]:
        subjects = http.get(R + "/subjects", headers=hdr(self.key)).json()["subjects"]
        faces = http.get(R + "/faces", params={"size": 100}, headers=hdr(self.key)).json()["faces"]
        return sorted(subjects), sorted((f["image_id"], f["subject"]) for f in faces)


@pytest.fixture
def tenants(server, http):
    """A fresh pair per test: A has Alice; B has Bob and Bella (the same person's photos: only the key separates them)."""
    a = Tenant(http, server.create_key("recognition"), {"Alice": FACE_JPG})
    b = Tenant(http, server.create_key("recognition"), {"Bob": FACE_JPG, "Bella": MIRRORED_JPG})
    return a, b


@pytest.fixture(scope="module")
def dkey(server) -> str:
    return server.create_key("detection")


@pytest.fixture(scope="module")
def vkey(server) -> str:
    return server.create_key("verification")


# ------------------------------------------------------------------------------- reading
def test_lists_are_per_key(http, tenants):
    a, b = tenants
    assert a.snapshot(http) == (["Alice"], [(a.ids["Alice"], "Alice")])
    assert b.snapshot(http)[0] == ["Bella", "Bob"]
    assert http.get(R + "/faces", params={"subject": "Bob"}, headers=hdr(a.key)).json()["total_elements"] == 0


def test_recognize_sees_only_its_own_collection(http, tenants):
    a, b = tenants
    r = http.post(R + "/recognize", params={"prediction_count": 10}, files={"file": ("a.jpg", FACE_JPG)},
                  headers=hdr(a.key))
    assert r.status_code == 200, r.text
    assert {s["subject"] for face in r.json()["result"] for s in face["subjects"]} == {"Alice"}
    # the same probe with B's key finds B's subjects only
    r = http.post(R + "/recognize", params={"prediction_count": 10}, files={"file": ("a.jpg", FACE_JPG)},
                  headers=hdr(b.key))
    assert {s["subject"] for face in r.json()["result"] for s in face["subjects"]} == {"Bob", "Bella"}
    emb = http.post(R + "/recognize", params={"face_plugins": "calculator"}, files={"file": ("a.jpg", FACE_JPG)},
                    headers=hdr(a.key)).json()["result"][0]["embedding"]
    sims = http.post(R + "/embeddings/recognize", params={"prediction_count": 10}, json={"embeddings": [emb]},
                     headers=hdr(a.key)).json()["result"][0]["similarities"]
    assert {s["subject"] for s in sims} == {"Alice"}


def test_images_of_another_key_cannot_be_downloaded(http, tenants, dkey, vkey):
    a, b = tenants
    bob = b.ids["Bob"]
    assert http.get(f"{R}/faces/{bob}/img", headers=hdr(b.key)).content == FACE_JPG  # the owner can
    assert http.get(f"/api/v1/static/{b.key}/images/{bob}").content == FACE_JPG
    for key in (a.key, dkey, vkey):
        assert http.get(f"/api/v1/static/{key}/images/{bob}").content == b""
    r = http.get(f"{R}/faces/{bob}/img", headers=hdr(a.key))
    assert r.status_code == 200 and r.content == b""


def test_images_of_another_key_cannot_be_verified_against(http, tenants):
    a, b = tenants
    bob = b.ids["Bob"]
    r = http.post(f"{R}/faces/{bob}/verify", files={"file": ("a.jpg", FACE_JPG)}, headers=hdr(a.key))
    assert error(r) == (404, 44, "Image Id is incorrect")
    emb = [0.1] * 128
    r = http.post(f"{R}/embeddings/faces/{bob}/verify", json={"embeddings": [emb]}, headers=hdr(a.key))
    assert error(r) == (404, 44, "Image Id is incorrect")
    # the owner can
    assert http.post(f"{R}/faces/{bob}/verify", files={"file": ("a.jpg", FACE_JPG)}, headers=hdr(b.key)).status_code == 200


# ------------------------------------------------------------------------------- writing
def test_subjects_of_another_key_cannot_be_renamed_or_deleted(http, tenants):
    a, b = tenants
    before = b.snapshot(http)
    assert error(http.put(R + "/subjects/Bob", json={"subject": "Stolen"}, headers=hdr(a.key))) == (
        404, 42, "Subject Bob not found")
    assert error(http.delete(R + "/subjects/Bob", headers=hdr(a.key))) == (404, 42, "Subject Bob not found")
    assert http.delete(R + "/faces", params={"subject": "Bob"}, headers=hdr(a.key)).json() == {"deleted": 0}
    assert b.snapshot(http) == before


def test_faces_of_another_key_cannot_be_deleted(http, tenants):
    a, b = tenants
    before = b.snapshot(http)
    bob = b.ids["Bob"]
    assert error(http.delete(f"{R}/faces/{bob}", headers=hdr(a.key))) == (404, 44, f"Image {bob} not found")
    assert http.post(R + "/faces/delete", json=list(b.ids.values()), headers=hdr(a.key)).json() == []
    assert b.snapshot(http) == before


def test_deleting_everything_stays_in_its_own_collection(http, tenants):
    a, b = tenants
    before = b.snapshot(http)
    assert http.delete(R + "/faces", headers=hdr(a.key)).json() == {"deleted": 1}
    assert http.delete(R + "/subjects", headers=hdr(a.key)).json() == {"deleted": 0}
    assert a.snapshot(http) == ([], [])
    assert b.snapshot(http) == before


def test_same_subject_names_are_separate(http, tenants):
    a, b = tenants
    before = b.snapshot(http)
    assert http.post(R + "/subjects", json={"subject": "Bob"}, headers=hdr(a.key)).status_code == 201
    r = http.post(R + "/faces", params={"subject": "bob"}, files={"file": ("m.jpg", MIRRORED_JPG)}, headers=hdr(a.key))
    assert r.status_code == 201
    assert http.put(R + "/subjects/Bob", json={"subject": "Bobby"}, headers=hdr(a.key)).json() == {"updated": True}
    assert http.put(R + "/subjects/Bobby", json={"subject": "Alice"}, headers=hdr(a.key)).json() == {"updated": True}
    assert b.snapshot(http) == before
    assert a.snapshot(http)[0] == ["Alice"] and len(a.snapshot(http)[1]) == 2


def _guesses(image_id: str) -> list[str]:
    """Ids an attacker might derive from a known one: each hex digit changed, and other spellings of it."""
    out = []
    hexpos = [i for i, ch in enumerate(image_id) if ch != "-"]
    for i in hexpos:
        out.append(image_id[:i] + format((int(image_id[i], 16) + 1) % 16, "x") + image_id[i + 1:])
    return out


def test_guessed_image_ids_find_nothing(http, tenants):
    a, b = tenants
    bob = b.ids["Bob"]
    spellings = [bob.upper(), bob.replace("-", ""), "{" + bob + "}", "urn:uuid:" + bob]
    for image_id in spellings:  # the same id, spelled differently: the owner still reaches it ...
        assert http.get(f"{R}/faces/{image_id}/img", headers=hdr(b.key)).content == FACE_JPG
        # ... another key does not
        assert http.get(f"{R}/faces/{image_id}/img", headers=hdr(a.key)).content == b""
        assert http.get(f"/api/v1/static/{a.key}/images/{image_id}").content == b""
        assert error(http.delete(f"{R}/faces/{image_id}", headers=hdr(a.key)))[:2] == (404, 44)
    neighbours = _guesses(bob)
    assert len(neighbours) == 32
    deleted = http.post(R + "/faces/delete", json=neighbours + [str(uuid.uuid4()) for _ in range(200)],
                        headers=hdr(b.key)).json()
    assert deleted == []  # not even the owner has faces under guessed ids
    for image_id in neighbours[:8]:
        assert http.get(f"{R}/faces/{image_id}/img", headers=hdr(b.key)).content == b""
    assert b.snapshot(http)[1] == sorted((i, s) for s, i in b.ids.items())


# ------------------------------------------------------------------------------- other services
RECOGNITION_ROUTES = [
    ("GET", "/subjects"), ("POST", "/subjects"), ("DELETE", "/subjects"), ("PUT", "/subjects/Bob"),
    ("DELETE", "/subjects/Bob"), ("GET", "/faces"), ("POST", "/faces"), ("DELETE", "/faces"),
    ("POST", "/faces/delete"), ("DELETE", "/faces/{id}"), ("GET", "/faces/{id}/img"), ("POST", "/faces/{id}/verify"),
    ("POST", "/recognize"), ("POST", "/embeddings/recognize"), ("POST", "/embeddings/faces/{id}/verify"),
]


@pytest.mark.parametrize("method, route", RECOGNITION_ROUTES)
def test_detection_and_verification_keys_cannot_reach_recognition(http, tenants, dkey, vkey, method, route):
    _, b = tenants
    path = R + route.replace("{id}", b.ids["Bob"])
    for key, name in ((dkey, "detection"), (vkey, "verification")):
        r = http.request(method, path, json={"subject": "x"}, headers=hdr(key))
        assert error(r) == (404, 10, f"Recognition service with API Key {key} not found"), (name, r.text)


def test_keys_are_bound_to_their_service(http, tenants, dkey, vkey):
    a, _ = tenants
    r = http.post(D + "/detect", files={"file": ("a.jpg", FACE_JPG)}, headers=hdr(a.key))
    assert error(r) == (404, 10, f"Detection service with API Key {a.key} not found")
    r = http.post(V + "/verify", files={"source_image": ("a.jpg", FACE_JPG), "target_image": ("b.jpg", FACE_JPG)},
                  headers=hdr(dkey))
    assert error(r) == (404, 10, f"Verification service with API Key {dkey} not found")
    r = http.post(D + "/detect", files={"file": ("a.jpg", FACE_JPG)}, headers=hdr(vkey))
    assert error(r) == (404, 10, f"Detection service with API Key {vkey} not found")


def test_a_deleted_key_loses_its_data(server, http):
    c = Tenant(http, server.create_key("recognition"), {"Carl": FACE_JPG})
    carl = c.ids["Carl"]
    r = http.delete(f"/api/v1/admin/keys/{c.key}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200 and r.json()["faces_deleted"] == 1
    assert error(http.get(R + "/subjects", headers=hdr(c.key)))[:2] == (404, 10)
    assert http.get(f"/api/v1/static/{c.key}/images/{carl}").content == b""
    # a new key never inherits the old collection
    d = server.create_key("recognition")
    assert http.get(R + "/faces", headers=hdr(d)).json()["total_elements"] == 0
    assert http.get(f"{R}/faces/{carl}/img", headers=hdr(d)).content == b""


def test_concurrent_clients_stay_apart(server, http):
    keys = [server.create_key("recognition") for _ in range(4)]
    failures: list[str] = []

    def client(key: str, n: int) -> None:
        with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as c:
            for i in range(3):
                r = c.post(R + "/subjects", json={"subject": f"user{n}-{i}"}, headers=hdr(key))
                if r.status_code != 201:
                    failures.append(r.text)
                names = c.get(R + "/subjects", headers=hdr(key)).json()["subjects"]
                if any(not s.startswith(f"user{n}-") for s in names):
                    failures.append(f"key {n} sees {names}")

    threads = [threading.Thread(target=client, args=(k, n)) for n, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert failures == []
    for n, key in enumerate(keys):
        assert http.get(R + "/subjects", headers=hdr(key)).json()["subjects"] == [f"user{n}-{i}" for i in range(3)]


# ------------------------------------------------------------------------------- secrets
def test_admin_token_is_compared_in_constant_time(http, monkeypatch):
    """Every admin request is decided by hmac.compare_digest (constant time), whatever the guess."""
    seen: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def recording_compare(a, b):  # records, then the real comparison decides
        seen.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", recording_compare)
    guesses = [ADMIN_TOKEN[:-1], ADMIN_TOKEN[:-1] + "x", ADMIN_TOKEN + "x", "t", "0" * 64, ADMIN_TOKEN.upper(), "é" * 5]
    for guess in guesses:
        r = http.get("/api/v1/admin/keys", headers={"Authorization": f"Bearer {guess}".encode()})
        assert r.status_code == 401, guess
    assert http.get("/api/v1/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    assert len(seen) == len(guesses) + 1
    assert all(expected == ADMIN_TOKEN.encode() for _, expected in seen)


def test_log_masks_keys():
    key = str(uuid.uuid4())
    assert mask_key(key) == key[:8] + "..."
    path = loggable_path(f"/api/v1/static/{key}/images/{uuid.UUID(int=7)}")
    assert key not in path and path.startswith(f"/api/v1/static/{key[:8]}.../images/")
    assert loggable_path(R + "/faces") == R + "/faces"


def test_keys_never_reach_the_log_in_full(tmp_path: Path):
    """A real server process at DEBUG level: its whole log output, after start-up (demo keys seeded),
    key creation and requests of every kind with the keys, holds no key in full."""
    token = "isolation-admin-token-" + uuid.uuid4().hex
    server = LocalServer(tmp_path / "data", admin_token=token, verbose=True, seed_demo_keys=True,
                         log_path=tmp_path / "server.log")
    demo = [f"00000000-0000-0000-0000-00000000000{i}" for i in (2, 3, 4)]
    with server:
        keys = {t: create_key_admin(server.base_url, token, t) for t in ("recognition", "detection", "verification")}
        keys["cli"] = server.create_key("recognition")
        with server.client() as c:
            rk = keys["recognition"]
            image_id = c.post(R + "/faces", params={"subject": "Logged"}, files={"file": ("a.jpg", FACE_JPG)},
                              headers=hdr(rk)).json()["image_id"]
            c.post(R + "/recognize", files={"file": ("a.jpg", FACE_JPG)}, headers=hdr(keys["cli"]))
            c.post(D + "/detect", files={"file": ("a.jpg", b"broken")}, headers=hdr(keys["detection"]))
            c.post(V + "/embeddings/verify", json={"source": [1]}, headers=hdr(keys["verification"]))
            c.get(R + "/subjects", headers=hdr(keys["detection"]))  # wrong service: 404 naming the key
            c.get(R + "/subjects", headers=hdr(str(uuid.uuid4())))  # unknown key
            assert c.get(f"/api/v1/static/{rk}/images/{image_id}").content == FACE_JPG
            c.get(f"/api/v1/static/{rk}/images/not-a-uuid")
            c.get(R + "/subjects", headers=hdr(demo[0]))
            c.delete(f"/api/v1/admin/keys/{keys['cli']}", headers={"Authorization": f"Bearer {token}"})
    log = server.log_text()
    assert "CompreFace demo keys" in log and "models loaded" in log  # the log was captured
    assert "00000000..." in log  # demo keys appear masked
    for secret in list(keys.values()) + demo + [token]:
        assert secret not in log, f"{secret} is in the log"
