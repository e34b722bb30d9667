"""Vector index per face collection: hnswlib HNSW (exact numpy search when small), snapshots, recovery.

Imports nothing of the `server` package. Modules:

- `vector_index`: `VectorIndex`, one collection's index (an exact or graph base, and an overlay
  that takes writes while the base is frozen by a snapshot or a background build);
- `exact`: `_Flat`, exact (brute-force) numpy search, and the k-smallest selection;
- `graph`: `_Graph`, the hnswlib HNSW wrapper (deleted elements reused);
- `snapshot`: the snapshot files (manifest + hnswlib's graph file): write, read, check; `IndexCorrupt`;
- `_lock`: the reader-writer lock;
- `collection`: `IndexRegistry` (one index per collection, catch-up from storage's `ChangeFeed`).
"""
from .collection import ChangeFeed, IndexRegistry
from .snapshot import IndexCorrupt, snapshot_files
from .vector_index import VectorIndex

__all__ = ["ChangeFeed", "IndexCorrupt", "IndexRegistry", "VectorIndex", "snapshot_files"]
