"""Bulk enrolment, the use case behind `python -m server import --key KEY SOURCE` (server/cli/importer.py).

SOURCE is a folder with one sub-folder per subject (the sub-folder's name is the subject; images
anywhere inside it), or a CSV file of `path,subject` rows (paths relative to the CSV's folder; a
first row `path,subject` is a header).

Every image goes through what POST /faces does (decode, detect with limit 2, exactly one face,
embed, L2-normalise), on a pool of threads over the micro-batcher so that images in flight share
model batches; the faces are stored in batches, one transaction each, together with the file's
path and sha256. Resumable: a file whose sha256 the collection already holds is skipped, so an
interrupted import simply runs again. Rejected files are counted by reason, the first few printed,
all written with --rejects FILE (CSV). A running server picks the new faces up within seconds: its
index catches up from the storage's change log (IndexRegistry.refresh).

`python -m benchmarks.import_compare SOURCE` times the same images posted one by one over HTTP
against this importer.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from server.config import Settings
from server.core.errors import DomainError, InvalidSubjectName
from server.core.subjects import ADD_FACE_LIMIT, check_subject_name, single_face
from server.wiring import Inference, build_inference

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WORKERS = 2 * (os.cpu_count() or 2)  # enough images in flight to keep every core busy


@dataclass(frozen=True)
class Item:
    path: Path
    subject: str


@dataclass
class ImportReport:
    files: int = 0
    added: int = 0
    skipped: int = 0  # already in the collection (same sha256), or twice in this run
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    def reasons(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.rejected)

    def summary(self) -> str:
        per = f", {1000 * self.seconds / self.files:.1f} ms per file" if self.files else ""
        text = (f"{self.files} files in {self.seconds:.1f} s{per}: {self.added} added, "
                f"{self.skipped} already there, {len(self.rejected)} rejected")
        return text + self.reasons_text()

    def reasons_text(self) -> str:
        """The rejections counted by reason, " (2 no face found, ...)"; "" when there are none."""
        reasons = self.reasons()
        return " (" + ", ".join(f"{n} {r}" for r, n in reasons.most_common()) + ")" if reasons else ""


# ------------------------------------------------------------------------------ sources
def list_source(source: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    """(items, problems) of a folder (one sub-folder per subject) or a CSV of path,subject."""
    from server.vision.decode import extension_allowed

    source = Path(source)
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    if source.is_dir():
        for entry in sorted(source.iterdir()):
            if entry.is_file():
                problems.append((str(entry), "not in a subject folder"))
                continue
            items += [Item(path, entry.name) for path in sorted(p for p in entry.rglob("*") if p.is_file())]
    elif source.is_file():
        with open(source, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f)):
                if not row or (n == 0 and [c.strip().lower() for c in row[:2]] == ["path", "subject"]):
                    continue
                if len(row) < 2:
                    problems.append((",".join(row), f"line {n + 1}: expected path,subject"))
                    continue
                path = Path(row[0].strip())
                items.append(Item(path if path.is_absolute() else source.parent / path, row[1].strip()))
    else:
        raise FileNotFoundError(f"{source}: no such folder or file")
    kept = []
    for item in items:
        # the API's rules: CompreFace's file extensions (POST /faces), subject names (POST /subjects)
        problem = None if extension_allowed(item.path.name) else "not an image file name (extension)"
        if problem is None:
            try:
                check_subject_name(item.subject)
            except InvalidSubjectName as exc:
                problem = str(exc)
        if problem:
            problems.append((str(item.path), problem))
        else:
            kept.append(item)
    return kept, problems


# ------------------------------------------------------------------------------ one example
def embed_example(pipeline, data: bytes, *, det_prob_threshold: float,
                  max_file_size: int) -> tuple[np.ndarray | None, str]:
    """What POST /faces does with an image: (L2-normalised embedding, "") when it is a subject's
    example (decodes, exactly one face), else (None, the reason)."""
    from server.core.service import l2_normalise
    from server.vision.decode import ImageError, decode_image

    if len(data) > max_file_size:
        return None, f"file too large: {len(data)} bytes > {max_file_size}"
    try:
        image = decode_image(data)
    except ImageError as exc:
        return None, f"not a readable image: {exc}"
    faces = pipeline.faces(image, det_prob_threshold=det_prob_threshold, limit=ADD_FACE_LIMIT)
    try:
        face = single_face(faces)  # as POST /faces: exactly one face
    except DomainError as exc:
        return None, str(exc)
    return l2_normalise(np.asarray(face.embedding, np.float32)), ""


def pipelined(process: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """process(item) for every item on `workers` threads, results as they complete. A bounded
    window of items is in flight (their bytes are held), enough for them to share model batches."""
    todo = iter(items)
    window = 4 * max(1, workers)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="import") as pool:
        running: set[Future] = set()
        while True:
            while len(running) < window:
                item = next(todo, _END)
                if item is _END:
                    break
                running.add(pool.submit(process, item))
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


_END = object()


# ------------------------------------------------------------------------------ the importer
@dataclass
class _Result:
    item: Item
    digest: str = ""
    data: bytes = b""
    vector: np.ndarray | None = None
    reason: str = ""  # rejection reason; "skip" for known files


class BulkEnrolment:
    """What the bulk use cases share (this importer, server/core/migrate.py): the storage, the batched
    pipeline on `workers` threads, faces stored `batch` per transaction, POST /faces' rules (`embed`)."""

    def __init__(self, storage, pipeline, *, workers: int = DEFAULT_WORKERS, batch: int = 64,
                 det_prob_threshold: float = 0.85, max_file_size: int = 5 * 1024 * 1024) -> None:
        self.storage = storage
        self.pipeline = pipeline
        self.workers = max(1, workers)
        self.batch = max(1, batch)
        self.det_prob_threshold = det_prob_threshold
        self.max_file_size = max_file_size

    def embed(self, data: bytes) -> tuple[np.ndarray | None, str]:
        """embed_example with this run's threshold and size limit."""
        return embed_example(self.pipeline, data, det_prob_threshold=self.det_prob_threshold,
                             max_file_size=self.max_file_size)

    def enrol(self, process: Callable[[T], R], items: Iterable[T], report: "ImportReport",
              accept: Callable[[R], bool], store: Callable[[list[R]], None],
              progress: Callable[["ImportReport"], None] | None) -> None:
        """`process` each item on the pool (pipelined), count it in `report.files`, keep those `accept`
        takes (it counts the others), and `store` them `batch` at a time; `progress` after every item."""
        pending: list[R] = []
        for result in pipelined(process, items, self.workers):
            report.files += 1
            if accept(result):
                pending.append(result)
            if len(pending) >= self.batch:
                store(pending)
                pending = []
            if progress is not None:
                progress(report)
        if pending:
            store(pending)
        if progress is not None:
            progress(report)


