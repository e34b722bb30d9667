"""One VectorIndex per collection: lazy load, catch-up from storage's change feed, snapshots.

Storage is the source of truth; an index is a cache of it that can always be rebuilt. Recovery is
"load the last snapshot (sequence S), replay changes_since(S)". Replays are idempotent because
every change is per label and the last change of a label decides its state.

Ordering: the write path calls apply() after its commit, so two writers may call apply() out of
sequence order. A per-label "last applied sequence" (kept only for changes above the last feed
sync) drops a stale change; a snapshot first syncs with the feed so its recorded sequence really
covers every change at or below it.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from .hnsw import IndexCorrupt, VectorIndex

__all__ = ["ChangeFeed", "IndexRegistry"]

log = logging.getLogger(__name__)

_SUFFIX = ".hnsw"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # leading alnum: no ".", "..", hidden files
_REPLAY_BATCH = 4096


class ChangeFeed(Protocol):
    """Implemented by storage."""

    def current_sequence(self, collection: str) -> int: ...

    def all_vectors(self, collection: str) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Chunks of (labels int64 (n,), vectors float32 (n, dim))."""
        ...

    def changes_since(self, collection: str, sequence: int) -> Iterable[tuple[int, str, int, np.ndarray | None]]:
        """(seq, op, label, vector) with seq > sequence, in seq order; op "add" | "delete"."""
        ...


@dataclass
class _Entry:
    index: VectorIndex | None = None
    mutex: threading.Lock = field(default_factory=threading.Lock)  # load / apply / sync
    snapshot_lock: threading.Lock = field(default_factory=threading.Lock)  # one save at a time
    synced: int = 0  # every feed change with seq <= synced is in the index
    recent: dict[int, int] = field(default_factory=dict)  # label -> seq, for applies above `synced`
    dirty: int = 0  # changes since the last snapshot
    last_snapshot: float = field(default_factory=time.monotonic)
    dropped: bool = False


