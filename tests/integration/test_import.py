"""Bulk enrolment: storage's batched write, `python -m server import` (folder and CSV, resumable,
rejections), a running server picking imported faces up, the import-vs-HTTP comparison, and our
two API extensions (bulk embeddings, verify against a whole subject). Real models throughout.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from benchmarks.import_compare import compare
from server.core.importer import Item, import_source, list_source
from server.config import Settings
from server.storage import FaceExists, NewFace, SubjectNotFound
from server.storage.sqlite import SqliteStorage
from tests.support.api_server import astronaut, blank, encode, live_server, side_by_side

ROOT = Path(__file__).resolve().parents[2]
R = "/api/v1/recognition"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, 128)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def face_variant(i: int) -> bytes:
    """The astronaut's face, cropped and shifted differently for each i: distinct files, one face."""
    img = astronaut()[5 + 3 * i: 300 + 3 * i, 100 + 4 * i: 350 + 4 * i]
    if i % 2:
        img = img[:, ::-1]
    return encode(np.ascontiguousarray(img), "JPEG", quality=90 - i)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """eileen/ 3 good photos (one of them twice, under two names), plus everything an import must
    refuse: two faces, no face, broken bytes, a text file, a file outside any subject folder."""
    root = tmp_path_factory.mktemp("photos")
    (root / "eileen").mkdir()
    for i in range(3):
        (root / "eileen" / f"e{i}.jpg").write_bytes(face_variant(i))
    (root / "eileen" / "copy-of-e0.jpg").write_bytes(face_variant(0))
    (root / "mirror" / "nested").mkdir(parents=True)
    (root / "mirror" / "nested" / "m.png").write_bytes(encode(astronaut()[:, ::-1], "PNG"))
    (root / "crowd").mkdir()
    (root / "crowd" / "two.jpg").write_bytes(encode(side_by_side(astronaut(), astronaut()[:, ::-1]), "JPEG"))
    (root / "crowd" / "empty-wall.jpg").write_bytes(encode(blank(), "JPEG"))
    (root / "crowd" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "crowd" / "notes.txt").write_text("not an image")
    (root / "stray.jpg").write_bytes(face_variant(5))
    return root


# ------------------------------------------------------------------------------ sources
def test_list_source_folder_and_csv(photo_folder, tmp_path):
    items, problems = list_source(photo_folder)
    assert [(i.path.name, i.subject) for i in items] == [
        ("broken.jpg", "crowd"), ("empty-wall.jpg", "crowd"), ("two.jpg", "crowd"), ("copy-of-e0.jpg", "eileen"),
        ("e0.jpg", "eileen"), ("e1.jpg", "eileen"), ("e2.jpg", "eileen"), ("m.png", "mirror")]
    assert sorted((Path(p).name, r) for p, r in problems) == [
        ("notes.txt", "not an image file name (extension)"), ("stray.jpg", "not in a subject folder")]
    table = tmp_path / "faces.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["path", "subject"], [str(photo_folder / "eileen" / "e1.jpg"), "Eileen Collins"],
                     ["photos/x.jpg", "a/b"], ["only-a-path.jpg"], ["photos/y.jpg", "  "]])
    items, problems = list_source(table)
    assert items == [Item(photo_folder / "eileen" / "e1.jpg", "Eileen Collins")]
    assert sorted(r.split(":")[0] for _, r in problems) == [
        "empty subject name", "line 4", "subject name contains ; / or \\"]
    with pytest.raises(FileNotFoundError):
        list_source(tmp_path / "missing")


# ------------------------------------------------------------------------------ storage
def test_add_faces_is_one_transaction_and_records_sources(tmp_path):
    store = SqliteStorage(tmp_path / "faces.db")
    c = store.create_key("recognition").collection
    rng = np.random.default_rng(1)
    v = unit(rng, 4)
    taken = str(uuid.uuid4())
    store.add_face(c, "Ann", v[0], b"img", image_id=taken)
    before = store.current_sequence(c)
    batch = [NewFace("ann", v[1], b"a", sha256="aa", source="x/a.jpg"), NewFace("Bob", v[2], image_id=taken)]
    with pytest.raises(FaceExists):
        store.add_faces(c, batch)  # a taken id anywhere in the batch: nothing at all is written
    dup = str(uuid.uuid4())
    with pytest.raises(FaceExists):
        store.add_faces(c, [NewFace("Bob", v[2], image_id=dup), NewFace("Bob", v[3], image_id=dup)])
    assert store.count_faces(c) == 1 and store.current_sequence(c) == before and store.find_subject(c, "Bob") is None
    added = store.add_faces(c, [NewFace("ann", v[1], b"a", sha256="aa", source="x/a.jpg"),
                                NewFace("Bob", v[2], sha256="bb"), NewFace("bob", v[3])])
    assert [f.subject for f in added.faces] == ["Ann", "Bob", "Bob"] and added.subjects_created == ["Bob"]
    assert [ch.seq for ch in added.changes] == [before + 1, before + 2, before + 3]
    assert [ch.label for ch in added.changes] == [f.label for f in added.faces]
    np.testing.assert_allclose(added.changes[2].vector, v[3])
    assert store.get_image(c, added.faces[0].image_id) == b"a"
    assert store.get_image(c, added.faces[2].image_id) is None  # embeddings only: no image
    assert store.known_sources(c, ["aa", "bb", "cc"]) == {"aa", "bb"}
    name, ids, vectors = store.subject_vectors(c, "BOB")
    assert name == "Bob" and ids == [added.faces[1].image_id, added.faces[2].image_id]
    np.testing.assert_allclose(vectors, v[2:4])
    with pytest.raises(SubjectNotFound):
        store.subject_vectors(c, "nobody")
    store.delete_faces(c, [added.faces[1].image_id])
    assert store.known_sources(c, ["aa", "bb"]) == {"aa"}  # a deleted face may be imported again
    other = store.create_key("recognition").collection
    assert store.known_sources(other, ["aa"]) == set()
    assert store.add_faces(c, []).faces == []
    store.close()


