"""The encrypted story vault: customers, profile fields and chapters.

Every value is sealed under the customer's data key for its category (see
governance.keys for the associated data that binds it to its row). The vault
itself decides nothing about who may read: the gate does that and asks the
vault for exactly the granted categories.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    DateTime,
    Select,
    String,
    bindparam,
    cast,
    delete,
    insert,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from audit import Prepared
from governance.catalog import Catalog
from governance.datakeys import DataKeys
from governance.db import ReadStep, ReadSteps
from governance.errors import InvalidInput, NotFound
from governance.keys import KeyRing, open_value, seal_value, value_aad
from governance.models import (
    CATEGORY_STATES,
    CHAPTERS,
    CUSTOMERS,
    EMAIL_INDEX,
    PROFILE_VALUES,
    ChapterRow,
    CustomerRow,
    EmailIndexRow,
    ProfileValueRow,
)

__all__ = [
    "CacheHit",
    "CachedStory",
    "Chapter",
    "GatedStory",
    "LoadedStory",
    "OpenedStory",
    "SealedRow",
    "Story",
    "StoryCache",
    "Vault",
    "sealed_rows",
    "story_rows",
    "story_rows_step",
]

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,63}$")
_PHONE = re.compile(r"^\+?[0-9 ()./-]{4,32}$")
MAX_VALUE = 1000
MAX_BODY_BYTES = 64 * 1024


class Chapter(msgspec.Struct, frozen=True):
    """One decrypted chapter (a Struct: built 25 times per gated read, several times
    faster than a frozen dataclass)."""

    id: str
    category: str
    kind: str
    occurred_at: datetime
    author_team: str
    body: dict[str, Any]


@dataclass(slots=True)
class Story:
    customer_id: str
    status: str
    profile: dict[str, str] = field(default_factory=dict)
    profile_categories: dict[str, str] = field(default_factory=dict)
    chapters: list[Chapter] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


_decode_body = msgspec.json.Decoder().decode
"""A chapter body's JSON (validated on write); msgspec's decoder is several times faster
than the standard library's on the read path."""


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The story's stored rows, profile values then chapters in time order, in one round
# trip (UNION ALL). Built once: on the gated read's hot path, building and caching a
# statement per request costs more than running it.
def _story_selects(filtered: bool) -> tuple[Select[Any], Select[Any]]:
    pstmt = select(
        literal(0).label("src"),
        PROFILE_VALUES.field.label("ref"),
        PROFILE_VALUES.category,
        cast(null(), String).label("kind"),
        cast(null(), DateTime(timezone=True)).label("occurred_at"),
        cast(null(), String).label("author_team"),
        PROFILE_VALUES.dek_id,
        PROFILE_VALUES.sealed,
    ).where(PROFILE_VALUES.customer_id == bindparam("customer_id"))
    cstmt = select(
        literal(1).label("src"),
        CHAPTERS.id.label("ref"),
        CHAPTERS.category,
        CHAPTERS.kind,
        CHAPTERS.occurred_at,
        CHAPTERS.author_team,
        CHAPTERS.dek_id,
        CHAPTERS.sealed,
    ).where(CHAPTERS.customer_id == bindparam("customer_id"))
    if filtered:
        pstmt = pstmt.where(PROFILE_VALUES.category.in_(bindparam("categories", expanding=True)))
        cstmt = cstmt.where(CHAPTERS.category.in_(bindparam("categories", expanding=True)))
    return pstmt, cstmt


def _story_union(filtered: bool) -> Select[Any]:
    both = union_all(*_story_selects(filtered)).subquery()
    return select(both).order_by(both.c.src, both.c.occurred_at, both.c.ref)


