"""The storage interface: durable source of truth for API keys, subjects and faces.

Implementations: `sqlite.py` (one file) and `postgres.py` (shared by replicas); the logic they
have in common is written once in `sql.py`. Every method is synchronous and thread-safe: the API calls
it from worker threads (e.g. `starlette.concurrency.run_in_threadpool`).

Conventions
- `collection` is an opaque id string owned by a recognition key (`ApiKey.collection`);
  it is safe to use as a file name (lowercase hex). Collections are created with keys.
- Subject names are matched case-insensitively (Python `str.lower()`), but stored and
  returned in their original spelling. The one exception is `list_faces(subject=...)`,
  which is an exact match, as in CompreFace's `GET /faces?subject=`.
- A mutating call returns only after its transaction is durable (fsync'ed).
- Mutations that change the vector index return the `Change`s they made, in sequence
  order, so the caller can apply them to the index after the commit. Renames/merges
  only change names (kept here), so they produce no changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from index import ChangeFeed  # what the index reads; storage implements it (Storage below)
from server.inference.names import EMBEDDING_DIM  # noqa: F401 - re-exported; the embedder's width (a leaf module)

# Service types of an API key (the URL prefix decides which type a request needs).
KEY_TYPES: tuple[str, ...] = ("recognition", "detection", "verification")

# CompreFace's demo keys (its docker images ship them); seeded only by `seed_demo_keys()`.
DEMO_KEYS: dict[str, str] = {
    "00000000-0000-0000-0000-000000000002": "recognition",
    "00000000-0000-0000-0000-000000000003": "detection",
    "00000000-0000-0000-0000-000000000004": "verification",
}


# ----------------------------------------------------------------------------- errors
class StorageError(Exception):
    """Base class of every storage error (also raised for bad arguments or a broken DB)."""


class KeyNotFound(StorageError):
    """The API key does not exist (e.g. `delete_key`)."""


class SubjectExists(StorageError):
    """`add_subject` with a name that already exists (case-insensitive)."""


class SubjectNotFound(StorageError):
    """The subject does not exist in the collection (case-insensitive lookup)."""


class FaceNotFound(StorageError):
    """No face with that image_id in the collection."""


class FaceExists(StorageError):
    """`add_face` with a caller-chosen image_id that the collection already holds."""


class StorageFull(StorageError):
    """A write failed because the disk (or the database's file system) is full. Nothing was written;
    reads keep working, deletes are kept possible by SQLite's space reserve (sqlite.py)."""


class StorageUnavailable(StorageError):
    """The database cannot be reached now (down, restarting, connections cut): the call did nothing
    durable that it reported, and may be retried shortly. `retry_after_s`: a hint for clients.
    `transient`: what the index registry (index/collection.py, ChangeFeed) reads to keep an index
    serving, rather than rebuild it, when its catch-up cannot reach the database."""

    transient = True

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# ----------------------------------------------------------------------------- records
class Change(NamedTuple):
    """One index operation; a plain tuple (seq, op, label, vector) for the index package.

    op is "add" (vector: float32 (128,)) or "delete" (vector: None).
    seq is monotonically increasing per collection, assigned in the same transaction.
    """

    seq: int
    op: str
    label: int
    vector: np.ndarray | None


@dataclass(frozen=True)
class ApiKey:
    key: str  # uuid4 string, as clients send it in `x-api-key`
    type: str  # one of KEY_TYPES
    name: str
    created: str  # ISO 8601 UTC, e.g. "2024-05-01T12:00:00.123456+00:00"
    collection: str  # opaque, file-name safe; every key has one, only recognition keys use it


@dataclass(frozen=True)
class FaceRecord:
    image_id: str  # uuid string
    subject: str  # the subject's stored spelling (current name, after renames/merges)
    label: int  # int64 index label, unique per collection, never reused
    sequence: int  # the change sequence of the "add" that created this face
    created: str  # ISO 8601 UTC
    embedding: np.ndarray | None = None  # float32 (128,); only filled by get_face / add_face


@dataclass(frozen=True)
class FaceAdded:
    """Result of `add_face`."""

    face: FaceRecord
    changes: list[Change]  # exactly one "add"
    subject_created: bool  # True when the subject did not exist before


@dataclass(frozen=True)
class NewFace:
    """One face for `add_faces`. `source`/`sha256`: where a bulk import read it (for resuming)."""

    subject: str
    embedding: np.ndarray  # float32-convertible (128,), finite, already L2-normalised
    image: bytes = b""
    image_id: str | None = None
    source: str | None = None  # e.g. the file path the importer read
    sha256: str | None = None  # hex digest of the source file's bytes


@dataclass(frozen=True)
class FacesAdded:
    """Result of `add_faces`: the faces in request order, one "add" change each."""

    faces: list[FaceRecord]
    changes: list[Change]
    subjects_created: list[str]  # stored names of the subjects this call created


@dataclass(frozen=True)
class FacesDeleted:
    """Result of `delete_faces` / `delete_subject_faces`."""

    faces: list[FaceRecord]  # the deleted faces (without embeddings), in request/label order
    changes: list[Change]  # one "delete" per deleted face
    subject: str | None = None  # delete_subject_faces: the deleted subject's spelling, None if absent


@dataclass(frozen=True)
class SubjectDeleted:
    """Result of `delete_subject`."""

    subject: str  # stored spelling of the deleted subject
    faces_deleted: int
    changes: list[Change]


@dataclass(frozen=True)
class SubjectsDeleted:
    """Result of `delete_all_subjects`."""

    deleted: int  # number of subjects deleted (CompreFace's {"deleted": n})
    faces_deleted: int
    changes: list[Change]


@dataclass(frozen=True)
class KeyDeleted:
    """Result of `delete_key`: the caller should also drop the index of `key.collection`."""

    key: ApiKey
    faces_deleted: int


# ----------------------------------------------------------------------------- protocol
@runtime_checkable
class Storage(ChangeFeed, Protocol):
    # ---- the index's change feed (index.ChangeFeed), as storage provides it
    def current_sequence(self, collection: str) -> int:
        """The last assigned sequence of the collection (0 when nothing happened yet)."""

    def all_vectors(self, collection: str, chunk: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All live faces as chunks (labels int64 (n,), vectors float32 (n, 128)), label order.

        Read in one snapshot: pair it with `current_sequence` read *before* iterating
        and replay `changes_since` that value afterwards (replays are idempotent).
        """

    def changes_since(self, collection: str, sequence: int) -> Iterator[Change]:
        """Changes with seq > sequence, in seq order ("add" carries its vector): index.ChangeFeed's
        (seq, op, label, vector) tuples, as Change named tuples."""

    # ---- keys
    def create_key(self, type: str, name: str = "", key: str | None = None) -> ApiKey:
        """New key of `type` (KEY_TYPES) with a fresh uuid4 (or the given uuid); StorageError on
        bad type / malformed or duplicate key."""

    def find_key(self, key: str) -> ApiKey | None:
        """The key, or None. An indexed lookup; no caching, so CLI changes take effect at once."""

    def list_keys(self) -> list[ApiKey]:
        """All keys, oldest first."""

    def rename_key(self, key: str, name: str) -> ApiKey:
        """Give the key a new name (its label; the key itself, type and collection stay); KeyNotFound if absent."""

    def delete_key(self, key: str) -> KeyDeleted:
        """Delete the key and everything in its collection; KeyNotFound if absent."""

    def seed_demo_keys(self) -> list[ApiKey]:
        """Create CompreFace's demo keys (DEMO_KEYS) that are missing; returns all three."""

    # ---- subjects (names case-insensitive)
    def add_subject(self, collection: str, name: str) -> str:
        """Create a subject; returns the stored name. SubjectExists on a case-insensitive duplicate."""

    def find_subject(self, collection: str, name: str) -> str | None:
        """Stored spelling of the subject matching `name` case-insensitively, or None."""

    def list_subjects(self, collection: str) -> list[str]:
        """All subject names (stored spelling), in creation order."""

    def subject_face_counts(self, collection: str) -> dict[str, int]:
        """{subject name: number of faces}, including subjects without faces (0)."""

    def rename_subject(self, collection: str, old: str, new: str) -> bool:
        """Rename `old` (case-insensitive) to `new`. SubjectNotFound if `old` is absent.

        False (nothing done) when `new` is empty/blank or exactly equal to `old`. When another
        subject already matches `new` case-insensitively, the faces of `old` move into it and
        `old` is deleted (merge; the target keeps its spelling). A change of case only
        ("bob" -> "Bob") just updates the spelling. Labels/vectors never change: no index ops.
        """

    def delete_subject(self, collection: str, name: str) -> SubjectDeleted:
        """Delete the subject and its faces; SubjectNotFound if absent."""

    def delete_all_subjects(self, collection: str) -> SubjectsDeleted:
        """Delete every subject and face of the collection."""

    # ---- faces
    def add_face(
        self,
        collection: str,
        subject: str,
        embedding: np.ndarray,
        image: bytes,
        image_id: str | None = None,
    ) -> FaceAdded:
        """Store one face (creating the subject if missing, matched case-insensitively).

        `embedding`: float32-convertible (128,), finite, already L2-normalised.
        `image_id`: optional caller-chosen uuid (FaceExists if taken); default: fresh uuid4.
        StorageError on a bad embedding, an empty subject name or an unknown collection.
        """

    def add_faces(self, collection: str, faces: Sequence[NewFace]) -> FacesAdded:
        """Store many faces in ONE durable transaction (all or nothing), as `add_face` would one
        by one; a source sha256 is recorded for `known_sources`. FaceExists / StorageError as
        add_face (also for an image_id repeated within the batch)."""

    def known_sources(self, collection: str, sha256s: Iterable[str]) -> set[str]:
        """The digests among `sha256s` that some live face of the collection was imported from."""

    def subject_vectors(self, collection: str, subject: str) -> tuple[str, list[str], np.ndarray]:
        """(stored name, image ids, float32 (n, 128) embeddings) of a subject's faces, matched
        case-insensitively; SubjectNotFound if absent (n may be 0)."""

    def list_faces(
        self, collection: str, subject: str | None = None, page: int = 0, size: int = 20
    ) -> tuple[list[FaceRecord], int]:
        """(faces on that page in insertion order, total matching). `subject` is an EXACT match.

        Records carry no embedding. page >= 0, size >= 1 (StorageError otherwise).
        """

    def count_faces(self, collection: str, subject: str | None = None) -> int:
        """Number of faces (subject matched exactly, like list_faces)."""

    def get_face(self, collection: str, image_id: str) -> FaceRecord:
        """The face including its embedding; FaceNotFound if absent."""

    def get_image(self, collection: str, image_id: str) -> bytes | None:
        """The original image bytes, or None if the face is absent."""

    def faces_by_labels(self, collection: str, labels: Iterable[int]) -> dict[int, tuple[str, str]]:
        """{label: (image_id, subject)} for the labels that still exist (others are left out)."""

    def delete_faces(self, collection: str, image_ids: Sequence[str]) -> FacesDeleted:
        """Delete the faces with those ids; unknown ids are skipped. Subjects are kept."""

    def delete_subject_faces(self, collection: str, subject: str) -> FacesDeleted:
        """Delete all faces of the subject (case-insensitive) AND the subject itself.

        A missing subject is not an error: the result is empty with subject=None.
        """

    # ---- change feed extras (beyond ChangeFeed)
    def snapshot_vectors(
        self, collection: str, chunk: int = 10_000
    ) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
        """(sequence, chunks) read in ONE snapshot: the chunks are exactly the live faces at
        `sequence`, so `changes_since(collection, sequence)` continues without overlap.
        Consume (or close) the iterator promptly: it holds a read transaction open."""

    def prune_changes(self, collection: str, up_to: int) -> int:
        """Drop change rows with seq <= up_to (e.g. after the index saved a snapshot at up_to);
        returns rows dropped. Afterwards `changes_since(c, s)` with s < up_to raises StorageError
        (the reader must rebuild from all_vectors)."""

    # ---- other processes' changes
    def start_follower(self, on_change: Callable[[str, int], object],
                       on_drop: Callable[[str], object] | None = None, *, listen: bool = True) -> None:
        """Call `on_change(collection, seq)` when another process may have committed changes of the
        collection up to `seq`, and `on_drop(collection)` when it deleted one, from a thread of the
        storage's own. PostgreSQL (replicas sharing one database) follows; SQLite has nothing to follow
        (one server process owns the file) and does nothing. `listen=False`: poll only."""

    def stop_follower(self) -> None:
        """Stop what start_follower started (nothing if it did not run)."""

    # ---- lifecycle
    def ping(self) -> bool:
        """Whether the database answers now (readiness); quick and never raises."""

    def close(self) -> None:
        """Close all connections. Further calls raise StorageError."""
