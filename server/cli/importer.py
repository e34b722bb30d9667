"""`import` command: bulk-enrol a folder or CSV (the use case: server/core/importer.py).

Wired into `python -m server` by `register(subparsers)`:
    python -m server import --key KEY SOURCE [--workers N] [--batch N] [--rejects FILE] [--no-progress]

Prints a tqdm progress bar while it runs, then the summary and the first rejected files.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Callable

from server.config import MTCNN_DET_PROB_THRESHOLD, YUNET_DET_PROB_THRESHOLD, Settings
from server.core.importer import DEFAULT_WORKERS, ImportReport, import_source

SHOWN_REJECTS = 20


def register(subparsers) -> None:
    """`python -m server import ...` (called by server/cli/__init__.py)."""
    p = subparsers.add_parser("import", help="bulk-enrol images: a folder (one sub-folder per subject) "
                              "or a CSV of path,subject; resumable")
    p.add_argument("source", help="folder of subject folders, or a CSV file of path,subject")
    p.add_argument("--key", required=True, help="recognition API key (its collection receives the faces)")
    add_bulk_arguments(p, rejects_help="write every rejected file and the reason to this CSV")
    p.set_defaults(func=_run)


def add_bulk_arguments(p: argparse.ArgumentParser, rejects_help: str) -> None:
    """The options every bulk command (import, migrate-compreface) has."""
    p.add_argument("--data-dir", help="storage folder (default ./data, env FR_DATA_DIR)")
    p.add_argument("--model-dir", help="model repository (default model_repository/, env FR_MODEL_DIR)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"images in the pipeline at once (default {DEFAULT_WORKERS}: 2 per core)")
    p.add_argument("--batch", type=int, default=64, help="faces per storage transaction (default 64)")
    p.add_argument("--det-prob-threshold", type=float, help="as the API's parameter (default: the detector's, "
                   f"{YUNET_DET_PROB_THRESHOLD} for YuNet, {MTCNN_DET_PROB_THRESHOLD} for MTCNN)")
    p.add_argument("--rejects", help=rejects_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(data_dir=args.data_dir, model_dir=args.model_dir)
    progress, close = progress_bars()
    try:
        report = import_source(settings, args.key, Path(args.source), workers=args.workers, batch=args.batch,
                               det_prob_threshold=args.det_prob_threshold,
                               progress=None if args.no_progress else progress)
    finally:
        close()
    print_report(report, args.rejects)
    return 0


def print_report(report: ImportReport, rejects: str | None, what: str = "rejected", column: str = "path") -> None:
    """The summary, the first rejected items and, with `rejects`, all of them as a CSV (`column`, reason)."""
    print(report.summary())
    for path, reason in report.rejected[:SHOWN_REJECTS]:
        print(f"  {what} {path}: {reason}")
    if len(report.rejected) > SHOWN_REJECTS:
        print(f"  ... {len(report.rejected) - SHOWN_REJECTS} more"
              + ("" if rejects else " (--rejects FILE lists all)"))
    if rejects:
        with open(rejects, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([column, "reason"])
            writer.writerows(report.rejected)


def progress_bars() -> tuple[Callable[[int], Callable[[ImportReport], None]], Callable[[], None]]:
    """(progress, close): `progress(total)` starts a bar and returns its update callback, as the use
    cases' `progress` argument wants; `close()` closes every bar started."""
    bars: list[_ProgressBar] = []

    def progress(total: int):
        bars.append(_ProgressBar(total))
        return bars[-1].update

    def close() -> None:
        for bar in bars:
            bar.close()

    return progress, close


class _ProgressBar:
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
