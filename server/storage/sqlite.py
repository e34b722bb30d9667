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
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from server.storage.base import Change, StorageError
from server.storage.sql import SCHEMA_VERSION, SqlStorage, blob_vector, stack_vectors

_BUSY_TIMEOUT_MS = 30_000
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


class SqliteStorage(SqlStorage):
    """`Storage` over one SQLite file. Create one per process; share it between threads.

    The storage logic is `SqlStorage`'s (sql.py); this class is the SQLite dialect: per-thread
    connections, BEGIN IMMEDIATE under a process-wide lock, `?` placeholders and chunked IN lists."""

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
    def _connection(self) -> Iterator[sqlite3.Connection]:
        yield self._con()

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

    # ------------------------------------------------------------------ following other processes
    def start_follower(self, on_change: Callable[[str, int], object],
                       on_drop: Callable[[str], object] | None = None, *, listen: bool = True) -> None:
        """Nothing to follow: one server process owns the file (the `keys` CLI only manages keys)."""

    def stop_follower(self) -> None:
        """Nothing to stop (see start_follower)."""

    # ------------------------------------------------------------------ dialect
    def _execute(self, con: sqlite3.Connection, sql: str, args: Sequence = (), binary: bool = False) -> sqlite3.Cursor:
        return con.execute(sql, args)

    def _executemany(self, con: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
        con.executemany(sql, rows)

    def _select_in(self, con: sqlite3.Connection, sql: str, args: tuple, values: Sequence) -> list[tuple]:
        rows: list[tuple] = []
        for part in _chunks(values):
            marks = ",".join("?" * len(part))
            rows.extend(con.execute(sql.format(**{"in": f"IN ({marks})"}), (*args, *part)).fetchall())
        return rows

    def _read_in(self, sql: str, args: tuple, values: Sequence) -> list[tuple]:
        with self._read() as con:  # several chunks: one snapshot
            return self._select_in(con, sql, args, values)

    def _delete_face_ids(self, con: sqlite3.Connection, ids: list[int]) -> None:
        rows = [(i,) for i in ids]
        con.executemany("DELETE FROM images WHERE face_id = ?", rows)
        con.executemany("DELETE FROM face_sources WHERE face_id = ?", rows)
        con.executemany("DELETE FROM faces WHERE id = ?", rows)

    # ------------------------------------------------------------------ change feed
    def _open_snapshot(self) -> sqlite3.Connection:
        return self._connect()

    def _snapshot_chunks(
        self, con: sqlite3.Connection, collection: str, chunk: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            cursor = con.execute(
                "SELECT label, embedding FROM faces WHERE collection = ? ORDER BY label", (collection,)
            )
            while True:
                rows = cursor.fetchmany(chunk)
                if not rows:
                    break
                labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                yield labels, stack_vectors((r[1] for r in rows), len(rows))
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
                yield Change(seq, op, label, blob_vector(blob))
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
