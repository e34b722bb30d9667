"""PostgreSQL storage: the storage contract (tests/unit/test_storage.py's checks, re-run here), ordering
of sequences across replicas, the change follower (LISTEN/NOTIFY + catch-up poll), and two real
server processes on one database.

Runs against a real PostgreSQL server started for this module (tests/support/pg_cluster.py: initdb in a temp
dir, 127.0.0.1, ephemeral port); skips with the reason when the binaries or psycopg are missing.
Every test gets a schema of its own (search_path), so tests never see each other's rows.
"""
from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.config import Settings
from server.storage import KeyNotFound, Storage, StorageError, open_storage
from tests.unit import test_storage as sqlite_contract
from tests.support.pg_cluster import PgCluster, PgUnavailable, wait_until

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 not installed (pip install -e .[postgres])")
pytest.importorskip("psycopg_pool", reason="psycopg_pool not installed (pip install -e .[postgres])")

from index import IndexRegistry  # noqa: E402
from server.storage.postgres import PostgresStorage, redact  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
vec = sqlite_contract.vec
PROPAGATION_LIMIT_S = 1.0  # the bar: a write through one replica is seen by the other within 1 s
FIGURES: dict[str, list[float]] = {}  # measured latencies, printed at the end of the module


def record(name: str, seconds: float) -> None:
    FIGURES.setdefault(name, []).append(seconds)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pg():
    try:
        with PgCluster() as cluster:
            yield cluster
    except PgUnavailable as exc:
        pytest.skip(f"no PostgreSQL to test against: {exc}")
    if FIGURES:
        print("\npropagation latency (s): " + ", ".join(
            f"{k}: median {np.median(v) * 1000:.1f} ms, max {max(v) * 1000:.1f} ms (n={len(v)})"
            for k, v in sorted(FIGURES.items())))


@pytest.fixture()
def url(pg) -> str:
    return pg.schema_url()


@pytest.fixture()
def store(url):
    # retention 0: prune_changes drops at once, as the SQLite contract expects
    s = PostgresStorage(url, pool_size=8, changes_retention_s=0.0)
    yield s
    s.close()


@pytest.fixture()
def col(store):
    return store.create_key("recognition", name="test").collection


# ----------------------------------------------------------------------------- the storage contract
# Every test of tests/unit/test_storage.py that only uses the public Storage API (fixtures `store`, `col`)
# runs here unchanged against PostgreSQL; the SQLite-specific ones (files, PRAGMAs, private
# connections, subprocesses) are left out and covered by PostgreSQL-specific tests below.
_SQLITE_SPECIFIC = ("store._", "SqliteStorage", "sqlite", "PRAGMA", "run_py")
REUSED: list[str] = []
for _name, _test in inspect.getmembers(sqlite_contract, inspect.isfunction):
    _params = set(inspect.signature(_test).parameters)
    if _name.startswith("test_") and _params and _params <= {"store", "col"} \
            and not any(marker in inspect.getsource(_test) for marker in _SQLITE_SPECIFIC):
        globals()[_name] = _test
        REUSED.append(_name)


def test_contract_reuse_covers_the_storage_api():
    """The reuse above must keep picking up the contract tests (not silently select nothing)."""
    assert len(REUSED) >= 20, REUSED
    for name in ("test_change_feed_order_and_content", "test_rename_merges_into_existing",
                 "test_concurrent_writers_and_readers", "test_prune_changes", "test_snapshot_vectors_is_consistent"):
        assert name in REUSED


def test_implements_every_storage_method(store):
    assert isinstance(store, Storage)
    wanted = {n for n, _ in inspect.getmembers(Storage, inspect.isfunction) if not n.startswith("_")}
    missing = {n for n in wanted if not callable(getattr(store, n, None))}
    assert not missing


