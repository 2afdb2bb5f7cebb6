"""The two in-memory caches of the gated read: unwrapped data keys and sealed rows."""

from __future__ import annotations

import gc
import os

import pytest

from governance.datakeys import KeyCache
from governance.vault import StoryRowCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def raw_key() -> bytes:
    """A data key as the cache holds it: its raw bytes."""
    return os.urandom(32)


def test_key_cache_forgets_keys_after_their_ttl() -> None:
    clock = Clock()
    cache = KeyCache(10, 60.0, clock)
    key = raw_key()
    cache.put("k1", key)
    clock.now += 59.9
    assert cache.get("k1") is key
    clock.now += 0.2
    assert cache.get("k1") is None
    assert len(cache) == 0


def test_key_cache_holds_at_most_size_keys_oldest_out_first() -> None:
    clock = Clock()
    cache = KeyCache(3, 60.0, clock)
    for i in range(5):
        cache.put(f"k{i}", raw_key())
        clock.now += 1
    assert sorted(cache) == ["k2", "k3", "k4"]
    cache.pop("k3")
    assert cache.get("k3") is None
    assert len(cache) == 2


def test_key_cache_drops_expired_keys_when_a_key_is_added() -> None:
    clock = Clock()
    cache = KeyCache(100, 10.0, clock)
    for i in range(20):
        cache.put(f"old{i}", raw_key())
    clock.now += 11
    cache.put("new", raw_key())
    assert list(cache) == ["new"]  # expired keys do not linger in memory


def test_key_cache_entries_are_not_walked_by_the_garbage_collector() -> None:
    """The point of the design: 10,000 cached keys add no objects for a full collection
    (whatever the cryptography release: its AESGCM objects are tracked from 51 on, so
    the cache holds raw keys)."""
    cache = KeyCache(20_000, 60.0)
    for i in range(10_000):
        cache.put(f"k{i}", raw_key())
    gc.collect()
    entries = cache._entries
    tracked = [v for v in entries.values() if gc.is_tracked(v)]
    assert tracked == []


def test_key_cache_refuses_a_useless_bound() -> None:
    with pytest.raises(ValueError, match="size"):
        KeyCache(0, 60.0)
    with pytest.raises(ValueError, match="ttl"):
        KeyCache(10, 0.0)


def test_row_cache_serves_only_the_version_it_loaded() -> None:
    cache = StoryRowCache(100)
    rows = [(0, "name", "identity.name", None, None, None, "dek", b"sealed")]
    assert cache.get("c1", None, 3) is None
    cache.put("c1", None, 3, rows)
    assert cache.get("c1", None, 3) == tuple(rows)
    assert cache.get("c1", None, 4) is None  # changed since: reload
    assert cache.get("c1", ("identity.name",), 3) is None  # another view: its own entry
    assert (cache.hits, cache.misses) == (1, 3)


def test_row_cache_keeps_the_most_recently_used_within_its_rows() -> None:
    cache = StoryRowCache(4)
    row = (1, "ch", "support.ticket", "ticket", None, "support", "dek", b"sealed")
    cache.put("a", None, 1, [row, row])
    cache.put("b", None, 1, [row])
    assert cache.get("a", None, 1) is not None  # a is now the most recent
    cache.put("c", None, 1, [row, row])  # 5 rows: b, the least recent, goes
    assert cache.get("b", None, 1) is None
    assert cache.get("a", None, 1) is not None
    assert (len(cache), cache.rows) == (2, 4)
    cache.put("a", None, 2, [row])  # a new version replaces the old entry
    assert (len(cache), cache.rows) == (2, 3)
    cache.clear()
    assert (len(cache), cache.rows) == (0, 0)


def test_row_cache_does_not_keep_a_story_larger_than_its_bound() -> None:
    cache = StoryRowCache(3)
    row = (1, "ch", "support.ticket", "ticket", None, "support", "dek", b"sealed")
    cache.put("small", None, 1, [row])
    assert len(cache.put("huge", None, 1, [row] * 4)) == 4  # served, not kept
    assert cache.get("huge", None, 1) is None
    assert cache.get("small", None, 1) is not None
    assert cache.rows == 1
