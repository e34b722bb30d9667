"""Bulk enrolment: `python -m server import --key KEY SOURCE`.

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

    python -m server.core.importer compare SOURCE [--limit N]

measures the same images posted one by one over HTTP to a fresh server process against this
importer, in one run, and prints both per-face times.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from server.config import Settings
from server.core.errors import DomainError, InvalidSubjectName
from server.core.subjects import ADD_FACE_LIMIT, check_subject_name, single_face

log = logging.getLogger(__name__)

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
        reasons = self.reasons()
        if reasons:
            text += " (" + ", ".join(f"{n} {r}" for r, n in reasons.most_common()) + ")"
        return text


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


# ------------------------------------------------------------------------------ the importer
@dataclass
class _Result:
    item: Item
    digest: str = ""
    data: bytes = b""
    vector: np.ndarray | None = None
    reason: str = ""  # rejection reason; "skip" for known files


class Importer:
    """Enrols items into one collection; `run` is blocking and may be called more than once."""

    def __init__(self, storage, pipeline, collection: str, *, workers: int = DEFAULT_WORKERS, batch: int = 64,
                 det_prob_threshold: float = 0.85, max_file_size: int = 5 * 1024 * 1024) -> None:
        self.storage = storage
        self.pipeline = pipeline
        self.collection = collection
        self.workers = max(1, workers)
        self.batch = max(1, batch)
        self.det_prob_threshold = det_prob_threshold
        self.max_file_size = max_file_size
        self._seen: set[str] = set()
        self._seen_lock = threading.Lock()

    def run(self, items: Iterable[Item], progress: Callable[[ImportReport], None] | None = None) -> ImportReport:
        report = ImportReport()
        pending: list[_Result] = []
        started = time.perf_counter()
        todo = iter(items)
        window = 4 * self.workers  # images in flight (bounds memory: their bytes are held)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="import") as pool:
            running: set[Future] = set()
            while True:
                while len(running) < window:
                    item = next(todo, None)
                    if item is None:
                        break
                    running.add(pool.submit(self._process, item))
                if not running:
                    break
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    report.files += 1
                    if result.reason == "skip":
                        report.skipped += 1
                    elif result.reason:
                        report.rejected.append((str(result.item.path), result.reason))
                    else:
                        pending.append(result)
                    if len(pending) >= self.batch:
                        report.added += self._store(pending)
                        pending = []
                    if progress is not None:
                        progress(report)
            if pending:
                report.added += self._store(pending)
        report.seconds = time.perf_counter() - started
        if progress is not None:
            progress(report)
        return report

    def _process(self, item: Item) -> _Result:
        """One file: read, digest (skip if known), decode, exactly one face, embed."""
        from server.vision.decode import ImageError, decode_image
        from server.core.service import l2_normalise

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
        if len(data) > self.max_file_size:
            result.reason = f"file too large: {len(data)} bytes > {self.max_file_size}"
            return result
        try:
            image = decode_image(data)
        except ImageError as exc:
            result.reason = f"not a readable image: {exc}"
            return result
        faces = self.pipeline.faces(image, det_prob_threshold=self.det_prob_threshold, limit=ADD_FACE_LIMIT)
        try:
            face = single_face(faces)  # as POST /faces: exactly one face
        except DomainError as exc:
            result.reason = str(exc)
            return result
        result.data = data
        result.vector = l2_normalise(np.asarray(face.embedding, np.float32))
        return result

    def _store(self, results: list[_Result]) -> int:
        from server.storage import NewFace

        faces = [NewFace(subject=r.item.subject, embedding=r.vector, image=r.data, source=str(r.item.path),
                         sha256=r.digest) for r in results]
        return len(self.storage.add_faces(self.collection, faces).faces)


# ------------------------------------------------------------------------------ wiring
def open_pipeline(settings: Settings):
    """The batched pipeline, as the server builds it; returns (pipeline, backend to close).

    Unless FR_INFERENCE_THREADS says otherwise, each model runs on one thread: the importer's
    parallelism is images in flight, and ONNX Runtime's spinning intra-op threads would only
    compete with them (measured: ~10% faster on 2 cores)."""
    from server.inference import create_backend
    from server.inference.batcher import create_batcher
    from server.modelbuild.repository import ensure_built
    from server.vision.pipeline import FacePipeline

    ensure_built(settings.model_dir)
    if not settings.inference_threads:
        settings = settings.with_(inference_threads=1)
    backend = create_batcher(create_backend(settings), settings)
    return FacePipeline.from_settings(settings, backend=backend), backend


def import_source(settings: Settings, key: str, source: Path, *, workers: int, batch: int,
                  det_prob_threshold: float | None, show_progress: bool) -> ImportReport:
    from server.storage import StorageError, open_storage

    items, problems = list_source(source)
    storage = open_storage(settings)
    try:
        api_key = storage.find_key(key)
        if api_key is None or api_key.type != "recognition":
            raise StorageError(f"{key} is not a recognition API key of {settings.data_dir}")
        pipeline, backend = open_pipeline(settings)
        try:
            threshold = settings.face_threshold() if det_prob_threshold is None else det_prob_threshold
            importer = Importer(storage, pipeline, api_key.collection, workers=workers, batch=batch,
                                det_prob_threshold=threshold, max_file_size=settings.max_file_size)
            bar = _progress_bar(len(items)) if show_progress else None
            try:
                report = importer.run(items, bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
        finally:
            backend.close()
    finally:
        storage.close()
    report.rejected = problems + report.rejected
    report.files += len(problems)
    return report


class _progress_bar:
    """tqdm over files, with added / skipped / rejected as its postfix."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.05)
        self.done = 0

    def update(self, report: ImportReport) -> None:
        self.bar.update(report.files - self.done)
        self.done = report.files
        self.bar.set_postfix(added=report.added, skipped=report.skipped, rejected=len(report.rejected),
                             refresh=False)

    def close(self) -> None:
        self.bar.close()


