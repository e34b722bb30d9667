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

Snapshot files: index/snapshot.py. Exact search: index/exact.py. The graph: index/graph.py.
"""
from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Iterable

import hnswlib
import numpy as np

from ._lock import _RWLock
from .exact import _Flat, _smallest_pairs
from .graph import _BUILD_CHUNK, _Graph
from .snapshot import IndexCorrupt, _check_file, _read_manifest, _write_snapshot

__all__ = ["VectorIndex"]

log = logging.getLogger(__name__)

_SYNC_BUILD_MAX = 4096  # graphs up to this size are built in the calling write (< ~0.5 s); bigger: background
_DRAIN_STEP = 256  # overlay labels moved into the base per write-lock hold
_COMPACT_MIN = 10_000  # compaction: only graphs with at least this many elements ...


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
