"""Durable shadow storage (keys, subjects, faces) behind the `Storage` protocol."""
from __future__ import annotations

from pathlib import Path

from server.storage.base import (
    DEMO_KEYS,
    EMBEDDING_DIM,
    KEY_TYPES,
    ApiKey,
    Change,
    ChangeFeed,
    FaceAdded,
    FaceExists,
    FaceNotFound,
    FaceRecord,
    FacesDeleted,
    KeyDeleted,
    KeyNotFound,
    Storage,
    StorageError,
    SubjectDeleted,
    SubjectExists,
    SubjectNotFound,
    SubjectsDeleted,
)

DB_FILE_NAME = "faces.db"


def open_storage(settings) -> Storage:
    """The storage named by `settings.database_url`; empty means SQLite at <data_dir>/faces.db."""
    url = (getattr(settings, "database_url", "") or "").strip()
    if not url:
        from server.storage.sqlite import SqliteStorage

        return SqliteStorage(Path(settings.data_dir) / DB_FILE_NAME)
    if url.startswith("sqlite:///"):
        from server.storage.sqlite import SqliteStorage

        return SqliteStorage(Path(url[len("sqlite:///"):]))
    scheme = url.split(":", 1)[0]
    raise StorageError(
        f"database_url scheme {scheme!r} is not supported yet: leave FR_DATABASE_URL empty for "
        "SQLite under the data dir (PostgreSQL support is planned)"
    )


__all__ = [
    "DEMO_KEYS", "EMBEDDING_DIM", "KEY_TYPES", "ApiKey", "Change", "ChangeFeed", "FaceAdded",
    "FaceExists", "FaceNotFound", "FaceRecord", "FacesDeleted", "KeyDeleted", "KeyNotFound",
    "Storage", "StorageError", "SubjectDeleted", "SubjectExists", "SubjectNotFound",
    "SubjectsDeleted", "open_storage", "DB_FILE_NAME",
]
