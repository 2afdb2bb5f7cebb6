"""The two in-memory caches of the gated read: unwrapped data keys and opened stories
(sealed under a key of the cache's own)."""

from __future__ import annotations

import gc
import itertools
import os
from datetime import UTC, datetime

import msgspec
import pytest

from governance.datakeys import KeyCache
from governance.vault import Chapter, OpenedStory, StoryCache


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
    cache = KeyCache(10, 60.0, clock, draw=lambda: 0.0)  # the longest lifetime: the TTL
    key = raw_key()
    cache.put("k1", key)
    clock.now += 59.9
    assert cache.get("k1") is key
    clock.now += 0.2
    assert cache.get("k1") is None
    assert len(cache) == 0


def test_key_cache_spreads_the_expiry_of_keys_loaded_at_once_within_the_ttl() -> None:
    """A warm-up loads every customer's keys within seconds: had they one lifetime,
    they would all expire together, and every read for a while after would go to
    the key store at once. Each load's keys get the TTL less up to a fifth of it,
    at random; none outlives the TTL (erasure's guarantee counts on it), and the
    keys one load brought expire together (the next read loads them in one query)."""
    clock = Clock()
    cache = KeyCache(100_000, 100.0, clock)
    for customer in range(1000):
        assert 80.0 < cache.lifetime() <= 100.0
        expires = cache.expiry()
        for scope in range(3):
            cache.put(f"c{customer}-s{scope}", raw_key(), expires)
    ids = list(cache)
    clock.now += 79.9
    assert cache.missing(ids) == []
    left = []
    for _ in range(4):  # in steps of 5 s, up to the TTL
        clock.now += 5.0
        gone = cache.missing(ids)
        left.append(len(ids) - len(gone))
        # The keys of one load go together: whole customers' keys, three each.
        assert len(gone) == 3 * len({g.split("-")[0] for g in gone})
    # Roughly a quarter of the loads expire in each 5 s: no step takes them all.
    expected = [2250, 1500, 750, 0]
    for got, want in zip(left, expected, strict=True):
        assert abs(got - want) <= 300
    clock.now += 0.2  # past the TTL: all gone
    assert cache.missing(ids) == ids
    assert len(cache) == 0


def test_key_cache_never_keeps_a_key_past_its_ttl() -> None:
    clock = Clock()
    cache = KeyCache(10, 60.0, clock)
    cache.put("k1", raw_key(), expires=clock.now + 600.0)  # asked for more: the TTL bounds it
    clock.now += 60.1
    assert cache.get("k1") is None
    with pytest.raises(ValueError, match="spread"):
        KeyCache(10, 60.0, spread=1.0)


def test_key_cache_names_the_keys_it_lacks_expired_ones_too() -> None:
    """``missing`` (what a cached story's read asks: are all its data keys still
    there?) agrees with ``get`` key by key, and drops expired keys as ``get`` does."""
    clock = Clock()
    cache = KeyCache(10, 60.0, clock)
    cache.put("k1", raw_key())
    clock.now += 30.0
    cache.put("k2", raw_key())
    assert cache.missing(["k1", "k2"]) == []
    assert cache.missing(["k2", "k3", "k1"]) == ["k3"]
    clock.now += 30.0  # k1's TTL is over, k2's is not
    assert cache.missing(["k1", "k2", "k3"]) == ["k1", "k3"]
    assert len(cache) == 1
    assert cache.get("k2") is not None
    assert cache.get("k1") is None


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


def story(*chapters: str, name: str = "Ada Lovelace", key: str = "dek-1") -> OpenedStory:
    return OpenedStory(
        profile={"name": name},
        profile_categories={"name": "identity.name"},
        profile_keys={"name": key},
        chapters=[
            Chapter(
                ch,
                "support.ticket",
                "ticket",
                datetime(2025, 3, 1, 9, 30, 15, 250, tzinfo=UTC),
                "support",
                {"subject": f"Broken {ch}", "n": 2**70, "x": 1.5, "tags": ["a", None]},
            )
            for ch in chapters
        ],
        chapter_keys=[f"dek-{ch}" for ch in chapters],
    )


def test_story_cache_serves_only_the_version_it_loaded() -> None:
    cache = StoryCache(100, key_lifetime=60.0)
    opened = story("ch1", "ch2")
    assert cache.get("c1", None, 3) is None
    cache.put("c1", None, 3, opened)
    got = cache.get("c1", None, 3)
    assert got is not None
    assert got.story.opened() == opened  # every value as it was, chapter bodies' types too
    # The chapters stay JSON, byte for byte as an encoder with msgspec's defaults
    # (a response's) writes them, with their categories known without decoding it.
    assert bytes(got.story.chapters) == msgspec.json.encode(opened.chapters)
    assert got.chapter_categories == ("support.ticket",)
    assert sorted(got.dek_ids) == ["dek-1", "dek-ch1", "dek-ch2"]
    assert cache.get("c1", None, 4) is None  # changed since: reload
    assert cache.get("c1", ("identity.name",), 3) is None  # another view: its own entry
    assert (cache.hits, cache.misses) == (1, 3)


def test_story_cache_round_trips_stories_with_empty_parts() -> None:
    """The sealed parts are framed by their lengths: empty ones read back as empty."""
    cache = StoryCache(100, key_lifetime=60.0)
    bare = OpenedStory(
        profile={}, profile_categories={}, profile_keys={}, chapters=[], chapter_keys=[]
    )
    for n, opened in enumerate([bare, story(), story("ch1")]):
        cache.put(f"c{n}", None, 1, opened)
        got = cache.get(f"c{n}", None, 1)
        assert got is not None
        assert got.story.opened() == opened
        assert got.story.profile == opened.profile
        assert bytes(got.story.chapters) == msgspec.json.encode(opened.chapters)


