"""SQLite implementation of `Storage`: one file, WAL journal, synchronous=FULL.

Durability: every write runs in its own `BEGIN IMMEDIATE ... COMMIT`; with WAL and
synchronous=FULL the commit fsyncs the WAL before returning, so an acknowledged write
survives a process kill or power loss.

Concurrency: one connection per thread (threading.local), so WAL readers never block
each other or the writer. Writes are serialised by a process-wide lock (cheap, avoids
SQLITE_BUSY churn between our own threads) and, across processes (the `keys` CLI while
the server runs), by SQLite's write lock plus busy_timeout.
"""
from __future__ import annotations

import sqlite3
import threading
import uuid
import weakref
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from server.storage.base import (
    DEMO_KEYS,
    EMBEDDING_DIM,
    KEY_TYPES,
    ApiKey,
    Change,
    FaceAdded,
    FaceExists,
    FaceNotFound,
    FaceRecord,
    FacesAdded,
    FacesDeleted,
    KeyDeleted,
    KeyNotFound,
    NewFace,
    StorageError,
    SubjectDeleted,
    SubjectExists,
    SubjectNotFound,
    SubjectsDeleted,
)

SCHEMA_VERSION = 2  # 2: face_sources (bulk import provenance)
_BUSY_TIMEOUT_MS = 30_000
_VECTOR_DTYPE = np.dtype("<f4")  # stored little-endian float32, 512 bytes per face
_SQL_VARS = 500  # max bound parameters per IN (...) list, well under SQLite's limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- one row per face collection: counters for labels and change sequences
CREATE TABLE IF NOT EXISTS collections (
    id         TEXT PRIMARY KEY,
    next_label INTEGER NOT NULL DEFAULT 1,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    pruned_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS api_keys (
    key        TEXT PRIMARY KEY,
    type       TEXT NOT NULL CHECK (type IN ('recognition', 'detection', 'verification')),
    name       TEXT NOT NULL DEFAULT '',
    created    TEXT NOT NULL,
    collection TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS subjects (
    id         INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    name       TEXT NOT NULL,
    name_key   TEXT NOT NULL,  -- name.lower(): Unicode-aware, unlike SQLite's lower()
    created    TEXT NOT NULL,
    UNIQUE (collection, name_key)
);
CREATE INDEX IF NOT EXISTS subjects_by_name ON subjects (collection, name);
CREATE TABLE IF NOT EXISTS faces (
    id         INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    label      INTEGER NOT NULL,
    image_id   TEXT NOT NULL,
    subject_id INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    created    TEXT NOT NULL,
    embedding  BLOB NOT NULL,
    UNIQUE (collection, label),
    UNIQUE (collection, image_id)
);
CREATE INDEX IF NOT EXISTS faces_by_subject ON faces (subject_id, label);
-- images apart from faces so that vector scans never page through image blobs
CREATE TABLE IF NOT EXISTS images (
    face_id INTEGER PRIMARY KEY,
    data    BLOB NOT NULL
);
-- where a bulk import read a face (file path + sha256 of its bytes), so an import can resume
CREATE TABLE IF NOT EXISTS face_sources (
    face_id    INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    path       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS face_sources_by_digest ON face_sources (collection, sha256);
CREATE TABLE IF NOT EXISTS changes (
    collection TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    op         TEXT NOT NULL CHECK (op IN ('add', 'delete')),
    label      INTEGER NOT NULL,
    vector     BLOB,
    PRIMARY KEY (collection, seq)
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _name_key(name: str) -> str:
    return name.lower()


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StorageError("subject name must be a non-empty string")
    return name


def _vector_blob(embedding: np.ndarray) -> tuple[np.ndarray, bytes]:
    try:
        vec = np.asarray(embedding, dtype=_VECTOR_DTYPE)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"embedding is not numeric: {exc}") from exc
    if vec.shape != (EMBEDDING_DIM,):
        raise StorageError(f"embedding must have shape ({EMBEDDING_DIM},), got {vec.shape}")
    if not np.isfinite(vec).all():
        raise StorageError("embedding contains NaN or infinity")
    vec = np.ascontiguousarray(vec)
    return vec.astype(np.float32, copy=False), vec.tobytes()


def _vector(blob: bytes | None) -> np.ndarray | None:
    if blob is None:
        return None
    # copy: frombuffer over bytes is read-only, callers may want to modify it
    return np.frombuffer(blob, dtype=_VECTOR_DTYPE).astype(np.float32)


def _canonical_uuid(value: str, what: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError) as exc:
        raise StorageError(f"{what} must be a UUID string, got {value!r}") from exc
    return str(parsed)


def _chunks(items: Sequence, size: int = _SQL_VARS) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _ThreadConnection:
    """Owns one thread's connection: when the thread ends, threading.local drops this holder
    and the connection closes with it (worker pools come and go; no connection leaks)."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def close(self) -> None:
        con, self.con = self.con, None
        if con is not None:
            try:
                con.close()
            except sqlite3.Error:
                pass

    def __del__(self) -> None:
        self.close()


class SqliteStorage:
    """`Storage` over one SQLite file. Create one per process; share it between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._holders: "weakref.WeakSet[_ThreadConnection]" = weakref.WeakSet()
        self._conn_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._init_schema()

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        # autocommit mode (isolation_level=None): transactions are explicit BEGIN/COMMIT;
        # check_same_thread=False only so close() may close connections of other threads.
        con = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        con.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            con.close()
            raise StorageError(f"could not put {self.path} in WAL mode (got {mode!r})")
        con.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit
        con.execute("PRAGMA foreign_keys = OFF")  # deletes are explicit, in dependency order
        return con

    def _con(self) -> sqlite3.Connection:
        if self._closed:
            raise StorageError("storage is closed")
        holder = getattr(self._local, "holder", None)
        if holder is None or holder.con is None:
            holder = _ThreadConnection(self._connect())
            with self._conn_lock:
                if self._closed:
                    holder.close()
                    raise StorageError("storage is closed")
                self._holders.add(holder)
            self._local.holder = holder
        return holder.con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction; rolled back on any exception."""
        con = self._con()
        with self._write_lock:
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot start a write transaction: {exc}") from exc
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so that several SELECTs see one snapshot."""
        con = self._con()
        con.execute("BEGIN")
        try:
            yield con
        finally:
            if con.in_transaction:
                con.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._write() as con:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(f"{self.path} has schema version {row[0]}, newer than this server's")
            elif int(row[0]) < SCHEMA_VERSION:  # older files only lack tables created above
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._conn_lock:
            if self._closed:
                return
            self._closed = True
            holders = list(self._holders)
        for holder in holders:
            holder.close()

    def __enter__(self) -> "SqliteStorage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _key_row(row: tuple) -> ApiKey:
        return ApiKey(key=row[0], type=row[1], name=row[2], created=row[3], collection=row[4])

    def create_key(self, type: str, name: str = "", key: str | None = None) -> ApiKey:
        if type not in KEY_TYPES:
            raise StorageError(f"key type must be one of {', '.join(KEY_TYPES)}, got {type!r}")
        value = str(uuid.uuid4()) if key is None else _canonical_uuid(key, "key")
        record = ApiKey(key=value, type=type, name=name or "", created=_now(), collection=uuid.uuid4().hex)
        with self._write() as con:
            if con.execute("SELECT 1 FROM api_keys WHERE key = ?", (value,)).fetchone():
                raise StorageError(f"key {value} already exists")
            con.execute(
                "INSERT INTO api_keys (key, type, name, created, collection) VALUES (?, ?, ?, ?, ?)",
                (record.key, record.type, record.name, record.created, record.collection),
            )
            con.execute("INSERT INTO collections (id) VALUES (?)", (record.collection,))
        return record

    def find_key(self, key: str) -> ApiKey | None:
        row = self._con().execute(
            "SELECT key, type, name, created, collection FROM api_keys WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else self._key_row(row)

    def list_keys(self) -> list[ApiKey]:
        rows = self._con().execute(
            "SELECT key, type, name, created, collection FROM api_keys ORDER BY created, key"
        ).fetchall()
        return [self._key_row(r) for r in rows]

    def delete_key(self, key: str) -> KeyDeleted:
        with self._write() as con:
            row = con.execute(
                "SELECT key, type, name, created, collection FROM api_keys WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                raise KeyNotFound(key)
            record = self._key_row(row)
            c = record.collection
            faces = con.execute("SELECT COUNT(*) FROM faces WHERE collection = ?", (c,)).fetchone()[0]
            con.execute("DELETE FROM images WHERE face_id IN (SELECT id FROM faces WHERE collection = ?)", (c,))
            con.execute("DELETE FROM face_sources WHERE collection = ?", (c,))
            con.execute("DELETE FROM faces WHERE collection = ?", (c,))
            con.execute("DELETE FROM subjects WHERE collection = ?", (c,))
            con.execute("DELETE FROM changes WHERE collection = ?", (c,))
            con.execute("DELETE FROM collections WHERE id = ?", (c,))
            con.execute("DELETE FROM api_keys WHERE key = ?", (key,))
        return KeyDeleted(key=record, faces_deleted=faces)

    def seed_demo_keys(self) -> list[ApiKey]:
        result = []
        for key, type_ in DEMO_KEYS.items():
            existing = self.find_key(key)
            if existing is None:
                try:
                    existing = self.create_key(type_, name=f"demo {type_}", key=key)
                except StorageError:  # created meanwhile by another process
                    existing = self.find_key(key)
            result.append(existing)
        return result

    # ------------------------------------------------------------------ subjects
    @staticmethod
    def _subject_row(con: sqlite3.Connection, collection: str, name: str) -> tuple[int, str] | None:
        return con.execute(
            "SELECT id, name FROM subjects WHERE collection = ? AND name_key = ?",
            (collection, _name_key(name)),
        ).fetchone()

    @staticmethod
    def _require_collection(con: sqlite3.Connection, collection: str) -> None:
        if con.execute("SELECT 1 FROM collections WHERE id = ?", (collection,)).fetchone() is None:
            raise StorageError(f"unknown collection {collection!r}")

    def add_subject(self, collection: str, name: str) -> str:
        _check_name(name)
        with self._write() as con:
            self._require_collection(con, collection)
            if self._subject_row(con, collection, name) is not None:
                raise SubjectExists(name)
            con.execute(
                "INSERT INTO subjects (collection, name, name_key, created) VALUES (?, ?, ?, ?)",
                (collection, name, _name_key(name), _now()),
            )
        return name

    def find_subject(self, collection: str, name: str) -> str | None:
        if not isinstance(name, str):
            return None
        row = self._subject_row(self._con(), collection, name)
        return None if row is None else row[1]

    def list_subjects(self, collection: str) -> list[str]:
        rows = self._con().execute(
            "SELECT name FROM subjects WHERE collection = ? ORDER BY id", (collection,)
        ).fetchall()
        return [r[0] for r in rows]

    def subject_face_counts(self, collection: str) -> dict[str, int]:
        rows = self._con().execute(
            """SELECT s.name, (SELECT COUNT(*) FROM faces f WHERE f.subject_id = s.id)
               FROM subjects s WHERE s.collection = ? ORDER BY s.id""",
            (collection,),
        ).fetchall()
        return {name: count for name, count in rows}

    def rename_subject(self, collection: str, old: str, new: str) -> bool:
        # CompreFace (SubjectService.updateSubjectName) returns false before any lookup
        if not isinstance(new, str) or not new.strip() or new == old:
            return False
        with self._write() as con:
            source = self._subject_row(con, collection, old)
            if source is None:
                raise SubjectNotFound(old)
            target = self._subject_row(con, collection, new)
            if target is None or target[0] == source[0]:
                # plain rename, including a change of case only
                con.execute(
                    "UPDATE subjects SET name = ?, name_key = ? WHERE id = ?", (new, _name_key(new), source[0])
                )
            else:
                # merge: faces keep their labels and vectors, only the owner changes
                con.execute("UPDATE faces SET subject_id = ? WHERE subject_id = ?", (target[0], source[0]))
                con.execute("DELETE FROM subjects WHERE id = ?", (source[0],))
        return True

    def delete_subject(self, collection: str, name: str) -> SubjectDeleted:
        with self._write() as con:
            row = self._subject_row(con, collection, name) if isinstance(name, str) else None
            if row is None:
                raise SubjectNotFound(name)
            changes = self._delete_face_rows(con, collection, "f.subject_id = ?", (row[0],))[1]
            con.execute("DELETE FROM subjects WHERE id = ?", (row[0],))
        return SubjectDeleted(subject=row[1], faces_deleted=len(changes), changes=changes)

    def delete_all_subjects(self, collection: str) -> SubjectsDeleted:
        with self._write() as con:
            changes = self._delete_face_rows(con, collection, "1", ())[1]
            deleted = con.execute("DELETE FROM subjects WHERE collection = ?", (collection,)).rowcount
        return SubjectsDeleted(deleted=deleted, faces_deleted=len(changes), changes=changes)

    # ------------------------------------------------------------------ faces
    def _next(self, con: sqlite3.Connection, collection: str, labels: int, seqs: int) -> tuple[int, int]:
        """Reserve `labels` labels and `seqs` sequences; returns (first label, first seq)."""
        row = con.execute(
            """UPDATE collections SET next_label = next_label + ?, last_seq = last_seq + ?
               WHERE id = ? RETURNING next_label - ?, last_seq - ? + 1""",
            (labels, seqs, collection, labels, seqs),
        ).fetchone()
        if row is None:
            raise StorageError(f"unknown collection {collection!r}")
        return row[0], row[1]

    def add_face(
        self,
        collection: str,
        subject: str,
        embedding: np.ndarray,
        image: bytes,
        image_id: str | None = None,
    ) -> FaceAdded:
        _check_name(subject)
        vector, blob = _vector_blob(embedding)
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise StorageError("image must be bytes")
        face_id = str(uuid.uuid4()) if image_id is None else _canonical_uuid(image_id, "image_id")
        created = _now()
        with self._write() as con:
            if con.execute(
                "SELECT 1 FROM faces WHERE collection = ? AND image_id = ?", (collection, face_id)
            ).fetchone():
                raise FaceExists(face_id)
            label, seq = self._next(con, collection, 1, 1)
            row = self._subject_row(con, collection, subject)
            subject_created = row is None
            if row is None:
                cur = con.execute(
                    "INSERT INTO subjects (collection, name, name_key, created) VALUES (?, ?, ?, ?)",
                    (collection, subject, _name_key(subject), created),
                )
                row = (cur.lastrowid, subject)
            cur = con.execute(
                """INSERT INTO faces (collection, label, image_id, subject_id, seq, created, embedding)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (collection, label, face_id, row[0], seq, created, blob),
            )
            con.execute("INSERT INTO images (face_id, data) VALUES (?, ?)", (cur.lastrowid, bytes(image)))
            con.execute(
                "INSERT INTO changes (collection, seq, op, label, vector) VALUES (?, ?, 'add', ?, ?)",
                (collection, seq, label, blob),
            )
        face = FaceRecord(
            image_id=face_id, subject=row[1], label=label, sequence=seq, created=created, embedding=vector.copy()
        )
        return FaceAdded(face=face, changes=[Change(seq, "add", label, vector)], subject_created=subject_created)

    def add_faces(self, collection: str, faces: Sequence[NewFace]) -> FacesAdded:
        items = list(faces)
        prepared = []
        for f in items:
            _check_name(f.subject)
            vector, blob = _vector_blob(f.embedding)
            if not isinstance(f.image, (bytes, bytearray, memoryview)):
                raise StorageError("image must be bytes")
            face_id = str(uuid.uuid4()) if f.image_id is None else _canonical_uuid(f.image_id, "image_id")
            prepared.append((f, vector, blob, face_id))
        ids = [p[3] for p in prepared]
        if len(set(ids)) != len(ids):
            raise FaceExists(next(i for i in ids if ids.count(i) > 1))
        if not prepared:
            return FacesAdded(faces=[], changes=[], subjects_created=[])
        created = _now()
        n = len(prepared)
        with self._write() as con:
            for part in _chunks(ids):
                taken = con.execute(
                    f"SELECT image_id FROM faces WHERE collection = ? AND image_id IN ({','.join('?' * len(part))})",
                    (collection, *part),
                ).fetchone()
                if taken is not None:
                    raise FaceExists(taken[0])
            first_label, first_seq = self._next(con, collection, n, n)
            subjects: dict[str, tuple[int, str]] = {}
            subjects_created: list[str] = []
            for f, *_ in prepared:
                key = _name_key(f.subject)
                if key in subjects:
                    continue
                row = self._subject_row(con, collection, f.subject)
                if row is None:
                    cur = con.execute(
                        "INSERT INTO subjects (collection, name, name_key, created) VALUES (?, ?, ?, ?)",
                        (collection, f.subject, key, created),
                    )
                    row = (cur.lastrowid, f.subject)
                    subjects_created.append(f.subject)
                subjects[key] = row
            con.executemany(
                """INSERT INTO faces (collection, label, image_id, subject_id, seq, created, embedding)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(collection, first_label + i, face_id, subjects[_name_key(f.subject)][0], first_seq + i, created, blob)
                 for i, (f, _, blob, face_id) in enumerate(prepared)],
            )
            # the rows just written hold labels first_label .. first_label + n - 1
            row_ids = dict(con.execute(
                "SELECT label, id FROM faces WHERE collection = ? AND label >= ? AND label < ?",
                (collection, first_label, first_label + n),
            ).fetchall())
            con.executemany(
                "INSERT INTO images (face_id, data) VALUES (?, ?)",
                [(row_ids[first_label + i], bytes(f.image)) for i, (f, *_) in enumerate(prepared) if len(f.image)],
            )
            con.executemany(
                "INSERT INTO face_sources (face_id, collection, sha256, path) VALUES (?, ?, ?, ?)",
                [(row_ids[first_label + i], collection, f.sha256, f.source or "")
                 for i, (f, *_) in enumerate(prepared) if f.sha256],
            )
            con.executemany(
                "INSERT INTO changes (collection, seq, op, label, vector) VALUES (?, ?, 'add', ?, ?)",
                [(collection, first_seq + i, first_label + i, blob) for i, (_, _, blob, _) in enumerate(prepared)],
            )
        records, changes = [], []
        for i, (f, vector, _, face_id) in enumerate(prepared):
            name = subjects[_name_key(f.subject)][1]
            records.append(FaceRecord(image_id=face_id, subject=name, label=first_label + i, sequence=first_seq + i,
                                      created=created, embedding=vector.copy()))
            changes.append(Change(first_seq + i, "add", first_label + i, vector))
        return FacesAdded(faces=records, changes=changes, subjects_created=subjects_created)

    def known_sources(self, collection: str, sha256s: Iterable[str]) -> set[str]:
        wanted = sorted({str(x) for x in sha256s})
        found: set[str] = set()
        with self._read() as con:
            for part in _chunks(wanted):
                rows = con.execute(
                    f"SELECT sha256 FROM face_sources WHERE collection = ? AND sha256 IN ({','.join('?' * len(part))})",
                    (collection, *part),
                ).fetchall()
                found.update(r[0] for r in rows)
        return found

    def subject_vectors(self, collection: str, subject: str) -> tuple[str, list[str], np.ndarray]:
        with self._read() as con:
            row = self._subject_row(con, collection, subject) if isinstance(subject, str) else None
            if row is None:
                raise SubjectNotFound(subject)
            rows = con.execute(
                "SELECT image_id, embedding FROM faces WHERE subject_id = ? ORDER BY label", (row[0],)
            ).fetchall()
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=_VECTOR_DTYPE).reshape(len(rows), EMBEDDING_DIM)
        return row[1], [r[0] for r in rows], vectors.astype(np.float32)

    _FACE_COLUMNS = "f.image_id, s.name, f.label, f.seq, f.created"

    @staticmethod
    def _face(row: tuple, embedding: np.ndarray | None = None) -> FaceRecord:
        return FaceRecord(
            image_id=row[0], subject=row[1], label=row[2], sequence=row[3], created=row[4], embedding=embedding
        )

    def list_faces(
        self, collection: str, subject: str | None = None, page: int = 0, size: int = 20
    ) -> tuple[list[FaceRecord], int]:
        if page < 0 or size < 1:
            raise StorageError(f"page must be >= 0 and size >= 1, got page={page} size={size}")
        with self._read() as con:
            where, args = self._face_filter(con, collection, subject)
            if where is None:
                return [], 0
            total = con.execute(f"SELECT COUNT(*) FROM faces WHERE {where}", args).fetchone()[0]
            # page through the (covering) index first, then join only the rows of the page
            rows = con.execute(
                f"""SELECT {self._FACE_COLUMNS}
                    FROM (SELECT id FROM faces WHERE {where} ORDER BY label LIMIT ? OFFSET ?) p
                    JOIN faces f ON f.id = p.id JOIN subjects s ON s.id = f.subject_id
                    ORDER BY f.label""",
                (*args, size, page * size),
            ).fetchall()
        return [self._face(r) for r in rows], total

    @staticmethod
    def _face_filter(con: sqlite3.Connection, collection: str, subject: str | None) -> tuple[str | None, tuple]:
        """WHERE clause over `faces` (unaliased); None when the subject does not exist."""
        if subject is None:
            return "collection = ?", (collection,)
        # exact match, as CompreFace's GET /faces?subject= (the one case-sensitive lookup);
        # name_key is unique, so at most one subject has this exact name
        row = con.execute(
            "SELECT id FROM subjects WHERE collection = ? AND name = ?", (collection, subject)
        ).fetchone()
        if row is None:
            return None, ()
        return "subject_id = ?", (row[0],)

    def count_faces(self, collection: str, subject: str | None = None) -> int:
        with self._read() as con:
            where, args = self._face_filter(con, collection, subject)
            if where is None:
                return 0
            return con.execute(f"SELECT COUNT(*) FROM faces WHERE {where}", args).fetchone()[0]

    def get_face(self, collection: str, image_id: str) -> FaceRecord:
        row = self._con().execute(
            f"""SELECT {self._FACE_COLUMNS}, f.embedding FROM faces f JOIN subjects s ON s.id = f.subject_id
                WHERE f.collection = ? AND f.image_id = ?""",
            (collection, str(image_id)),
        ).fetchone()
        if row is None:
            raise FaceNotFound(image_id)
        return self._face(row, _vector(row[5]))

    def get_image(self, collection: str, image_id: str) -> bytes | None:
        row = self._con().execute(
            """SELECT i.data FROM faces f JOIN images i ON i.face_id = f.id
               WHERE f.collection = ? AND f.image_id = ?""",
            (collection, str(image_id)),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def faces_by_labels(self, collection: str, labels: Iterable[int]) -> dict[int, tuple[str, str]]:
        wanted = sorted({int(x) for x in labels})
        result: dict[int, tuple[str, str]] = {}
        with self._read() as con:
            for part in _chunks(wanted):
                marks = ",".join("?" * len(part))
                rows = con.execute(
                    f"""SELECT f.label, f.image_id, s.name FROM faces f JOIN subjects s ON s.id = f.subject_id
                        WHERE f.collection = ? AND f.label IN ({marks})""",
                    (collection, *part),
                ).fetchall()
                for label, image_id, name in rows:
                    result[label] = (image_id, name)
        return result

    def _delete_face_rows(
        self, con: sqlite3.Connection, collection: str, where: str, args: tuple
    ) -> tuple[list[FaceRecord], list[Change]]:
        """Delete faces of `collection` matching `where` (over faces f), logging one delete each."""
        rows = con.execute(
            f"""SELECT f.id, {self._FACE_COLUMNS} FROM faces f JOIN subjects s ON s.id = f.subject_id
                WHERE f.collection = ? AND ({where}) ORDER BY f.label""",
            (collection, *args),
        ).fetchall()
        return self._delete_rows(con, collection, rows)

    def _delete_rows(
        self, con: sqlite3.Connection, collection: str, rows: list[tuple]
    ) -> tuple[list[FaceRecord], list[Change]]:
        if not rows:
            return [], []
        _, first_seq = self._next(con, collection, 0, len(rows))
        faces, changes = [], []
        for offset, row in enumerate(rows):
            face = self._face(row[1:])
            change = Change(first_seq + offset, "delete", face.label, None)
            faces.append(face)
            changes.append(change)
        ids = [(r[0],) for r in rows]
        con.executemany("DELETE FROM images WHERE face_id = ?", ids)
        con.executemany("DELETE FROM face_sources WHERE face_id = ?", ids)
        con.executemany("DELETE FROM faces WHERE id = ?", ids)
        con.executemany(
            "INSERT INTO changes (collection, seq, op, label, vector) VALUES (?, ?, 'delete', ?, NULL)",
            [(collection, c.seq, c.label) for c in changes],
        )
        return faces, changes

    def delete_faces(self, collection: str, image_ids: Sequence[str]) -> FacesDeleted:
        # keep request order, drop duplicates; a dict, not `in` on a list: a 10 MB body holds 250k ids
        ordered = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        with self._write() as con:
            found: dict[str, tuple] = {}
            for part in _chunks(ordered):
                marks = ",".join("?" * len(part))
                for row in con.execute(
                    f"""SELECT f.id, {self._FACE_COLUMNS} FROM faces f JOIN subjects s ON s.id = f.subject_id
                        WHERE f.collection = ? AND f.image_id IN ({marks})""",
                    (collection, *part),
                ):
                    found[row[1]] = row
            rows = [found[i] for i in ordered if i in found]
            faces, changes = self._delete_rows(con, collection, rows)
        return FacesDeleted(faces=faces, changes=changes)

    def delete_subject_faces(self, collection: str, subject: str) -> FacesDeleted:
        with self._write() as con:
            row = self._subject_row(con, collection, subject) if isinstance(subject, str) else None
            if row is None:
                return FacesDeleted(faces=[], changes=[], subject=None)
            faces, changes = self._delete_face_rows(con, collection, "f.subject_id = ?", (row[0],))
            con.execute("DELETE FROM subjects WHERE id = ?", (row[0],))
        return FacesDeleted(faces=faces, changes=changes, subject=row[1])

    # ------------------------------------------------------------------ change feed
    def current_sequence(self, collection: str) -> int:
        row = self._con().execute("SELECT last_seq FROM collections WHERE id = ?", (collection,)).fetchone()
        return 0 if row is None else int(row[0])

    def all_vectors(self, collection: str, chunk: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.snapshot_vectors(collection, chunk)[1]

    def snapshot_vectors(
        self, collection: str, chunk: int = 10_000
    ) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
        if chunk < 1:
            raise StorageError("chunk must be >= 1")
        if self._closed:
            raise StorageError("storage is closed")
        # a private connection: the iterator may be consumed on another thread, and its
        # read transaction (the snapshot) must not mix with this thread's other work
        con = self._connect()
        try:
            con.execute("BEGIN")
            row = con.execute("SELECT last_seq FROM collections WHERE id = ?", (collection,)).fetchone()
        except BaseException:
            con.close()
            raise
        sequence = 0 if row is None else int(row[0])
        return sequence, self._iter_vectors(con, collection, chunk)

    @staticmethod
    def _iter_vectors(con: sqlite3.Connection, collection: str, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            cursor = con.execute(
                "SELECT label, embedding FROM faces WHERE collection = ? ORDER BY label", (collection,)
            )
            while True:
                rows = cursor.fetchmany(chunk)
                if not rows:
                    break
                labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=_VECTOR_DTYPE)
                yield labels, vectors.reshape(len(rows), EMBEDDING_DIM).astype(np.float32)
        finally:
            con.close()

    def changes_since(self, collection: str, sequence: int) -> Iterator[Change]:
        con = self._con()
        row = con.execute("SELECT pruned_seq FROM collections WHERE id = ?", (collection,)).fetchone()
        if row is not None and int(sequence) < int(row[0]):
            raise StorageError(
                f"changes of {collection} up to {row[0]} were pruned; rebuild from all_vectors"
            )
        # materialised in pages so the per-thread connection is never left mid-statement
        last = int(sequence)
        while True:
            rows = con.execute(
                """SELECT seq, op, label, vector FROM changes WHERE collection = ? AND seq > ?
                   ORDER BY seq LIMIT 10000""",
                (collection, last),
            ).fetchall()
            if not rows:
                return
            for seq, op, label, blob in rows:
                yield Change(seq, op, label, _vector(blob))
            last = rows[-1][0]

    def prune_changes(self, collection: str, up_to: int) -> int:
        with self._write() as con:
            dropped = con.execute(
                "DELETE FROM changes WHERE collection = ? AND seq <= ?", (collection, int(up_to))
            ).rowcount
            con.execute(
                "UPDATE collections SET pruned_seq = MAX(pruned_seq, ?) WHERE id = ?", (int(up_to), collection)
            )
        return dropped
