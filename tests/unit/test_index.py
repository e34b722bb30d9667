"""index/: VectorIndex (exact + hnswlib), snapshots, IndexRegistry recovery. Real hnswlib throughout."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index import IndexCorrupt, IndexRegistry, VectorIndex

DIM = 128


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def noisy(rng: np.random.Generator, x: np.ndarray, sigma: float = 0.03) -> np.ndarray:
    y = x + sigma * rng.normal(size=x.shape).astype(np.float32)
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def brute(labels: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(queries[:, None, :].astype(np.float64) - vectors[None, :, :], axis=2)
    order = np.argsort(d, axis=1)[:, :k]
    return labels[order], np.take_along_axis(d, order, axis=1)


class MemoryFeed:
    """Test data source with storage's ChangeFeed shape: a change log per collection."""

    def __init__(self) -> None:
        self.log: dict[str, list[tuple[int, str, int, np.ndarray | None]]] = {}
        self.seq = 0
        self.full_reads = 0

    def add(self, collection: str, labels, vectors) -> list[tuple[int, str, int, np.ndarray | None]]:
        out = []
        for label, v in zip(np.asarray(labels).tolist(), vectors):
            self.seq += 1
            out.append((self.seq, "add", int(label), np.array(v, np.float32)))
        self.log.setdefault(collection, []).extend(out)
        return out

    def delete(self, collection: str, labels) -> list[tuple[int, str, int, np.ndarray | None]]:
        out = []
        for label in labels:
            self.seq += 1
            out.append((self.seq, "delete", int(label), None))
        self.log.setdefault(collection, []).extend(out)
        return out

    def live(self, collection: str) -> tuple[np.ndarray, np.ndarray]:
        state: dict[int, np.ndarray] = {}
        for _, op, label, v in self.log.get(collection, []):
            if op == "add":
                state[label] = v
            else:
                state.pop(label, None)
        labels = np.array(sorted(state), np.int64)
        vectors = np.stack([state[x] for x in labels.tolist()]) if len(labels) else np.zeros((0, DIM), np.float32)
        return labels, vectors

    # ChangeFeed
    def current_sequence(self, collection: str) -> int:
        entries = self.log.get(collection, [])
        return entries[-1][0] if entries else 0

    def all_vectors(self, collection: str):
        self.full_reads += 1
        labels, vectors = self.live(collection)
        for i in range(0, len(labels), 1000):
            yield labels[i : i + 1000], vectors[i : i + 1000]

    def changes_since(self, collection: str, sequence: int):
        return [c for c in self.log.get(collection, []) if c[0] > sequence]


# ------------------------------------------------------------------ VectorIndex: search
@pytest.mark.parametrize("n, exact_below", [(800, 2000), (5000, 100)])
def test_search_matches_brute_force_top1(n: int, exact_below: int) -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng, n)
    labels = rng.choice(10**12, n, replace=False).astype(np.int64)  # arbitrary int64 labels, not slots
    index = VectorIndex(exact_below=exact_below)
    index.add(labels, vectors)
    assert index.wait_built(120)  # graphs of more than a few thousand vectors are built in the background
    assert index.uses_graph == (n >= exact_below)
    queries = np.concatenate([noisy(rng, vectors[rng.integers(0, n, 150)]), unit(rng, 50)])
    got_l, got_d = index.search(queries, 5)
    want_l, want_d = brute(labels, vectors, queries, 5)
    assert got_l.dtype == np.int64 and got_d.dtype == np.float32 and got_l.shape == (200, 5)
    # queries that have a match (a noisy copy of a stored vector): exactly brute force's top-1
    np.testing.assert_array_equal(got_l[:150, 0], want_l[:150, 0])
    np.testing.assert_allclose(got_d[:150, 0], want_d[:150, 0], atol=2e-3)  # plain L2, not squared
    assert np.all(np.diff(got_d, axis=1) >= 0)
    if index.uses_graph:
        # random queries in isotropic 128-d (no match: every vector ~1.4 away) are HNSW's worst case;
        # its top-1 may be another near-equidistant vector, but never a much farther one
        assert np.all(got_d[150:, 0] <= want_d[150:, 0] * 1.1)
        assert np.mean(got_l[150:, 0] == want_l[150:, 0]) >= 0.6
    else:
        np.testing.assert_array_equal(got_l, want_l)
        np.testing.assert_allclose(got_d, want_d, atol=2e-3)


