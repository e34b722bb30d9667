"""Vector index per face collection: hnswlib HNSW (exact numpy search when small), snapshots, recovery."""
from .collection import ChangeFeed, IndexRegistry
from .hnsw import IndexCorrupt, VectorIndex

__all__ = ["ChangeFeed", "IndexCorrupt", "IndexRegistry", "VectorIndex"]
