"""What the SQL backends (`sqlite.py`, `postgres.py`) share: validation, row mapping, and every
query that reads or writes the same tables the same way.

Both backends keep the same tables, columns and semantics, so the storage logic is written once
here, with `?` placeholders. A backend supplies the dialect:

- `_execute` / `_executemany`: run a statement (PostgreSQL translates `?` to `%s`);
- `_select_in`: rows of a statement whose `{in}` is a membership test on a list of values
  (SQLite: `IN (?, ...)` in chunks under its bound-parameter limit; PostgreSQL: `= ANY(%s)`);
- `_connection`, `_read`, `_write`: connections and transactions. `_write` is ONE transaction,
  committed durably before the block ends, rolled back on any exception: every public write
  here runs in exactly one `_write` block and returns after it, so it is acknowledged only
  after its commit;
- `_delete_face_ids`, `_open_snapshot`, `_snapshot_chunks`, `_BEGIN_SNAPSHOT`: bulk deletes and
  the private snapshot connection of `snapshot_vectors`;
- hooks whose defaults are SQLite's: `_lock_collection` and `_LOCK_ROWS` (SQLite's BEGIN
  IMMEDIATE already serialises every writer; PostgreSQL locks the collection's row), `_notify`
  (other replicas to tell: PostgreSQL only), and the NUL-refusing checks PostgreSQL's text needs.

What stays in the backends differs in semantics, not just spelling: schema creation, the
change log's pruning (PostgreSQL keeps rows for a retention time) and `changes_since` (one
statement per page there, so a racing prune cannot be missed).
"""
from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import replace
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence, TypeVar

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

SCHEMA_VERSION = 2  # 2: face_sources (bulk import provenance); the same in both backends
VECTOR_DTYPE = np.dtype("<f4")  # stored little-endian float32, 512 bytes per face (same bytes in both)

_KEY_COLUMNS = "key, type, name, created, collection"
_FACE_COLUMNS = "f.image_id, s.name, f.label, f.seq, f.created"  # see SqlStorage._face
_FACES_WITH_SUBJECT = "faces f JOIN subjects s ON s.id = f.subject_id"

_Self = TypeVar("_Self", bound="SqlStorage")


# ----------------------------------------------------------------------------- helpers
def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def name_key(name: str) -> str:
    return name.lower()  # Python's Unicode-aware lower(), unlike SQLite's lower()


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StorageError("subject name must be a non-empty string")
    return name


def check_image(image: object) -> bytes:
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise StorageError("image must be bytes")
    return bytes(image)


def canonical_uuid(value: str, what: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError) as exc:
        raise StorageError(f"{what} must be a UUID string, got {value!r}") from exc
    return str(parsed)