def test_add_remove_replace_and_sizes() -> None:
    rng = np.random.default_rng(1)
    v = unit(rng, 10)
    index = VectorIndex()
    empty_l, empty_d = index.search(v[:3], 5)
    assert empty_l.shape == (3, 0) and empty_d.shape == (3, 0)
    index.add(np.arange(10), v)
    assert len(index) == 10 and 3 in index and 10 not in index
    labels, dists = index.search(v[:2], 50)  # k > size
    assert labels.shape == (2, 10) and set(labels[0].tolist()) == set(range(10))
    np.testing.assert_array_equal(labels[:, 0], [0, 1])
    index.remove([3, 4, 999])  # unknown label ignored
    assert len(index) == 8 and 3 not in index
    assert 3 not in index.search(v[3:4], 10)[0]
    index.add(np.array([5]), v[3:4])  # replace: label 5 now sits where 3 was
    assert len(index) == 8
    labels, dists = index.search(v[3:4], 1)
    assert labels[0, 0] == 5 and dists[0, 0] < 1e-3
    assert index.search(v[5:6], 1)[0][0, 0] != 5
    index.add(np.array([7, 7]), np.stack([v[0], v[9]]))  # duplicates in one batch: last wins
    assert index.search(v[9:10], 2)[0][0].tolist() in ([7, 9], [9, 7])
    index.remove(list(range(10)))
    assert len(index) == 0 and index.search(v[:1], 3)[0].shape == (1, 0)
    with pytest.raises(ValueError):
        index.add(np.array([1]), np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError):
        index.add(np.array([1]), np.full((1, DIM), np.nan, np.float32))


def test_graph_mode_remove_replace_reuse_and_mode_switch() -> None:
    rng = np.random.default_rng(2)
    v = unit(rng, 600)
    index = VectorIndex(exact_below=300, initial_capacity=16)  # grows by doubling (arrays + resize_index)
    index.add(np.arange(400), v[:400])
    assert index.uses_graph
    index.remove(np.arange(0, 400, 2))  # 200 left: below exact_below, above half -> graph kept
    assert len(index) == 200 and index.uses_graph and index.stats()["deleted"] == 200
    index.add(np.arange(400, 600), v[400:])  # reuses the deleted elements (hnswlib's replace_deleted)
    assert index.uses_graph and index.stats()["slots"] == 400 and index.stats()["deleted"] == 0
    index.add(np.array([1]), v[0:1])  # replace a live label's vector in the graph
    live = np.array(sorted(set(range(1, 400, 2)) | set(range(400, 600))))
    lv = np.array([v[0] if x == 1 else v[x] for x in live])
    q = noisy(rng, lv[rng.integers(0, len(lv), 100)])
    np.testing.assert_array_equal(index.search(q, 1)[0][:, 0], brute(live, lv, q, 1)[0][:, 0])
    assert 0 not in index.search(v[:50], 10)[0]
    index.remove(np.arange(400, 600))
    index.remove(np.arange(1, 400, 2)[:60])  # 140 < 150: graph dropped
    assert not index.uses_graph and len(index) == 140
    live = np.arange(1, 400, 2)[60:]
    np.testing.assert_array_equal(index.search(v[live], 1)[0][:, 0], live)


def test_large_k_in_graph_mode() -> None:
    # the graph keeps no copy of the vectors, so k > ef_search searches the graph with ef = k:
    # the top-1 stays exact, the tail of a long list is HNSW-approximate
    rng = np.random.default_rng(3)
    v = unit(rng, 500)
    index = VectorIndex(exact_below=100, ef_search=16)
    index.add(np.arange(500), v)
    got, dist = index.search(v[:5], 100)
    want = brute(np.arange(500), v, v[:5], 100)[0]
    np.testing.assert_array_equal(got[:, 0], want[:, 0])
    assert got.shape == (5, 100) and np.all(np.diff(dist, axis=1) >= 0)
    assert np.mean([len(set(g) & set(w)) / 100 for g, w in zip(got.tolist(), want.tolist())]) >= 0.95


