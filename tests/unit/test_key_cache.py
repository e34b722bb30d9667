"""KeyCache (server/http/state.py) over a real SQLite storage: hits cached for the ttl, misses always
asked, and concurrent lookups of one key share one storage call (one worker thread, not one each)."""
from __future__ import annotations

import threading
import time

import anyio
import pytest

from server.http.state import KeyCache
from server.storage.sqlite import SqliteStorage


class CountingStorage(SqliteStorage):
    """The real storage; counts find_key calls and the worker threads they ran on, and makes each
    lookup take a little while, as a busy database does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def find_key(self, key):
        with self.lock:
            self.calls += 1
            self.threads.add(threading.get_ident())
        time.sleep(0.05)
        return super().find_key(key)


@pytest.fixture
def storage(tmp_path):
    s = CountingStorage(tmp_path / "faces.db")
    yield s
    s.close()


def find_many(cache: KeyCache, keys: list[str]) -> list:
    async def main():
        results: list = [None] * len(keys)

        async def one(i, key):
            results[i] = await cache.find(key)

        async with anyio.create_task_group() as tg:
            for i, key in enumerate(keys):
                tg.start_soon(one, i, key)
        return results

    return anyio.run(main)


def test_a_burst_of_one_key_takes_one_lookup(storage):
    key = storage.create_key("recognition", name="door").key
    cache = KeyCache(storage, ttl=60)
    found = find_many(cache, [key] * 100)
    assert {f.key for f in found} == {key}
    assert storage.calls == 1 and len(storage.threads) == 1
    find_many(cache, [key] * 10)  # cached
    assert storage.calls == 1


def test_a_burst_of_a_missing_key_takes_one_lookup_and_is_not_cached(storage):
    cache = KeyCache(storage, ttl=60)
    missing = "00000000-0000-0000-0000-00000000dead"
    assert find_many(cache, [missing] * 50) == [None] * 50
    assert storage.calls == 1
    created = storage.create_key("recognition", key=missing)  # a key made meanwhile works at once
    assert find_many(cache, [missing])[0].key == created.key
    assert storage.calls == 2


def test_different_keys_are_looked_up_each(storage):
    keys = [storage.create_key("recognition").key for _ in range(3)]
    cache = KeyCache(storage, ttl=60)
    found = find_many(cache, keys * 20)
    assert [f.key for f in found] == keys * 20
    assert storage.calls == 3


def test_hits_expire_after_the_ttl(storage):
    key = storage.create_key("recognition").key
    cache = KeyCache(storage, ttl=0.2)
    find_many(cache, [key])
    time.sleep(0.3)
    find_many(cache, [key] * 5)
    assert storage.calls == 2


def test_a_failed_lookup_fails_its_waiters_as_fast(storage, monkeypatch):
    """The database is down: the requests that waited on the failing lookup get the same error at the
    same moment (a copy each), instead of each waiting out a lookup of its own (test_database_outage
    bounds how long a request may take then)."""
    key = storage.create_key("recognition").key
    cache = KeyCache(storage, ttl=60)
    real = CountingStorage.find_key
    down = [True]

    def flaky(self, k):
        self.calls += 1
        if down[0]:
            time.sleep(0.2)
            raise OSError("database went away")
        return real(self, k)

    monkeypatch.setattr(CountingStorage, "find_key", flaky)

    async def main():
        outcomes = []

        async def one():
            try:
                outcomes.append((await cache.find(key)).key)
            except OSError as exc:
                outcomes.append(str(exc))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
        return outcomes

    t = time.monotonic()
    assert anyio.run(main) == ["database went away"] * 5
    assert time.monotonic() - t < 0.35 and storage.calls == 1
    down[0] = False  # back: the next lookup asks storage again
    assert anyio.run(main) == [key] * 5
