"""Per-customer data keys: creation, unwrapping through a bounded cache, destruction, re-wrap."""

from __future__ import annotations

import random
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from governance.db import Database
from governance.keys import KeyRing, KeyRingError
from governance.models import DATA_KEYS, DataKeyRow

__all__ = ["DataKeys", "KeyCache", "dek_aad"]


def dek_aad(customer_id: str, scope: str, dek_id: str) -> bytes:
    # A wrapped key is bound to its customer, scope and id: copying it to
    # another row makes it fail to unwrap instead of silently decrypting.
    return f"sv:dek:v1|{customer_id}|{scope}|{dek_id}".encode()


_KEYS_FOR_READ = select(
    DATA_KEYS.id, DATA_KEYS.customer_id, DATA_KEYS.scope, DATA_KEYS.kek_version, DATA_KEYS.wrapped
).where(DATA_KEYS.id.in_(bindparam("ids", expanding=True)), DATA_KEYS.destroyed_at.is_(None))


class KeyCache:
    """Unwrapped data keys by id: at most ``size`` of them, each for at most ``ttl``
    seconds.

    Each key is kept for the TTL shortened at random by up to ``spread`` of it
    (``lifetime``), one draw (``expiry``) for the keys loaded together (a read's):
    keys loaded at once, as a warm-up or a restart loads every customer's, then do
    not all expire at once. Measured before (``make bench-soak``): every key of
    5,000 customers expired within the same few seconds, every read in them went
    to the key store, and that minute's p99 was 63.7 ms, against 13.5-50.3 ms in
    the minutes without misses. The TTL stays the bound that erasure's guarantee
    counts on (how long an instance may use a key destroyed through another).

    Oldest first out: insertion order is expiry order to within ``spread`` of the
    TTL, so a key expired behind one that is not yet is dropped when it is looked
    up, or when its turn comes. Entries are (expiry, raw key bytes) tuples in one
    OrderedDict, which the garbage collector does not traverse entry by entry: a
    linked-list cache of tens of thousands of keys made every full collection, and
    so the gated read's tail latency, several times longer. The cache holds the
    keys' bytes, not AESGCM objects: from cryptography 51 on an AESGCM object is
    tracked by the collector (65,000 cached objects made a full collection take
    8.7 ms instead of 1.0), and making one per use costs about 0.5 µs. Not
    thread-safe: ``DataKeys`` holds its lock around every call.
    """

    def __init__(
        self,
        size: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        spread: float = 0.2,
        draw: Callable[[], float] = random.random,
    ) -> None:
        if size < 1 or ttl <= 0:
            raise ValueError("a key cache needs size >= 1 and ttl > 0")
        if not 0 <= spread < 1:
            raise ValueError("a key cache's spread is a fraction of its TTL, in [0, 1)")
        self._size = size
        self._ttl = ttl
        self._spread = spread
        self._clock = clock
        self._draw = draw
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def lifetime(self) -> float:
        """A lifetime for keys loaded together: the TTL less a random part of
        ``spread`` of it."""
        return self._ttl * (1.0 - self._spread * self._draw())

    def expiry(self) -> float:
        """When keys loaded together now expire (now plus a ``lifetime()``): pass it
        to ``put`` for each of them, so that they expire at the same moment."""
        return self._clock() + self.lifetime()

    def get(self, dek_id: str) -> bytes | None:
        entry = self._entries.get(dek_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[dek_id]
            return None
        return entry[1]

    def missing(self, dek_ids: Iterable[str]) -> list[str]:
        """Those of ``dek_ids`` that ``get`` would not find (expired ones are dropped
        as ``get`` drops them): one read of the clock for all of them."""
        entries = self._entries
        now = self._clock()
        out: list[str] = []
        for dek_id in dek_ids:
            entry = entries.get(dek_id)
            if entry is None or entry[0] <= now:
                if entry is not None:
                    del entries[dek_id]
                out.append(dek_id)
        return out

    def put(self, dek_id: str, key: bytes, expires: float | None = None) -> None:
        """Keep ``key`` until ``expires`` (an ``expiry()``; one drawn for this key when
        None), and never past the TTL from now."""
        entries = self._entries
        now = self._clock()
        limit = now + self._ttl
        until = now + self.lifetime() if expires is None else min(expires, limit)
        entries.pop(dek_id, None)
        entries[dek_id] = (until, key)
        # Expired ones first (they are the oldest), then the oldest over the bound.
        while entries:
            oldest_id, (oldest_until, _) = next(iter(entries.items()))
            if oldest_until > now and len(entries) <= self._size:
                break
            del entries[oldest_id]

    @property
    def ttl(self) -> float:
        return self._ttl

    def pop(self, dek_id: str) -> None:
        self._entries.pop(dek_id, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))


