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
    FacesAdded,
    FacesDeleted,
    KeyDeleted,
    KeyNotFound,
    NewFace,
    Storage,
    StorageError,
    StorageFull,
    StorageUnavailable,
    SubjectDeleted,
    SubjectExists,
    SubjectNotFound,
    SubjectsDeleted,
)

DB_FILE_NAME = "faces.db"


def sqlite_path(settings) -> Path | None:
    """The SQLite file `settings` store into (<data_dir>/faces.db, or sqlite:///path); None for a server database."""
    url = (getattr(settings, "database_url", "") or "").strip()
    if not url:
        return Path(settings.data_dir) / DB_FILE_NAME
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


def open_storage(settings) -> Storage:
    """The storage named by `settings.database_url`: empty means SQLite at <data_dir>/faces.db,
    postgresql:// a PostgreSQL database that several server replicas share."""
    url = (getattr(settings, "database_url", "") or "").strip()
    sqlite_file = sqlite_path(settings)
    if sqlite_file is not None:
        from server.storage.sqlite import SqliteStorage

        return SqliteStorage(sqlite_file, reserve_bytes=getattr(settings, "storage_reserve_bytes", 0))
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        from server.storage.postgres import PostgresStorage  # shared by several replicas

        return PostgresStorage(
            url, pool_size=getattr(settings, "database_pool_size", 10),
            connect_timeout_s=getattr(settings, "database_connect_timeout_s", 60.0),
            changes_retention_s=getattr(settings, "database_changes_retention_s", 600.0),
            wait_s=getattr(settings, "database_wait_s", 2.0),
        )
    scheme = url.split(":", 1)[0]
    raise StorageError(
        f"database_url scheme {scheme!r} is not supported: leave FR_DATABASE_URL empty for SQLite under "
        "the data dir, or give sqlite:///path or postgresql://user:password@host:5432/database"
    )


__all__ = [
    "DEMO_KEYS", "EMBEDDING_DIM", "KEY_TYPES", "ApiKey", "Change", "ChangeFeed", "FaceAdded",
    "FaceExists", "FaceNotFound", "FaceRecord", "FacesAdded", "FacesDeleted", "KeyDeleted", "KeyNotFound",
    "NewFace", "Storage", "StorageError", "SubjectDeleted", "SubjectExists", "SubjectNotFound",
    "SubjectsDeleted", "StorageFull", "StorageUnavailable", "open_storage", "sqlite_path", "DB_FILE_NAME",
]