def test_story_cache_keeps_values_sealed() -> None:
    """What the cache holds is ciphertext: no value appears in its memory as text,
    and an entry moved to another customer's place is refused, not served."""
    cache = StoryCache(100, key_lifetime=60.0)
    cache.put("c1", None, 1, story("ch1", name="Wilhelmina Sealed"))
    cache.put("c2", None, 1, story("ch2", name="Other Person"))
    held = repr(cache._entries).encode()
    assert b"Wilhelmina" not in held
    assert b"Broken" not in held
    assert all(b"Wilhelmina" not in e[2] for e in cache._entries.values())
    cache._entries["c2", None] = cache._entries["c1", None]
    assert cache.get("c2", None, 1) is None
    assert cache.get("c1", None, 1) is not None


def test_story_cache_forgets_its_keys_within_two_lifetimes() -> None:
    clock = Clock()
    cache = StoryCache(100, key_lifetime=10.0, clock=clock)
    cache.put("c1", None, 1, story("ch1"))
    clock.now += 10.0  # the next key: the entry's is still the previous one
    assert cache.get("c1", None, 1) is not None
    cache.put("c2", None, 1, story("ch2"))
    clock.now += 10.0  # the entry's key is now two generations old: gone
    assert cache.get("c1", None, 1) is None
    # In every shard only this generation's key and the one before are left.
    assert [len(keys) for keys in cache._keys] == [2] * len(cache._keys)
    assert cache.get("c2", None, 1) is not None
    clock.now += 25.0
    assert cache.get("c2", None, 1) is None
    assert (len(cache), cache.rows) == (0, 0)


def test_story_cache_lets_stories_cached_at_once_expire_in_small_waves() -> None:
    """A warm-up caches every customer's story within seconds. Had the cache one key,
    they would all become unusable at the same moment, and every read for a while
    after would go to the database and decrypt every value. Each shard of customers
    replaces its key at its own moment, so they go a sixteenth at a time; each entry
    still lasts more than one lifetime and at most two."""
    clock = Clock()
    cache = StoryCache(100_000, key_lifetime=16.0, clock=clock)
    customers = [f"c{i}" for i in range(320)]
    start = clock.now = 1003.5
    for cid in customers:
        cache.put(cid, None, 1, story(f"chapter of {cid}"))

    def usable() -> int:
        return sum(1 for cid in customers if cache.get(cid, None, 1) is not None)

    counts = []
    while clock.now < start + 33.0:
        clock.now += 0.5
        counts.append((clock.now - start, usable()))
    assert all(n == 320 for t, n in counts if t <= 16.0)  # more than one lifetime
    assert all(n == 0 for t, n in counts if t >= 32.0)  # at most two
    drops = [a[1] - b[1] for a, b in itertools.pairwise(counts)]
    assert max(drops) <= 320 // 4  # no half-second loses more than a quarter
    assert sum(1 for d in drops if d > 0) >= 8  # they go in many waves


def test_story_cache_drops_what_destroyed_keys_sealed() -> None:
    cache = StoryCache(100, key_lifetime=60.0)
    cache.put("c1", None, 1, story("ch1", key="dek-a"))
    cache.put("c1", ("identity.name",), 1, story(key="dek-a"))
    cache.put("c2", None, 1, story("ch2", key="dek-b"))
    cache.drop_keys(["dek-a"])
    assert (len(cache), cache.rows) == (1, 2)
    assert cache.get("c1", None, 1) is None
    assert cache.get("c2", None, 1) is not None
    cache.drop_keys(["dek-ch2"])  # a chapter's key alone is enough
    assert (len(cache), cache.rows) == (0, 0)


def test_story_cache_keeps_the_most_recently_used_within_its_rows() -> None:
    cache = StoryCache(6, key_lifetime=60.0)
    cache.put("a", None, 1, story("ch1"))  # 2 values each: a profile field and a chapter
    cache.put("b", None, 1, story("ch1"))
    assert cache.get("a", None, 1) is not None  # a is now the most recent
    cache.put("c", None, 1, story("ch1", "ch2"))  # 3 values: 7 in all, b goes
    assert cache.get("b", None, 1) is None
    assert cache.get("a", None, 1) is not None
    assert (len(cache), cache.rows) == (2, 5)
    cache.put("a", None, 2, story())  # a new version replaces the old entry
    assert (len(cache), cache.rows) == (2, 4)
    cache.clear()
    assert (len(cache), cache.rows) == (0, 0)


def test_story_cache_does_not_keep_a_story_larger_than_its_bound() -> None:
    cache = StoryCache(3, key_lifetime=60.0)
    cache.put("small", None, 1, story())
    cache.put("huge", None, 1, story("ch1", "ch2", "ch3"))
    assert cache.get("huge", None, 1) is None
    assert cache.get("small", None, 1) is not None
    assert cache.rows == 1


def test_story_cache_entries_are_not_tracked_by_the_collector() -> None:
    cache = StoryCache(100, key_lifetime=60.0)
    cache.put("c1", None, 1, story("ch1", "ch2"))
    # Atomic parts only: the collector stops tracking an entry once it has seen it
    # (the inner tuple of key ids in one pass, the entry in the next).
    gc.collect()
    gc.collect()
    assert [e for e in cache._entries.values() if gc.is_tracked(e)] == []


def test_story_cache_refuses_a_useless_bound() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        StoryCache(0, key_lifetime=60.0)
    with pytest.raises(ValueError, match="key_lifetime"):
        StoryCache(10, key_lifetime=0.0)