def test_second_search_for_far_top1() -> None:
    """A query whose nearest face lies beyond escalate_distance is searched again with ef
    escalate_ef: on a deliberately poor graph (M=4, ef 1) that turns a poor top-1 into (nearly
    always) the exact one, while a first answer within the distance stands."""
    rng = np.random.default_rng(11)
    v = unit(rng, 3000)
    labels = np.arange(3000)
    index = VectorIndex(exact_below=100, M=4, ef_construction=16, ef_search=1, build_threads=1)
    index.add(labels, v)
    assert index.uses_graph
    strangers = unit(rng, 300)  # random directions in 128-d: nearest face ~1.2 away
    want = brute(labels, v, strangers, 1)[0][:, 0]
    first = index.search(strangers, 1)[0][:, 0]
    assert np.mean(first == want) < 0.9  # the poor graph alone misses many (measured ~0.3)
    index.set_escalation(0.5, 1500)  # ef = half the elements: the second pass finds the nearest
    got, dist = index.search(strangers, 3)
    # random 128-d directions are as hard as data gets for HNSW: a few stay missed even at ef 1500
    assert np.mean(got[:, 0] == want) >= 0.97
    assert np.all(dist[:, 0] > 0.5) and np.all(np.diff(dist, axis=1) >= 0)
    # a face seen again (~0.34 away): where the first pass found a face within 0.5 its answer
    # stands (the same as without a second pass); where it did not, the second pass finds the face
    near = noisy(rng, v[:300])
    with_second = index.search(near, 2)
    index.set_escalation(0.0, 1500)
    without = index.search(near, 2)
    confident = without[1][:, 0] <= 0.5
    assert 0 < confident.sum() < 300
    np.testing.assert_array_equal(with_second[0][confident], without[0][confident])
    assert np.mean(with_second[0][~confident, 0] == np.arange(300)[~confident]) >= 0.97
    assert index.stats()["escalate_distance"] == 0.0
    with pytest.raises(ValueError):
        index.set_escalation(0.5, 0)
    with pytest.raises(ValueError):
        VectorIndex(escalate_distance=-1.0)


def test_second_search_with_masked_labels(tmp_path: Path) -> None:
    """While a snapshot freezes the graph, writes go to the overlay and the graph's copies of the
    touched labels are masked: the second search must hide them as the first does."""
    rng = np.random.default_rng(12)
    v = unit(rng, 2000)
    index = VectorIndex(exact_below=100, M=4, ef_construction=16, ef_search=1, escalate_distance=0.5,
                        escalate_ef=1000, build_threads=1)
    index.add(np.arange(2000), v)
    strangers = unit(rng, 100)
    nearest = brute(np.arange(2000), v, strangers, 1)[0][:, 0]
    gone = np.unique(nearest[:40])  # delete the true nearest of 40 queries while the base is frozen
    index._maint.acquire()  # as a running snapshot save does (VectorIndex.save): freeze the base
    index._freeze()
    try:
        index.remove(gone)  # lands in the overlay; the graph still holds them, masked in searches
        got = index.search(strangers, 1)[0][:, 0]
    finally:
        index._thaw()  # drains the overlay into the graph, releases _maint
    keep = np.setdiff1d(np.arange(2000), gone)
    want = brute(keep, v[keep], strangers, 1)[0][:, 0]
    assert not np.isin(got, gone).any()
    assert np.mean(got == want) >= 0.97  # HNSW on random 128-d data: a few stay approximate
    after = index.search(strangers, 1)[0][:, 0]  # and after the thaw, from the graph alone
    assert not np.isin(after, gone).any() and np.mean(after == want) >= 0.97


