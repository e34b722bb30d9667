"""Bulk import against posting the same images one by one over HTTP, in one run.

    python -m benchmarks.import_compare SOURCE [--limit N] [--workers N] [--model-dir DIR]

SOURCE as for `python -m server import` (a folder of subject folders, or a CSV of path,subject).
The images are first posted one by one to POST /faces of a fresh server process
(tests/support/local_server.py), then, with that server stopped, imported by the importer of
server/core/importer.py; prints the faces each added and both per-image times.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.config import Settings
from server.core.importer import DEFAULT_WORKERS, Importer, list_source, open_inference
from server.storage import open_storage
from tests.support.local_server import LocalServer, create_key_admin


def compare(source: Path, limit: int, workers: int, model_dir: Path | None = None) -> dict[str, float]:
    """The same images: posted one by one over HTTP to a fresh server process, then imported.

    Both enrol into their own collection of one fresh data folder; the server is stopped before
    the import runs, so each has the machine to itself. Model loading is outside both timings.
    """
    items, _ = list_source(source)
    items = items[:limit] if limit else items
    if not items:
        raise SystemExit(f"{source}: no images")
    with tempfile.TemporaryDirectory(prefix="import-compare-") as tmp:
        data_dir = Path(tmp) / "data"
        settings = Settings.from_env(data_dir=data_dir, model_dir=model_dir)
        token = "compare-" + os.urandom(8).hex()
        server = LocalServer(data_dir, admin_token=token, env={"FR_MODEL_DIR": str(settings.model_dir)})
        try:
            server.start()
            http_key = create_key_admin(server.base_url, token, "recognition", "http")
            import_key = create_key_admin(server.base_url, token, "recognition", "import")
            with httpx.Client(base_url=server.base_url, timeout=120) as c:
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
        inference = open_inference(settings)
        try:
            collection = storage.find_key(import_key).collection
            importer = Importer(storage, inference.pipeline, collection, workers=workers,
                                det_prob_threshold=settings.face_threshold(), max_file_size=settings.max_file_size)
            report = importer.run(items)
        finally:
            inference.close()
            storage.close()
    n = len(items)
    return {"images": n, "http_added": http_added, "import_added": report.added, "http_s": http_s,
            "import_s": report.seconds, "http_ms_per_image": 1000 * http_s / n,
            "import_ms_per_image": 1000 * report.seconds / n, "speedup": http_s / report.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_compare",
                                     description="time one-by-one HTTP POST /faces against the bulk importer, "
                                     "same images")
    parser.add_argument("source", help="folder of subject folders, or a CSV of path,subject")
    parser.add_argument("--limit", type=int, default=0, help="first N images only (default all)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--model-dir")
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