_STORY_ALL = Prepared(_story_union(filtered=False))
_STORY_IN = _story_union(filtered=True)
_PROFILE_ALL, _CHAPTERS_ALL = _story_selects(filtered=False)
_PROFILE_IN, _CHAPTERS_IN = _story_selects(filtered=True)
_CHAPTERS_ALL_LIMITED = _CHAPTERS_ALL.order_by(CHAPTERS.occurred_at, CHAPTERS.id).limit(
    bindparam("chapter_limit")
)
_CHAPTERS_IN_LIMITED = _CHAPTERS_IN.order_by(CHAPTERS.occurred_at, CHAPTERS.id).limit(
    bindparam("chapter_limit")
)


def story_rows(
    conn: Connection,
    customer_id: str,
    categories: Sequence[str] | None = None,
    chapter_limit: int | None = None,
) -> list[Any]:
    """The stored (sealed) rows of a story in ``categories`` (all when None), for
    ``Vault.open_story``. Synchronous: see ``Database.read``."""
    params: dict[str, Any] = {"customer_id": customer_id}
    if categories is not None:
        if not categories:
            return []
        params["categories"] = list(categories)
    if chapter_limit is None:
        if categories is None:
            return _STORY_ALL.rows(conn, params)
        return [tuple(row) for row in conn.execute(_STORY_IN, params)]
    params["chapter_limit"] = chapter_limit
    profile = _PROFILE_ALL if categories is None else _PROFILE_IN
    chapters = _CHAPTERS_ALL_LIMITED if categories is None else _CHAPTERS_IN_LIMITED
    return [tuple(row) for row in conn.execute(profile, params)] + [
        tuple(row) for row in conn.execute(chapters, params)
    ]


def story_rows_step(customer_id: str, categories: Sequence[str] | None = None) -> ReadStep:
    """``story_rows`` as a step of ``Database.query``: the prepared statement when all
    categories are read, else ``story_rows`` itself (expanding parameters)."""
    if categories is None:
        return (_STORY_ALL, {"customer_id": customer_id})
    wanted = list(categories)
    return lambda conn: story_rows(conn, customer_id, wanted)


SealedRow = tuple[int, str, str, Any, Any, Any, str, bytes, bytes]
"""A row of ``story_rows`` made ready to open: (src, ref, category, kind, occurred_at
in UTC, author_team, dek_id, sealed value, its associated data); kind, occurred_at and
author_team are None for a profile value (src 0). Still a ciphertext."""


def sealed_rows(customer_id: str, rows: Iterable[Sequence[Any]]) -> tuple[SealedRow, ...]:
    """``rows`` of ``story_rows`` with the per-row work that does not need a key done
    once: the value's associated data (``value_aad``) and its time in UTC."""
    out: list[SealedRow] = []
    for src, ref, category, kind, occurred_at, author_team, dek_id, sealed in rows:
        aad = value_aad(customer_id, ref, ref if src == 0 else category, dek_id)
        when = None if occurred_at is None else _as_utc(occurred_at)
        out.append((src, ref, category, kind, when, author_team, dek_id, bytes(sealed), aad))
    return tuple(out)


class OpenedStory(msgspec.Struct, array_like=True, frozen=True):
    """A story's opened values as the story cache seals them: the profile (with each
    field's category and data-key id) and the chapters (with theirs)."""

    profile: dict[str, str]
    profile_categories: dict[str, str]
    profile_keys: dict[str, str]
    chapters: list[Chapter]
    chapter_keys: list[str]


class _CachedHead(msgspec.Struct, array_like=True, frozen=True):
    profile: dict[str, str]
    profile_categories: dict[str, str]


class _CachedKeys(msgspec.Struct, array_like=True, frozen=True):
    profile_keys: dict[str, str]
    chapter_keys: list[str]


_encode = msgspec.json.Encoder().encode
# JSON rather than MessagePack: a chapter body may hold an integer wider than 64 bits,
# which JSON carries as it is.
_decode_head = msgspec.json.Decoder(_CachedHead).decode
_decode_keys = msgspec.json.Decoder(_CachedKeys).decode
_decode_chapters = msgspec.json.Decoder(list[Chapter]).decode
_LENGTH = struct.Struct(">II")


