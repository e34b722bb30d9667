"""A full disk, for real: the data directory on a small tmpfs made for the test (root only; skipped
with the reason elsewhere).

- storage: a write that finds no room fails with StorageFull and changes nothing; the reserve
  (server/storage/sqlite.py) is given back so that deletes still run on the full disk; writes that
  add data are refused until deletes (the file shrinks) or a bigger file system make room, then
  they work again in the same process;
- index snapshots: one that cannot be written leaves the last good one whole, and no stray files;
- the server: real photos enrolled until the disk is full; every refused write is a JSON 507
  (code 63) answered at once; recognize, listings and images keep working; DELETE works on the
  full disk and frees room for new examples; after kill -9 and a restart on the full disk, storage
  holds every acknowledged face and the index equals storage; growing the file system lets writes
  resume without a restart.
"""
from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from index import VectorIndex
from index.snapshot import _read_manifest, snapshot_files
from server.storage import StorageFull
from server.storage.sqlite import SqliteStorage
from tests.support.api_server import ADMIN_TOKEN
from tests.support.faults import free_bytes, grow_tmpfs, report, small_tmpfs
from tests.support.local_server import LocalServer

R = "/api/v1/recognition"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RESERVE = 2 * 1024 * 1024
PEOPLE = 5  # real photos enrolled (the first sample images with exactly one face)
WRITE_ANSWER_S = 10.0  # a refused write is answered at once (the pipeline runs first: ~1 s on 2 cores)


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=128).astype(np.float32)
    return v / np.linalg.norm(v)


def fill(path: Path, leave: int) -> Path:
    """A file taking all free space of the file system but `leave` bytes."""
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        left = free_bytes(path) - leave
        while left > 0:
            left -= f.write(b"\1" * min(left, 1 << 20))
    return filler


# ------------------------------------------------------------------------------ storage
def test_storage_full_refuses_cleanly_and_deletes_free_room(tmp_path):
    rng = np.random.default_rng(1)
    image = os.urandom(100_000)
    with small_tmpfs(tmp_path / "fs", "12m") as fs:
        store = SqliteStorage(fs / "faces.db", reserve_bytes=RESERVE)
        try:
            assert (fs / "faces.db.reserve").stat().st_size == RESERVE
            c = store.create_key("recognition").collection
            acked: list[str] = []
            with pytest.raises(StorageFull):
                while True:
                    acked.append(store.add_face(c, f"s{len(acked) % 7}", unit(rng), image).face.image_id)
            assert len(acked) > 20
            assert not (fs / "faces.db.reserve").exists()  # given back for the deletes
            t0 = time.perf_counter()
            for _ in range(3):  # refused at once while the reserve is missing, nothing written
                with pytest.raises(StorageFull):
                    store.add_face(c, "late", unit(rng), image)
                with pytest.raises(StorageFull):
                    store.add_subject(c, "late")
            assert time.perf_counter() - t0 < 1.0
            assert store.count_faces(c) == len(acked) and store.find_subject(c, "late") is None
            assert store.get_image(c, acked[0]) == image  # reads work
            # deletes run on the full disk, and the file shrinks until the reserve is back
            deleted = 0
            while not (fs / "faces.db.reserve").exists():
                assert deleted < len(acked) // 2, "deletes did not make room for the reserve"
                assert len(store.delete_faces(c, [acked[deleted]]).faces) == 1
                deleted += 1
            store.add_face(c, "after", unit(rng), image)  # writes resume, same process
            assert store.count_faces(c) == len(acked) - deleted + 1
            # full again; growing the file system lets writes resume too
            with pytest.raises(StorageFull):
                while True:
                    store.add_face(c, "more", unit(rng), image)
            with pytest.raises(StorageFull):
                store.add_face(c, "more", unit(rng), image)
            grow_tmpfs(fs, "24m")
            store.add_face(c, "grown", unit(rng), image)
            assert (fs / "faces.db.reserve").exists()
        finally:
            store.close()
        # everything acknowledged is there when the file is opened again
        with SqliteStorage(fs / "faces.db", reserve_bytes=RESERVE) as again:
            assert again.count_faces(c, "grown") == 1 and again.count_faces(c, "after") == 1
            assert {f.image_id for f in again.list_faces(c, size=10_000)[0]} >= set(acked[deleted:])


