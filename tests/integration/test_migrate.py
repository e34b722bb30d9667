"""Switching from CompreFace: `python -m server migrate-compreface URL` against a real PostgreSQL holding
CompreFace's tables, then our server on the migrated data dir, driven by the official Python SDK with
the OLD keys and image ids. Real models, real dev photos (../shared/facedata/dev/).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.api_server import blank, encode, live_server, side_by_side

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 not installed (pip install -e .[postgres])")
try:
    import compreface
except ImportError as exc:
    pytest.skip(f"compreface-sdk 0.6.0 cannot be imported ({exc}); see tests/integration/test_api_sdk.py",
                allow_module_level=True)

from tests.integration.test_postgres import pg  # noqa: E402,F401 - the module's throw-away PostgreSQL (or skip)

ROOT = Path(__file__).resolve().parents[2]

# The subset of CompreFace 1.x's schema the migration reads, as its Liquibase changelogs define it
# (exadel-inc/CompreFace, java/admin/src/main/resources/db/changelog/):
#   model:     db.changelog-0.0.4.yaml (create-model-table), 0.1.4 (model-type-column), 0.1.9 (created_date);
#              its fk_app_id to table app is left out (app is not read)
#   subject, img, embedding: db.changelog-0.1.7.yaml (create-subject-table, create-img-table,
#              create-embedding-table); nothing later renames or adds their columns (up to 0.2.7)
COMPREFACE_DDL = """
CREATE TABLE model (
    id bigint CONSTRAINT pk_model PRIMARY KEY,
    name varchar(255) NOT NULL,
    guid varchar(36) NOT NULL CONSTRAINT model_guid_uindex UNIQUE,
    app_id bigint NOT NULL,
    api_key varchar(36) NOT NULL CONSTRAINT model_api_key_uindex UNIQUE,
    type varchar(1) NOT NULL,
    created_date timestamp,
    CONSTRAINT app_name_app_id_uindex UNIQUE (name, app_id)
);
CREATE TABLE subject (
    id uuid CONSTRAINT pk_subject PRIMARY KEY,
    api_key varchar(36),
    subject_name varchar(255),
    CONSTRAINT api_key_subject_name_uindex UNIQUE (api_key, subject_name)
);
CREATE TABLE img (
    id uuid CONSTRAINT pk_img PRIMARY KEY,
    content bytea NOT NULL
);
CREATE TABLE embedding (
    id uuid CONSTRAINT pk_embedding PRIMARY KEY,
    subject_id uuid CONSTRAINT fk_subject_id REFERENCES subject (id) ON DELETE CASCADE ON UPDATE CASCADE,
    embedding float8[] NOT NULL,
    calculator varchar(255) NOT NULL,
    img_id uuid CONSTRAINT fk_img_id REFERENCES img (id)
);
"""
TABLES = ("model", "subject", "img", "embedding")


class Installation:
    """What the test put into CompreFace's database."""

    def __init__(self) -> None:
        self.keys = {t: str(uuid.uuid4()) for t in ("R1", "R2", "D", "V")}
        self.images: dict[str, bytes] = {}  # image id (embedding.id) -> stored bytes, migratable ones
        self.subject_of: dict[str, str] = {}  # image id -> subject (migratable ones)
        self.failing: dict[str, str] = {}  # image id -> expected reason prefix


def fill(conn, photos: Path) -> Installation:
    inst = Installation()
    rng = np.random.default_rng(7)
    services = [(1, "Office", inst.keys["R1"], "R"), (2, "Lab", inst.keys["R2"], "R"),
                (3, "Gate detection", inst.keys["D"], "D"), (4, "Badge check", inst.keys["V"], "V")]
    for id_, name, key, type_ in services:
        conn.execute("INSERT INTO model (id, name, guid, app_id, api_key, type, created_date) "
                     "VALUES (%s, %s, %s, 1, %s, %s, now())", (id_, name, str(uuid.uuid4()), key, type_))
    subjects: dict[tuple[str, str], str] = {}

    def subject(key: str, name: str) -> str:
        if (key, name) not in subjects:
            subjects[key, name] = str(uuid.uuid4())
            conn.execute("INSERT INTO subject (id, api_key, subject_name) VALUES (%s, %s, %s)",
                         (subjects[key, name], key, name))
        return subjects[key, name]

    def example(key: str, name: str, data: bytes | None, failing: str | None = None) -> str:
        image_id, img_id = str(uuid.uuid4()), None
        if data is not None:
            img_id = str(uuid.uuid4())
            conn.execute("INSERT INTO img (id, content) VALUES (%s, %s)", (img_id, data))
        conn.execute("INSERT INTO embedding (id, subject_id, embedding, calculator, img_id) VALUES (%s, %s, %s, %s, %s)",
                     (image_id, subject(key, name), rng.normal(size=512).tolist(), "Facenet2018", img_id))
        if failing:
            inst.failing[image_id] = failing
        else:
            inst.images[image_id], inst.subject_of[image_id] = data, name
        return image_id

    def read(name: str) -> bytes:
        return (photos / "face_recognition" / "examples" / name).read_bytes()

    def pixels(name: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(read(name))).convert("RGB"))

    r1, r2 = inst.keys["R1"], inst.keys["R2"]
    example(r1, "Obama", read("obama-480p.jpg"))
    example(r1, "Obama", read("obama-720p.jpg"))
    example(r1, "Biden", read("biden.jpg"))
    example(r1, "Biden", None, failing="no stored image")  # save_images_to_db=false
    example(r1, "Wall", encode(blank(), "JPEG"), failing="no face found")
    example(r1, "Crowd", encode(side_by_side(pixels("biden.jpg"), pixels("obama-480p.jpg")), "JPEG"),
            failing="more than one face")
    example(r1, "Broken", rng.bytes(3000), failing="not a readable image")
    example(r2, "Barack", read("obama_small.jpg"))
    subject(r2, "Nobody")  # a subject without examples
    return inst