def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(data_dir=args.data_dir, model_dir=args.model_dir)
    report = import_source(settings, args.key, Path(args.source), workers=args.workers, batch=args.batch,
                           det_prob_threshold=args.det_prob_threshold, show_progress=not args.no_progress)
    print(report.summary())
    for path, reason in report.rejected[:20]:
        print(f"  rejected {path}: {reason}")
    if len(report.rejected) > 20:
        print(f"  ... {len(report.rejected) - 20} more" + ("" if args.rejects else " (--rejects FILE lists all)"))
    if args.rejects:
        with open(args.rejects, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(report.rejected)
    return 0


def register(subparsers) -> None:
    """`python -m server import ...` (called by server/cli/__init__.py)."""
    p = subparsers.add_parser("import", help="bulk-enrol images: a folder (one sub-folder per subject) "
                              "or a CSV of path,subject; resumable")
    p.add_argument("source", help="folder of subject folders, or a CSV file of path,subject")
    p.add_argument("--key", required=True, help="recognition API key (its collection receives the faces)")
    p.add_argument("--data-dir", help="storage folder (default ./data, env FR_DATA_DIR)")
    p.add_argument("--model-dir", help="model repository (default model_repository/, env FR_MODEL_DIR)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"images in the pipeline at once (default {DEFAULT_WORKERS}: 2 per core)")
    p.add_argument("--batch", type=int, default=64, help="faces per storage transaction (default 64)")
    p.add_argument("--det-prob-threshold", type=float, help="as the API's parameter (default 0.85)")
    p.add_argument("--rejects", help="write every rejected file and the reason to this CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


# ------------------------------------------------------------------------------ import vs HTTP
def compare(source: Path, limit: int, workers: int, model_dir: Path | None = None) -> dict[str, float]:
    """The same images: posted one by one over HTTP to a fresh server process, then imported.

    Both enrol into their own collection of one fresh data folder; the server is stopped before
    the import runs, so each has the machine to itself. Model loading is outside both timings.
    """
    import tempfile

    import httpx

    from server.storage import open_storage

    items, _ = list_source(source)
    items = items[:limit] if limit else items
    if not items:
        raise SystemExit(f"{source}: no images")
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="import-compare-") as tmp:
        data_dir = Path(tmp) / "data"
        settings = Settings.from_env(data_dir=data_dir, model_dir=model_dir)
        token = "compare-" + os.urandom(8).hex()
        sys.path.insert(0, str(root))  # the repo's load-test helpers
        from tests.support.local_server import LocalServer

        server = LocalServer(data_dir, admin_token=token, env={"FR_MODEL_DIR": str(settings.model_dir)})
        try:
            server.start()
            with httpx.Client(base_url=server.base_url, timeout=120) as c:
                admin = {"Authorization": f"Bearer {token}"}
                http_key = c.post("/api/v1/admin/keys", json={"type": "recognition"}, headers=admin).json()["key"]
                import_key = c.post("/api/v1/admin/keys", json={"type": "recognition"}, headers=admin).json()["key"]
                c.post("/api/v1/recognition/subjects", json={"subject": "warm-up"}, headers={"x-api-key": http_key})
                http_added = 0
                t0 = time.perf_counter()
                for item in items:
                    r = c.post("/api/v1/recognition/faces", params={"subject": item.subject},
                               files={"file": (item.path.name, item.path.read_bytes())},
                               headers={"x-api-key": http_key})
                    http_added += r.status_code == 201
                http_s = time.perf_counter() - t0
        finally:
            server.stop(timeout_s=60)
        storage = open_storage(settings)
        pipeline, backend = open_pipeline(settings)
        try:
            collection = storage.find_key(import_key).collection
            importer = Importer(storage, pipeline, collection, workers=workers,
                                det_prob_threshold=settings.face_threshold(), max_file_size=settings.max_file_size)
            report = importer.run(items)
        finally:
            backend.close()
            storage.close()
    n = len(items)
    result = {"images": n, "http_added": http_added, "import_added": report.added, "http_s": http_s,
              "import_s": report.seconds, "http_ms_per_image": 1000 * http_s / n,
              "import_ms_per_image": 1000 * report.seconds / n, "speedup": http_s / report.seconds}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.core.importer",
                                     description="compare the bulk importer with posting images one by one")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="time one-by-one HTTP POST /faces against the importer, same images")
    p.add_argument("source", help="folder of subject folders, or a CSV of path,subject")
    p.add_argument("--limit", type=int, default=0, help="first N images only (default all)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--model-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = compare(Path(args.source), args.limit, args.workers, Path(args.model_dir) if args.model_dir else None)
    print(f"{r['images']} images; faces added: HTTP {r['http_added']}, import {r['import_added']}")
    print(f"one by one over HTTP: {r['http_s']:.1f} s = {r['http_ms_per_image']:.1f} ms per image")
    print(f"python -m server import: {r['import_s']:.1f} s = {r['import_ms_per_image']:.1f} ms per image")
    print(f"speed-up: {r['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
