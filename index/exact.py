"""Exact (brute-force) search: `_Flat`, numpy rows of vectors searched exactly (results == brute
force), and the k-smallest selection that the graph's and the index's merges use too."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

_EXACT_BLOCK = 1 << 24  # exact search: at most this many distances (64 MB) at once


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