# ------------------------------------------------------------------------------ the importer
def run_cli(data_dir: Path, model_dir: Path, *args: str) -> str:
    env = {**os.environ, "FR_DATA_DIR": str(data_dir), "FR_MODEL_DIR": str(model_dir), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "server", "import", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_cli_is_resumable_and_reports_rejections(photo_folder, tmp_path, model_dir):
    data = tmp_path / "data"
    store = SqliteStorage(data / "faces.db")
    key = store.create_key("recognition")
    store.close()
    rejects = tmp_path / "rejects.csv"
    out = run_cli(data, model_dir, "--key", key.key, str(photo_folder), "--rejects", str(rejects), "--no-progress")
    assert "10 files" in out and "4 added" in out and "1 already there" in out and "5 rejected" in out, out
    with open(rejects, newline="") as f:
        reasons = {Path(row["path"]).name: row["reason"].split(":")[0] for row in csv.DictReader(f)}
    assert reasons == {"stray.jpg": "not in a subject folder", "notes.txt": "not an image file name (extension)",
                       "two.jpg": "more than one face", "empty-wall.jpg": "no face found",
                       "broken.jpg": "not a readable image"}
    store = SqliteStorage(data / "faces.db")
    assert store.subject_face_counts(key.collection) == {"eileen": 3, "mirror": 1}
    _, _, vectors = store.subject_vectors(key.collection, "eileen")
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    store.close()
    # interrupted or not, a second run adds nothing and redoes no inference for what is in
    again = run_cli(data, model_dir, "--key", key.key, str(photo_folder), "--no-progress")
    assert "0 added" in again and "5 already there" in again, again
    with pytest.raises(AssertionError):
        run_cli(data, model_dir, "--key", str(uuid.uuid4()), str(photo_folder), "--no-progress")


def test_running_server_picks_imported_faces_up(photo_folder, tmp_path, model_dir):
    with live_server(tmp_path, model_dir, index_snapshot_interval_s=0.2) as srv:
        key = srv.create_key("recognition")
        h = {"x-api-key": key}
        with srv.client() as c:
            probe = c.post(R + "/recognize", files={"file": ("e.jpg", face_variant(1))}, headers=h)
            assert probe.status_code == 200 and probe.json()["result"][0]["subjects"] == []  # index loaded, empty
            settings = Settings(data_dir=tmp_path, model_dir=model_dir)
            report = import_source(settings, key, photo_folder / "eileen", workers=4, batch=2,
                                   det_prob_threshold=None)
            assert report.added == 0 and len(report.rejected) == 4  # e*.jpg at the root: no subject folder
            report = import_source(settings, key, photo_folder, workers=4, batch=2, det_prob_threshold=None)
            assert report.added == 4
            deadline = time.monotonic() + 30
            while True:  # the server's index catches up from the change log within a snapshot period
                hits = c.post(R + "/recognize", files={"file": ("e.jpg", face_variant(1))},
                              headers=h).json()["result"][0]["subjects"]
                if hits or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert hits and hits[0]["subject"] == "eileen" and hits[0]["similarity"] > 0.999, hits
            faces = c.get(R + "/faces", headers=h).json()
            assert faces["total_elements"] == 4


def test_compare_script_runs_both_ways_on_the_same_images(photo_folder, model_dir):
    r = compare(photo_folder, 0, 4, model_dir)
    # HTTP enrols the duplicate photo again; the importer recognises the file (sha256) and skips it
    assert r["images"] == 8 and r["http_added"] == 5 and r["import_added"] == 4
    assert r["http_s"] > 0 and r["import_s"] > 0 and r["speedup"] == pytest.approx(r["http_s"] / r["import_s"])


# ------------------------------------------------------------------------------ API extensions
@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("ext-data"), model_dir) as srv:
        yield srv


