"""One collection's vector index: exact numpy search when small, hnswlib HNSW when large.

Vectors live in a numpy array indexed by *slot*; hnswlib's own labels are those slots, never the
caller's labels. We choose which slot a new vector takes (freed slots first), so re-using a slot
means "update the marked-deleted hnswlib element in place" — deterministic reuse that sidesteps
hnswlib's `replace_deleted` bookkeeping (which corrupts its label table if a label is re-added
while an older deleted element still carries it).
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import hnswlib
import numpy as np

__all__ = ["IndexCorrupt", "VectorIndex"]


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


# Snapshot layout: header, then payload = slot labels int64[slots] + vectors float32[slots, dim]
# + hnswlib's save_index bytes (empty in exact mode). The sha256 covers header fields + payload.
_MAGIC = b"FRHNSW\r\n"  # \r\n catches text-mode mangling, like PNG's signature
_VERSION = 1
_HEADER = struct.Struct("<8sIIqQQQ32s")  # magic, version, dim, sequence, count, slots, graph_len, sha256
_HASH_CHUNK = 8 << 20
_PARALLEL_ADD_MIN = 256  # below this, hnswlib's thread start-up costs more than it saves


class VectorIndex:
    """L2 search over float32 vectors (the caller L2-normalises them).

    Thread-safe: many concurrent searches, writes exclusive (hnswlib is not safe for mixed
    add/query). Labels are int64. Distances returned are plain L2 (not squared).
    """

    def __init__(
        self,
        dim: int = 128,
        *,
        exact_below: int = 2000,
        M: int = 16,
        ef_construction: int = 200,
        ef_search: int = 64,
        initial_capacity: int = 1024,
    ) -> None:
        if dim <= 0 or M <= 1 or ef_construction <= 0 or ef_search <= 0 or exact_below < 0:
            raise ValueError("bad index parameters")
        self.dim = dim
        self.exact_below = exact_below
        self.M = M
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._lock = _RWLock()
        capacity = max(16, int(initial_capacity))
        self._vectors = np.zeros((capacity, dim), np.float32)
        self._sqnorms = np.zeros(capacity, np.float32)  # cached |v|^2 for exact search
        self._slot_labels = np.full(capacity, -1, np.int64)  # -1: free slot
        self._label_slot: dict[int, int] = {}
        self._free: list[int] = []  # freed slots below _used, reused first
        self._used = 0  # slots ever handed out (high-water mark)
        self._graph: hnswlib.Index | None = None

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._label_slot)

    def __contains__(self, label: object) -> bool:
        try:
            return int(label) in self._label_slot  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    @property
    def uses_graph(self) -> bool:
        """True when searches go through the HNSW graph (size >= exact_below)."""
        return self._graph is not None and len(self) >= self.exact_below

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
            kk = min(int(k), len(self))
            if kk == 0 or q.shape[0] == 0:
                return np.zeros((q.shape[0], kk), np.int64), np.zeros((q.shape[0], kk), np.float32)
            # hnswlib needs ef >= k; changing ef is not safe under concurrent queries, so a k
            # beyond ef_search (rare: CompreFace asks for a handful) goes exact instead.
            if self.uses_graph and kk <= self.ef_search:
                try:
                    slots, d2 = self._graph.knn_query(q, k=kk, num_threads=1)  # type: ignore[union-attr]
                except RuntimeError:  # too few reachable live elements (heavy deletion): be exact
                    slots, d2 = self._exact(q, kk)
            else:
                slots, d2 = self._exact(q, kk)
            labels = self._slot_labels[slots.astype(np.int64)]
        return labels, np.sqrt(np.maximum(d2, 0.0, dtype=np.float32)).astype(np.float32, copy=False)

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the used slots; free slots get +inf. Returns (slots, squared L2)."""
        n = self._used
        d2 = self._sqnorms[:n][None, :] - 2.0 * (q @ self._vectors[:n].T)
        d2 += np.einsum("ij,ij->i", q, q)[:, None]
        d2[:, self._slot_labels[:n] < 0] = np.inf
        if k < n:
            part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(n), (q.shape[0], n))
        pd = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(pd, axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1), np.take_along_axis(pd, order, axis=1)

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
        # duplicates inside one batch: the last one wins (hnswlib's parallel add must not see both)
        _, last = np.unique(lab[::-1], return_index=True)
        keep = np.sort(lab.size - 1 - last)
        lab, vec = lab[keep], vec[keep]
        with self._lock.write():
            slots = np.empty(lab.size, np.int64)
            changed = np.ones(lab.size, bool)
            for i, label in enumerate(lab.tolist()):
                slot = self._label_slot.get(label)
                if slot is None:
                    slot = self._take_slot()
                    self._label_slot[label] = slot
                    self._slot_labels[slot] = label
                elif np.array_equal(self._vectors[slot], vec[i]):
                    changed[i] = False  # replay of a change we already hold: skip the graph update
                slots[i] = slot
            slots, vec = slots[changed], vec[changed]
            self._vectors[slots] = vec
            self._sqnorms[slots] = np.einsum("ij,ij->i", vec, vec)
            if self._graph is not None:
                if self._graph.get_max_elements() < self._capacity:
                    self._graph.resize_index(self._capacity)
                if slots.size:
                    self._graph.add_items(vec, slots, num_threads=self._threads(slots.size))
            self._fit_mode()

    def remove(self, labels: Iterable[int] | np.ndarray) -> None:
        """Delete labels; unknown labels are ignored."""
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        with self._lock.write():
            for label in lab.tolist():
                slot = self._label_slot.pop(label, None)
                if slot is None:
                    continue
                self._slot_labels[slot] = -1
                self._free.append(slot)
                if self._graph is not None:
                    self._graph.mark_deleted(slot)
            self._fit_mode()

    @property
    def _capacity(self) -> int:
        return self._vectors.shape[0]

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._used == self._capacity:
            self._grow(self._capacity * 2)
        self._used += 1
        return self._used - 1

    def _grow(self, capacity: int) -> None:
        """Double the arrays (the graph follows in add(), via resize_index)."""
        extra = capacity - self._capacity
        self._vectors = np.concatenate([self._vectors, np.zeros((extra, self.dim), np.float32)])
        self._sqnorms = np.concatenate([self._sqnorms, np.zeros(extra, np.float32)])
        self._slot_labels = np.concatenate([self._slot_labels, np.full(extra, -1, np.int64)])

    def _fit_mode(self) -> None:
        """Build the graph when the index reaches exact_below; drop it at half that (hysteresis)."""
        n = len(self)
        if self._graph is None and n >= self.exact_below and n > 0:
            self._graph = self._build_graph()
        elif self._graph is not None and n < self.exact_below // 2:
            self._graph = None

    def _build_graph(self) -> hnswlib.Index:
        graph = hnswlib.Index(space="l2", dim=self.dim)
        graph.init_index(max_elements=self._capacity, M=self.M, ef_construction=self.ef_construction)
        graph.set_ef(self.ef_search)
        live = np.flatnonzero(self._slot_labels[: self._used] >= 0)
        if live.size:
            graph.add_items(self._vectors[live], live, num_threads=self._threads(live.size))
        return graph

    @staticmethod
    def _threads(n: int) -> int:
        return -1 if n >= _PARALLEL_ADD_MIN else 1

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path, sequence: int) -> None:
        """Write a snapshot atomically (temp file + fsync + rename + fsync dir), recording `sequence`.

        Only the copy (arrays + hnswlib's save_index) happens under the lock, and a *read* lock:
        searches continue, writes wait. Hashing and the final write happen outside it.
        """
        path = Path(path)
        directory = path.parent
        graph_fd, graph_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".graph.tmp", dir=directory)
        os.close(graph_fd)
        out_tmp = None
        try:
            with self._lock.read():
                n = self._used
                slot_labels = self._slot_labels[:n].copy()
                vectors = self._vectors[:n].copy()
                count = len(self._label_slot)
                has_graph = self._graph is not None
                if has_graph:
                    self._graph.save_index(graph_tmp)  # type: ignore[union-attr]
            graph_len = os.path.getsize(graph_tmp) if has_graph else 0
            fields = (_MAGIC, _VERSION, self.dim, int(sequence), count, n, graph_len)
            digest = hashlib.sha256(_HEADER.pack(*fields, b"\0" * 32)[:-32])
            label_bytes, vector_bytes = _raw(slot_labels, "<i8"), _raw(vectors, "<f4")
            digest.update(label_bytes)
            digest.update(vector_bytes)
            out_fd, out_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
            with os.fdopen(out_fd, "wb") as out:
                out.write(b"\0" * _HEADER.size)  # header last: the digest needs the whole payload
                out.write(label_bytes)
                out.write(vector_bytes)
                if has_graph:
                    with open(graph_tmp, "rb") as g:
                        while chunk := g.read(_HASH_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                out.seek(0)
                out.write(_HEADER.pack(*fields, digest.digest()))
                out.flush()
                os.fsync(out.fileno())
            os.replace(out_tmp, path)
            out_tmp = None
            _fsync_dir(directory)
        finally:
            _unlink_quietly(graph_tmp)
            if out_tmp is not None:
                _unlink_quietly(out_tmp)

    @classmethod
    def load(cls, path: Path, **params) -> tuple["VectorIndex", int]:
        """Read a snapshot; returns (index, sequence). IndexCorrupt on any defect."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise IndexCorrupt(f"{path}: cannot read ({e})") from e
        if len(data) < _HEADER.size:
            raise IndexCorrupt(f"{path}: truncated header")
        magic, version, dim, sequence, count, n, graph_len, stored = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise IndexCorrupt(f"{path}: not an index snapshot (magic/version)")
        labels_end = _HEADER.size + 8 * n
        vectors_end = labels_end + 4 * n * dim
        if len(data) != vectors_end + graph_len:
            raise IndexCorrupt(f"{path}: size {len(data)} != expected {vectors_end + graph_len}")
        view = memoryview(data)
        digest = hashlib.sha256(view[: _HEADER.size - 32])
        digest.update(view[_HEADER.size :])
        if digest.digest() != stored:
            raise IndexCorrupt(f"{path}: checksum mismatch")
        params.setdefault("dim", dim)
        if params["dim"] != dim:
            raise IndexCorrupt(f"{path}: dimension {dim} != expected {params['dim']}")
        params["initial_capacity"] = max(int(params.get("initial_capacity", 1024)), n)
        index = cls(**params)
        slot_labels = np.frombuffer(data, "<i8", n, _HEADER.size).astype(np.int64)
        vectors = np.frombuffer(data, "<f4", n * dim, labels_end).reshape(n, dim).astype(np.float32)
        live = np.flatnonzero(slot_labels >= 0)
        if live.size != count or np.unique(slot_labels[live]).size != count:
            raise IndexCorrupt(f"{path}: inconsistent labels")
        index._used = n
        index._slot_labels[:n] = slot_labels
        index._vectors[:n] = vectors
        index._sqnorms[:n] = np.einsum("ij,ij->i", vectors, vectors)
        index._label_slot = dict(zip(slot_labels[live].tolist(), live.tolist()))
        index._free = np.flatnonzero(slot_labels < 0)[::-1].tolist()
        if graph_len:
            index._graph = _load_graph(view[vectors_end:], path, dim, index._capacity, n)
            index._graph.set_ef(index.ef_search)
        index._fit_mode()
        return index, sequence


def _load_graph(blob: memoryview, path: Path, dim: int, capacity: int, slots: int) -> hnswlib.Index:
    """hnswlib only loads from a file: spill the blob next to the snapshot, load, delete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".load.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        graph = hnswlib.Index(space="l2", dim=dim)
        try:
            graph.load_index(tmp, max_elements=capacity)
        except (RuntimeError, ValueError) as e:
            raise IndexCorrupt(f"{path}: hnswlib cannot load the graph ({e})") from e
    finally:
        _unlink_quietly(tmp)
    if graph.element_count > slots:
        raise IndexCorrupt(f"{path}: graph holds {graph.element_count} elements for {slots} slots")
    return graph


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