def test_delete_key_drops_collection_rows(store, url):
    k = store.create_key("recognition")
    other = store.create_key("recognition").collection
    for i in range(3):
        store.add_face(k.collection, "a", vec(i), b"img%d" % i)
    kept = store.add_face(other, "a", vec(9), b"keep").face
    assert store.delete_key(k.key).faces_deleted == 3
    assert store.current_sequence(k.collection) == 0 and list(store.changes_since(k.collection, 0)) == []
    with pytest.raises(StorageError):
        store.add_face(k.collection, "a", vec(1), b"x")
    assert store.get_image(other, kept.image_id) == b"keep"
    with psycopg.connect(url) as conn:
        for table in ("faces", "images", "subjects", "changes"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 1, table


def test_add_faces_batch_is_one_transaction(store, col):
    from server.storage import FaceExists, NewFace

    store.add_subject(col, "Ann")
    batch = [NewFace(subject=s, embedding=vec(i), image=b"i%d" % i, source=f"/p/{i}.jpg", sha256=f"{i:064x}")
             for i, s in enumerate(["ann", "Bob", "bob", "Cy"])]
    added = store.add_faces(col, batch)
    assert [f.subject for f in added.faces] == ["Ann", "Bob", "Bob", "Cy"]
    assert added.subjects_created == ["Bob", "Cy"]
    assert [c.seq for c in added.changes] == [1, 2, 3, 4] and [c.op for c in added.changes] == ["add"] * 4
    assert [f.label for f in added.faces] == [c.label for c in added.changes]
    for f, i in zip(added.faces, range(4)):
        np.testing.assert_array_equal(store.get_face(col, f.image_id).embedding, vec(i))
        assert store.get_image(col, f.image_id) == b"i%d" % i
    assert store.known_sources(col, [f"{i:064x}" for i in (0, 3, 7)]) == {f"{0:064x}", f"{3:064x}"}
    # all or nothing: a taken image id fails the whole batch and leaves no trace
    with pytest.raises(FaceExists):
        store.add_faces(col, [NewFace(subject="Dee", embedding=vec(8)),
                              NewFace(subject="Dee", embedding=vec(9), image_id=added.faces[0].image_id)])
    with pytest.raises(FaceExists):  # repeated within the batch
        store.add_faces(col, [NewFace(subject="x", embedding=vec(1), image_id=added.faces[0].image_id)] * 2)
    assert store.find_subject(col, "Dee") is None and store.current_sequence(col) == 4
    store.delete_faces(col, [added.faces[0].image_id])
    assert store.known_sources(col, [f"{0:064x}"]) == set()  # only live faces count
    assert store.add_faces(col, []).faces == []


# ----------------------------------------------------------------------------- configuration
def test_open_storage_picks_postgres_for_postgresql_urls(url):
    s = open_storage(Settings(data_dir=Path("/nonexistent-never-created"), database_url=url))
    try:
        assert isinstance(s, PostgresStorage) and isinstance(s, Storage)
        assert s.changes_retention_s == Settings().database_changes_retention_s
        assert s.list_keys() == []
    finally:
        s.close()


def test_environment_selects_postgres(url, monkeypatch):
    monkeypatch.setenv("FR_DATABASE_URL", url)
    monkeypatch.setenv("FR_DATABASE_POOL_SIZE", "3")
    settings = Settings.from_env()
    assert settings.database_url == url and settings.database_pool_size == 3
    s = open_storage(settings)
    try:
        assert isinstance(s, PostgresStorage)
    finally:
        s.close()


def test_unreachable_database_is_a_clear_error_without_the_password():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bad = f"postgresql://facerec:s3cret@127.0.0.1:{port}/nope"
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        open_storage(Settings(database_url=bad, database_connect_timeout_s=0))
    assert time.monotonic() - started < 15
    assert f"127.0.0.1:{port}" in str(info.value) and "s3cret" not in str(info.value)
    assert redact(bad) == f"postgresql://facerec:***@127.0.0.1:{port}/nope"


def test_schema_is_created_once_by_replicas_starting_together(url):
    stores: list[PostgresStorage] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(PostgresStorage(url, pool_size=2))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(stores) == 4
        key = stores[0].create_key("recognition")
        assert all(s.find_key(key.key) == key for s in stores)
    finally:
        for s in stores:
            s.close()


def test_text_with_nul_is_refused_not_a_crash(store, col):
    with pytest.raises(StorageError):
        store.add_face(col, "a\x00b", vec(1), b"x")
    assert store.find_subject(col, "a\x00b") is None and store.find_key("a\x00") is None
    with pytest.raises(KeyNotFound):
        store.rename_key("a\x00", "x")
    key = store.create_key("recognition")
    assert store.rename_key(key.key, "front\x00door").name == "frontdoor" == store.find_key(key.key).name
    assert store.list_subjects(col) == []


def test_prune_keeps_recent_changes_for_other_replicas(url):
    s = PostgresStorage(url, changes_retention_s=600.0)
    try:
        c = s.create_key("recognition").collection
        for i in range(3):
            s.add_face(c, "a", vec(i), b"x")
        assert s.prune_changes(c, 3) == 0  # younger than the retention: a lagging replica still needs them
        assert [x.seq for x in s.changes_since(c, 0)] == [1, 2, 3]
    finally:
        s.close()


# ----------------------------------------------------------------------------- ordering across replicas
def test_sequences_become_visible_in_order_across_replicas(url):
    """Writers in two "replicas" (two pools) and a reader: every read of the feed is a gap-free
    prefix (seq N is never visible before N-1), which the index's catch-up relies on."""
    a, b = PostgresStorage(url, pool_size=4), PostgresStorage(url, pool_size=4)
    collection = a.create_key("recognition").collection
    writers_done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def writer(store: PostgresStorage, t: int) -> None:
        try:
            for i in range(25):
                if i % 5 == 4:  # mix deletes in: they take sequences too
                    faces, _ = store.list_faces(collection, size=1)
                    store.delete_faces(collection, [f.image_id for f in faces])
                else:
                    store.add_face(collection, f"s{t}", vec(t * 1000 + i), b"x")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        last = 0
        try:
            while True:
                done = writers_done.is_set()
                got = [c.seq for c in b.changes_since(collection, last)]
                assert got == list(range(last + 1, last + 1 + len(got))), (last, got[:10])
                seen.extend(got)
                last = got[-1] if got else last
                if done:
                    return
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, t)) for t, s in enumerate((a, b, a, b))]
    read = threading.Thread(target=reader)
    read.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writers_done.set()
    read.join()
    try:
        assert errors == []
        last = a.current_sequence(collection)
        assert seen == list(range(1, last + 1)) and last >= 80
        feed = list(a.changes_since(collection, 0))
        adds = [c.label for c in feed if c.op == "add"]
        assert len(adds) == len(set(adds)) == 80  # labels unique across replicas
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- the follower
class Replica:
    """One "process": its own storage (pool, listener) and its own index registry."""

    def __init__(self, url: str, directory: Path, *, poll_s: float = 30.0, listen: bool = True) -> None:
        self.storage = PostgresStorage(url, pool_size=4, poll_interval_s=poll_s, changes_retention_s=0.0)
        self.index = IndexRegistry(directory, self.storage, exact_below=100_000, snapshot_every=10_000,
                                   snapshot_interval_s=3600)
        self.storage.start_follower(self.index.catch_up, self.index.drop, listen=listen)

    def add(self, collection: str, subject: str, seed: int):
        added = self.storage.add_face(collection, subject, vec(seed), b"img")
        for c in added.changes:  # what FaceService does after the commit
            self.index.apply(collection, c.seq, c.op, c.label, c.vector)
        return added.face

    def delete(self, collection: str, image_id: str) -> None:
        for c in self.storage.delete_faces(collection, [image_id]).changes:
            self.index.apply(collection, c.seq, c.op, c.label, c.vector)

    def has(self, collection: str, label: int) -> bool:
        return label in self.index.get(collection)

    def close(self) -> None:
        self.storage.stop_follower()
        self.index.close()
        self.storage.close()