def test_bulk_embeddings_endpoint(server):
    key = server.create_key("recognition")
    h = {"x-api-key": key}
    rng = np.random.default_rng(7)
    v = rng.normal(size=(3, 128))  # not normalised: the server does it, as for its own embeddings
    with server.client() as c:
        r = c.post(R + "/embeddings/faces", headers=h,
                   json=[{"subject": "Ann", "embedding": v[0].tolist()}, {"subject": "ann", "embedding": v[1].tolist()},
                         {"subject": "Bob", "embedding": v[2].tolist()}])
        assert r.status_code == 201
        body = r.json()
        assert [x["subject"] for x in body] == ["Ann", "ann", "Bob"] and len({x["image_id"] for x in body}) == 3
        assert c.get(R + "/subjects", headers=h).json() == {"subjects": ["Ann", "Bob"]}
        hits = c.post(R + "/embeddings/recognize", headers=h, params={"prediction_count": 2},
                      json={"embeddings": [v[1].tolist()]}).json()["result"][0]["similarities"]
        assert hits[0] == {"subject": "Ann", "similarity": 1.0}
        assert c.get(f"{R}/faces/{body[2]['image_id']}/img", headers=h).content == b""
        # all or nothing: one bad item refuses the whole request
        good = {"subject": "C", "embedding": v[0].tolist()}
        for bad, code in [([good, {"subject": "D", "embedding": [1.0] * 12}], 0),
                          ([good, {"subject": "a;b", "embedding": v[1].tolist()}], 36),
                          ([{"subject": "", "embedding": v[0].tolist()}], 26),
                          ([{"subject": "C"}], 5),
                          ([{"subject": "C", "embedding": [0.0] * 128}], 0),
                          (good, 0),
                          ([good] * 1001, 0)]:
            r = c.post(R + "/embeddings/faces", headers=h, json=bad)
            assert r.status_code == 400 and r.json()["code"] == code, (r.text, code)
        assert c.get(R + "/faces", headers=h).json()["total_elements"] == 3
        r = c.post(R + "/embeddings/faces", headers=h, json=[])
        assert r.status_code == 201 and r.json() == []
        assert c.post(R + "/embeddings/faces", json=[]).json()["code"] == 20  # the key is required


def test_verify_against_a_whole_subject(server):
    key = server.create_key("recognition")
    h = {"x-api-key": key}
    with server.client() as c:
        ids = []
        for i in (0, 3):
            r = c.post(R + "/faces", params={"subject": "Eileen"}, files={"file": ("e.jpg", face_variant(i))},
                       headers=h)
            assert r.status_code == 201
            ids.append(r.json()["image_id"])
        c.post(R + "/subjects", json={"subject": "Nobody Yet"}, headers=h)
        probe = face_variant(3)
        r = c.post(R + "/subjects/eileen/verify", files={"file": ("p.jpg", probe)}, headers=h,
                   params={"status": "true", "face_plugins": "calculator"})
        assert r.status_code == 200, r.text
        body = r.json()
        (item,) = body["result"]
        # the best example is the identical photo; verify against each example agrees
        assert item["subject"] == "Eileen" and item["image_id"] == ids[1] and item["similarity"] >= 0.9999
        assert len(item["embedding"]) == 128 and "execution_time" in item and "plugins_versions" in body
        single = [c.post(f"{R}/faces/{i}/verify", files={"file": ("p.jpg", probe)}, headers=h).json()["result"][0]
                  for i in ids]
        assert item["similarity"] == max(s["similarity"] for s in single)
        assert item["box"] == single[0]["box"]
        two = c.post(R + "/subjects/Eileen/verify", files={"file": ("p.jpg", encode(side_by_side(astronaut(),
                     astronaut()[:, ::-1]), "JPEG"))}, headers=h).json()["result"]
        assert len(two) == 2 and all(x["similarity"] > 0.9 for x in two)
        r = c.post(R + "/subjects/Nobody/verify", files={"file": ("p.jpg", probe)}, headers=h)
        assert r.status_code == 404 and r.json() == {"message": "Subject Nobody not found", "code": 42}
        r = c.post(R + "/subjects/Nobody Yet/verify", files={"file": ("p.jpg", probe)}, headers=h)
        assert r.status_code == 400 and r.json()["code"] == 0 and "no faces" in r.json()["message"]
        r = c.post(R + "/subjects/Nobody/verify", files={"file": ("b.jpg", encode(blank(), "JPEG"))}, headers=h)
        assert r.status_code == 400 and r.json()["code"] == 28  # faces first, as faces/{id}/verify
        b64 = __import__("base64").b64encode(probe).decode()
        r = c.post(R + "/subjects/Eileen/verify", json={"file": b64}, headers=h)
        assert r.status_code == 200 and r.json()["result"][0]["image_id"] == ids[1]