def vector_blob(embedding: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(float32 (128,) vector, its stored bytes) of a valid embedding; StorageError otherwise."""
    try:
        vec = np.asarray(embedding, dtype=VECTOR_DTYPE)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"embedding is not numeric: {exc}") from exc
    if vec.shape != (EMBEDDING_DIM,):
        raise StorageError(f"embedding must have shape ({EMBEDDING_DIM},), got {vec.shape}")
    if not np.isfinite(vec).all():
        raise StorageError("embedding contains NaN or infinity")
    vec = np.ascontiguousarray(vec)
    return vec.astype(np.float32, copy=False), vec.tobytes()


def blob_vector(blob: bytes | None) -> np.ndarray | None:
    if blob is None:
        return None
    # copy: frombuffer over bytes is read-only, callers may want to modify it
    return np.frombuffer(blob, dtype=VECTOR_DTYPE).astype(np.float32)


def stack_vectors(blobs: Iterable[bytes], n: int) -> np.ndarray:
    """float32 (n, 128) from n stored embeddings."""
    return np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPE).reshape(n, EMBEDDING_DIM).astype(np.float32)


# ----------------------------------------------------------------------------- shared storage
class SqlStorage(ABC):
    """The `Storage` methods both SQL backends implement identically, over the dialect below."""

    _closed: bool
    _LOCK_ROWS = ""  # suffix of a SELECT that must lock its rows until commit (PostgreSQL: FOR UPDATE)
    _KEY_ORDER = "created, key"  # list_keys order: bytewise text comparison (SQLite's BINARY)
    _BEGIN_SNAPSHOT = "BEGIN"  # starts the read transaction of snapshot_vectors

    # ------------------------------------------------------------------ dialect
    @abstractmethod
    def _execute(self, con: Any, sql: str, args: Sequence = (), binary: bool = False) -> Any:
        """Run one statement written with `?` placeholders; returns its cursor. `binary`: a hint
        that the result holds blobs (PostgreSQL's binary transfer)."""

    @abstractmethod
    def _executemany(self, con: Any, sql: str, rows: list[tuple]) -> None:
        """Run one statement (with `?` placeholders) for each row of arguments."""

    @abstractmethod
    def _select_in(self, con: Any, sql: str, args: tuple, values: Sequence) -> list[tuple]:
        """Rows of `sql` with `{in}` replaced by a test "is among `values`" (bound after `args`)."""

    @abstractmethod
    def _read_in(self, sql: str, args: tuple, values: Sequence) -> list[tuple]:
        """`_select_in` outside a write, all of it read in one snapshot."""

    @abstractmethod
    def _connection(self) -> AbstractContextManager[Any]:
        """A connection for reads outside a transaction."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Any]:
        """A read transaction: its SELECTs see one snapshot."""

    @abstractmethod
    def _write(self) -> AbstractContextManager[Any]:
        """One write transaction, durable when the block ends, rolled back on any exception."""

    @abstractmethod
    def _delete_face_ids(self, con: Any, ids: list[int]) -> None:
        """Delete the faces with those row ids, with their images and sources."""

    @abstractmethod
    def _open_snapshot(self) -> Any:
        """A new private connection (not in a transaction yet) for snapshot_vectors."""

    @abstractmethod
    def _snapshot_chunks(self, con: Any, collection: str, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The faces of the snapshot open on `con` in label order; closes `con` when done."""

    # ------------------------------------------------------------------ hooks (SQLite's defaults)
    def _lock_collection(self, con: Any, collection: str) -> None:
        """Serialise the collection's writers until commit, so its sequences commit in order.
        SQLite: nothing to do, BEGIN IMMEDIATE already holds the database's single write lock."""

    def _notify(self, con: Any, collection: str, what: str) -> None:
        """Tell other processes at commit that the collection changed ("<seq>" or "drop").
        SQLite: one server process owns the file, there is nobody to tell."""

    @staticmethod
    def _check_name(name: object) -> str:
        return check_name(name)

    @staticmethod
    def _image_id_arg(image_id: object) -> str | None:
        """The image id as a query argument; None when no stored face can have it."""
        return str(image_id)

    # ------------------------------------------------------------------ small queries
    def _one(self, sql: str, args: Sequence = ()) -> tuple | None:
        with self._connection() as con:
            return self._execute(con, sql, args).fetchone()

    def _all(self, sql: str, args: Sequence = (), binary: bool = False) -> list[tuple]:
        with self._connection() as con:
            return self._execute(con, sql, args, binary).fetchall()

    def _collection_exists(self, con: Any, collection: str) -> bool:
        """Whether the collection exists (its row locked until commit where the dialect locks rows)."""
        sql = "SELECT 1 FROM collections WHERE id = ?" + self._LOCK_ROWS
        return self._execute(con, sql, (collection,)).fetchone() is not None

    def _require_collection(self, con: Any, collection: str) -> None:
        if not self._collection_exists(con, collection):
            raise StorageError(f"unknown collection {collection!r}")

    def _next(self, con: Any, collection: str, labels: int, seqs: int) -> tuple[int, int]:
        """Reserve `labels` labels and `seqs` sequences; returns (first label, first seq)."""
        row = self._execute(
            con,
            """UPDATE collections SET next_label = next_label + ?, last_seq = last_seq + ?
               WHERE id = ? RETURNING next_label - ?, last_seq - ? + 1""",
            (labels, seqs, collection, labels, seqs),
        ).fetchone()
        if row is None:
            raise StorageError(f"unknown collection {collection!r}")
        return int(row[0]), int(row[1])

    def _log_changes(self, con: Any, collection: str, rows: list[tuple[int, str, int, bytes | None]]) -> None:
        """Change rows (seq, op, label, vector bytes), then the notification of the last seq."""
        if not rows:
            return
        self._executemany(
            con,
            "INSERT INTO changes (collection, seq, op, label, vector) VALUES (?, ?, ?, ?, ?)",
            [(collection, seq, op, label, blob) for seq, op, label, blob in rows],
        )
        self._notify(con, collection, str(rows[-1][0]))

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Close all connections. Further calls raise StorageError."""

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _key_row(row: tuple) -> ApiKey:
        return ApiKey(key=row[0], type=row[1], name=row[2], created=row[3], collection=row[4])

    @staticmethod
    def _new_key(type: str, name: str, key: str | None) -> ApiKey:
        if type not in KEY_TYPES:
            raise StorageError(f"key type must be one of {', '.join(KEY_TYPES)}, got {type!r}")
        value = str(uuid.uuid4()) if key is None else canonical_uuid(key, "key")
        return ApiKey(key=value, type=type, name=name or "", created=utc_now(), collection=uuid.uuid4().hex)

    def _insert_key(self, con: Any, record: ApiKey) -> None:
        if self._execute(con, "SELECT 1 FROM api_keys WHERE key = ?", (record.key,)).fetchone():
            raise StorageError(f"key {record.key} already exists")
        self._execute(
            con,
            f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (record.key, record.type, record.name, record.created, record.collection),
        )
        self._execute(con, "INSERT INTO collections (id) VALUES (?)", (record.collection,))

    def create_key(self, type: str, name: str = "", key: str | None = None) -> ApiKey:
        record = self._new_key(type, name, key)
        with self._write() as con:
            self._insert_key(con, record)
        return record

    def find_key(self, key: str) -> ApiKey | None:
        row = self._one(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key = ?", (key,))
        return None if row is None else self._key_row(row)

    def list_keys(self) -> list[ApiKey]:
        return [self._key_row(r) for r in self._all(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY {self._KEY_ORDER}")]

    def _locked_key(self, con: Any, key: str) -> ApiKey:
        """The key's row, locked until the transaction ends; KeyNotFound if absent."""
        row = self._execute(con, f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key = ?{self._LOCK_ROWS}", (key,)).fetchone()
        if row is None:
            raise KeyNotFound(key)
        return self._key_row(row)

    def rename_key(self, key: str, name: str) -> ApiKey:
        with self._write() as con:
            record = replace(self._locked_key(con, key), name=name or "")
            self._execute(con, "UPDATE api_keys SET name = ? WHERE key = ?", (record.name, key))
        return record

    def delete_key(self, key: str) -> KeyDeleted:
        with self._write() as con:
            record = self._locked_key(con, key)
            c = record.collection
            self._lock_collection(con, c)  # waits for writers of this collection in flight
            faces = self._execute(con, "SELECT COUNT(*) FROM faces WHERE collection = ?", (c,)).fetchone()[0]
            self._execute(con, "DELETE FROM images WHERE face_id IN (SELECT id FROM faces WHERE collection = ?)", (c,))
            for table in ("face_sources", "faces", "subjects", "changes"):
                self._execute(con, f"DELETE FROM {table} WHERE collection = ?", (c,))
            self._execute(con, "DELETE FROM collections WHERE id = ?", (c,))
            self._execute(con, "DELETE FROM api_keys WHERE key = ?", (key,))
            self._notify(con, c, "drop")
        return KeyDeleted(key=record, faces_deleted=int(faces))

    def seed_demo_keys(self) -> list[ApiKey]:
        result = []
        for key, type_ in DEMO_KEYS.items():
            existing = self.find_key(key)
            if existing is None:
                try:
                    existing = self.create_key(type_, name=f"demo {type_}", key=key)
                except StorageError:  # created meanwhile by another process or replica
                    existing = self.find_key(key)
            result.append(existing)
        return result

    # ------------------------------------------------------------------ subjects
    def _subject_row(self, con: Any, collection: str, name: str) -> tuple[int, str] | None:
        return self._execute(
            con, "SELECT id, name FROM subjects WHERE collection = ? AND name_key = ?", (collection, name_key(name))
        ).fetchone()

    def _insert_subject(self, con: Any, collection: str, name: str, created: str) -> tuple[int, str]:
        row = self._execute(
            con,
            "INSERT INTO subjects (collection, name, name_key, created) VALUES (?, ?, ?, ?) RETURNING id",
            (collection, name, name_key(name), created),
        ).fetchone()
        return int(row[0]), name

    def add_subject(self, collection: str, name: str) -> str:
        self._check_name(name)
        with self._write() as con:
            self._require_collection(con, collection)
            if self._subject_row(con, collection, name) is not None:
                raise SubjectExists(name)
            self._insert_subject(con, collection, name, utc_now())
        return name

    def find_subject(self, collection: str, name: str) -> str | None:
        if not isinstance(name, str):
            return None
        with self._connection() as con:
            row = self._subject_row(con, collection, name)
        return None if row is None else row[1]

    def list_subjects(self, collection: str) -> list[str]:
        return [r[0] for r in self._all("SELECT name FROM subjects WHERE collection = ? ORDER BY id", (collection,))]

    def subject_face_counts(self, collection: str) -> dict[str, int]:
        rows = self._all(
            """SELECT s.name, (SELECT COUNT(*) FROM faces f WHERE f.subject_id = s.id)
               FROM subjects s WHERE s.collection = ? ORDER BY s.id""",
            (collection,),
        )
        return {name: int(count) for name, count in rows}

    def rename_subject(self, collection: str, old: str, new: str) -> bool:
        # CompreFace (SubjectService.updateSubjectName) returns false before any lookup
        if not isinstance(new, str) or not new.strip() or new == old:
            return False
        self._check_name(new)
        with self._write() as con:
            self._lock_collection(con, collection)
            source = self._subject_row(con, collection, old)
            if source is None:
                raise SubjectNotFound(old)
            target = self._subject_row(con, collection, new)
            if target is None or target[0] == source[0]:
                # plain rename, including a change of case only
                self._execute(
                    con, "UPDATE subjects SET name = ?, name_key = ? WHERE id = ?", (new, name_key(new), source[0])
                )
            else:
                # merge: faces keep their labels and vectors, only the owner changes
                self._execute(con, "UPDATE faces SET subject_id = ? WHERE subject_id = ?", (target[0], source[0]))
                self._execute(con, "DELETE FROM subjects WHERE id = ?", (source[0],))
        return True

    def delete_subject(self, collection: str, name: str) -> SubjectDeleted:
        with self._write() as con:
            self._lock_collection(con, collection)
            row = self._subject_row(con, collection, name) if isinstance(name, str) else None
            if row is None:
                raise SubjectNotFound(name)
            changes = self._delete_face_rows(con, collection, "f.subject_id = ?", (row[0],))[1]
            self._execute(con, "DELETE FROM subjects WHERE id = ?", (row[0],))
        return SubjectDeleted(subject=row[1], faces_deleted=len(changes), changes=changes)

    def delete_all_subjects(self, collection: str) -> SubjectsDeleted:
        with self._write() as con:
            self._lock_collection(con, collection)
            changes = self._delete_face_rows(con, collection, None, ())[1]
            deleted = self._execute(con, "DELETE FROM subjects WHERE collection = ?", (collection,)).rowcount
        return SubjectsDeleted(deleted=deleted, faces_deleted=len(changes), changes=changes)

    # ------------------------------------------------------------------ faces
    @staticmethod
    def _face(row: tuple, embedding: np.ndarray | None = None) -> FaceRecord:
        """A FaceRecord from the columns _FACE_COLUMNS."""
        return FaceRecord(image_id=row[0], subject=row[1], label=int(row[2]), sequence=int(row[3]), created=row[4],
                          embedding=embedding)

    def _prepare(self, subject: str, embedding: np.ndarray, image: bytes, image_id: str | None):
        """Validated (vector, blob, image bytes, image id) of one new face."""
        self._check_name(subject)
        vector, blob = vector_blob(embedding)
        data = check_image(image)
        face_id = str(uuid.uuid4()) if image_id is None else canonical_uuid(image_id, "image_id")
        return vector, blob, data, face_id

    def add_face(
        self,
        collection: str,
        subject: str,
        embedding: np.ndarray,
        image: bytes,
        image_id: str | None = None,
    ) -> FaceAdded:
        vector, blob, data, face_id = self._prepare(subject, embedding, image, image_id)
        created = utc_now()
        with self._write() as con:
            self._require_collection(con, collection)
            if self._execute(
                con, "SELECT 1 FROM faces WHERE collection = ? AND image_id = ?", (collection, face_id)
            ).fetchone():
                raise FaceExists(face_id)
            label, seq = self._next(con, collection, 1, 1)
            row = self._subject_row(con, collection, subject)
            subject_created = row is None
            if row is None:
                row = self._insert_subject(con, collection, subject, created)
            face_row = self._execute(
                con,
                """INSERT INTO faces (collection, label, image_id, subject_id, seq, created, embedding)
                   VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id""",
                (collection, label, face_id, row[0], seq, created, blob),
            ).fetchone()
            self._execute(con, "INSERT INTO images (face_id, data) VALUES (?, ?)", (face_row[0], data))
            self._log_changes(con, collection, [(seq, "add", label, blob)])
        face = FaceRecord(
            image_id=face_id, subject=row[1], label=label, sequence=seq, created=created, embedding=vector.copy()
        )
        return FaceAdded(face=face, changes=[Change(seq, "add", label, vector)], subject_created=subject_created)

    def add_faces(self, collection: str, faces: Sequence[NewFace]) -> FacesAdded:
        items = list(faces)
        prepared = [self._prepare(f.subject, f.embedding, f.image, f.image_id) for f in items]
        ids = [p[3] for p in prepared]
        if len(set(ids)) != len(ids):
            raise FaceExists(next(i for i in ids if ids.count(i) > 1))
        if not prepared:
            return FacesAdded(faces=[], changes=[], subjects_created=[])
        created = utc_now()
        n = len(prepared)
        with self._write() as con:
            self._require_collection(con, collection)
            taken = self._select_in(
                con, "SELECT image_id FROM faces WHERE collection = ? AND image_id {in} LIMIT 1", (collection,), ids
            )
            if taken:
                raise FaceExists(taken[0][0])
            first_label, first_seq = self._next(con, collection, n, n)
            subjects: dict[str, tuple[int, str]] = {}
            subjects_created: list[str] = []
            for f in items:
                key = name_key(f.subject)
                if key in subjects:
                    continue
                row = self._subject_row(con, collection, f.subject)
                if row is None:
                    row = self._insert_subject(con, collection, f.subject, created)
                    subjects_created.append(f.subject)
                subjects[key] = row
            self._executemany(
                con,
                """INSERT INTO faces (collection, label, image_id, subject_id, seq, created, embedding)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(collection, first_label + i, face_id, subjects[name_key(f.subject)][0], first_seq + i, created, blob)
                 for i, (f, (_, blob, _, face_id)) in enumerate(zip(items, prepared))],
            )
            # the rows just written hold labels first_label .. first_label + n - 1
            row_ids = dict(self._execute(
                con,
                "SELECT label, id FROM faces WHERE collection = ? AND label >= ? AND label < ?",
                (collection, first_label, first_label + n),
            ).fetchall())
            images = [(row_ids[first_label + i], p[2]) for i, p in enumerate(prepared) if p[2]]
            if images:
                self._executemany(con, "INSERT INTO images (face_id, data) VALUES (?, ?)", images)
            sources = [(row_ids[first_label + i], collection, f.sha256, f.source or "")
                       for i, f in enumerate(items) if f.sha256]
            if sources:
                self._executemany(
                    con, "INSERT INTO face_sources (face_id, collection, sha256, path) VALUES (?, ?, ?, ?)", sources
                )
            self._log_changes(con, collection,
                              [(first_seq + i, "add", first_label + i, p[1]) for i, p in enumerate(prepared)])
        records, changes = [], []
        for i, (f, (vector, *_)) in enumerate(zip(items, prepared)):
            name = subjects[name_key(f.subject)][1]
            records.append(FaceRecord(image_id=ids[i], subject=name, label=first_label + i, sequence=first_seq + i,
                                      created=created, embedding=vector.copy()))
            changes.append(Change(first_seq + i, "add", first_label + i, vector))
        return FacesAdded(faces=records, changes=changes, subjects_created=subjects_created)

    def known_sources(self, collection: str, sha256s: Iterable[str]) -> set[str]:
        wanted = sorted({str(x) for x in sha256s})
        rows = self._read_in("SELECT sha256 FROM face_sources WHERE collection = ? AND sha256 {in}",
                             (collection,), wanted)
        return {r[0] for r in rows}

    def subject_vectors(self, collection: str, subject: str) -> tuple[str, list[str], np.ndarray]:
        with self._read() as con:
            row = self._subject_row(con, collection, subject) if isinstance(subject, str) else None
            if row is None:
                raise SubjectNotFound(subject)
            rows = self._execute(
                con, "SELECT image_id, embedding FROM faces WHERE subject_id = ? ORDER BY label", (row[0],), binary=True
            ).fetchall()
        return row[1], [r[0] for r in rows], stack_vectors((r[1] for r in rows), len(rows))

    def _face_filter(self, con: Any, collection: str, subject: str | None) -> tuple[str | None, tuple]:
        """WHERE clause over `faces` (unaliased); None when the subject does not exist."""
        if subject is None:
            return "collection = ?", (collection,)
        # exact match, as CompreFace's GET /faces?subject= (the one case-sensitive lookup);
        # name_key is unique, so at most one subject has this exact name
        row = self._execute(
            con, "SELECT id FROM subjects WHERE collection = ? AND name = ?", (collection, subject)
        ).fetchone()
        if row is None:
            return None, ()
        return "subject_id = ?", (row[0],)

    def list_faces(
        self, collection: str, subject: str | None = None, page: int = 0, size: int = 20
    ) -> tuple[list[FaceRecord], int]:
        if page < 0 or size < 1:
            raise StorageError(f"page must be >= 0 and size >= 1, got page={page} size={size}")
        with self._read() as con:
            where, args = self._face_filter(con, collection, subject)
            if where is None:
                return [], 0
            total = self._execute(con, f"SELECT COUNT(*) FROM faces WHERE {where}", args).fetchone()[0]
            # page through the (covering) index first, then join only the rows of the page
            rows = self._execute(
                con,
                f"""SELECT {_FACE_COLUMNS}
                    FROM (SELECT id FROM faces WHERE {where} ORDER BY label LIMIT ? OFFSET ?) p
                    JOIN faces f ON f.id = p.id JOIN subjects s ON s.id = f.subject_id
                    ORDER BY f.label""",
                (*args, size, page * size),
            ).fetchall()
        return [self._face(r) for r in rows], int(total)

    def count_faces(self, collection: str, subject: str | None = None) -> int:
        with self._read() as con:
            where, args = self._face_filter(con, collection, subject)
            if where is None:
                return 0
            return int(self._execute(con, f"SELECT COUNT(*) FROM faces WHERE {where}", args).fetchone()[0])

    def get_face(self, collection: str, image_id: str) -> FaceRecord:
        key = self._image_id_arg(image_id)
        row = None if key is None else self._one(
            f"SELECT {_FACE_COLUMNS}, f.embedding FROM {_FACES_WITH_SUBJECT} WHERE f.collection = ? AND f.image_id = ?",
            (collection, key),
        )
        if row is None:
            raise FaceNotFound(image_id)
        return self._face(row, blob_vector(bytes(row[5])))

    def get_image(self, collection: str, image_id: str) -> bytes | None:
        key = self._image_id_arg(image_id)
        row = None if key is None else self._one(
            """SELECT i.data FROM faces f JOIN images i ON i.face_id = f.id
               WHERE f.collection = ? AND f.image_id = ?""",
            (collection, key),
        )
        return None if row is None else bytes(row[0])

    def faces_by_labels(self, collection: str, labels: Iterable[int]) -> dict[int, tuple[str, str]]:
        wanted = sorted({int(x) for x in labels})
        rows = self._read_in(f"SELECT f.label, f.image_id, s.name FROM {_FACES_WITH_SUBJECT} "
                             "WHERE f.collection = ? AND f.label {in}", (collection,), wanted)
        return {int(label): (image_id, name) for label, image_id, name in rows}

    def _delete_face_rows(
        self, con: Any, collection: str, where: str | None, args: tuple
    ) -> tuple[list[FaceRecord], list[Change]]:
        """Delete faces of `collection` matching `where` (over faces f; None: all of them),
        logging one delete each."""
        extra = "" if where is None else f" AND ({where})"
        rows = self._execute(
            con,
            f"SELECT f.id, {_FACE_COLUMNS} FROM {_FACES_WITH_SUBJECT} WHERE f.collection = ?{extra} ORDER BY f.label",
            (collection, *args),
        ).fetchall()
        return self._delete_rows(con, collection, rows)

    def _delete_rows(self, con: Any, collection: str, rows: list[tuple]) -> tuple[list[FaceRecord], list[Change]]:
        """Delete the faces of rows (row id, *_FACE_COLUMNS), logging one delete each."""
        if not rows:
            return [], []
        _, first_seq = self._next(con, collection, 0, len(rows))
        faces = [self._face(row[1:]) for row in rows]
        changes = [Change(first_seq + i, "delete", face.label, None) for i, face in enumerate(faces)]
        self._delete_face_ids(con, [int(r[0]) for r in rows])
        self._log_changes(con, collection, [(c.seq, "delete", c.label, None) for c in changes])
        return faces, changes

    def delete_faces(self, collection: str, image_ids: Sequence[str]) -> FacesDeleted:
        # keep request order, drop duplicates; a dict, not `in` on a list: a 10 MB body holds 250k ids
        keys = (self._image_id_arg(image_id) for image_id in image_ids)
        ordered = list(dict.fromkeys(k for k in keys if k is not None))
        with self._write() as con:
            self._lock_collection(con, collection)
            found: dict[str, tuple] = {}
            sql = (f"SELECT f.id, {_FACE_COLUMNS} FROM {_FACES_WITH_SUBJECT} "
                   "WHERE f.collection = ? AND f.image_id {in}")  # not an f-string: {in} is _select_in's
            for row in self._select_in(con, sql, (collection,), ordered):
                found[row[1]] = row
            rows = [found[i] for i in ordered if i in found]
            faces, changes = self._delete_rows(con, collection, rows)
        return FacesDeleted(faces=faces, changes=changes)

    def delete_subject_faces(self, collection: str, subject: str) -> FacesDeleted:
        with self._write() as con:
            self._lock_collection(con, collection)
            row = self._subject_row(con, collection, subject) if isinstance(subject, str) else None
            if row is None:
                return FacesDeleted(faces=[], changes=[], subject=None)
            faces, changes = self._delete_face_rows(con, collection, "f.subject_id = ?", (row[0],))
            self._execute(con, "DELETE FROM subjects WHERE id = ?", (row[0],))
        return FacesDeleted(faces=faces, changes=changes, subject=row[1])

    # ------------------------------------------------------------------ change feed
    def current_sequence(self, collection: str) -> int:
        row = self._one("SELECT last_seq FROM collections WHERE id = ?", (collection,))
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
        # a private connection: the iterator may be consumed later or on another thread, and its
        # read transaction (the snapshot) must not mix with this thread's other work
        con = self._open_snapshot()
        try:
            self._execute(con, self._BEGIN_SNAPSHOT)
            row = self._execute(con, "SELECT last_seq FROM collections WHERE id = ?", (collection,)).fetchone()
        except BaseException:
            con.close()
            raise
        return (0 if row is None else int(row[0])), self._snapshot_chunks(con, collection, chunk)