# ------------------------------------------------------------------ VectorIndex: persistence
@pytest.mark.parametrize("exact_below", [10_000, 100])
def test_save_load_round_trip(tmp_path: Path, exact_below: int) -> None:
    rng = np.random.default_rng(4)
    v = unit(rng, 1200)
    index = VectorIndex(exact_below=exact_below)
    index.add(np.arange(1200) * 7, v)
    index.remove(np.arange(0, 1200, 3) * 7)
    path = tmp_path / "c.hnsw"
    index.save(path, 4242)
    assert snapshot_names(tmp_path) == expected_names(index)  # no temp files left behind
    loaded, seq = VectorIndex.load(path, exact_below=exact_below)
    assert seq == 4242 and len(loaded) == len(index) and loaded.uses_graph == index.uses_graph
    assert all(x in loaded for x in np.arange(1, 1200, 3) * 7) and 0 not in loaded
    q = noisy(rng, v[:200])
    (la, da), (lb, db) = index.search(q, 10), loaded.search(q, 10)
    np.testing.assert_array_equal(la, lb)
    # exact search: the same vectors, maybe another memory layout, so BLAS may sum in another order (1 ulp)
    np.testing.assert_allclose(da, db, rtol=0, atol=1e-6)
    loaded.add(np.array([5, 99_999]), unit(rng, 2))  # still writable: freed slots, new slots
    assert len(loaded) == len(index) + 2
    first = set(os.listdir(tmp_path))
    index.save(path, 4243)  # overwrite in place
    assert VectorIndex.load(path)[1] == 4243 and snapshot_names(tmp_path) == expected_names(index)
    if index.uses_graph:  # a new graph file; the previous one is gone
        assert set(os.listdir(tmp_path)) & first == {"c.hnsw"}


def snapshot_names(directory: Path) -> list[str]:
    return sorted(re.sub(r"\.[0-9a-f]{16}\.graph$", ".*.graph", n) for n in os.listdir(directory))


def expected_names(index: VectorIndex) -> list[str]:
    # the manifest, plus hnswlib's own file (c.hnsw.<token>.graph) when the index is a graph
    return ["c.hnsw", "c.hnsw.*.graph"] if index.uses_graph else ["c.hnsw"]


def test_empty_index_round_trip(tmp_path: Path) -> None:
    VectorIndex().save(tmp_path / "e.hnsw", 0)
    loaded, seq = VectorIndex.load(tmp_path / "e.hnsw")
    assert seq == 0 and len(loaded) == 0 and loaded.search(unit(np.random.default_rng(0), 1), 3)[0].shape == (1, 0)