def test_snapshot_on_full_disk_keeps_the_last_good_one(tmp_path):
    rng = np.random.default_rng(2)
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        for exact_below in (10_000, 16):  # a flat snapshot, and a graph (hnswlib file + manifest)
            path = fs / f"c{exact_below}.hnsw"
            index = VectorIndex(exact_below=exact_below)
            index.add(np.arange(1, 401, dtype=np.int64), np.stack([unit(rng) for _ in range(400)]))
            index.wait_built()
            index.save(path, 400)
            good = sorted(p.name for p in snapshot_files(path))
            index.add(np.arange(401, 2401, dtype=np.int64), np.stack([unit(rng) for _ in range(2000)]))
            index.wait_built()
            filler = fill(fs, 64 * 1024)
            with pytest.raises(OSError):
                index.save(path, 2400)
            filler.unlink()
            assert sorted(p.name for p in snapshot_files(path)) == good  # nothing new, nothing lost
            assert not [p for p in fs.iterdir() if p.name.startswith(".")], "temp files left behind"
            _read_manifest(path)  # checksums hold
            loaded, seq = VectorIndex.load(path, exact_below=exact_below)
            assert seq == 400 and len(loaded) == 400
            for p in snapshot_files(path):
                p.unlink()


# ------------------------------------------------------------------------------ the server
def sample_photos(facedata: Path) -> dict[str, bytes]:
    folder = facedata / "CompreFace" / "embedding-calculator" / "sample_images"
    return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.jpg"))}