def _encode_opened(story: OpenedStory) -> bytes:
    """The plaintext the story cache seals: the lengths of the first two parts, then
    the profile (with its categories), the data-key ids, and the chapters, each JSON."""
    head = _encode(_CachedHead(story.profile, story.profile_categories))
    keys = _encode(_CachedKeys(story.profile_keys, story.chapter_keys))
    return b"".join((_LENGTH.pack(len(head), len(keys)), head, keys, _encode(story.chapters)))


@dataclass(slots=True, frozen=True)
class CachedStory:
    """An ``OpenedStory`` as a story-cache hit decodes it: the profile decoded; the
    chapters left as the JSON array the cache holds, which is also how a response
    encodes them (the same encoder, the same fields), so a read that masks and drops
    none of them sends that array as it is instead of decoding and encoding every
    chapter; the data-key ids left as JSON too, needed only when a key is gone.
    The parts are framed by their lengths, so a hit does not scan the chapters."""

    profile: dict[str, str]
    profile_categories: dict[str, str]
    chapters: msgspec.Raw
    keys: msgspec.Raw

    @classmethod
    def decode(cls, plain: bytes) -> CachedStory:
        head_len, keys_len = _LENGTH.unpack_from(plain)
        start = _LENGTH.size
        view = memoryview(plain)
        head = _decode_head(view[start : start + head_len])
        start += head_len
        return cls(
            head.profile,
            head.profile_categories,
            msgspec.Raw(view[start + keys_len :]),
            msgspec.Raw(view[start : start + keys_len]),
        )

    def opened(self) -> OpenedStory:
        """The same story with its chapters and data-key ids decoded."""
        keys = _decode_keys(self.keys)
        return OpenedStory(
            self.profile,
            self.profile_categories,
            keys.profile_keys,
            _decode_chapters(self.chapters),
            keys.chapter_keys,
        )


_CacheKey = tuple[str, tuple[str, ...] | None]
# (story_version, key generation, nonce + ciphertext, data-key ids, values, the
# chapters' categories): only atomic parts, so the collector does not track the
# entries.
_CacheEntry = tuple[int, int, bytes, tuple[str, ...], int, tuple[str, ...]]


@dataclass(slots=True, frozen=True)
class CacheHit:
    """A story from the story cache: the story, the ids of the data keys its values
    came from, and the distinct categories of its chapters (taken from the chapters
    when they were cached, so a read knows without decoding them whether a mask
    applies to any)."""

    story: CachedStory
    dek_ids: tuple[str, ...]
    chapter_categories: tuple[str, ...]


_SHARDS = 16
"""Shards of the story cache, each with its own key and its own moment of replacing
it (see ``StoryCache``)."""