class IndexRegistry:
    def __init__(
        self,
        directory: Path,
        feed: ChangeFeed,
        *,
        dim: int = 128,
        snapshot_every: int = 1000,
        snapshot_interval_s: float = 60.0,
        **index_params,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._feed = feed
        self._params = dict(index_params, dim=dim)
        self._snapshot_every = max(1, int(snapshot_every))
        self._snapshot_interval_s = float(snapshot_interval_s)
        self._lock = threading.Lock()  # guards _entries; order: _lock -> snapshot_lock -> mutex
        self._entries: dict[str, _Entry] = {}
        self._remove_stale_temp_files()

    # ------------------------------------------------------------------ reads
    def get(self, collection: str) -> VectorIndex:
        """The collection's index, loaded (snapshot + replay, or rebuild) on first use."""
        path = self._path(collection)
        with self._lock:
            entry = self._entries.setdefault(collection, _Entry())
        index = entry.index
        if index is not None:
            return index
        with entry.mutex:
            if entry.index is None:
                self._load(collection, path, entry)
            return entry.index  # type: ignore[return-value]

    def search(self, collection: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.get(collection).search(queries, k)

    # ------------------------------------------------------------------ writes
    def apply(self, collection: str, sequence: int, op: str, label: int, vector: np.ndarray | None) -> None:
        """One committed change; idempotent, and a change older than one already applied is dropped."""
        if op not in ("add", "delete"):
            raise ValueError(f"unknown op {op!r}")
        if op == "add" and vector is None:
            raise ValueError("an add needs a vector")
        with self._lock:
            entry = self._entries.get(collection)
        if entry is None:
            return  # not loaded yet: its lazy load reads this change from the feed
        with entry.mutex:
            index = entry.index
            if index is None or entry.dropped or sequence <= entry.synced:
                return
            label = int(label)
            if entry.recent.get(label, -1) >= sequence:
                return  # duplicate, or a later change of this label already applied
            entry.recent[label] = sequence
            if op == "add":
                index.add(np.array([label], np.int64), np.asarray(vector, np.float32).reshape(1, -1))
            else:
                index.remove([label])
            entry.dirty += 1

    def drop(self, collection: str) -> None:
        """The collection was deleted: forget its index and delete its files."""
        path = self._path(collection)
        with self._lock:  # held throughout so a concurrent get() cannot reload the old snapshot
            entry = self._entries.pop(collection, None)
            if entry is not None:
                with entry.snapshot_lock:  # wait out a save in flight, else it would recreate the file
                    entry.dropped = True
            for p in self._files_of(collection):
                p.unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, collection: str | None = None) -> None:
        """Write snapshots now: of one loaded collection, or of all loaded ones."""
        with self._lock:
            if collection is None:
                targets = list(self._entries.items())
            else:
                self._path(collection)
                entry = self._entries.get(collection)
                targets = [(collection, entry)] if entry is not None else []
        for name, entry in targets:
            self._snapshot_entry(name, entry)

    def maybe_snapshot(self) -> None:
        """Snapshot collections with >= snapshot_every changes, or any change older than the interval."""
        now = time.monotonic()
        with self._lock:
            due = [
                (name, e)
                for name, e in self._entries.items()
                if e.dirty >= self._snapshot_every
                or (e.dirty > 0 and now - e.last_snapshot >= self._snapshot_interval_s)
            ]
        for name, entry in due:
            if entry.snapshot_lock.locked():
                continue  # another thread is already saving it
            try:
                self._snapshot_entry(name, entry)
            except Exception:  # background upkeep: a failed snapshot only costs a longer replay later
                log.exception("index snapshot of collection %s failed", name)

    def close(self) -> None:
        """Final snapshot of every collection with unsaved changes."""
        with self._lock:
            dirty = [(name, e) for name, e in self._entries.items() if e.dirty > 0]
        for name, entry in dirty:
            try:
                self._snapshot_entry(name, entry)
            except Exception:  # keep closing the others; the feed can replay this one
                log.exception("final index snapshot of collection %s failed", name)

    def _snapshot_entry(self, collection: str, entry: _Entry) -> None:
        path = self._path(collection)
        with entry.snapshot_lock:
            if entry.dropped or entry.index is None:
                return
            with entry.mutex:
                self._sync(collection, entry)  # so `synced` covers changes whose apply() is still in flight
                sequence, dirty = entry.synced, entry.dirty
                index = entry.index
            index.save(path, sequence)  # changes applied meanwhile may be in it too: replay is idempotent
            with entry.mutex:
                entry.dirty -= dirty
                entry.last_snapshot = time.monotonic()

    # ------------------------------------------------------------------ loading and replay
    def _load(self, collection: str, path: Path, entry: _Entry) -> None:
        index: VectorIndex | None = None
        sequence = 0
        rebuilt_reason = ""
        if path.exists():
            try:
                index, sequence = VectorIndex.load(path, **self._params)
            except IndexCorrupt as e:
                rebuilt_reason = str(e)
                log.warning("index snapshot of collection %s unusable, rebuilding from storage: %s", collection, e)
        loaded = index is not None
        if index is None:
            sequence = self._feed.current_sequence(collection)  # before all_vectors: replay covers the gap
            index = VectorIndex(**self._params)
            for labels, vectors in self._feed.all_vectors(collection):
                index.add(labels, vectors)
            if not rebuilt_reason:
                log.info("index of collection %s built from storage (%d vectors)", collection, len(index))
        last, replayed = self._replay(collection, index, sequence)
        entry.index = index
        entry.synced = max(sequence, last)
        entry.recent.clear()
        entry.last_snapshot = time.monotonic()
        entry.dirty = replayed
        if rebuilt_reason or (not loaded and len(index)):
            entry.dirty += self._snapshot_every  # a rebuild is expensive: the next maybe_snapshot() saves it

    def _sync(self, collection: str, entry: _Entry) -> None:
        """Catch up from the feed (entry.mutex held)."""
        assert entry.index is not None
        last, _ = self._replay(collection, entry.index, entry.synced)
        entry.synced = max(entry.synced, last)
        entry.recent = {label: seq for label, seq in entry.recent.items() if seq > entry.synced}

    def _replay(self, collection: str, index: VectorIndex, since: int) -> tuple[int, int]:
        """Apply changes_since(since) in batches; returns (last sequence seen, number of changes)."""
        last, count = since, 0
        pending: dict[int, np.ndarray | None] = {}  # the last change per label decides it
        for seq, op, label, vector in self._feed.changes_since(collection, since):
            pending[int(label)] = None if op == "delete" else vector
            last, count = max(last, int(seq)), count + 1
            if len(pending) >= _REPLAY_BATCH:
                _apply_batch(index, pending)
                pending = {}
        _apply_batch(index, pending)
        return last, count

    # ------------------------------------------------------------------ files
    def _path(self, collection: str) -> Path:
        if not isinstance(collection, str) or not _SAFE_NAME.fullmatch(collection):
            raise ValueError(f"unsafe collection name {collection!r}")
        return self.directory / f"{collection}{_SUFFIX}"

    def _files_of(self, collection: str) -> list[Path]:
        """Temp files of a collection's snapshot (".<name>.hnsw.<random>.tmp")."""
        prefix = f".{collection}{_SUFFIX}."
        return [p for p in self.directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]

    def _remove_stale_temp_files(self) -> None:
        """Leftovers of a crash during save/load (never complete snapshots: those are renamed)."""
        for p in self.directory.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and f"{_SUFFIX}." in p.name:
                try:
                    os.unlink(p)
                except OSError:
                    log.warning("cannot remove stale index temp file %s", p)


def _apply_batch(index: VectorIndex, pending: dict[int, np.ndarray | None]) -> None:
    """Changes of distinct labels commute: removes first, then adds."""
    removes = [label for label, v in pending.items() if v is None]
    adds = [(label, v) for label, v in pending.items() if v is not None]
    if removes:
        index.remove(removes)
    if adds:
        index.add(np.array([a[0] for a in adds], np.int64), np.stack([np.asarray(a[1], np.float32) for a in adds]))