def big_photo(data: bytes, rng: np.random.Generator) -> bytes:
    """A real face photo as a ~2-3 MB PNG (upscaled, with noise that does not compress): few adds fill the disk."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 900 / max(image.size)
    image = image.resize((int(image.width * scale), int(image.height * scale)))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, size=(image.height, image.width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "PNG", compress_level=1)
    return out.getvalue()


def add(c: httpx.Client, key: str, subject: str, data: bytes) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = c.post(f"{R}/faces", params={"subject": subject}, files={"file": ("f.png", data)}, headers={"x-api-key": key})
    return r, time.perf_counter() - t0


def assert_full(r: httpx.Response, seconds: float) -> None:
    assert r.status_code == 507, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == 63 and body["message"].startswith("Storage is full"), body
    assert seconds < WRITE_ANSWER_S


def stored(c: httpx.Client, key: str) -> dict[str, str]:
    """{image_id: subject} of every stored face (all pages)."""
    out: dict[str, str] = {}
    page = 0
    while True:
        r = c.get(f"{R}/faces", params={"page": page, "size": 100}, headers={"x-api-key": key})
        assert r.status_code == 200, r.text
        body = r.json()
        out.update({f["image_id"]: f["subject"] for f in body["faces"]})
        page += 1
        if page >= body["total_pages"]:
            return out


def recognized(c: httpx.Client, key: str, data: bytes) -> str:
    r = c.post(f"{R}/recognize", params={"limit": 1, "prediction_count": 1}, files={"file": ("f.jpg", data)},
               headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()["result"][0]["subjects"][0]["subject"]


def index_faces(c: httpx.Client, key: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        index = c.get("/api/v1/admin/stats", headers=ADMIN).json()["indexes"][key]
        if index is not None and not index["building"] or time.monotonic() > deadline:
            return index["faces"] if index else -1
        time.sleep(0.1)


@pytest.mark.slow
def test_server_on_a_full_disk(tmp_path, facedata, model_dir):
    rng = np.random.default_rng(3)
    env = {"FR_MODEL_DIR": str(model_dir), "FR_STORAGE_RESERVE_BYTES": str(RESERVE), "FR_INFERENCE_THREADS": "1",
           "FR_INDEX_EXACT_BELOW": "4", "FR_INDEX_SNAPSHOT_EVERY": "1", "FR_INDEX_SNAPSHOT_INTERVAL_S": "0.2"}
    errors: dict[str, int] = {}
    with small_tmpfs(tmp_path / "fs", "24m") as fs:
        server = LocalServer(fs, admin_token=ADMIN_TOKEN, env=env, log_path=tmp_path / "server.log")
        server.start()
        try:
            with server.client() as c:
                key = c.post("/api/v1/admin/keys", json={"type": "recognition"}, headers=ADMIN).json()["key"]
                acked: dict[str, str] = {}  # image_id -> subject of every acknowledged add
                people: dict[str, bytes] = {}
                for subject, data in sample_photos(facedata).items():
                    r, _ = add(c, key, subject, data)
                    if r.status_code == 201:
                        acked[r.json()["image_id"]] = subject
                        people[subject] = data
                    else:  # no face or several: not an example
                        assert r.status_code == 400 and r.json()["code"] in (28, 31), r.text
                    if len(people) == PEOPLE:
                        break
                assert len(people) == PEOPLE, "too few sample photos with one face"
                names = list(people)
                filler_of = names[0]  # the fillers are this person's face, enlarged
                filler_photo = big_photo(people[filler_of], rng)
                # fill the disk with examples until a write is refused
                fillers: list[str] = []
                while True:
                    r, seconds = add(c, key, "filler", filler_photo)
                    if r.status_code != 201:
                        assert_full(r, seconds)
                        break
                    fillers.append(r.json()["image_id"])
                    acked[fillers[-1]] = "filler"
                    assert len(fillers) < 40, "the disk never filled up"
                acked_at_full = len(acked)
                # every other write is refused the same way, at once
                for data in (people[names[1]], filler_photo):
                    r, seconds = add(c, key, "late", data)
                    assert_full(r, seconds)
                r = c.post(f"{R}/subjects", json={"subject": "late"}, headers={"x-api-key": key})
                assert r.status_code == 507 and r.json()["code"] == 63, r.text
                r = c.post(f"{R}/embeddings/faces", json=[{"subject": "late", "embedding": unit(rng).tolist()}],
                           headers={"x-api-key": key})
                assert r.status_code == 507 and r.json()["code"] == 63, r.text
                errors["507/63"] = 5
                # reads keep working: recognize, listings, images, index stats
                assert stored(c, key) == acked
                for subject, data in people.items():
                    expected = {subject, "filler"} if subject == filler_of else {subject}
                    assert recognized(c, key, data) in expected
                first = next(i for i, s in acked.items() if s == names[1])
                assert c.get(f"{R}/faces/{first}/img", headers={"x-api-key": key}).content == people[names[1]]
                subjects = c.get(f"{R}/subjects", headers={"x-api-key": key}).json()["subjects"]
                assert sorted(subjects) == sorted({*people, "filler"})  # "late" was refused
                # the index's snapshots on the full disk: whatever is there is whole
                time.sleep(0.5)  # the snapshotter tried (and failed) meanwhile
                for manifest in (fs / "index").glob("*.hnsw"):
                    _read_manifest(manifest)
                # deletes work on the full disk, and free room for new examples
                t_full = time.perf_counter()
                deletes, resumed = 0, None
                for image_id in list(fillers):
                    r = c.delete(f"{R}/faces/{image_id}", headers={"x-api-key": key})
                    assert r.status_code == 200, r.text
                    fillers.remove(image_id)
                    del acked[image_id]
                    deletes += 1
                    r, seconds = add(c, key, "after-delete", people[names[2]])
                    if r.status_code == 201:
                        acked[r.json()["image_id"]] = "after-delete"
                        resumed = time.perf_counter() - t_full
                        break
                    assert_full(r, seconds)
                    errors["507/63"] += 1
                assert resumed is not None, "writes did not resume after deleting every filler example"
                # full again, then kill -9 on the full disk and restart there
                while True:
                    r, seconds = add(c, key, "filler", filler_photo)
                    if r.status_code != 201:
                        assert_full(r, seconds)
                        errors["507/63"] += 1
                        break
                    fillers.append(r.json()["image_id"])
                    acked[fillers[-1]] = "filler"
            os.kill(server.pid, signal.SIGKILL)
            server.proc.wait(30)
            server.stop()
            t_restart = time.perf_counter()
            server.start()
            restart_s = time.perf_counter() - t_restart
            with server.client() as c:
                after = stored(c, key)
                assert after == acked, "acknowledged faces lost or unknown faces present after kill -9"
                assert index_faces(c, key) == len(acked), "the index does not equal storage after the restart"
                also = {filler_of: "filler", names[2]: "after-delete"}  # the same face stored twice
                for subject, data in people.items():
                    assert recognized(c, key, data) in {subject, also.get(subject)}
                # deletes still work after the restart on the full disk
                r = c.delete(f"{R}/faces/{fillers[-1]}", headers={"x-api-key": key})
                assert r.status_code == 200, r.text
                del acked[fillers.pop()]
                # a bigger file system: writes resume without a restart
                while True:
                    r, _ = add(c, key, "filler", filler_photo)
                    if r.status_code != 201:
                        break
                    acked[r.json()["image_id"]] = "filler"
                grow_tmpfs(fs, "48m")
                t_grow = time.perf_counter()
                r, _ = add(c, key, "after-grow", people[names[3]])
                grown_s = time.perf_counter() - t_grow
                assert r.status_code == 201, r.text
                acked[r.json()["image_id"]] = "after-grow"
                assert stored(c, key) == acked
                assert index_faces(c, key) == len(acked)
                assert recognized(c, key, people[names[3]]) in (names[3], "after-grow")
        finally:
            server.stop()
    report("disk full (SQLite on a 24 MB tmpfs)", {
        "measured": "enrol real photos until full; reads; deletes on the full disk; kill -9 + restart; grow fs",
        "acked_before": acked_at_full, "present_after_kill9": len(after),
        "client_errors": {"507 code 63": errors["507/63"]},
        "deletes_until_writes_resume": deletes, "writes_resume_after_deletes_s": round(resumed, 2),
        "restart_on_full_disk_s": round(restart_s, 2), "write_after_grow_s": round(grown_s, 2),
    })