@pytest.fixture()
def replicas(url, tmp_path):
    made: list[Replica] = []

    def make(**kw) -> Replica:
        made.append(Replica(url, tmp_path / f"index{len(made)}", **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_notifications_propagate_adds_and_deletes_within_a_second(replicas):
    a, b = replicas(), replicas()  # polls every 30 s: only NOTIFY can be this fast
    collection = a.storage.create_key("recognition").collection
    assert len(b.index.get(collection)) == 0  # B has the collection loaded (follows it from now on)
    for i in range(5):
        face = a.add(collection, "ann", i)
        took = wait_until(lambda: b.has(collection, face.label), PROPAGATION_LIMIT_S)
        assert took is not None, "B did not see A's face within a second"
        record("notify add (in-process replicas)", took)
        np.testing.assert_allclose(b.index.get(collection).vectors([face.label])[face.label], vec(i), atol=1e-6)
        a.delete(collection, face.image_id)
        took = wait_until(lambda: not b.has(collection, face.label), PROPAGATION_LIMIT_S)
        assert took is not None, "B did not drop A's deleted face within a second"
        record("notify delete (in-process replicas)", took)
    # and the other way round
    face = b.add(collection, "bob", 99)
    assert wait_until(lambda: a.has(collection, face.label), PROPAGATION_LIMIT_S) is not None
    assert b.storage.follower.notifications >= 10 and b.storage.follower.polls == 1  # the start-up poll only


def test_own_writes_are_not_replayed_from_notifications(replicas):
    a = replicas()
    collection = a.storage.create_key("recognition").collection
    a.index.get(collection)
    for i in range(3):
        a.add(collection, "x", i)
    time.sleep(0.3)
    assert a.storage.follower.notifications == 0  # all three came from this replica's own pool


def test_a_missed_notification_is_caught_up_by_the_poll(replicas, url):
    """B's LISTEN connection is killed; A writes while B reconnects: the notifications are lost,
    and the catch-up poll (at once after reconnecting, then every poll interval) finds the face."""
    a, b = replicas(), replicas(poll_s=0.5)
    collection = a.storage.create_key("recognition").collection
    b.index.get(collection)
    assert wait_until(lambda: b.storage.follower.listener_pid is not None, 5) is not None
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (b.storage.follower.listener_pid,))
    face = a.add(collection, "lost", 1)
    took = wait_until(lambda: b.has(collection, face.label), 5.0)
    assert took is not None and b.storage.follower.reconnects >= 1
    record("after a lost LISTEN connection", took)


def test_poll_alone_follows(replicas):
    a, b = replicas(), replicas(poll_s=0.2, listen=False)
    collection = a.storage.create_key("recognition").collection
    b.index.get(collection)
    face = a.add(collection, "p", 1)
    took = wait_until(lambda: b.has(collection, face.label), 2.0)
    assert took is not None and b.storage.follower.notifications == 0
    record("poll only (0.2 s interval)", took)


def test_deleted_key_drops_the_other_replicas_index(replicas):
    a, b = replicas(), replicas()
    key = a.storage.create_key("recognition")
    a.add(key.collection, "z", 1)
    assert len(b.index.get(key.collection)) == 1
    b.index.snapshot(key.collection)
    assert any(b.index.directory.glob(f"{key.collection}*"))
    a.storage.delete_key(key.key)
    a.index.drop(key.collection)
    assert wait_until(lambda: b.index.stats(key.collection) is None, PROPAGATION_LIMIT_S) is not None
    assert not any(b.index.directory.glob(f"{key.collection}*"))


def test_follower_behind_a_pruned_log_reloads_from_storage(replicas):
    a, b = replicas(), replicas(poll_s=3600, listen=False)  # B hears nothing by itself
    collection = a.storage.create_key("recognition").collection
    a.index.get(collection)
    b.index.get(collection)
    faces = [a.add(collection, "q", i) for i in range(6)]
    a.delete(collection, faces[0].image_id)
    a.index.snapshot(collection)  # A saves and prunes everything up to seq 7 (retention 0)
    assert a.storage.prune_changes(collection, 7) == 0  # already pruned by the snapshot
    assert b.index.catch_up(collection) == 7
    index = b.index.get(collection)
    assert sorted(int(x) for x in index.vectors([f.label for f in faces])) == [f.label for f in faces[1:]]


# ----------------------------------------------------------------------------- two server processes
R = "/api/v1/recognition"
TOKEN = "pg-test-admin-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, url: str, data_dir: Path, model_dir: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FR_DATABASE_URL": url, "FR_INFERENCE_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(data_dir.with_suffix(".log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(data_dir), "--model-dir", str(model_dir), "--admin-token", TOKEN],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=self.base, timeout=60)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if self.http.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def index_faces(self, key: str) -> int | None:
        stats = self.http.get("/api/v1/admin/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        index = stats["indexes"].get(key)
        return None if index is None else index["faces"]

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def two_servers(pg, tmp_path_factory, model_dir):
    url = pg.schema_url("two_servers")
    root = tmp_path_factory.mktemp("replicas")
    servers = [ServerProcess(url, root / name, model_dir) for name in ("a", "b")]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def _subjects(server: ServerProcess, key: str, image: bytes) -> list[dict]:
    r = server.http.post(R + "/recognize", files={"file": ("q.jpg", image)}, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()["result"][0]["subjects"]


def test_two_server_processes_share_one_database(two_servers):
    from tests.support.api_server import astronaut, encode

    a, b = two_servers
    face_jpg = encode(astronaut(), "JPEG", quality=95)
    query_jpg = encode(np.clip(astronaut()[:, ::-1].astype(np.int16) + 25, 0, 255).astype(np.uint8), "JPEG",
                       quality=90)
    r = a.http.post("/api/v1/admin/keys", json={"type": "recognition"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    h = {"x-api-key": key}
    # the key made through A works on B at once; both load the (empty) collection's index
    for server in (a, b):
        assert _subjects(server, key, query_jpg) == []
        assert server.index_faces(key) == 0

    # add through A -> B's own index has it within a second, and B recognises the face
    r = a.http.post(R + "/faces", params={"subject": "Eileen"}, files={"file": ("f.jpg", face_jpg)}, headers=h)
    assert r.status_code == 201, r.text
    image_id = r.json()["image_id"]
    took = wait_until(lambda: b.index_faces(key) == 1, PROPAGATION_LIMIT_S, interval=0.01)
    assert took is not None, f"B's index did not receive A's face within {PROPAGATION_LIMIT_S} s"
    record("two processes: add", took)
    (hit,) = _subjects(b, key, query_jpg)
    assert hit["subject"] == "Eileen" and hit["similarity"] > 0.9

    # rename through A -> B answers with the new name (names live in the database)
    r = a.http.put(R + "/subjects/Eileen", json={"subject": "Collins"}, headers=h)
    assert r.status_code == 200, r.text
    started = time.perf_counter()
    assert [s["subject"] for s in _subjects(b, key, query_jpg)] == ["Collins"]
    record("two processes: rename (first answer)", time.perf_counter() - started)

    # add through B -> A
    r = b.http.post(R + "/faces", params={"subject": "Collins"}, files={"file": ("g.jpg", query_jpg)}, headers=h)
    assert r.status_code == 201, r.text
    took = wait_until(lambda: a.index_faces(key) == 2, PROPAGATION_LIMIT_S, interval=0.01)
    assert took is not None
    record("two processes: add", took)

    # delete through A -> gone from B's index within a second and from its answers
    assert a.http.delete(R + f"/faces/{image_id}", headers=h).status_code == 200
    took = wait_until(lambda: b.index_faces(key) == 1, PROPAGATION_LIMIT_S, interval=0.01)
    assert took is not None, "B's index still holds the face deleted through A"
    record("two processes: delete", took)
    assert len(_subjects(b, key, query_jpg)) == 1
    listed = b.http.get(R + "/faces", headers=h).json()
    assert [f["subject"] for f in listed["faces"]] == ["Collins"] and listed["total_elements"] == 1

    # delete the subject through B -> A's index is empty
    assert b.http.delete(R + "/subjects/Collins", headers=h).status_code == 200
    assert wait_until(lambda: a.index_faces(key) == 0, PROPAGATION_LIMIT_S, interval=0.01) is not None
    assert _subjects(a, key, query_jpg) == []
