"""SQLite implementation of `Storage`: one file, WAL journal, synchronous=FULL.

Durability: every write runs in its own `BEGIN IMMEDIATE ... COMMIT`; with WAL and
synchronous=FULL the commit fsyncs the WAL before returning, so an acknowledged write
survives a process kill or power loss.

Concurrency: one connection per thread (threading.local), so WAL readers never block
each other or the writer. Writes are serialised by a process-wide lock (cheap, avoids
SQLITE_BUSY churn between our own threads) and, across processes (the `keys` CLI while
the server runs), by SQLite's write lock plus busy_timeout.

A full disk. SQLite needs room for its WAL to write anything, deletes included, so a server whose
disk filled up could not even free space through the API. The storage therefore keeps a reserve
file next to the database (`<db>.reserve`, `reserve_bytes`, preallocated at start): a write that
fails for lack of space (SQLITE_FULL / ENOSPC) is rolled back and answered `StorageFull`, and the
reserve is given back to the file system. While it is missing, writes that add data are refused at
once (`StorageFull`, the database untouched) and writes that free data (deletes, pruning) run in the
room it left; a delete that met a full disk with the reserve still in place releases it and runs
once more. After each freeing write the file is shrunk (new databases use auto_vacuum=INCREMENTAL)
and the WAL truncated; the reserve is re-created as soon as twice its size is free again (examples
deleted, the file system grown), and writes resume without a restart.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from server.storage.base import Change, StorageError, StorageFull
from server.storage.sql import SCHEMA_VERSION, SqlStorage, blob_vector, stack_vectors

_BUSY_TIMEOUT_MS = 30_000
_SQL_VARS = 500  # max bound parameters per IN (...) list, well under SQLite's limit
_SQLITE_FULL = 13  # primary result code "database or disk is full"
_RESERVE_CHUNK = 1 << 20
_WAL_CHECKPOINT_PAGES = 256
_WAL_SIZE_LIMIT = 2 << 20
# page cache per connection, in KiB (SQLite's default is 2,000): there is one connection per worker
# thread (~30 under load), and each cache fills slowly as that thread reads, so with the default the
# process's RSS crept up by ~25 MB over the soak's 100,000 requests after warm-up (5.2-6.0 %), with 256
# by 2.5 % (docs/benchmarks.md, Soak); reads are then served from the OS's file cache
_CACHE_KIB = 256

log = logging.getLogger(__name__)

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


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk is full (SQLITE_FULL, or ENOSPC from the file system)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(exc)
    return False


class SpaceReserve:
    """A preallocated file of `size` bytes that can be given back to the file system when it is full,
    and re-created once twice its size is free again. size 0: no reserve (always "present")."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = max(0, int(size))
        self.releases = 0  # how often the reserve was given back (tests, logs)
        try:
            self.present = self.size == 0 or self.path.stat().st_size >= self.size
        except OSError:
            self.present = False

    def free_bytes(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def ensure(self) -> bool:
        """Present, or re-created now if there is room for it and as much again; False otherwise."""
        if self.present:
            return True
        try:
            if self.free_bytes() < 2 * self.size:
                return False
            with open(self.path, "wb") as f:  # written, not a sparse hole: the blocks must be ours
                block = b"\0" * _RESERVE_CHUNK
                left = self.size
                while left > 0:
                    left -= f.write(block[:min(left, _RESERVE_CHUNK)])
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            log.warning("cannot create the space reserve %s: %s", self.path, exc)
            self._unlink()
            return False
        self.present = True
        log.info("space reserve %s in place (%d bytes)", self.path, self.size)
        return True

    def release(self) -> bool:
        """Give the reserve back to the file system; False when there was none to give."""
        if self.present and self.size:
            self._unlink()
            self.present = False
            self.releases += 1
            log.warning("disk full: released the space reserve %s (%d bytes) so that deletes can run; writes "
                        "that add data are refused until space is free again", self.path, self.size)
            return True
        return False

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _frees_space(method):
    """A write that frees space: it may use the reserve (released and the write retried once when the
    disk is full); afterwards the file shrinks and the reserve comes back if there is room."""

    @functools.wraps(method)
    def wrapper(self: "SqliteStorage", *args, **kwargs):
        self._local.freeing = True
        try:
            try:
                return method(self, *args, **kwargs)
            except StorageFull:
                with self._write_lock:
                    released = self._reserve.release()
                if not released:
                    raise
                return method(self, *args, **kwargs)
        finally:
            self._local.freeing = False
            if not self._reserve.present:
                self._reclaim()

    return wrapper


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

    def __init__(self, path: str | Path, *, reserve_bytes: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reserve = SpaceReserve(self.path.with_name(self.path.name + ".reserve"), reserve_bytes)
        self._local = threading.local()
        self._holders: "weakref.WeakSet[_ThreadConnection]" = weakref.WeakSet()
        self._conn_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._init_schema()
        self._reserve.ensure()

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        # autocommit mode (isolation_level=None): transactions are explicit BEGIN/COMMIT;
        # check_same_thread=False only so close() may close connections of other threads.
        con = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        con.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # before anything creates the file's first page: a new file can give freed pages back to the file
        # system (_reclaim); files created before this stay as they are (no-op)
        con.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            con.close()
            raise StorageError(f"could not put {self.path} in WAL mode (got {mode!r})")
        con.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit
        # checkpoint every ~1 MB (not SQLite's 4 MB): on a full disk the WAL's not yet checkpointed growth
        # of the database is what a checkpoint needs room for, and the reserve must cover it
        con.execute(f"PRAGMA wal_autocheckpoint = {_WAL_CHECKPOINT_PAGES}")
        con.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")  # a truncated WAL gives its space back
        con.execute("PRAGMA foreign_keys = OFF")  # deletes are explicit, in dependency order
        con.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
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
        """One durable write transaction; rolled back on any exception. A full disk: StorageFull (and
        the reserve released); a write that adds data while the reserve is missing: StorageFull at once."""
        con = self._con()
        freeing = getattr(self._local, "freeing", False)
        with self._write_lock:
            if not freeing and not self._reserve.ensure():
                raise StorageFull("Storage is full: free space by deleting examples or subjects, or grow the disk")
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if is_disk_full(exc):
                    self._full(exc, freeing)
                raise StorageError(f"cannot start a write transaction: {exc}") from exc
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error:  # SQLite rolled back by itself
                        pass
                if is_disk_full(exc):
                    self._full(exc, freeing)
                raise

    def _full(self, exc: BaseException, freeing: bool) -> None:
        """Raise StorageFull for `exc`; a write that adds data gives the reserve back first (a freeing
        one is retried by _frees_space after releasing it)."""
        if not freeing:
            self._reserve.release()
        raise StorageFull(f"Storage is full: {exc}") from exc

    def _reclaim(self) -> None:
        """After a freeing write while the reserve is missing: shrink the file, truncate the WAL and
        put the reserve back if there is room (best effort)."""
        try:
            con = self._con()
            with self._write_lock:
                con.executescript("PRAGMA incremental_vacuum;")  # (execute() would free one page per call)
                con.execute("PRAGMA busy_timeout = 200")  # a reader in the way: truncate another time
                try:
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    con.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                self._reserve.ensure()
        except (sqlite3.Error, OSError, StorageError) as exc:
            log.info("reclaiming space after a delete: %s", exc)

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
        self._local.freeing = True  # creates nothing on an existing file: must run on a full disk too
        try:
            self._init_tables()
        finally:
            self._local.freeing = False

    def _init_tables(self) -> None:
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

    def ping(self) -> bool:
        return not self._closed

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

    # ------------------------------------------------------------------ writes that free space
    delete_key = _frees_space(SqlStorage.delete_key)
    delete_subject = _frees_space(SqlStorage.delete_subject)
    delete_all_subjects = _frees_space(SqlStorage.delete_all_subjects)
    delete_faces = _frees_space(SqlStorage.delete_faces)
    delete_subject_faces = _frees_space(SqlStorage.delete_subject_faces)
    rename_subject = _frees_space(SqlStorage.rename_subject)  # a merge only moves rows

    @_frees_space
    def prune_changes(self, collection: str, up_to: int) -> int:
        with self._write() as con:
            dropped = con.execute(
                "DELETE FROM changes WHERE collection = ? AND seq <= ?", (collection, int(up_to))
            ).rowcount
            con.execute(
                "UPDATE collections SET pruned_seq = MAX(pruned_seq, ?) WHERE id = ?", (int(up_to), collection)
            )
        return dropped
