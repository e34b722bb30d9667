"""One VectorIndex per collection: lazy load, catch-up from storage's change feed, snapshots.

Storage is the source of truth; an index is a cache of it that can always be rebuilt. Recovery is
"load the last snapshot (sequence S), replay changes_since(S)". Replays are idempotent because
every change is per label and the last change of a label decides its state. A missing, truncated
or corrupt snapshot (checksums) is rebuilt from storage: exact search serves at once and a large
graph is built in the background (VectorIndex.from_chunks). After a snapshot at S is on disk, the
feed's changes up to S are pruned (when the feed can), so the change log stays short.

Ordering: the write path calls apply() after its commit, so two writers may call apply() out of
sequence order. A per-label "last applied sequence" (kept only for changes above the last feed
sync) drops a stale change; a snapshot first syncs with the feed so its recorded sequence really
covers every change at or below it.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from .snapshot import IndexCorrupt, snapshot_files
from .vector_index import VectorIndex

__all__ = ["ChangeFeed", "IndexRegistry"]

log = logging.getLogger(__name__)

_SUFFIX = ".hnsw"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # leading alnum: no ".", "..", hidden files
_REPLAY_BATCH = 4096


class ChangeFeed(Protocol):
    """Implemented by storage. An exception whose `transient` attribute is true means the feed cannot
    be read just now (its database is down or restarting): the index keeps what it has, the caller
    tries again later. Any other failure to replay (e.g. the changes were pruned) reloads the index."""

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
    load_failures: int = 0  # loads that raised; with load_error, the last one's exception
    load_error: BaseException | None = None


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
        failures = entry.load_failures
        with entry.mutex:
            if entry.index is None:
                if entry.load_failures != failures:
                    # the load we waited for failed (e.g. the database is down): fail as fast, with a
                    # copy of its error, rather than queue one more load behind it
                    raise _copy_error(entry.load_error)
                try:
                    self._load(collection, path, entry)
                except Exception as e:
                    entry.load_failures += 1
                    entry.load_error = e
                    raise
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
                if entry.index is not None:
                    entry.index.cancel_build()
                with entry.snapshot_lock:  # wait out a save in flight, else it would recreate the file
                    entry.dropped = True
            for p in self._files_of(collection) + snapshot_files(path):
                p.unlink(missing_ok=True)

    def warm(self, collections: Iterable[str]) -> None:
        """Load these collections now (at start-up, in a background thread) so that the first
        request does not pay for the snapshot load. Failures are logged; get() retries later."""
        for collection in collections:
            try:
                self.get(collection)
            except Exception:  # noqa: BLE001 - a lazy load on first use will try again
                log.exception("loading the index of collection %s failed", collection)

    def stats(self, collection: str) -> dict | None:
        """Size, mode and memory of a loaded collection's index (None when not loaded)."""
        with self._lock:
            entry = self._entries.get(collection)
        if entry is None or entry.index is None:
            return None
        out = entry.index.stats()
        out["sequence"] = entry.synced
        out["unsaved_changes"] = entry.dirty
        return out

    def loaded_stats(self) -> dict[str, dict]:
        """stats() of every loaded collection, by collection (for the metrics, at scrape time)."""
        with self._lock:
            names = [name for name, entry in self._entries.items() if entry.index is not None]
        out = {}
        for name in names:
            stats = self.stats(name)
            if stats is not None:  # dropped meanwhile
                out[name] = stats
        return out

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

    def refresh(self) -> None:
        """Catch every loaded index up with changes that other processes committed (e.g.
        `python -m server import` while the server runs); this process's writes apply at once."""
        with self._lock:
            entries = list(self._entries.items())
        for name, entry in entries:
            with entry.mutex:
                if entry.index is None or entry.dropped:
                    continue
                try:
                    self._sync(name, entry)
                except Exception:  # noqa: BLE001 - retried at the next refresh
                    log.exception("catching up the index of collection %s failed", name)

    def catch_up(self, collection: str, sequence: int | None = None) -> int | None:
        """Follow one collection's feed (another replica committed up to `sequence`, e.g. a
        PostgreSQL notification): replay what is newer than the last sync. Returns the synced
        sequence, or None when the index is not loaded (its lazy load reads the feed anyway). When
        the feed can no longer replay from our sequence (pruned), the index is reloaded."""
        with self._lock:
            entry = self._entries.get(collection)
        if entry is None:
            return None
        with entry.mutex:
            if entry.index is None or entry.dropped:
                return None
            if sequence is not None and sequence <= entry.synced:
                return entry.synced
            try:
                self._sync(collection, entry)
            except Exception as e:  # noqa: BLE001 - e.g. the change log was pruned past us: start over
                if getattr(e, "transient", False):
                    raise  # the feed is unreachable now: the index serves on, the caller retries
                log.warning("index of collection %s cannot catch up (%s); reloading", collection, e)
                old = entry.index
                # _load replaces entry.index only once the new one is complete: a load that fails
                # (the storage went away meanwhile) leaves the old index serving searches, rather
                # than none, which every search would then try to load again under the mutex
                self._load(collection, self._path(collection), entry)
                old.cancel_build()
            return entry.synced

    def maybe_snapshot(self) -> None:
        """Catch up with other processes' changes, then snapshot collections with >= snapshot_every
        changes, or any change older than the interval."""
        self.refresh()
        now = time.monotonic()
        with self._lock:
            due = [
                (name, e)
                for name, e in self._entries.items()
                if e.dirty >= self._snapshot_every
                or (e.dirty > 0 and now - e.last_snapshot >= self._snapshot_interval_s)
            ]
        for name, entry in due:
            if entry.snapshot_lock.locked() or (entry.index is not None and entry.index.busy):
                continue  # already being saved, or its graph is being built: next round
            try:
                self._snapshot_entry(name, entry)
            except Exception:  # background upkeep: a failed snapshot only costs a longer replay later
                log.exception("index snapshot of collection %s failed", name)

    def close(self) -> None:
        """Final snapshot of every collection with unsaved changes (background builds stop first:
        the snapshot then holds the exact vectors, and the next start builds the graph again)."""
        with self._lock:
            entries = list(self._entries.items())
        for _, entry in entries:
            if entry.index is not None:
                entry.index.cancel_build()
        dirty = [(name, e) for name, e in entries if e.dirty > 0]
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
        self._prune(collection, sequence)

    def _prune(self, collection: str, sequence: int) -> None:
        """The snapshot at `sequence` is durable: the feed may forget the changes it covers."""
        prune = getattr(self._feed, "prune_changes", None)
        if prune is None or sequence <= 0:
            return
        try:
            prune(collection, sequence)
        except Exception:  # noqa: BLE001 - a longer change log only costs disk space
            log.exception("pruning the change log of collection %s failed", collection)

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
        if index is not None:
            try:
                last, replayed = self._replay(collection, index, sequence)
            except Exception as e:  # noqa: BLE001 - e.g. the snapshot predates a prune of the log
                rebuilt_reason = f"cannot replay the changes after {sequence}: {e}"
                log.warning("index of collection %s: %s; rebuilding from storage", collection, rebuilt_reason)
                index.cancel_build()
                index = None
        loaded = index is not None
        if index is None:
            sequence = self._feed.current_sequence(collection)  # before all_vectors: replay covers the gap
            # exact at once; a large graph is built in the background while exact search serves
            index = VectorIndex.from_chunks(self._feed.all_vectors(collection), **self._params)
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
        last, new = self._replay(collection, entry.index, entry.synced, applied=entry.recent)
        entry.synced = max(entry.synced, last)
        entry.dirty += new
        entry.recent = {label: seq for label, seq in entry.recent.items() if seq > entry.synced}

    def _replay(self, collection: str, index: VectorIndex, since: int,
                applied: dict[int, int] | None = None) -> tuple[int, int]:
        """Apply changes_since(since) in batches; returns (last sequence seen, number of changes
        applied). `applied` (label -> seq): changes apply() already made, skipped here."""
        last, count = since, 0
        pending: dict[int, np.ndarray | None] = {}  # the last change per label decides it
        for seq, op, label, vector in self._feed.changes_since(collection, since):
            if applied and applied.get(int(label), -1) >= int(seq):
                last = max(last, int(seq))
                continue
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


def _copy_error(err: BaseException | None) -> BaseException:
    try:
        return copy.copy(err) if err is not None else RuntimeError("loading the index failed")
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied: share it
        return err  # type: ignore[return-value]


def _apply_batch(index: VectorIndex, pending: dict[int, np.ndarray | None]) -> None:
    """Changes of distinct labels commute: removes first, then adds."""
    removes = [label for label, v in pending.items() if v is None]
    adds = [(label, v) for label, v in pending.items() if v is not None]
    if removes:
        index.remove(removes)
    if adds:
        index.add(np.array([a[0] for a in adds], np.int64), np.stack([np.asarray(a[1], np.float32) for a in adds]))
