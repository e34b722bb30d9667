"""Locust scenarios against the CompreFace API of this server, weighted like real use.

CompreFace's own k6 load tests (load-tests/ in its repository) each hammer one endpoint with
multipart uploads: recognize (with `limit` and `prediction_count` as form fields), detect,
verify against a stored image id, and the verification service. Real clients mix those with
collection management, and half of the SDKs send base64 JSON. The weights below follow that:
recognition dominates, writes are a small share, every image endpoint runs in both forms.

Keys come from the environment (loadtests/run.py creates them):
    FR_LOAD_RECOGNITION_KEY, FR_LOAD_DETECTION_KEY, FR_LOAD_VERIFICATION_KEY
Optional: FR_LOAD_WAIT="min,max" think time in seconds per user (default 0: back to back, as k6's
constant-vus), FR_LOAD_SEED_FACES (examples enrolled before the run, default 4).

Run it through `python -m loadtests.run` (server, keys, thresholds, reports), or directly:
    FR_LOAD_RECOGNITION_KEY=... locust -f loadtests/locustfile.py --host http://127.0.0.1:8000
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import random
import threading
import uuid

import requests
from locust import FastHttpUser, between, constant, events, task

from loadtests.images import TestImage, face_images, multipart, two_faces_image

R, D, V = "/api/v1/recognition", "/api/v1/detection", "/api/v1/verification"
SEED_SUBJECT_PREFIX = "load-seed-"
TEMP_SUBJECT_PREFIX = "load-tmp-"
TIMEOUT_S = 60.0  # per request: a hung request is a failure, never a stuck user

KEYS = {t: os.environ.get(f"FR_LOAD_{t.upper()}_KEY", "") for t in ("recognition", "detection", "verification")}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Bodies:
    """Request bodies encoded once (multipart and base64 JSON) and shared by every user."""

    def __init__(self) -> None:
        self.faces: tuple[TestImage, ...] = face_images()
        self.recognize_mp = [multipart({"file": (i.name, i.data)}, {"limit": "0", "prediction_count": "1"})
                             for i in self.faces]
        self.file_mp = [multipart({"file": (i.name, i.data)}) for i in self.faces]
        self.file_json = [json.dumps({"file": _b64(i.data)}).encode() for i in self.faces]
        two = two_faces_image()
        self.verify_mp = [multipart({"source_image": (i.name, i.data), "target_image": (two.name, two.data)})
                          for i in self.faces]
        self.verify_json = [json.dumps({"source_image": _b64(i.data), "target_image": _b64(two.data)}).encode()
                            for i in self.faces]


BODIES = Bodies()


class Seed:
    """Examples enrolled once before the run (verify-by-id needs ids; recognize needs a gallery)."""

    image_ids: list[str] = []
    embedding: list[float] = []
    _lock = threading.Lock()


@events.test_start.add_listener
def _seed(environment, **_kwargs) -> None:
    host = environment.host.rstrip("/")
    key = KEYS["recognition"]
    if not key:
        raise RuntimeError("FR_LOAD_RECOGNITION_KEY is not set (python -m loadtests.run creates the keys)")
    count = int(os.environ.get("FR_LOAD_SEED_FACES", "4"))
    ids = []
    with requests.Session() as s:
        for n, image in zip(range(count), itertools.cycle(BODIES.faces)):
            body, ctype = multipart({"file": (image.name, image.data)})
            r = s.post(f"{host}{R}/faces", params={"subject": f"{SEED_SUBJECT_PREFIX}{n}"}, data=body,
                       headers={"x-api-key": key, "content-type": ctype}, timeout=TIMEOUT_S)
            if r.status_code != 201:
                raise RuntimeError(f"seeding the collection failed: {r.status_code} {r.text}")
            ids.append(r.json()["image_id"])
        if KEYS["detection"]:
            r = s.post(f"{host}{D}/detect", params={"face_plugins": "calculator"}, data=BODIES.file_mp[0][0],
                       headers={"x-api-key": KEYS["detection"], "content-type": BODIES.file_mp[0][1]},
                       timeout=TIMEOUT_S)
            if r.status_code == 200:
                Seed.embedding = r.json()["result"][0]["embedding"]
    with Seed._lock:
        Seed.image_ids = ids


@events.test_stop.add_listener
def _unseed(environment, **_kwargs) -> None:
    """Leave the collection as it was: the seeded subjects and any temporary example go."""
    host = environment.host.rstrip("/")
    key = KEYS["recognition"]
    with requests.Session() as s:
        try:
            names = s.get(f"{host}{R}/subjects", headers={"x-api-key": key}, timeout=TIMEOUT_S).json()["subjects"]
        except (requests.RequestException, ValueError, KeyError):
            return
        for name in names:
            if name.startswith((SEED_SUBJECT_PREFIX, TEMP_SUBJECT_PREFIX)):
                s.delete(f"{host}{R}/subjects/{name}", headers={"x-api-key": key}, timeout=TIMEOUT_S)


def _think_time():
    raw = os.environ.get("FR_LOAD_WAIT", "")
    if not raw:
        return constant(0)
    low, _, high = raw.partition(",")
    return between(float(low), float(high or low))


class CompreFaceUser(FastHttpUser):
    """One client of the API, with all three keys (as an application using every service)."""

    wait_time = _think_time()
    network_timeout = TIMEOUT_S
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.user_id = uuid.uuid4().hex[:8]
        self.h_rec = {"x-api-key": KEYS["recognition"]}
        self.h_det = {"x-api-key": KEYS["detection"]}
        self.h_ver = {"x-api-key": KEYS["verification"]}

    # ------------------------------------------------------------------ helpers
    def _post(self, path: str, name: str, body: bytes, ctype: str, headers: dict, *, expect: int = 200,
              params: dict | None = None, check=None):
        """POST and judge the answer: the status, then the JSON shape (`check(json) -> error or None`)."""
        with self.client.post(path, name=name, data=body, params=params, headers={**headers, "content-type": ctype},
                              catch_response=True) as r:
            if r.status_code != expect:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return None
            try:
                payload = r.json()
            except ValueError:
                r.failure("the body is not JSON")
                return None
            problem = check(payload) if check else None
            if problem:
                r.failure(problem)
                return None
            r.success()
            return payload

    @staticmethod
    def _has_faces(payload) -> str | None:
        result = payload.get("result") if isinstance(payload, dict) else None
        if not result or "box" not in result[0]:
            return "no face in the result"
        return None

    @staticmethod
    def _has_similarity(payload) -> str | None:
        result = payload.get("result") if isinstance(payload, dict) else None
        if not result:
            return "empty result"
        first = result[0]
        if "subjects" in first:  # recognize
            return None if first["subjects"] and "similarity" in first["subjects"][0] else "no subject matched"
        if "face_matches" in first:  # verification service
            return None if first["face_matches"] and "similarity" in first["face_matches"][0] else "no match"
        return None if "similarity" in first else "no similarity"

    def _image(self) -> int:
        return random.randrange(len(BODIES.faces))

    # ------------------------------------------------------------------ recognition service
    @task(10)
    def recognize_multipart(self) -> None:
        body, ctype = BODIES.recognize_mp[self._image()]
        self._post(R + "/recognize", "recognize [multipart]", body, ctype, self.h_rec, check=self._has_similarity)

    @task(4)
    def recognize_base64(self) -> None:
        self._post(R + "/recognize", "recognize [base64]", BODIES.file_json[self._image()], "application/json",
                   self.h_rec, params={"limit": 0, "prediction_count": 1}, check=self._has_similarity)

    @task(4)
    def verify_by_image_id(self) -> None:
        if not Seed.image_ids:
            return
        image_id = random.choice(Seed.image_ids)
        body, ctype = BODIES.file_mp[self._image()]
        self._post(f"{R}/faces/{image_id}/verify", "verify by image id [multipart]", body, ctype, self.h_rec,
                   check=self._has_similarity)

    @task(2)
    def add_and_delete_example_multipart(self) -> None:
        body, ctype = BODIES.file_mp[self._image()]
        added = self._post(R + "/faces", "add example [multipart]", body, ctype, self.h_rec, expect=201,
                           params={"subject": TEMP_SUBJECT_PREFIX + self.user_id},
                           check=lambda j: None if "image_id" in j else "no image_id")
        if added:
            self.client.delete(f"{R}/faces/{added['image_id']}", name="delete example", headers=self.h_rec)

    @task(1)
    def add_and_delete_example_base64(self) -> None:
        added = self._post(R + "/faces", "add example [base64]", BODIES.file_json[self._image()], "application/json",
                           self.h_rec, expect=201, params={"subject": TEMP_SUBJECT_PREFIX + self.user_id},
                           check=lambda j: None if "image_id" in j else "no image_id")
        if added:
            self.client.delete(f"{R}/faces/{added['image_id']}", name="delete example", headers=self.h_rec)

    @task(3)
    def list_faces(self) -> None:
        with self.client.get(R + "/faces", name="list faces", params={"page": 0, "size": 20}, headers=self.h_rec,
                             catch_response=True) as r:
            try:
                ok = r.status_code == 200 and "faces" in r.json()
            except ValueError:
                ok = False
            if not ok:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")

    @task(1)
    def list_subjects(self) -> None:
        self.client.get(R + "/subjects", name="list subjects", headers=self.h_rec)

    @task(1)
    def recognize_embedding(self) -> None:
        if not Seed.embedding:
            return
        body = json.dumps({"embeddings": [Seed.embedding]}).encode()
        self._post(R + "/embeddings/recognize", "recognize embedding", body, "application/json", self.h_rec)

    # ------------------------------------------------------------------ detection service
    @task(5)
    def detect_multipart(self) -> None:
        body, ctype = BODIES.file_mp[self._image()]
        self._post(D + "/detect", "detect [multipart]", body, ctype, self.h_det, check=self._has_faces)

    @task(2)
    def detect_base64(self) -> None:
        self._post(D + "/detect", "detect [base64]", BODIES.file_json[self._image()], "application/json",
                   self.h_det, check=self._has_faces)

    # ------------------------------------------------------------------ verification service
    @task(3)
    def verification_multipart(self) -> None:
        body, ctype = BODIES.verify_mp[self._image()]
        self._post(V + "/verify", "verification [multipart]", body, ctype, self.h_ver, check=self._has_similarity)

    @task(1)
    def verification_base64(self) -> None:
        self._post(V + "/verify", "verification [base64]", BODIES.verify_json[self._image()], "application/json",
                   self.h_ver, check=self._has_similarity)
