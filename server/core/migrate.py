"""Switching from CompreFace, the use case behind `python -m server migrate-compreface URL`
(server/cli/migrate.py).

Reads a CompreFace 1.x installation's PostgreSQL database, read only (one REPEATABLE READ, READ ONLY
transaction on a session with default_transaction_read_only=on), and brings over, for every service
(CompreFace's `model` row): an API key with the same key string and the same type (R/D/V ->
recognition/detection/verification), and for recognition services their subjects and every example
with the same image id (CompreFace's `image_id` is `embedding.id`: EmbeddingDto's "image_id" is the
embedding's id), re-embedded by our pipeline from the image CompreFace stored (`img.content`).
CompreFace's own embeddings are of another model and are not used.

The tables read (Liquibase changelogs of CompreFace, java/admin/src/main/resources/db/changelog/):
  model(id bigint, name, api_key varchar(36), type varchar(1))   0.0.4 create-model-table, 0.1.4 model-type-column
  subject(id uuid, api_key varchar(36), subject_name varchar(255))  0.1.7 create-subject-table
  embedding(id uuid, subject_id uuid, img_id uuid NULL, ...)      0.1.7 create-embedding-table
  img(id uuid, content bytea)                                     0.1.7 create-img-table
An example whose img_id is null (CompreFace ran with save_images_to_db=false) cannot be re-embedded.

Each example goes through what POST /faces does (server/core/importer.py embed_example: decode,
detect with ADD_FACE_LIMIT, exactly one face), on the importer's pool of threads over the batcher.
Order and durability: a key is created before its subjects, subjects before their examples, and
examples are stored in batches, each one durable transaction together with any subject it creates;
an interrupted run leaves whole batches only. Resumable: keys, subjects and faces (by image id)
already here are counted as present and skipped, so the command simply runs again. A running
server picks the faces up from the storage's change log, as after an import.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from server.config import Settings
from server.core.importer import DEFAULT_WORKERS, BulkEnrolment, ImportReport, open_inference

SERVICE_TYPES = {"R": "recognition", "D": "detection", "V": "verification"}  # CompreFace's model.type
NO_STORED_IMAGE = "no stored image (CompreFace ran with save_images_to_db=false)"
READ_ONLY = "-c default_transaction_read_only=on"


@dataclass(frozen=True)
class Service:
    id: int
    name: str
    key: str
    type: str  # CompreFace's letter


@dataclass(frozen=True)
class Example:
    image_id: str  # CompreFace's embedding.id
    subject: str
    img_id: str | None  # None: CompreFace kept no image


@dataclass
class MigrationReport(ImportReport):
    """ImportReport's counters over examples (files = examples seen, skipped = already here,
    rejected = (where, reason)), plus keys and subjects."""

    services: int = 0
    keys_created: int = 0
    keys_present: int = 0
    subjects_created: int = 0
    subjects_present: int = 0

    def summary(self) -> str:
        text = (f"{self.services} services: keys {self.keys_created} created, {self.keys_present} already there; "
                f"subjects {self.subjects_created} created, {self.subjects_present} already there; "
                f"examples {self.files} in {self.seconds:.1f} s: {self.added} added, {self.skipped} already there, "
                f"{len(self.rejected)} not migrated")
        return text + self.reasons_text()


# ------------------------------------------------------------------------------ CompreFace's database
class CompreFaceDb:
    """Read-only view of CompreFace's tables, in one snapshot."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        options = " ".join(filter(None, [conninfo_to_dict(url).get("options"), READ_ONLY]))  # keeps the URL's own
        self.conn = psycopg.connect(url, options=options, connect_timeout=30)
        self.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.conn.read_only = True

    def services(self) -> list[Service]:
        rows = self.conn.execute("SELECT id, name, api_key, type FROM model ORDER BY id").fetchall()
        return [Service(int(r[0]), r[1], r[2], (r[3] or "").strip().upper()) for r in rows]

    def subjects(self, key: str) -> list[str]:
        rows = self.conn.execute("SELECT subject_name FROM subject WHERE api_key = %s ORDER BY subject_name",
                                 (key,)).fetchall()
        return [r[0] for r in rows]

    def count_examples(self, keys: list[str]) -> int:
        if not keys:
            return 0
        return int(self.conn.execute(
            "SELECT COUNT(*) FROM embedding e JOIN subject s ON s.id = e.subject_id WHERE s.api_key = ANY(%s)",
            (keys,)).fetchone()[0])

    def examples(self, key: str) -> list[Example]:
        rows = self.conn.execute(
            "SELECT e.id, s.subject_name, e.img_id FROM embedding e JOIN subject s ON s.id = e.subject_id "
            "WHERE s.api_key = %s ORDER BY s.subject_name, e.id", (key,)).fetchall()
        return [Example(str(r[0]), r[1], None if r[2] is None else str(r[2])) for r in rows]

    def image(self, img_id: str) -> bytes | None:
        row = self.conn.execute("SELECT content FROM img WHERE id = %s", (img_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        self.conn.rollback()  # nothing was written: end the read-only transaction
        self.conn.close()


# ------------------------------------------------------------------------------ the migration
@dataclass
class _Job:
    service: Service
    example: Example
    data: bytes = b""
    vector: np.ndarray | None = None
    reason: str = ""


class Migration(BulkEnrolment):
    """Brings `source` into `storage`; `run` is blocking and may be called again (it resumes)."""

    def __init__(self, source: CompreFaceDb, storage, pipeline, **options) -> None:
        super().__init__(storage, pipeline, **options)
        self.source = source

    def run(self, progress: Callable[[int], Callable[[ImportReport], None]] | None = None) -> MigrationReport:
        report = MigrationReport()
        started = time.perf_counter()
        services = self.source.services()
        report.services = len(services)
        collections: dict[str, str] = {}  # CompreFace key -> our collection, recognition services only
        for service in services:
            collection = self._key(service, report)
            if collection is not None and SERVICE_TYPES[service.type] == "recognition":
                collections[service.key] = collection
                self._subjects(service, collection, report)
        update = progress(self.source.count_examples(list(collections))) if progress else None

        def accept(job: _Job) -> bool:
            if job.reason:
                report.rejected.append((_where(job.service, job.example), job.reason))
            return not job.reason

        self.enrol(self._embed, self._jobs(services, collections, report, update), report, accept,
                   lambda jobs: self._store(jobs, collections, report), update)
        report.seconds = time.perf_counter() - started
        return report

    def _key(self, service: Service, report: MigrationReport) -> str | None:
        """Our collection of the service's key, creating the key when missing (None: not migrated)."""
        from server.storage import StorageError

        type_ = SERVICE_TYPES.get(service.type)
        where = f"service {service.name!r} ({service.key})"
        if type_ is None:
            report.rejected.append((where, f"unknown service type {service.type!r}"))
            return None
        existing = self.storage.find_key(service.key) or self.storage.find_key(service.key.lower())
        if existing is not None:
            if existing.type != type_:
                report.rejected.append((where, f"key already here as a {existing.type} key, not {type_}"))
                return None
            report.keys_present += 1
            return existing.collection
        try:
            created = self.storage.create_key(type_, name=service.name, key=service.key)
        except StorageError as exc:
            report.rejected.append((where, f"key not created: {exc}"))
            return None
        report.keys_created += 1
        return created.collection

    def _subjects(self, service: Service, collection: str, report: MigrationReport) -> None:
        from server.storage import StorageError

        for name in self.source.subjects(service.key):
            stored = self.storage.find_subject(collection, name)
            if stored is not None:
                report.subjects_present += 1
                if stored != name:  # CompreFace tells "Bob" from "bob"; names here are case-insensitive
                    report.rejected.append((f"{service.name}/{name}", f"merged into subject {stored!r} "
                                            "(subject names are case-insensitive here)"))
                continue
            try:
                self.storage.add_subject(collection, name)
            except StorageError as exc:
                report.rejected.append((f"{service.name}/{name}", f"subject not created: {exc}"))
                continue
            report.subjects_created += 1

    def _jobs(self, services: list[Service], collections: dict[str, str], report: MigrationReport,
              update) -> Iterator[_Job]:
        """The examples still to bring over, with their image bytes (read here, on one thread)."""
        from server.storage import FaceNotFound

        for service in services:
            collection = collections.get(service.key)
            if collection is None:
                continue
            for example in self.source.examples(service.key):
                try:
                    self.storage.get_face(collection, example.image_id)
                except FaceNotFound:
                    pass
                else:
                    report.files += 1
                    report.skipped += 1
                    if update is not None:
                        update(report)
                    continue
                job = _Job(service, example)
                if example.img_id is None:
                    job.reason = NO_STORED_IMAGE
                else:
                    data = self.source.image(example.img_id)
                    if data is None:
                        job.reason = f"stored image {example.img_id} is missing from table img"
                    else:
                        job.data = data
                yield job

    def _embed(self, job: _Job) -> _Job:
        if not job.reason:
            job.vector, job.reason = self.embed(job.data)
        return job

    def _store(self, jobs: list[_Job], collections: dict[str, str], report: MigrationReport) -> None:
        """One durable transaction per collection's share of the batch (subjects created with their faces)."""
        from server.storage import NewFace

        by_collection: dict[str, list[_Job]] = {}
        for job in jobs:
            by_collection.setdefault(collections[job.service.key], []).append(job)
        for collection, group in by_collection.items():
            faces = [NewFace(subject=j.example.subject, embedding=j.vector, image=j.data, image_id=j.example.image_id)
                     for j in group]
            report.added += len(self.storage.add_faces(collection, faces).faces)


def _where(service: Service, example: Example) -> str:
    return f"{service.name}/{example.subject}/{example.image_id}"


# ------------------------------------------------------------------------------ wiring
def migrate_compreface(settings: Settings, url: str, *, workers: int = DEFAULT_WORKERS, batch: int = 64,
                       det_prob_threshold: float | None = None,
                       progress: Callable[[int], Callable[[ImportReport], None]] | None = None) -> MigrationReport:
    """Bring the CompreFace database at `url` (postgresql://...) into the storage of `settings`.

    `progress`, when given, is called with the number of CompreFace examples once keys and subjects
    exist, and returns the callback that then gets the report after every example."""
    from server.storage import open_storage

    source = CompreFaceDb(url)
    try:
        storage = open_storage(settings)
        try:
            inference = open_inference(settings)
            try:
                threshold = settings.face_threshold() if det_prob_threshold is None else det_prob_threshold
                migration = Migration(source, storage, inference.pipeline, workers=workers, batch=batch,
                                      det_prob_threshold=threshold, max_file_size=settings.max_file_size)
                return migration.run(progress)
            finally:
                inference.close()
        finally:
            storage.close()
    finally:
        source.close()