class Importer(BulkEnrolment):
    """Enrols items into one collection; `run` is blocking and may be called more than once."""

    def __init__(self, storage, pipeline, collection: str, **options) -> None:
        super().__init__(storage, pipeline, **options)
        self.collection = collection
        self._seen: set[str] = set()
        self._seen_lock = threading.Lock()

    def run(self, items: Iterable[Item], progress: Callable[[ImportReport], None] | None = None) -> ImportReport:
        report = ImportReport()
        started = time.perf_counter()

        def accept(result: _Result) -> bool:
            if result.reason == "skip":
                report.skipped += 1
            elif result.reason:
                report.rejected.append((str(result.item.path), result.reason))
            return not result.reason

        def store(results: list[_Result]) -> None:
            report.added += self._store(results)

        self.enrol(self._process, items, report, accept, store, progress)
        report.seconds = time.perf_counter() - started
        return report

    def _process(self, item: Item) -> _Result:
        """One file: read, digest (skip if known), decode, exactly one face, embed."""
        result = _Result(item)
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            result.reason = f"unreadable file: {exc.strerror or exc}"
            return result
        result.digest = hashlib.sha256(data).hexdigest()
        with self._seen_lock:
            duplicate = result.digest in self._seen
            self._seen.add(result.digest)
        if duplicate or self.storage.known_sources(self.collection, [result.digest]):
            result.reason = "skip"
            return result
        result.vector, result.reason = self.embed(data)
        if result.vector is not None:
            result.data = data
        return result

    def _store(self, results: list[_Result]) -> int:
        from server.storage import NewFace

        faces = [NewFace(subject=r.item.subject, embedding=r.vector, image=r.data, source=str(r.item.path),
                         sha256=r.digest) for r in results]
        return len(self.storage.add_faces(self.collection, faces).faces)


# ------------------------------------------------------------------------------ wiring
def open_inference(settings: Settings) -> Inference:
    """The batched pipeline, as the server builds it (no plugins: the importer only embeds).

    Unless FR_INFERENCE_THREADS says otherwise, each model runs on one thread: the importer's
    parallelism is images in flight, and ONNX Runtime's spinning intra-op threads would only
    compete with them (measured: ~10% faster on 2 cores)."""
    if not settings.inference_threads:
        settings = settings.with_(inference_threads=1)
    return build_inference(settings, plugins=False)


def import_source(settings: Settings, key: str, source: Path, *, workers: int = DEFAULT_WORKERS, batch: int = 64,
                  det_prob_threshold: float | None = None,
                  progress: Callable[[int], Callable[[ImportReport], None]] | None = None) -> ImportReport:
    """Enrol `source` (see list_source) into the collection of the recognition key `key`.

    `progress`, when given, is called with the number of files once the models are loaded, and
    returns the callback that then gets the report after every file (python -m server import's bar).
    """
    from server.storage import StorageError, open_storage

    items, problems = list_source(source)
    storage = open_storage(settings)
    try:
        api_key = storage.find_key(key)
        if api_key is None or api_key.type != "recognition":
            raise StorageError(f"{key} is not a recognition API key of {settings.data_dir}")
        inference = open_inference(settings)
        try:
            threshold = settings.face_threshold() if det_prob_threshold is None else det_prob_threshold
            importer = Importer(storage, inference.pipeline, api_key.collection, workers=workers, batch=batch,
                                det_prob_threshold=threshold, max_file_size=settings.max_file_size)
            report = importer.run(items, progress(len(items)) if progress else None)
        finally:
            inference.close()
    finally:
        storage.close()
    report.rejected = problems + report.rejected
    report.files += len(problems)
    return report
