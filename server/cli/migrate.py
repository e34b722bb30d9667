"""`migrate-compreface` command: bring a CompreFace 1.x installation over (the use case: server/core/migrate.py).

Wired into `python -m server` by `register(subparsers)`:
    python -m server migrate-compreface postgresql://user:pw@host:5432/frs [--data-dir D] [--workers N]
        [--batch N] [--det-prob-threshold T] [--rejects FILE] [--no-progress]

CompreFace's database is only read. Prints a tqdm progress bar over the examples, then the summary and
what could not come over, and why. Runs again to resume.
"""
from __future__ import annotations

import argparse

from server.cli.importer import add_bulk_arguments, print_report, progress_bars
from server.config import Settings
from server.core.migrate import migrate_compreface


def register(subparsers) -> None:
    """`python -m server migrate-compreface ...` (called by server/cli/__init__.py)."""
    p = subparsers.add_parser("migrate-compreface", help="bring a CompreFace 1.x installation's keys, subjects and "
                              "examples over from its PostgreSQL database (read only; resumable)")
    p.add_argument("url", help="CompreFace's database, postgresql://user:password@host:5432/frs")
    add_bulk_arguments(p, rejects_help="write every example that did not come over, and why, to this CSV")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(data_dir=args.data_dir, model_dir=args.model_dir)
    progress, close = progress_bars()
    try:
        report = migrate_compreface(settings, args.url, workers=args.workers, batch=args.batch,
                                    det_prob_threshold=args.det_prob_threshold,
                                    progress=None if args.no_progress else progress)
    finally:
        close()
    print_report(report, args.rejects, what="not migrated", column="where")
    return 0
