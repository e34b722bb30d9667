"""hnswlib HNSW over the caller's labels (`_Graph`), deleted elements reused.

hnswlib's replace_deleted must never see a label that the graph already holds (it would then
carry the label twice and later erase the live one from its table), so every add first asks the
graph: `unmark_deleted` succeeds for a dead label, says "not deleted" for a live one and "not
found" for a new one. Labels above the highest one ever added skip that probe (storage's labels
only grow, so new faces never pay it).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import hnswlib
import numpy as np

from .exact import _empty, _Flat, _smallest_pairs

_PARALLEL_ADD_MIN = 256  # below this, hnswlib's thread start-up costs more than it saves
_BUILD_CHUNK = 16_384  # background build: rows per add_items call (a cancel is seen between calls)
_MASK_OVERFETCH_MAX = 64  # up to this many masked labels, over-fetch from hnswlib; beyond, filter


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