class DataKeys:
    """Data keys per (customer, scope); scope is a category name.

    The keys live in the *key store*, a database apart from the story's (a
    sibling SQLite file, or the database named by STORYVAULT_KEYSTORE_URL).
    That separation is what makes erasure reach backups: a copy of the story
    database holds ciphertexts and key ids but no keys, and once a customer's
    keys are destroyed in the live key store, no copy can be decrypted with the
    live key ring. (The key store's own backups get a short retention.)

    Unwrapped keys are cached (bounded size and TTL) so the gated read does
    no KEK work on a warm path; destroying a key evicts it here (and tells
    ``on_forget`` listeners: the story cache drops what it opened). Another
    instance may hold its copy until the TTL ends; erasure also marks the
    categories erased in the story database, which every instance's gated read
    withholds from its next read on, whatever its caches hold.
    """

    def __init__(
        self, ring: KeyRing, store: Database, *, cache_size: int, cache_ttl: float
    ) -> None:
        self.ring = ring
        self.store = store
        self._cache: KeyCache | None = (
            KeyCache(cache_size, cache_ttl) if cache_size and cache_ttl else None
        )
        self._lock = threading.Lock()
        self._forget_listeners: list[Callable[[list[str]], None]] = []
        self.hits = 0
        self.misses = 0

    @property
    def cache_ttl(self) -> float | None:
        """Seconds an unwrapped key stays cached; None when keys are not cached."""
        return None if self._cache is None else self._cache.ttl

    def on_forget(self, listener: Callable[[list[str]], None]) -> None:
        """Call ``listener`` with the ids of keys destroyed (or forgotten) here."""
        self._forget_listeners.append(listener)

    def _remember(self, dek_id: str, key: bytes, expires: float | None = None) -> None:
        if self._cache is not None:
            with self._lock:
                self._cache.put(dek_id, key, expires)

    def forget(self, dek_ids: Iterable[str]) -> None:
        ids = list(dek_ids)
        if self._cache is not None:
            with self._lock:
                for dek_id in ids:
                    self._cache.pop(dek_id)
        for listener in self._forget_listeners:
            listener(ids)

    async def for_write(self, customer_id: str, scope: str) -> tuple[str, AESGCM]:
        """The live key of (customer, scope), created (and committed) on first use.

        The key commits before the values it will seal: a failed story write
        leaves at most an unused key, never a value without its key.
        """
        async with self.store.session() as session:
            row = (
                await session.execute(
                    select(DATA_KEYS.id, DATA_KEYS.kek_version, DATA_KEYS.wrapped)
                    .where(
                        DATA_KEYS.customer_id == customer_id,
                        DATA_KEYS.scope == scope,
                        DATA_KEYS.destroyed_at.is_(None),
                    )
                    .order_by(DATA_KEYS.created_at)
                    .limit(1)
                )
            ).first()
        if row is not None and row.wrapped is not None:
            return row.id, await self._unwrap_one(
                customer_id, scope, row.id, row.kek_version, row.wrapped
            )
        created = await self.create(customer_id, [scope])
        return created[scope]

    async def create(
        self, customer_id: str, scopes: Iterable[str]
    ) -> dict[str, tuple[str, AESGCM]]:
        """Fresh keys for ``scopes`` in one key-store transaction."""
        out: dict[str, tuple[str, AESGCM]] = {}
        rows: list[dict[str, object]] = []
        expires = self._cache.expiry() if self._cache is not None else None
        for scope in dict.fromkeys(scopes):
            dek_id, aead, row = self.new_key(customer_id, scope, expires)
            out[scope] = (dek_id, aead)
            rows.append(row)
        if rows:
            async with self.store.write_session() as session:
                await session.execute(insert(DataKeyRow), rows)
                await session.commit()
        return out

    def new_key(
        self, customer_id: str, scope: str, expires: float | None = None
    ) -> tuple[str, AESGCM, dict[str, object]]:
        """A fresh data key and the row that stores it wrapped by the current KEK
        (cached until ``expires``: see ``KeyCache.put``)."""
        dek_id = str(uuid.uuid4())
        raw = secrets.token_bytes(32)
        version, wrapped = self.ring.wrap(raw, dek_aad(customer_id, scope, dek_id))
        aead = AESGCM(raw)
        self._remember(dek_id, raw, expires)
        row = {
            "id": dek_id,
            "customer_id": customer_id,
            "scope": scope,
            "kek_version": version,
            "wrapped": wrapped,
            "created_at": datetime.now(UTC),
        }
        return dek_id, aead, row

    async def _unwrap_one(
        self, customer_id: str, scope: str, dek_id: str, version: int, wrapped: bytes
    ) -> AESGCM:
        if self._cache is not None:
            with self._lock:
                cached = self._cache.get(dek_id)
            if cached is not None:
                self.hits += 1
                return AESGCM(cached)
        self.misses += 1
        raw = self.ring.unwrap(version, wrapped, dek_aad(customer_id, scope, dek_id))
        self._remember(dek_id, raw)
        return AESGCM(raw)

    async def present(self, dek_ids: Sequence[str]) -> Sequence[str]:
        """Those of ``dek_ids`` that still exist (are not destroyed): from the cache,
        else from the key store (and then cached). ``dek_ids`` itself when all do."""
        cache = self._cache
        if cache is None:
            missing = list(dek_ids)
        else:
            with self._lock:
                missing = cache.missing(dek_ids)
        if not missing:
            self.hits += len(dek_ids)
            return dek_ids
        self.hits += len(dek_ids) - len(missing)
        found = await self.for_read(set(missing))
        gone = set(missing).difference(found)
        return [dek_id for dek_id in dek_ids if dek_id not in gone]

    async def for_read(self, dek_ids: set[str]) -> dict[str, AESGCM]:
        """Unwrapped keys for the given ids; destroyed keys are simply absent."""
        found: dict[str, AESGCM] = {}
        missing: list[str] = []
        cache = self._cache
        if cache is None:
            missing = list(dek_ids)
        else:
            with self._lock:
                for dek_id in dek_ids:
                    key = cache.get(dek_id)
                    if key is None:
                        missing.append(dek_id)
                    else:
                        found[dek_id] = AESGCM(key)
        self.hits += len(found)
        if missing:
            self.misses += len(missing)
            rows = await self.store.read(
                lambda conn: conn.execute(_KEYS_FOR_READ, {"ids": missing}).all()
            )
            # One expiry for the keys of one read (a customer's): they expire
            # together, and the next read loads them in one query again.
            expires = cache.expiry() if cache is not None else None
            for row in rows:
                if row.wrapped is None:
                    continue
                raw = self.ring.unwrap(
                    row.kek_version, row.wrapped, dek_aad(row.customer_id, row.scope, row.id)
                )
                self._remember(row.id, raw, expires)
                found[row.id] = AESGCM(raw)
        return found

    async def destroy(self, customer_id: str, scopes: Iterable[str] | None) -> list[str]:
        """Crypto-shred: forget the wrapped keys of these scopes (all when None)."""
        async with self.store.write_session() as session:
            ids = await self._destroy(session, customer_id, scopes)
            await session.commit()
        self.forget(ids)
        return ids

    async def _destroy(
        self, session: AsyncSession, customer_id: str, scopes: Iterable[str] | None
    ) -> list[str]:
        stmt = select(DATA_KEYS.id).where(
            DATA_KEYS.customer_id == customer_id,
            DATA_KEYS.destroyed_at.is_(None),
        )
        if scopes is not None:
            stmt = stmt.where(DATA_KEYS.scope.in_(list(scopes)))
        ids = list((await session.execute(stmt)).scalars())
        if ids:
            await session.execute(
                update(DataKeyRow)
                .where(DATA_KEYS.id.in_(ids))
                .values(wrapped=None, destroyed_at=datetime.now(UTC))
            )
        return ids

    async def rewrap_batch(self, *, limit: int) -> int:
        """Re-wrap up to ``limit`` live keys not under the current KEK (one transaction)."""
        async with self.store.write_session() as session:
            count = await self._rewrap(session, limit=limit)
            await session.commit()
        return count

    async def _rewrap(self, session: AsyncSession, *, limit: int) -> int:
        current = self.ring.current_kek
        rows = (
            await session.execute(
                select(
                    DATA_KEYS.id,
                    DATA_KEYS.customer_id,
                    DATA_KEYS.scope,
                    DATA_KEYS.kek_version,
                    DATA_KEYS.wrapped,
                )
                .where(
                    DATA_KEYS.kek_version != current,
                    DATA_KEYS.destroyed_at.is_(None),
                )
                .limit(limit)
            )
        ).all()
        for row in rows:
            if row.wrapped is None:
                continue
            aad = dek_aad(row.customer_id, row.scope, row.id)
            raw = self.ring.unwrap(row.kek_version, row.wrapped, aad)
            version, wrapped = self.ring.wrap(raw, aad)
            await session.execute(
                update(DataKeyRow)
                .where(DATA_KEYS.id == row.id, DATA_KEYS.kek_version == row.kek_version)
                .values(kek_version=version, wrapped=wrapped)
            )
        return len(rows)

    async def kek_versions_in_use(self) -> set[int]:
        async with self.store.session() as session:
            rows = await session.execute(
                select(DATA_KEYS.kek_version).where(DATA_KEYS.destroyed_at.is_(None)).distinct()
            )
        return set(rows.scalars())


def check_ring_fits(ring: KeyRing, versions: set[int]) -> None:
    missing = versions - set(ring.keks)
    if missing:
        raise KeyRingError(
            f"the database holds data keys wrapped by KEK versions {sorted(missing)} "
            "that this key ring does not have: wrong key ring for this database"
        )
