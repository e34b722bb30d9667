"""Helpers of the fault tests (tests/integration/test_disk_full.py, test_database_outage.py): a small
real file system to fill, and the figures each test reports for the closing note.

    with small_tmpfs(tmp_path / "fs", "24m") as fs:      # pytest.skip when not root / mount refused
        ...
        grow_tmpfs(fs, "48m")
    report("disk full", {...})   # printed, and appended to $FR_FAULT_RESULTS (a JSON-lines file) if set
"""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the block; skips the test where it cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("a size-limited file system needs root (mount -t tmpfs); not root here")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} (an unprivileged container?): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # still busy: detach it


def grow_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def report(fault: str, figures: dict) -> None:
    """One row of the closing note's table: printed (pytest -s shows it) and appended as JSON to the
    file named by FR_FAULT_RESULTS, if set."""
    row = {"fault": fault, **figures}
    print(f"\nFAULT FIGURES {json.dumps(row, sort_keys=False)}")
    target = os.environ.get("FR_FAULT_RESULTS", "").strip()
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