def checksum(conn) -> dict[str, tuple[int, str]]:
    return {t: conn.execute(f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) "
                            f"FROM {t} t").fetchone() for t in TABLES}


def migrate_cli(data_dir: Path, model_dir: Path, url: str, *args: str) -> str:
    env = {**os.environ, "FR_DATA_DIR": str(data_dir), "FR_MODEL_DIR": str(model_dir), "FR_DATABASE_URL": "",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "server", "migrate-compreface", url, "--data-dir", str(data_dir),
                          *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_migrate_compreface(pg, facedata, model_dir, tmp_path):
    url = pg.schema_url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(COMPREFACE_DDL)
        inst = fill(conn, facedata)
        before = checksum(conn)

    data = tmp_path / "data"
    rejects = tmp_path / "rejects.csv"
    out = migrate_cli(data, model_dir, url, "--no-progress", "--rejects", str(rejects))
    assert "4 services: keys 4 created, 0 already there; subjects 7 created, 0 already there; " \
           "examples 8 in" in out, out
    assert "4 added, 0 already there, 4 not migrated" in out, out
    for image_id, reason in inst.failing.items():  # the report names every failed example, and why
        line = next((x for x in out.splitlines() if image_id in x), "")
        assert "not migrated" in line and reason in line.split(image_id, 1)[1], (reason, out)
    assert rejects.read_text().count("\n") == 1 + len(inst.failing)

    again = migrate_cli(data, model_dir, url)  # resumable: nothing new the second time (with the bar, on stderr)
    assert "keys 0 created, 4 already there; subjects 0 created, 7 already there; examples 8 in" in again, again
    assert "0 added, 4 already there, 4 not migrated" in again, again

    with psycopg.connect(url, autocommit=True) as conn:
        assert checksum(conn) == before  # CompreFace's database is only read

    photos = facedata / "face_recognition" / "examples"
    with live_server(data, model_dir, database_url="") as server:
        sdk = compreface.CompreFace(domain="http://127.0.0.1", port=str(server.port),
                                    options={"limit": 0, "det_prob_threshold": 0.8, "prediction_count": 1})
        office = sdk.init_face_recognition(inst.keys["R1"])
        assert sorted(office.get_subjects().list()["subjects"]) == ["Biden", "Broken", "Crowd", "Obama", "Wall"]
        listed = office.get_face_collection().list()
        office_ids = {i for i, s in inst.subject_of.items() if s in ("Obama", "Biden")}
        assert {(f["image_id"], f["subject"]) for f in listed["faces"]} == {(i, inst.subject_of[i]) for i in office_ids}
        lab = sdk.init_face_recognition(inst.keys["R2"])
        assert sorted(lab.get_subjects().list()["subjects"]) == ["Barack", "Nobody"]
        assert [f["subject"] for f in lab.get_face_collection().list()["faces"]] == ["Barack"]

        with httpx.Client(base_url=server.base_url, timeout=60) as http:  # the SDK has no image download
            for image_id, stored in inst.images.items():
                key = inst.keys["R2" if inst.subject_of[image_id] == "Barack" else "R1"]
                r = http.get(f"/api/v1/recognition/faces/{image_id}/img", headers={"x-api-key": key})
                assert r.status_code == 200 and r.content == stored

        found = office.recognize(str(photos / "obama-1080p.jpg"))["result"]
        assert len(found) == 1 and found[0]["subjects"][0]["subject"] == "Obama"
        obama_id = next(i for i, s in inst.subject_of.items() if s == "Obama")
        verified = office.get_face_collection().verify(str(photos / "obama-240p.jpg"), obama_id)["result"]
        assert verified[0]["subject"] == "Obama" and verified[0]["similarity"] > 0.8
        biden_id = next(i for i, s in inst.subject_of.items() if s == "Biden")
        other = office.get_face_collection().verify(str(photos / "obama-240p.jpg"), biden_id)["result"]
        assert other[0]["similarity"] < verified[0]["similarity"]

        detected = sdk.init_face_detection(inst.keys["D"]).detect(str(photos / "biden.jpg"))
        assert len(detected["result"]) == 1
        pair = sdk.init_face_verification(inst.keys["V"]).verify(str(photos / "obama-480p.jpg"),
                                                                 str(photos / "obama-720p.jpg"))
        assert pair["result"][0]["face_matches"][0]["similarity"] > 0.8


def test_compreface_connection_is_read_only(pg):
    from server.core.migrate import CompreFaceDb

    url = pg.schema_url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(COMPREFACE_DDL)
    db = CompreFaceDb(url)
    try:
        assert db.services() == []  # the URL's own options (search_path) are kept
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            db.conn.execute("INSERT INTO img (id, content) VALUES (%s, 'x')", (str(uuid.uuid4()),))
    finally:
        db.close()