class StoryCache:
    """Recently read stories, opened and sealed again under a key of this process.

    Keyed by (customer, categories read): a read loads only its granted
    categories, so each purpose's view is an entry of its own. An entry is used
    only under the customer's ``story_version`` it was loaded at, which the read
    fetches with the customer row anyway; database triggers bump that version on
    every change to the customer's profile values or chapters (migration 0003),
    so a change made through any instance counts from the next read on every
    instance.

    A cached read decrypts one value (the story, AES-256-GCM under the cache's
    key, its associated data binding it to customer, categories and version)
    instead of one per field and chapter. The cache's keys live in this process
    only. Customers fall into ``_SHARDS`` shards (by the hash of their id), each
    with a key of its own, replaced every ``key_lifetime`` seconds; an entry
    sealed under a key older than the one before is unusable and dropped, so
    nothing in the cache can be opened longer than two lifetimes after it was
    written. The shards' replacements are staggered evenly over a lifetime:
    stories cached at once (a warm-up) then expire in ``_SHARDS`` small waves,
    not in one, in which every read would go to the database and decrypt.
    ``Vault`` sets the lifetime to half the data-key cache's TTL: the story
    cache exposes no value for longer than that cache may hold its key. The
    read still asks the key store whether every data key the entry's values
    came from still exists (``DataKeys.present``), so a destroyed key makes its
    values vanish as it does without the cache, and destroying keys through
    this process drops the entries that hold their values (``drop_keys``).

    At most ``max_rows`` values (profile fields and chapters) in all, least
    recently used out first; a story larger than the whole bound is not kept.
    Used on the event loop's thread only (``Database.query`` runs its steps
    there).
    """

    def __init__(
        self, max_rows: int, key_lifetime: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_rows < 1:
            raise ValueError("a story cache needs max_rows >= 1")
        if key_lifetime <= 0:
            raise ValueError("a story cache needs key_lifetime > 0")
        self._max_rows = max_rows
        self._lifetime = key_lifetime
        self._clock = clock
        self._rows = 0
        self._entries: OrderedDict[_CacheKey, _CacheEntry] = OrderedDict()
        # Each shard's keys by generation, and the step (a lifetime / _SHARDS) at
        # which the generations were last brought up to date.
        self._keys: list[dict[int, AESGCM]] = [{} for _ in range(_SHARDS)]
        self._step: int | None = None
        self.hits = 0
        self.misses = 0

    def _generation(self, shard: int, now: float) -> int:
        return int((now + shard * self._lifetime / _SHARDS) // self._lifetime)

    def _current(self, shard: int) -> tuple[int, AESGCM]:
        """The shard's current generation and its key. Whenever some shard's
        generation may have moved on (every ``_SHARDS``-th of a lifetime), every
        shard whose has gets a new key and forgets those older than the previous
        generation (checked on every use, as the data-key cache checks its expiry)."""
        now = self._clock()
        step = int(now // (self._lifetime / _SHARDS))
        if step != self._step:
            for other in range(_SHARDS):
                self._key(other, self._generation(other, now))
            self._step = step
        # Again for this shard: a step's boundary and its generation's may fall a
        # rounding error apart.
        generation = self._generation(shard, now)
        return generation, self._key(shard, generation)

    def _key(self, shard: int, generation: int) -> AESGCM:
        """The shard's key of ``generation``, made (and older ones than the one before
        it forgotten) if it is new."""
        keys = self._keys[shard]
        key = keys.get(generation)
        if key is None:
            keys = self._keys[shard] = {g: k for g, k in keys.items() if g >= generation - 1}
            key = keys[generation] = AESGCM(AESGCM.generate_key(bit_length=256))
        return key

    @staticmethod
    def _aad(customer_id: str, categories: tuple[str, ...] | None, version: int) -> bytes:
        wanted = "*" if categories is None else ",".join(categories)
        return f"{customer_id}\x1f{wanted}\x1f{version}".encode()

    def get(
        self, customer_id: str, categories: tuple[str, ...] | None, version: int
    ) -> CacheHit | None:
        """The cached story, or None (not cached, changed since, or sealed under a key
        now gone)."""
        key = (customer_id, categories)
        entry = self._entries.get(key)
        if entry is None or entry[0] != version:
            self.misses += 1
            return None
        _, generation, sealed, dek_ids, _, chapter_categories = entry
        shard = hash(customer_id) % _SHARDS
        self._current(shard)
        aead = self._keys[shard].get(generation)
        if aead is None:
            self._remove(key)
            self.misses += 1
            return None
        try:
            plain = aead.decrypt(
                sealed[:12], sealed[12:], self._aad(customer_id, categories, version)
            )
        except InvalidTag:  # not what was sealed for this key: never served
            self._remove(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return CacheHit(CachedStory.decode(plain), dek_ids, chapter_categories)

    def put(
        self,
        customer_id: str,
        categories: tuple[str, ...] | None,
        version: int,
        story: OpenedStory,
    ) -> None:
        key = (customer_id, categories)
        self._remove(key)
        rows = len(story.profile) + len(story.chapters)
        if rows > self._max_rows:
            return
        generation, aead = self._current(hash(customer_id) % _SHARDS)
        nonce = os.urandom(12)
        sealed = nonce + aead.encrypt(
            nonce, _encode_opened(story), self._aad(customer_id, categories, version)
        )
        dek_ids = tuple(set(story.profile_keys.values()).union(story.chapter_keys))
        # Interned: the few category names are then shared by every entry.
        in_chapters = tuple(sorted({sys.intern(c.category) for c in story.chapters}))
        self._entries[key] = (version, generation, sealed, dek_ids, rows, in_chapters)
        self._rows += rows
        while self._rows > self._max_rows:
            _, evicted = self._entries.popitem(last=False)
            self._rows -= evicted[4]

    def _remove(self, key: _CacheKey) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._rows -= old[4]

    def drop_keys(self, dek_ids: Iterable[str]) -> None:
        """Forget every entry holding a value sealed under one of ``dek_ids`` (their
        keys were destroyed). Walks all entries: erasure is rare, and an index by
        key would be one more object per key for the collector to walk."""
        gone = set(dek_ids)
        if not gone:
            return
        for key in [k for k, e in self._entries.items() if not gone.isdisjoint(e[3])]:
            self._remove(key)

    @property
    def rows(self) -> int:
        """Values held (profile fields and chapters), over all entries."""
        return self._rows

    def clear(self) -> None:
        self._entries.clear()
        self._rows = 0

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True, frozen=True)
class LoadedStory:
    """What a gated read's database visit found of the story (``Vault.cached_story``):
    the story from the story cache, or its sealed rows."""

    customer_id: str
    categories: tuple[str, ...] | None
    version: int
    rows: tuple[SealedRow, ...]
    cached: CacheHit | None


@dataclass(slots=True, frozen=True)
class GatedStory:
    """A story as the gated read opens it (``Vault.open_loaded``). ``chapters`` is
    either the opened chapters or, when they came from the story cache with every
    data key still there, the JSON array the cache holds (``msgspec.Raw``: the
    chapters exactly as a response encodes them), whose distinct categories are
    ``chapter_categories``; ``opened_chapters`` decodes it."""

    customer_id: str
    status: str
    profile: dict[str, str]
    profile_categories: dict[str, str]
    chapters: list[Chapter] | msgspec.Raw
    chapter_categories: tuple[str, ...]  # no default: masks are checked against it

    def opened_chapters(self) -> list[Chapter]:
        chapters = self.chapters
        return _decode_chapters(chapters) if isinstance(chapters, msgspec.Raw) else chapters


def _keeping_keys(opened: OpenedStory, present: set[str]) -> OpenedStory:
    """``opened`` without the values whose data keys are gone (destroyed since it was
    cached, through another instance)."""
    fields = [f for f, k in opened.profile_keys.items() if k in present]
    kept = [
        (c, k) for c, k in zip(opened.chapters, opened.chapter_keys, strict=True) if k in present
    ]
    return OpenedStory(
        {f: opened.profile[f] for f in fields},
        {f: opened.profile_categories[f] for f in fields},
        {f: opened.profile_keys[f] for f in fields},
        [c for c, _ in kept],
        [k for _, k in kept],
    )


class Vault:
    def __init__(
        self, ring: KeyRing, catalog: Catalog, keys: DataKeys, *, story_cache_rows: int = 0
    ) -> None:
        self.ring = ring
        self.catalog = catalog
        self.keys = keys
        # The story cache holds opened values (sealed under a key of its own), so it
        # exists only with a data-key cache and forgets within that cache's TTL.
        ttl = keys.cache_ttl
        self.story_cache = (
            StoryCache(story_cache_rows, key_lifetime=ttl / 2)
            if story_cache_rows > 0 and ttl is not None
            else None
        )
        if self.story_cache is not None:
            keys.on_forget(self.story_cache.drop_keys)

    def cached_story(
        self, customer_id: str, version: int, categories: Sequence[str] | None
    ) -> ReadSteps[LoadedStory]:
        """The story in ``categories`` (all when None) at the customer's current
        ``story_version``: from the story cache when it has it, else its
        ``sealed_rows`` (steps for ``Database.query``); ``open_loaded`` opens either."""
        cache = self.story_cache
        wanted = None if categories is None else tuple(categories)
        if cache is not None:
            cached = cache.get(customer_id, wanted, version)
            if cached is not None:
                return LoadedStory(customer_id, wanted, version, (), cached)
        rows = sealed_rows(customer_id, (yield story_rows_step(customer_id, categories)))
        return LoadedStory(customer_id, wanted, version, rows, None)

    async def open_loaded(self, status: str, loaded: LoadedStory) -> GatedStory:
        """The story of ``cached_story``. A cached story keeps only the values whose
        data keys still exist; one opened from its rows goes into the cache."""
        customer_id = loaded.customer_id
        hit = loaded.cached
        if hit is not None:
            cached, dek_ids = hit.story, hit.dek_ids
            present = await self.keys.present(dek_ids)
            if len(present) == len(dek_ids):
                return GatedStory(
                    customer_id,
                    status,
                    cached.profile,
                    cached.profile_categories,
                    cached.chapters,
                    hit.chapter_categories,
                )
            opened = _keeping_keys(cached.opened(), set(present))
            return GatedStory(
                customer_id,
                status,
                opened.profile,
                opened.profile_categories,
                opened.chapters,
                (),  # opened chapters: each is masked by its own category
            )
        cache = self.story_cache
        if cache is None:
            story = await self.open_story(customer_id, status, loaded.rows)
        else:
            profile_keys: dict[str, str] = {}
            chapter_keys: list[str] = []
            story = await self.open_story(
                customer_id, status, loaded.rows, (profile_keys, chapter_keys)
            )
            cache.put(
                customer_id,
                loaded.categories,
                loaded.version,
                OpenedStory(
                    story.profile,
                    story.profile_categories,
                    profile_keys,
                    story.chapters,
                    chapter_keys,
                ),
            )
        return GatedStory(
            customer_id, status, story.profile, story.profile_categories, story.chapters, ()
        )

    # --- validation ----------------------------------------------------
    def validate_profile(
        self, profile: Mapping[str, object], *, allow_null: bool = False
    ) -> dict[str, str | None]:
        """Check field names and shapes; messages name the field, never the value."""
        clean: dict[str, str | None] = {}
        for name, raw in profile.items():
            spec = self.catalog.profile_fields.get(name)
            if spec is None:
                raise InvalidInput(f"unknown profile field '{name[:40]}'", code="unknown_field")
            if raw is None and allow_null:
                clean[name] = None
                continue
            if not isinstance(raw, str):
                raise InvalidInput(f"profile field '{name}' must be a string", code="invalid_value")
            value = raw.strip()
            if not value or len(value) > MAX_VALUE:
                raise InvalidInput(
                    f"profile field '{name}' must be 1 to {MAX_VALUE} characters",
                    code="invalid_value",
                )
            if spec.type == "email" and not _EMAIL.match(value):
                raise InvalidInput(
                    f"profile field '{name}' is not an e-mail address", code="invalid_value"
                )
            if spec.type == "phone" and not _PHONE.match(value):
                raise InvalidInput(
                    f"profile field '{name}' is not a phone number", code="invalid_value"
                )
            if spec.type == "date":
                try:
                    date.fromisoformat(value)
                except ValueError:
                    raise InvalidInput(
                        f"profile field '{name}' must be a date (YYYY-MM-DD)", code="invalid_value"
                    ) from None
            clean[name] = value
        return clean

    def validate_chapter(self, category: str, kind: str, body: object) -> bytes:
        cat = self.catalog.categories.get(category)
        if cat is None:
            raise InvalidInput(f"unknown category '{category[:120]}'", code="unknown_category")
        if kind not in cat.chapter_kinds:
            raise InvalidInput(
                f"chapter kind '{kind[:40]}' does not belong to category '{category}'",
                code="invalid_kind",
            )
        if not isinstance(body, dict):
            raise InvalidInput("chapter body must be a JSON object", code="invalid_value")
        encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        if len(encoded) > MAX_BODY_BYTES:
            raise InvalidInput(f"chapter body exceeds {MAX_BODY_BYTES} bytes", code="too_large")
        return encoded

    # --- writes ----------------------------------------------------------
    async def _seal_profile(
        self, session: AsyncSession, customer_id: str, values: Mapping[str, str], now: datetime
    ) -> None:
        for name, value in values.items():
            category = self.catalog.profile_fields[name].category
            dek_id, aead = await self.keys.for_write(customer_id, category)
            sealed = seal_value(aead, value.encode(), value_aad(customer_id, name, name, dek_id))
            await session.merge(
                ProfileValueRow(
                    customer_id=customer_id,
                    field=name,
                    category=category,
                    dek_id=dek_id,
                    sealed=sealed,
                    updated_at=now,
                )
            )
            if self.catalog.profile_fields[name].type == "email":
                await session.execute(
                    delete(EmailIndexRow).where(EMAIL_INDEX.customer_id == customer_id)
                )
                session.add(
                    EmailIndexRow(blind_index=self.ring.blind_index(value), customer_id=customer_id)
                )

    async def create_customer(
        self, session: AsyncSession, *, external_ref: str | None, profile: Mapping[str, str]
    ) -> str:
        """Insert a customer with its profile in a few bulk statements (no read-back)."""
        customer_id = str(uuid.uuid4())
        now = _now()
        await session.execute(
            insert(CustomerRow).values(
                id=customer_id,
                subject=self.ring.pseudonym(customer_id),
                external_ref=external_ref,
                status="active",
                created_at=now,
                updated_at=now,
            )
        )
        keys = await self.keys.create(
            customer_id, [self.catalog.profile_fields[name].category for name in profile]
        )
        value_rows: list[dict[str, object]] = []
        for name, value in profile.items():
            category = self.catalog.profile_fields[name].category
            dek_id, aead = keys[category]
            value_rows.append(
                {
                    "customer_id": customer_id,
                    "field": name,
                    "category": category,
                    "dek_id": dek_id,
                    "sealed": seal_value(
                        aead, value.encode(), value_aad(customer_id, name, name, dek_id)
                    ),
                    "updated_at": now,
                }
            )
            if self.catalog.profile_fields[name].type == "email":
                await session.execute(
                    insert(EmailIndexRow).values(
                        blind_index=self.ring.blind_index(value), customer_id=customer_id
                    )
                )
        if value_rows:
            await session.execute(insert(ProfileValueRow), value_rows)
        return customer_id

    async def customer(self, session: AsyncSession, customer_id: str) -> CustomerRow | None:
        return await session.get(CustomerRow, customer_id)

    async def category_states(
        self, session: AsyncSession, customer_id: str
    ) -> dict[str, tuple[str, str | None]]:
        rows = await session.execute(
            select(
                CATEGORY_STATES.category, CATEGORY_STATES.state, CATEGORY_STATES.hold_purpose
            ).where(CATEGORY_STATES.customer_id == customer_id)
        )
        return {r.category: (r.state, r.hold_purpose) for r in rows}

    async def require_active(self, session: AsyncSession, customer_id: str) -> CustomerRow:
        row = await session.get(CustomerRow, customer_id)
        if row is None or row.status == "erased":
            raise NotFound("no such customer", code="customer_not_found")
        return row

    async def update_profile(
        self, session: AsyncSession, customer_id: str, changes: Mapping[str, str | None]
    ) -> None:
        now = _now()
        await self._seal_profile(
            session, customer_id, {k: v for k, v in changes.items() if v is not None}, now
        )
        removed = [k for k, v in changes.items() if v is None]
        if removed:
            await session.execute(
                delete(ProfileValueRow).where(
                    PROFILE_VALUES.customer_id == customer_id,
                    PROFILE_VALUES.field.in_(removed),
                )
            )
            if any(self.catalog.profile_fields[k].type == "email" for k in removed):
                await session.execute(
                    delete(EmailIndexRow).where(EMAIL_INDEX.customer_id == customer_id)
                )
        await session.execute(
            update(CustomerRow).where(CUSTOMERS.id == customer_id).values(updated_at=now)
        )

    async def add_chapter(
        self,
        session: AsyncSession,
        customer_id: str,
        *,
        category: str,
        kind: str,
        occurred_at: datetime,
        body: bytes,
        author_team: str,
    ) -> str:
        chapter_id = str(uuid.uuid4())
        dek_id, aead = await self.keys.for_write(customer_id, category)
        sealed = seal_value(aead, body, value_aad(customer_id, chapter_id, category, dek_id))
        session.add(
            ChapterRow(
                id=chapter_id,
                customer_id=customer_id,
                category=category,
                kind=kind,
                occurred_at=_as_utc(occurred_at),
                author_team=author_team,
                dek_id=dek_id,
                sealed=sealed,
                created_at=_now(),
            )
        )
        return chapter_id

    # --- reads -----------------------------------------------------------
    async def find_by_email(self, session: AsyncSession, email: str) -> list[str]:
        rows = await session.execute(
            select(EMAIL_INDEX.customer_id)
            .join(CustomerRow, CUSTOMERS.id == EMAIL_INDEX.customer_id)
            .where(
                EMAIL_INDEX.blind_index == self.ring.blind_index(email),
                CUSTOMERS.status != "erased",
            )
            .order_by(EMAIL_INDEX.customer_id)
        )
        return list(rows.scalars())

    async def read_story(
        self,
        session: AsyncSession,
        customer_id: str,
        categories: Iterable[str] | None = None,
        *,
        chapter_limit: int | None = None,
        customer: CustomerRow | None = None,
    ) -> Story:
        """Decrypt the story's parts in ``categories`` (all when None)."""
        if customer is None:
            customer = await self.require_active(session, customer_id)
        wanted = None if categories is None else list(categories)
        if wanted is not None and not wanted:
            return Story(customer_id=customer_id, status=customer.status)
        rows = await session.run_sync(
            lambda s: story_rows(s.connection(), customer_id, wanted, chapter_limit)
        )
        return await self.open_story(customer_id, customer.status, sealed_rows(customer_id, rows))

    async def open_story(
        self,
        customer_id: str,
        status: str,
        rows: Sequence[SealedRow],
        noted: tuple[dict[str, str], list[str]] | None = None,
    ) -> Story:
        """Decrypt the rows of ``sealed_rows``; values whose key was destroyed are gone.
        With ``noted`` (profile field -> key id, chapter key ids in order), notes there
        the data key each opened value came from, for the story cache."""
        story = Story(customer_id=customer_id, status=status)
        if not rows:
            return story
        # Rows are unpacked by position: attribute access on a Row costs about a
        # microsecond each, a fifth of a gated read's decryption work.
        keys = await self.keys.for_read({r[6] for r in rows})
        for src, ref, category, kind, occurred_at, author_team, dek_id, sealed, aad in rows:
            aead = keys.get(dek_id)
            if aead is None:
                continue  # its key was destroyed: the value no longer exists
            if src == 0:
                story.profile[ref] = open_value(aead, sealed, aad).decode()
                story.profile_categories[ref] = category
                if noted is not None:
                    noted[0][ref] = dek_id
                continue
            body = open_value(aead, sealed, aad)
            story.chapters.append(
                Chapter(ref, category, kind, occurred_at, author_team, _decode_body(body))
            )
            if noted is not None:
                noted[1].append(dek_id)
        return story
