"""One collection's vector index: exact numpy search when small, hnswlib HNSW when large.

A `VectorIndex` holds a *base* and, at times, an *overlay*:

- base `_Flat`: numpy rows searched exactly (results == brute force), used below `exact_below`
  faces, and while a large graph is (re)built in the background;
- base `_Graph`: hnswlib with the caller's labels as its labels. The vectors live only inside
  hnswlib (no numpy copy: ~790 bytes per face at M=20 in all), deleted elements are reused by
  later adds (hnswlib's replace_deleted) and compacted by a background rebuild when they
  outnumber the live ones;
- overlay: while the base is *frozen* (a snapshot is being written, or a graph is being built),
  writes land in a small exact `_Flat` plus the set of labels they touched; searches merge the
  base (touched labels masked) with the overlay, then the overlay drains into the base in short
  steps. So neither a multi-second snapshot nor a multi-minute rebuild ever blocks a request.

hnswlib's replace_deleted must never see a label that the graph already holds (it would then
carry the label twice and later erase the live one from its table), so every add first asks the
graph: `unmark_deleted` succeeds for a dead label, says "not deleted" for a live one and "not
found" for a new one. Labels above the highest one ever added skip that probe (storage's labels
only grow, so new faces never pay it).

Snapshot: `<name>` (the manifest: header, sha256, and for a flat base the labels + vectors, for a
graph base the dead labels) and, for a graph base, `<name>.<token>.graph` (hnswlib's own file,
whose size and sha256 the manifest records). Both are written to temp files, fsynced and renamed;
the manifest last, so a crash leaves the old snapshot whole. hnswlib loads its file directly.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import secrets
import struct
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import hnswlib
import numpy as np

__all__ = ["IndexCorrupt", "VectorIndex", "snapshot_files"]

log = logging.getLogger(__name__)


class IndexCorrupt(Exception):
    """A snapshot file is missing, truncated, fails its checksum, or does not fit the parameters."""


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (so writes never starve)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_PARALLEL_ADD_MIN = 256  # below this, hnswlib's thread start-up costs more than it saves
_SYNC_BUILD_MAX = 4096  # graphs up to this size are built in the calling write (< ~0.5 s); bigger: background
_BUILD_CHUNK = 16_384  # background build: rows per add_items call (a cancel is seen between calls)
_DRAIN_STEP = 256  # overlay labels moved into the base per write-lock hold
_MASK_OVERFETCH_MAX = 64  # up to this many masked labels, over-fetch from hnswlib; beyond, filter
_COMPACT_MIN = 10_000  # compaction: only graphs with at least this many elements ...
_HASH_CHUNK = 1 << 20
_EXACT_BLOCK = 1 << 24  # exact search: at most this many distances (64 MB) at once


# ============================================================================ flat (exact) store
class _Flat:
    """Rows of float32 vectors with exact search; a row per label, freed rows reused."""

    kind = "flat"

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        cap = max(16, int(capacity))
        self.vectors = np.zeros((cap, dim), np.float32)
        self.sqnorms = np.zeros(cap, np.float32)  # cached |v|^2 for the expansion of |q - v|^2
        self.labels = np.full(cap, -1, np.int64)  # -1: free row
        self.rows: dict[int, int] = {}
        self.free: list[int] = []
        self.used = 0  # rows ever handed out (high-water mark)

    def __len__(self) -> int:
        return len(self.rows)

    def contains(self, label: int) -> bool:
        return label in self.rows

    def vector(self, label: int) -> np.ndarray:
        return self.vectors[self.rows[label]]

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace; returns how many labels are new."""
        rows = np.empty(labels.size, np.int64)
        new = 0
        for i, label in enumerate(labels.tolist()):
            row = self.rows.get(label)
            if row is None:
                row = self._take()
                self.rows[label] = row
                self.labels[row] = label
                new += 1
            rows[i] = row
        self.vectors[rows] = vectors
        self.sqnorms[rows] = np.einsum("ij,ij->i", vectors, vectors)
        return new

    def extend(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk insert of labels known to be new and distinct (loads, rebuilds)."""
        n = labels.size
        if self.used + n > self.vectors.shape[0]:
            self._grow(max(self.used + n, self.vectors.shape[0] * 2))
        rows = np.arange(self.used, self.used + n)
        self.vectors[rows] = vectors
        self.sqnorms[rows] = np.einsum("ij,ij->i", vectors, vectors)
        self.labels[rows] = labels
        self.rows.update(zip(labels.tolist(), rows.tolist()))
        self.used += n

    def remove(self, labels: Iterable[int]) -> int:
        gone = 0
        for label in labels:
            row = self.rows.pop(label, None)
            if row is not None:
                self.labels[row] = -1
                self.free.append(row)
                gone += 1
        return gone

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(self.labels[: self.used] >= 0)
        return self.labels[rows], self.vectors[rows]

    def live_chunks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = np.flatnonzero(self.labels[: self.used] >= 0)
        for start in range(0, rows.size, size):
            part = rows[start : start + size]
            yield self.labels[part], self.vectors[part]

    def search(self, q: np.ndarray, k: int, masked: set[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """(labels, squared distances), k columns, nearest first; -1 / inf where fewer rows."""
        n = self.used
        if n == 0 or k == 0:
            return _empty(q.shape[0], k)
        rows = max(1, _EXACT_BLOCK // n)  # queries per block: a big flat (a rebuild) x many queries
        if q.shape[0] > rows:
            parts = [self.search(q[i:i + rows], k, masked) for i in range(0, q.shape[0], rows)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        d2 = self.sqnorms[:n][None, :] - 2.0 * (q @ self.vectors[:n].T)
        d2 += np.einsum("ij,ij->i", q, q)[:, None]
        np.maximum(d2, 0.0, out=d2)
        d2[:, self.labels[:n] < 0] = np.inf
        if masked:
            hidden = [self.rows[x] for x in masked if x in self.rows]
            if hidden:
                d2[:, hidden] = np.inf
        slots, dist = _smallest(d2, k)
        labels = self.labels[slots]
        labels[~np.isfinite(dist)] = -1
        return labels, dist

    def nbytes(self) -> int:
        # numpy arrays + the label -> row dict (~100 bytes per entry with its int objects)
        return self.vectors.nbytes + self.sqnorms.nbytes + self.labels.nbytes + 100 * len(self.rows)

    def stats(self) -> dict[str, int]:
        return {"slots": self.used, "deleted": self.used - len(self.rows)}

    def _take(self) -> int:
        if self.free:
            return self.free.pop()
        if self.used == self.vectors.shape[0]:
            self._grow(self.vectors.shape[0] * 2)
        self.used += 1
        return self.used - 1

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.vectors.shape[0]
        self.vectors = np.concatenate([self.vectors, np.zeros((extra, self.dim), np.float32)])
        self.sqnorms = np.concatenate([self.sqnorms, np.zeros(extra, np.float32)])
        self.labels = np.concatenate([self.labels, np.full(extra, -1, np.int64)])


# ============================================================================ hnswlib graph
class _Graph:
    """hnswlib HNSW over the caller's labels, with deleted elements reused (replace_deleted)."""

    kind = "graph"

    def __init__(self, index: hnswlib.Index, dim: int, count: int, dead: set[int], top: int) -> None:
        self.g = index
        self.dim = dim
        self.count = count  # live elements
        self.dead = dead  # labels marked deleted; a superset (replace_deleted may evict some)
        self.top = top  # highest label ever added: anything above is certainly new

    @classmethod
    def new(cls, dim: int, M: int, ef_construction: int, ef: int, capacity: int) -> "_Graph":
        g = hnswlib.Index(space="l2", dim=dim)
        g.init_index(max_elements=max(16, int(capacity)), M=M, ef_construction=ef_construction,
                     allow_replace_deleted=True)
        g.set_ef(ef)
        return cls(g, dim, 0, set(), -1)

    def __len__(self) -> int:
        return self.count

    @property
    def elements(self) -> int:
        return self.g.element_count

    def contains(self, label: int) -> bool:
        if label > self.top:
            return False
        try:
            self.g.get_items([label])
        except RuntimeError:  # "Label not found": absent or marked deleted
            return False
        return True

    def vector(self, label: int) -> np.ndarray:
        return np.asarray(self.g.get_items([label]), np.float32)[0]

    def add(self, labels: np.ndarray, vectors: np.ndarray, *, fresh: bool = False, threads: int = -1) -> int:
        """Insert or replace; returns how many labels are new (or came back from deleted).

        fresh=True: the caller guarantees the labels are not in the graph at all (bulk builds).
        """
        if fresh:
            new_rows = np.arange(labels.size)
            update_rows: list[int] = []
            delta = labels.size
        else:
            new_rows, update_rows, delta = self._classify(labels, vectors)
        if len(new_rows):
            self._reserve(len(new_rows))
            self.g.add_items(vectors[new_rows], labels[new_rows],
                             num_threads=threads if len(new_rows) >= _PARALLEL_ADD_MIN else 1, replace_deleted=True)
        if update_rows:  # updates in place (hnswlib's updatePoint)
            self.g.add_items(vectors[update_rows], labels[update_rows], num_threads=1)
        if labels.size:
            self.top = max(self.top, int(labels.max()))
        self.count += delta
        return delta

    def _classify(self, labels: np.ndarray, vectors: np.ndarray) -> tuple[list[int], list[int], int]:
        new_rows: list[int] = []
        update_rows: list[int] = []
        delta = 0
        for i, label in enumerate(labels.tolist()):
            if label > self.top:
                new_rows.append(i)
                delta += 1
                continue
            try:
                self.g.unmark_deleted(label)  # a dead label comes back: update its slot in place
            except RuntimeError as exc:
                if "not deleted" in str(exc):  # live: update only if the vector changed (replays)
                    if not np.array_equal(self.vector(label), vectors[i]):
                        update_rows.append(i)
                    continue
                new_rows.append(i)  # not in the graph (never, or evicted by a replacement)
            else:
                update_rows.append(i)
                self.dead.discard(label)
            delta += 1
        for i in new_rows:
            self.dead.discard(int(labels[i]))
        return new_rows, update_rows, delta

    def _reserve(self, extra: int) -> None:
        """Room for `extra` new elements (replace_deleted may not find enough dead ones)."""
        need = self.g.element_count + extra
        cap = self.g.get_max_elements()
        if need > cap:
            self.g.resize_index(max(need, cap + cap // 4, 1024))

    def remove(self, labels: Iterable[int]) -> int:
        gone = 0
        for label in labels:
            if label > self.top:
                continue
            try:
                self.g.mark_deleted(label)
            except RuntimeError:  # unknown or already deleted
                continue
            self.dead.add(label)
            gone += 1
        self.count -= gone
        if len(self.dead) > 2 * (self.elements - self.count) + 1024:
            self.dead &= set(self.g.get_ids_list())  # forget dead labels that replacements evicted
        return gone

    def live_labels(self) -> np.ndarray:
        ids = np.asarray(self.g.get_ids_list(), np.int64)
        if self.dead and ids.size:
            ids = ids[~np.isin(ids, np.fromiter(self.dead, np.int64, len(self.dead)))]
        return np.sort(ids)

    def live_chunks(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = self.live_labels()
        for start in range(0, ids.size, size):
            part = ids[start : start + size]
            yield part, np.asarray(self.g.get_items(part), np.float32).reshape(-1, self.dim)

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        chunks = list(self.live_chunks(_BUILD_CHUNK))
        if not chunks:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    def search(self, q: np.ndarray, k: int, masked: set[int] | None,
               escalate: tuple[float, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (labels, squared distances). `escalate` = (squared distance, ef): queries whose
        nearest result lies farther than that are searched again with that ef (see VectorIndex)."""
        if self.count == 0 or k == 0:
            return _empty(q.shape[0], k)
        extra = len(masked) if masked else 0
        if extra > _MASK_OVERFETCH_MAX:
            is_masked = masked.__contains__  # type: ignore[union-attr]
            try:  # a Python filter per visited node: slow, so never escalated (a transient state)
                labels, d2 = self.g.knn_query(q, k=min(k, self.count), num_threads=1,
                                              filter=lambda x: not is_masked(x))
            except RuntimeError:
                return self._exact(q, k, masked)
            return labels.astype(np.int64), d2.astype(np.float32, copy=False)
        try:
            labels, d2 = self._knn(q, k, masked, min(k + extra, self.count))
        except RuntimeError:
            return self._exact(q, k, masked)
        if escalate is not None:
            far2, ef = escalate
            fetch = min(max(ef, k + extra), self.count)
            rows = np.flatnonzero(~(d2[:, 0] <= far2))  # a masked-out (inf) first result counts as far
            if rows.size and fetch > k + extra:
                try:  # hnswlib searches with ef = max(its ef, k): asking for `fetch` results is ef `fetch`
                    labels[rows], d2[rows] = self._knn(q[rows], k, masked, fetch)
                except RuntimeError:
                    pass  # too few live elements reachable for that many results: keep the first answer
        return labels, d2

    def _knn(self, q: np.ndarray, k: int, masked: set[int] | None, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's `fetch` nearest, masked labels removed, cut to k (RuntimeError when hnswlib
        finds fewer than `fetch` live elements)."""
        labels, d2 = self.g.knn_query(q, k=fetch, num_threads=1)
        labels = labels.astype(np.int64)
        d2 = d2.astype(np.float32, copy=False)
        if not masked:
            return labels[:, :k], d2[:, :k]  # hnswlib's results come nearest first
        hide = np.isin(labels, np.fromiter(masked, np.int64, len(masked)))
        labels[hide] = -1
        return _smallest_pairs(labels, np.where(hide, np.float32(np.inf), d2), k)

    def _exact(self, q: np.ndarray, k: int, masked: set[int] | None) -> tuple[np.ndarray, np.ndarray]:
        # hnswlib found fewer than k live elements (many deleted ones cut the graph): be exact
        flat = _Flat(self.dim, max(16, self.count))
        live_labels, live_vectors = self.live()
        flat.extend(live_labels, live_vectors)
        return flat.search(q, k, masked)

    def per_element_bytes(self) -> int:
        """hnswlib's memory per allocated element: level-0 block (links + vector + label), its
        std::mutex, level and link-list pointer, plus the label table and upper levels (~50 B)."""
        M = self.g.M
        return (2 * M * 4 + 4) + self.dim * 4 + 8 + 40 + 4 + 8

    def nbytes(self) -> int:
        # spare capacity: hnswlib's level-0 block is malloc'd but untouched (not resident); its
        # mutexes and levels are constructed (~44 B each)
        spare = self.g.get_max_elements() - self.elements
        return self.elements * (self.per_element_bytes() + 50) + spare * 44 + 60 * len(self.dead)

    def stats(self) -> dict[str, int]:
        return {"slots": self.elements, "deleted": self.elements - self.count}


def _empty(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), -1, np.int64), np.full((rows, k), np.inf, np.float32)


def _smallest(d2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the k smallest per row, ascending; inf-padded past the width."""
    rows, n = d2.shape
    if k < n:
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), (rows, n))
    vals = np.take_along_axis(d2, part, axis=1)
    order = np.argsort(vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
    if k > n:
        idx = np.concatenate([idx, np.zeros((rows, k - n), idx.dtype)], axis=1)
        vals = np.concatenate([vals, np.full((rows, k - n), np.inf, vals.dtype)], axis=1)
    return idx, vals.astype(np.float32, copy=False)


def _smallest_pairs(labels: np.ndarray, d2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx, vals = _smallest(d2, k)
    out = np.take_along_axis(labels, np.minimum(idx, labels.shape[1] - 1), axis=1) if labels.shape[1] else \
        np.full(idx.shape, -1, np.int64)
    out = np.where(np.isfinite(vals), out, -1)
    return out, vals


# ============================================================================ overlay
class _Overlay:
    """Writes made while the base is frozen: their current state, and the labels they touched."""

    def __init__(self, dim: int) -> None:
        self.flat = _Flat(dim, 64)
        self.touched: set[int] = set()
        self.hidden = 0  # touched labels that are live in the base (masked in its results)

    def touch(self, label: int, base) -> None:
        if label not in self.touched:
            self.touched.add(label)
            if base.contains(label):
                self.hidden += 1


# ============================================================================ the index
class VectorIndex:
    """L2 search over float32 vectors (the caller L2-normalises them).

    Thread-safe: many concurrent searches, writes exclusive (hnswlib is not safe for mixed
    add/query). Labels are int64 >= 0. Distances returned are plain L2 (not squared).
    """

    def __init__(
        self,
        dim: int = 128,
        *,
        exact_below: int = 2000,
        M: int = 16,
        ef_construction: int = 200,
        ef_search: int = 64,
        escalate_distance: float = 0.0,
        escalate_ef: int = 1024,
        initial_capacity: int = 1024,
        build_threads: int = -1,
    ) -> None:
        if (dim <= 0 or M <= 1 or ef_construction <= 0 or ef_search <= 0 or exact_below < 0
                or not escalate_distance >= 0 or escalate_ef <= 0):
            raise ValueError("bad index parameters")
        self.dim = dim
        self.exact_below = exact_below
        self.M = M
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        # graph search, second pass: a query whose nearest face is farther than escalate_distance
        # (no confident match: a stranger, or a face whose own photos the first pass missed) is
        # searched again with ef escalate_ef. 0: off.
        self.escalate_distance = float(escalate_distance)
        self.escalate_ef = int(escalate_ef)
        self.build_threads = build_threads
        self._lock = _RWLock()
        self._maint = threading.Lock()  # held by whoever froze the base (one save or build at a time)
        self._base: _Flat | _Graph = _Flat(dim, initial_capacity)
        self._overlay: _Overlay | None = None
        self._builder: threading.Thread | None = None
        self._cancel = threading.Event()
        self._retired = False  # cancel_build() was called: no more background builds
        self.build_error: BaseException | None = None

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        with self._lock.read():
            return self._size()

    def _size(self) -> int:
        n = len(self._base)
        ov = self._overlay
        if ov is not None:
            n += len(ov.flat) - ov.hidden
        return n

    def __contains__(self, label: object) -> bool:
        try:
            key = int(label)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        with self._lock.read():
            ov = self._overlay
            if ov is not None and key in ov.touched:
                return ov.flat.contains(key)
            return self._base.contains(key)

    @property
    def uses_graph(self) -> bool:
        """True when the base is an HNSW graph (from exact_below faces; exact again below half)."""
        return isinstance(self._base, _Graph)

    @property
    def building(self) -> bool:
        """True while a graph is being built (or compacted) in the background."""
        t = self._builder
        return t is not None and t.is_alive()

    @property
    def busy(self) -> bool:
        """True while the base is frozen (a save or a background build)."""
        return self._maint.locked()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, k') int64 labels and float32 L2 distances, nearest first, k' = min(k, len(self))."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {np.shape(queries)}")
        if k < 0:
            raise ValueError("k must be >= 0")
        with self._lock.read():
            kk = min(int(k), self._size())
            if kk == 0 or q.shape[0] == 0:
                return np.zeros((q.shape[0], kk), np.int64), np.zeros((q.shape[0], kk), np.float32)
            ov = self._overlay
            if ov is None:
                labels, d2 = self._search_base(q, kk, None)
            else:
                # the base holds len(base) - hidden visible faces: never ask it for more
                bl, bd = self._search_base(q, min(kk, len(self._base) - ov.hidden), ov.touched)
                ol, od = ov.flat.search(q, kk, None)
                labels, d2 = _smallest_pairs(np.concatenate([bl, ol], 1), np.concatenate([bd, od], 1), kk)
        return labels, np.sqrt(d2).astype(np.float32, copy=False)

    def _search_base(self, q: np.ndarray, k: int, masked: set[int] | None) -> tuple[np.ndarray, np.ndarray]:
        base = self._base
        if isinstance(base, _Graph) and self.escalate_distance > 0:
            return base.search(q, k, masked, (self.escalate_distance ** 2, self.escalate_ef))
        return base.search(q, k, masked)

    def vectors(self, labels: Iterable[int]) -> dict[int, np.ndarray]:
        """The stored vectors of the labels present (others are left out)."""
        out: dict[int, np.ndarray] = {}
        with self._lock.read():
            ov = self._overlay
            for label in labels:
                label = int(label)
                store = ov.flat if ov is not None and label in ov.touched else self._base
                if store.contains(label):
                    out[label] = np.array(store.vector(label), np.float32)
        return out

    # ------------------------------------------------------------------ writes
    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors; re-adding a label replaces its vector (identical re-adds are no-ops)."""
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        vec = np.ascontiguousarray(vectors, dtype=np.float32)
        if vec.ndim == 1 and lab.size == 1:
            vec = vec[None, :]
        if vec.ndim != 2 or vec.shape != (lab.size, self.dim):
            raise ValueError(f"vectors must have shape ({lab.size}, {self.dim}), got {np.shape(vectors)}")
        if lab.size == 0:
            return
        if not np.isfinite(vec).all():
            raise ValueError("vectors must be finite")
        if (lab < 0).any():
            raise ValueError("labels must be >= 0")
        # duplicates inside one batch: the last one wins (hnswlib's parallel add must not see both)
        _, last = np.unique(lab[::-1], return_index=True)
        keep = np.sort(lab.size - 1 - last)
        lab, vec = lab[keep], vec[keep]
        with self._lock.write():
            ov = self._overlay
            if ov is not None:
                for label in lab.tolist():
                    ov.touch(label, self._base)
                ov.flat.add(lab, vec)
                return
            self._base.add(lab, vec)
            self._fit_mode()

    def remove(self, labels: Iterable[int] | np.ndarray) -> None:
        """Delete labels; unknown labels are ignored."""
        lab = np.asarray(labels, dtype=np.int64).reshape(-1).tolist()
        if not lab:
            return
        with self._lock.write():
            ov = self._overlay
            if ov is not None:
                for label in lab:
                    ov.touch(label, self._base)
                ov.flat.remove(lab)
                return
            self._base.remove(lab)
            self._fit_mode()

    # ------------------------------------------------------------------ modes
    def _fit_mode(self) -> None:
        """(write lock held, not frozen) Flat -> graph at exact_below (in the background when big),
        graph -> flat below half of it, and compaction when dead elements outnumber live ones."""
        base = self._base
        n = len(base)
        if isinstance(base, _Flat):
            if n >= self.exact_below and n > 0:
                if n <= _SYNC_BUILD_MAX:
                    self._base = self._graph_from(base.live_chunks(_BUILD_CHUNK), n, None)
                else:
                    self._start_build()
        elif n < self.exact_below // 2:
            labels, vectors = base.live()
            flat = _Flat(self.dim, max(16, 2 * labels.size))
            flat.extend(labels, vectors)
            self._base = flat
        elif base.elements >= _COMPACT_MIN and base.elements - n > n:
            self._start_build()  # most slots are dead: rebuild from the live ones

    def _new_graph(self, capacity: int) -> _Graph:
        return _Graph.new(self.dim, self.M, self.ef_construction, self.ef_search, capacity)

    def _graph_from(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], n: int,
                    cancel: threading.Event | None) -> _Graph:
        graph = self._new_graph(max(1024, n + n // 8))
        for labels, vectors in chunks:
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            graph.add(labels, np.ascontiguousarray(vectors), fresh=True, threads=self.build_threads)
        return graph

    def _start_build(self) -> None:
        """(write lock held) Freeze the base and build a graph from it in a thread."""
        if self._retired or self.building or not self._maint.acquire(blocking=False):
            return  # retired, or a save holds the base (the next write after it retries)
        self._overlay = _Overlay(self.dim)
        self._cancel.clear()
        source = self._base
        self._builder = threading.Thread(target=self._build, args=(source,), name="index-build", daemon=True)
        self._builder.start()

    def _build(self, source: _Flat | _Graph) -> None:
        """Background: a new graph from the frozen base; then swap it in and drain the overlay."""
        try:
            n = len(source)
            log.info("building an HNSW graph of %d vectors in the background (exact search meanwhile)", n)
            graph = self._graph_from(source.live_chunks(_BUILD_CHUNK), n, self._cancel)
            with self._lock.write():
                self._base = graph  # the overlay's masks hold for it too: same contents as `source`
            log.info("HNSW graph of %d vectors ready", n)
        except _Cancelled:
            log.info("background graph build cancelled")
        except BaseException as exc:  # noqa: BLE001 - keep serving exactly; the error is reported
            self.build_error = exc
            log.exception("background graph build failed; exact search continues")
        finally:
            self._thaw()

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait for a background build; True when none is running any more."""
        t = self._builder
        if t is not None:
            t.join(timeout)
        return not self.building

    def cancel_build(self) -> None:
        """Stop a background build for good (the index is being closed or dropped; the base stays
        as it was and is still searchable and writable) and wait for the thread."""
        self._retired = True
        t = self._builder
        if t is not None and t.is_alive():
            self._cancel.set()
            t.join()

    def _freeze(self) -> _Flat | _Graph:
        """(_maint held) Writes go to a new overlay from now on; returns the base, now read-only."""
        with self._lock.write():
            self._overlay = _Overlay(self.dim)
            return self._base

    def _thaw(self) -> None:
        """(_maint held) Move the overlay into the base, a few labels per lock hold; release _maint."""
        try:
            while True:
                with self._lock.write():
                    ov = self._overlay
                    if ov is None:
                        break
                    step = list(itertools.islice(ov.touched, _DRAIN_STEP))
                    if not step:
                        self._overlay = None
                        break
                    base = self._base
                    removes = [x for x in step if not ov.flat.contains(x)]
                    adds = [x for x in step if ov.flat.contains(x)]
                    ov.hidden -= sum(1 for x in step if base.contains(x))
                    if removes:
                        base.remove(removes)
                    if adds:
                        base.add(np.array(adds, np.int64), np.stack([ov.flat.vector(x) for x in adds]))
                        ov.flat.remove(adds)
                    ov.touched.difference_update(step)
        finally:
            self._maint.release()
        with self._lock.write():
            if self._overlay is None:
                self._fit_mode()

    def set_ef_search(self, ef: int) -> None:
        """Change the search-time ef (speed/recall) of the graph, now and after later rebuilds."""
        if ef <= 0:
            raise ValueError("ef must be > 0")
        with self._lock.write():  # hnswlib's ef must not change under a running query
            self.ef_search = int(ef)
            if isinstance(self._base, _Graph):
                self._base.g.set_ef(self.ef_search)

    def set_escalation(self, distance: float, ef: int) -> None:
        """Change the second search (see __init__): top-1 distance beyond which it runs, and its ef."""
        if not distance >= 0 or ef <= 0:
            raise ValueError("escalation needs distance >= 0 and ef > 0")
        with self._lock.write():
            self.escalate_distance, self.escalate_ef = float(distance), int(ef)

    # ------------------------------------------------------------------ memory
    def memory_bytes(self) -> int:
        """Estimated RAM of the index (what hnswlib and numpy allocate for it)."""
        with self._lock.read():
            total = self._base.nbytes()
            if self._overlay is not None:
                total += self._overlay.flat.nbytes()
            return total

    def stats(self) -> dict[str, object]:
        with self._lock.read():
            base = self._base
            out: dict[str, object] = {"faces": self._size(), "mode": base.kind, **base.stats(),
                                      "building": self.building, "frozen": self._overlay is not None}
            if isinstance(base, _Graph):
                out.update(M=base.g.M, ef_construction=base.g.ef_construction, ef_search=self.ef_search,
                           escalate_distance=self.escalate_distance, escalate_ef=self.escalate_ef)
        out["memory_bytes"] = self.memory_bytes()
        n = out["faces"]
        out["bytes_per_face"] = round(out["memory_bytes"] / n) if n else 0  # type: ignore[operator]
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path, sequence: int) -> None:
        """Write a snapshot atomically, recording `sequence`.

        The base is frozen meanwhile (searches and writes go on through the overlay), so only
        the brief freeze and the drain steps take the write lock. Waits for a background build.
        """
        path = Path(path)
        self._maint.acquire()
        try:
            base = self._freeze()
        except BaseException:
            self._maint.release()
            raise
        try:
            _write_snapshot(path, base, self.dim, int(sequence))
        finally:
            self._thaw()

    @classmethod
    def load(cls, path: Path, **params) -> tuple["VectorIndex", int]:
        """Read a snapshot; returns (index, sequence). IndexCorrupt on any defect."""
        path = Path(path)
        meta, payload = _read_manifest(path)
        params.setdefault("dim", meta["dim"])
        if params["dim"] != meta["dim"]:
            raise IndexCorrupt(f"{path}: dimension {meta['dim']} != expected {params['dim']}")
        dim = meta["dim"]
        index = cls(**params)
        if meta["graph_name"]:
            graph_path = path.parent / meta["graph_name"]
            _check_file(graph_path, meta["graph_size"], meta["graph_sha256"])
            g = hnswlib.Index(space="l2", dim=dim)
            capacity = max(1024, meta["elements"] + meta["elements"] // 16)
            try:
                g.load_index(str(graph_path), max_elements=capacity, allow_replace_deleted=True)
            except (RuntimeError, ValueError, MemoryError) as e:
                raise IndexCorrupt(f"{graph_path}: hnswlib cannot load the graph ({e})") from e
            if g.element_count != meta["elements"] or g.element_count < meta["count"]:
                raise IndexCorrupt(f"{graph_path}: {g.element_count} elements, manifest says {meta['elements']}")
            g.set_ef(index.ef_search)
            dead = np.frombuffer(payload, "<i8", meta["dead"]).astype(np.int64)
            index._base = _Graph(g, dim, meta["count"], set(dead.tolist()), meta["top"])
        else:
            n = meta["count"]
            labels = np.frombuffer(payload, "<i8", n).astype(np.int64)
            vectors = np.frombuffer(payload, "<f4", n * dim, 8 * n).reshape(n, dim)
            if np.unique(labels).size != n or (labels < 0).any():
                raise IndexCorrupt(f"{path}: inconsistent labels")
            flat = _Flat(dim, max(int(params.get("initial_capacity", 1024)), n))
            flat.extend(labels, vectors)
            index._base = flat
        with index._lock.write():
            index._fit_mode()
        return index, meta["sequence"]

    @classmethod
    def from_chunks(cls, chunks: Iterable[tuple[np.ndarray, np.ndarray]], **params) -> "VectorIndex":
        """An index of distinct labels read in chunks (a rebuild from storage): exact at once, and
        for a large set the graph is built in the background while exact search serves."""
        index = cls(**params)
        flat = index._base
        assert isinstance(flat, _Flat)
        for labels, vectors in chunks:
            lab = np.asarray(labels, np.int64).reshape(-1)
            vec = np.ascontiguousarray(vectors, dtype=np.float32).reshape(lab.size, index.dim)
            if not np.isfinite(vec).all():
                raise ValueError("vectors must be finite")
            known = [i for i, x in enumerate(lab.tolist()) if x in flat.rows]
            if known:  # not expected from storage, but stay correct: replace those
                flat.add(lab[known], vec[known])
                rest = np.setdiff1d(np.arange(lab.size), known)
                lab, vec = lab[rest], vec[rest]
            flat.extend(lab, vec)
        with index._lock.write():
            index._fit_mode()
        return index


class _Cancelled(Exception):
    pass


# ============================================================================ snapshot files
# Manifest: header, then payload (flat: labels int64[count] + vectors float32[count, dim];
# graph: dead labels int64[dead]). The header's last field is the sha256 of everything before it
# plus the payload; the graph file's size and sha256 are fields of the header.
_MAGIC = b"FRHNSW\r\n"  # \r\n catches text-mode mangling, like PNG's signature
_VERSION = 2
_HEADER = struct.Struct("<8sIIqQQqQQ32s16s32s")
# magic, version, dim, sequence, count, dead, top, elements, graph_size, graph_sha256, graph_token, sha256
_GRAPH_SUFFIX = ".graph"


def snapshot_files(path: Path) -> list[Path]:
    """Every file of the snapshot at `path`: the manifest and its graph files (current or stale)."""
    path = Path(path)
    prefix = path.name + "."
    out = [path] if path.exists() else []
    if path.parent.is_dir():
        out += [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(_GRAPH_SUFFIX)]
    return out


def _graph_name(path: Path, token: str) -> str:
    return f"{path.name}.{token}{_GRAPH_SUFFIX}"


def _write_snapshot(path: Path, base: _Flat | _Graph, dim: int, sequence: int) -> None:
    directory = path.parent
    graph_name, graph_size, graph_sha, token = "", 0, b"\0" * 32, ""
    if isinstance(base, _Graph):
        token = secrets.token_hex(8)
        graph_name = _graph_name(path, token)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".graph.tmp", dir=directory)
        os.close(fd)
        try:
            base.g.save_index(tmp)
            graph_size, graph_sha = _fsync_and_hash(tmp)
            os.replace(tmp, directory / graph_name)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(directory)
        dead = np.fromiter(base.dead, np.int64, len(base.dead))
        payload = [_raw(dead, "<i8")]
        fields = (_MAGIC, _VERSION, dim, sequence, base.count, dead.size, base.top, base.elements, graph_size,
                  graph_sha, token.encode("ascii"))
    else:
        labels, vectors = base.live()
        payload = [_raw(labels, "<i8"), _raw(vectors, "<f4")]
        fields = (_MAGIC, _VERSION, dim, sequence, labels.size, 0, -1, 0, 0, graph_sha, b"")
    digest = hashlib.sha256(_HEADER.pack(*fields, b"\0" * 32)[:-32])
    for part in payload:
        digest.update(part)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_HEADER.pack(*fields, digest.digest()))
            for part in payload:
                out.write(part)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)
    for stale in snapshot_files(path):  # graphs of earlier snapshots (or of crashed saves)
        if stale != path and stale.name != graph_name:
            _unlink_quietly(stale)


def _read_manifest(path: Path) -> tuple[dict, memoryview]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexCorrupt(f"{path}: cannot read ({e})") from e
    if len(data) < _HEADER.size:
        raise IndexCorrupt(f"{path}: truncated header")
    magic, version, dim, sequence, count, dead, top, elements, graph_size, graph_sha, token, stored = \
        _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise IndexCorrupt(f"{path}: not an index snapshot of version {_VERSION} (magic/version)")
    view = memoryview(data)
    digest = hashlib.sha256(view[: _HEADER.size - 32])
    digest.update(view[_HEADER.size :])
    if digest.digest() != stored:
        raise IndexCorrupt(f"{path}: checksum mismatch")
    text = token.rstrip(b"\0").decode("ascii", "replace")
    if text and not all(c in "0123456789abcdef" for c in text):
        raise IndexCorrupt(f"{path}: bad graph token {text!r}")
    graph_name = _graph_name(path, text) if text else ""
    expected = 8 * dead if graph_name else count * (8 + 4 * dim)
    if len(data) - _HEADER.size != expected or dim <= 0:
        raise IndexCorrupt(f"{path}: payload of {len(data) - _HEADER.size} bytes, expected {expected}")
    meta = dict(dim=dim, sequence=sequence, count=count, dead=dead, top=top, elements=elements,
                graph_size=graph_size, graph_sha256=graph_sha, graph_name=graph_name)
    return meta, view[_HEADER.size :]


def _check_file(path: Path, size: int, sha: bytes) -> None:
    try:
        actual = path.stat().st_size
        if actual != size:
            raise IndexCorrupt(f"{path}: size {actual} != expected {size}")
        digest = _hash_file(path)
    except OSError as e:
        raise IndexCorrupt(f"{path}: cannot read ({e})") from e
    if digest.digest() != sha:
        raise IndexCorrupt(f"{path}: checksum mismatch")


def _hash_file(path: str | Path, fsync: bool = False) -> "hashlib._Hash":
    # one reused buffer: reading the file in fresh chunks would leave freed megabytes in the heap
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return digest


def _fsync_and_hash(path: str) -> tuple[int, bytes]:
    digest = _hash_file(path, fsync=True)
    return os.path.getsize(path), digest.digest()


def _raw(array: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian bytes of an array as a flat uint8 view (no copy on little-endian hosts)."""
    return np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