@pytest.mark.parametrize("exact_below", [100, 10_000])
def test_corrupt_snapshots_are_detected(tmp_path: Path, exact_below: int) -> None:
    rng = np.random.default_rng(5)
    index = VectorIndex(exact_below=exact_below)
    index.add(np.arange(300), unit(rng, 300))
    path = tmp_path / "c.hnsw"
    index.save(path, 9)
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(tmp_path / "missing.hnsw")
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(path, dim=64)
    # the manifest (header: sequence field; labels and vectors of a flat index) and, for a
    # graph, hnswlib's file: truncated, extended, a flipped bit anywhere, or missing
    files = sorted(tmp_path.iterdir())
    assert len(files) == (2 if exact_below == 100 else 1)
    for f in files:
        good = f.read_bytes()
        for cut in (0, 20, len(good) // 2, len(good) - 1):
            f.write_bytes(good[:cut])
            with pytest.raises(IndexCorrupt):
                VectorIndex.load(path)
        f.write_bytes(good + b"\0")
        with pytest.raises(IndexCorrupt):
            VectorIndex.load(path)
        for pos in (17, 80, len(good) // 2, len(good) - 100):
            bad = bytearray(good)
            bad[pos] ^= 0x04
            f.write_bytes(bytes(bad))
            with pytest.raises(IndexCorrupt):
                VectorIndex.load(path)
        f.unlink()
        with pytest.raises(IndexCorrupt):
            VectorIndex.load(path)
        f.write_bytes(good)
    assert VectorIndex.load(path)[1] == 9


# ------------------------------------------------------------------ IndexRegistry
def fill(feed: MemoryFeed, collection: str, rng: np.random.Generator, start: int, n: int) -> np.ndarray:
    v = unit(rng, n)
    feed.add(collection, np.arange(start, start + n), v)
    return v


def assert_matches_feed(index: VectorIndex, feed: MemoryFeed, collection: str, rng: np.random.Generator) -> None:
    labels, vectors = feed.live(collection)
    assert len(index) == len(labels) and all(x in index for x in labels[:: max(1, len(labels) // 50)])
    q = noisy(rng, vectors[rng.integers(0, len(labels), 200)])
    np.testing.assert_array_equal(index.search(q, 1)[0][:, 0], brute(labels, vectors, q, 1)[0][:, 0])


def test_registry_snapshot_then_replay_equals_rebuild(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(6)
    feed = MemoryFeed()
    fill(feed, "c1", rng, 0, 3000)
    reg = IndexRegistry(tmp_path / "idx", feed, exact_below=500)
    assert len(reg.get("c1")) == 3000 and feed.full_reads == 1
    reg.snapshot("c1")
    assert (tmp_path / "idx" / "c1.hnsw").exists()
    snap_seq = VectorIndex.load(tmp_path / "idx" / "c1.hnsw")[1]
    assert snap_seq == feed.current_sequence("c1")
    # later changes that the old process never applied (it "crashed"): adds, deletes, a re-add
    fill(feed, "c1", rng, 3000, 400)
    feed.delete("c1", range(0, 3000, 5))
    feed.add("c1", [10], unit(rng, 1))
    feed.delete("c1", [3001])
    caplog.set_level(logging.INFO, logger="index")
    reg2 = IndexRegistry(tmp_path / "idx", feed, exact_below=500)
    recovered = reg2.get("c1")
    assert feed.full_reads == 1  # snapshot + replay, no rebuild
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    fresh = IndexRegistry(tmp_path / "fresh", feed, exact_below=500).get("c1")
    assert feed.full_reads == 2
    assert len(recovered) == len(fresh) == len(feed.live("c1")[0])
    assert_matches_feed(recovered, feed, "c1", rng)
    q = noisy(rng, feed.live("c1")[1][:300])
    np.testing.assert_array_equal(recovered.search(q, 1)[0], fresh.search(q, 1)[0])


def test_registry_corrupt_snapshot_rebuilds(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(7)
    feed = MemoryFeed()
    fill(feed, "c1", rng, 0, 800)
    reg = IndexRegistry(tmp_path, feed, exact_below=300)
    reg.get("c1")
    reg.snapshot()
    path = tmp_path / "c1.hnsw"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    feed.delete("c1", range(100))
    reg2 = IndexRegistry(tmp_path, feed, exact_below=300)
    with caplog.at_level(logging.WARNING, logger="index"):
        index = reg2.get("c1")
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert feed.full_reads == 2
    assert_matches_feed(index, feed, "c1", rng)
    reg2.maybe_snapshot()  # a rebuild is persisted at the next opportunity
    assert VectorIndex.load(path)[1] == feed.current_sequence("c1")


def test_registry_apply_is_idempotent_and_order_safe(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    feed = MemoryFeed()
    fill(feed, "c", rng, 0, 50)
    reg = IndexRegistry(tmp_path, feed)
    reg.apply("c", 1, "add", 0, feed.log["c"][0][3])  # not loaded yet: ignored, the load reads the feed
    index = reg.get("c")
    assert len(index) == 50
    (add,) = feed.add("c", [100], unit(rng, 1))
    reg.apply("c", *add)
    reg.apply("c", *add)  # duplicate
    assert len(index) == 51 and index.search(add[3][None], 1)[0][0, 0] == 100
    # two writers finishing out of order: the delete (later seq) arrives before the add
    (add2,) = feed.add("c", [200], unit(rng, 1))
    (del2,) = feed.delete("c", [200])
    reg.apply("c", *del2)
    reg.apply("c", *add2)
    assert 200 not in index
    # committed but apply() not yet called: a snapshot still covers it (it syncs with the feed)
    feed.add("c", [300], unit(rng, 1))
    reg.snapshot("c")
    assert 300 in index and VectorIndex.load(tmp_path / "c.hnsw")[1] == feed.current_sequence("c")
    with pytest.raises(ValueError):
        reg.apply("c", 999, "upsert", 1, None)
    assert_matches_feed(index, feed, "c", rng)


def test_registry_maybe_snapshot_close_drop(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    feed = MemoryFeed()
    fill(feed, "a", rng, 0, 20)
    fill(feed, "b", rng, 0, 20)
    (tmp_path / ".a.hnsw.stale.tmp").write_bytes(b"x")  # leftover of a crash mid-save
    reg = IndexRegistry(tmp_path, feed, snapshot_every=3, snapshot_interval_s=3600)
    assert not (tmp_path / ".a.hnsw.stale.tmp").exists()
    reg.get("a"), reg.get("b")
    reg.maybe_snapshot()  # both were built from storage (no snapshot yet): persisted at once
    seq = {c: VectorIndex.load(tmp_path / f"{c}.hnsw")[1] for c in "ab"}
    assert seq == {c: feed.current_sequence(c) for c in "ab"}
    reg.maybe_snapshot()
    for change in feed.add("a", [50, 51], unit(rng, 2)):
        reg.apply("a", *change)
    reg.maybe_snapshot()
    assert VectorIndex.load(tmp_path / "a.hnsw")[1] == seq["a"]  # 2 < snapshot_every: not due
    reg.apply("a", *feed.delete("a", [0])[0])
    reg.maybe_snapshot()
    assert VectorIndex.load(tmp_path / "a.hnsw")[1] == feed.current_sequence("a")
    assert VectorIndex.load(tmp_path / "b.hnsw")[1] == seq["b"]
    reg.apply("b", *feed.delete("b", [1])[0])
    reg._snapshot_interval_s = 0.0  # by time
    reg.maybe_snapshot()
    assert VectorIndex.load(tmp_path / "b.hnsw")[1] == feed.current_sequence("b")
    reg.apply("b", *feed.delete("b", [2])[0])
    reg.close()
    assert VectorIndex.load(tmp_path / "b.hnsw")[1] == feed.current_sequence("b")
    reg.drop("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.hnsw"]
    reg.drop("never-loaded")
    for bad in ("../a", "a/b", "", ".hidden", "x\0y"):
        with pytest.raises(ValueError):
            reg.get(bad)


def test_concurrent_search_and_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    feed = MemoryFeed()
    anchors = fill(feed, "c", rng, 0, 150)  # labels 0..149 are never touched
    reg = IndexRegistry(tmp_path, feed, exact_below=400, initial_capacity=16)  # writers cross the graph threshold both ways
    index = reg.get("c")
    errors: list[BaseException] = []
    stop = time.monotonic() + 1.0
    lock = threading.Lock()  # one writer at a time on the feed (storage serialises commits too)
    phase = ["up"]

    def searcher(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while time.monotonic() < stop:
                pick = r.integers(0, 150, 8)
                labels, dists = reg.search("c", anchors[pick], 3)
                assert np.array_equal(labels[:, 0], pick), (labels[:, 0], pick)
                assert np.all(dists[:, 0] < 1e-3)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    def writer(seed: int) -> None:
        r = np.random.default_rng(seed)
        next_label = 10_000 * seed
        try:
            while time.monotonic() < stop:
                with lock:
                    if len(index) >= 520 or len(index) <= 190:  # swing across the graph's build/drop sizes
                        phase[0] = "down" if len(index) >= 520 else "up"
                    if phase[0] == "up":
                        changes = feed.add("c", np.arange(next_label, next_label + 40), unit(r, 40))
                        next_label += 40
                    else:
                        mine = [x for x in feed.live("c")[0].tolist() if x >= 150 and x // 10_000 == seed]
                        changes = feed.delete("c", r.choice(mine, min(len(mine), 40), replace=False).tolist())
                for change in changes:
                    reg.apply("c", *change)
                if r.random() < 0.1:
                    reg.snapshot("c")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in (1, 2)]
    threads += [threading.Thread(target=writer, args=(s,)) for s in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert_matches_feed(index, feed, "c", rng)
