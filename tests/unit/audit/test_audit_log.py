"""TransparencyLog on a database: incremental tree, reads, proofs, sequencing."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import asyncpg
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit import (
    DEFAULT_LOCK_ID,
    EntryNotFound,
    InvalidProofRequest,
    InvalidQuery,
    TransparencyLog,
    TreeHeadNotFound,
    encode_leaf,
    leaf_hash,
    merkle_tree_hash,
    nodes,
    tree_heads,
    verify_consistency,
    verify_inclusion,
    verify_log,
)
from audit._pg_append import APPEND_FUNCTION, NEWEST_HEAD_SQL
from tests.pgserver import PgServer


async def _fill(log: TransparencyLog, kit: type, sizes: list[int]) -> None:
    n = 0
    for size in sizes:
        await log.append([kit.make_entry(n + i) for i in range(size)])
        n += size


async def test_incremental_roots_equal_full_recomputation(
    audit_log: TransparencyLog, audit_engine: AsyncEngine, kit: type
) -> None:
    rng = random.Random(9162)
    sizes = [1, 1, 2, 3, 1, 7, 8, 16, 5, 33, 64, 1, 100, 2, 255, 256, 1, 3]
    sizes += [rng.randint(1, 40) for _ in range(15)]
    hashes: list[bytes] = []
    for size in sizes:
        start = len(hashes)
        result = await audit_log.append([kit.make_entry(start + i) for i in range(size)])
        assert result.indexes == range(start, start + size)
        for i in range(size):
            stored = await audit_log.get_entry(start + i) if i in (0, size - 1) else None
            hashes.append(leaf_hash(_leaf(kit, start + i)))
            if stored is not None:
                assert stored.leaf_hash == hashes[-1]
        assert result.tree_head.root_hash == merkle_tree_hash(hashes)
    assert await audit_log.size() == len(hashes)
    # Roots of every past size come from stored subtrees alone.
    for size in rng.sample(range(1, len(hashes) + 1), 40):
        assert await audit_log.root_at(size) == merkle_tree_hash(hashes[:size])
    async with audit_engine.connect() as conn:
        node_count = (await conn.execute(select(func.count()).select_from(nodes))).scalar()
        head_count = (await conn.execute(select(func.count()).select_from(tree_heads))).scalar()
    n = len(hashes)
    assert node_count == sum(n >> level for level in range(n.bit_length()))
    assert head_count == len(sizes)


def _leaf(kit: type, i: int) -> bytes:
    leaf: bytes = encode_leaf(kit.make_entry(i))
    return leaf


async def test_get_entry_returns_the_exact_leaf_bytes(
    audit_log: TransparencyLog, kit: type
) -> None:
    await _fill(audit_log, kit, [3])
    stored = await audit_log.get_entry(1)
    assert stored.leaf_index == 1
    assert stored.entry == kit.make_entry(1)
    assert stored.leaf == _leaf(kit, 1)
    assert stored.leaf_hash == leaf_hash(stored.leaf)
    with pytest.raises(EntryNotFound) as raised:
        await audit_log.get_entry(3)
    assert raised.value.kind == "not_found"


async def test_list_entries_filters_and_paginates(audit_log: TransparencyLog, kit: type) -> None:
    entries = [kit.make_entry(i, subject="alice" if i % 4 == 0 else "bob") for i in range(40)]
    entries += [kit.make_entry(i, team="support") for i in range(40, 45)]
    await audit_log.append(entries)

    seen: list[int] = []
    cursor = None
    while True:
        page = await audit_log.list_entries(subject="alice", limit=3, cursor=cursor)
        seen += [s.leaf_index for s in page.items]
        assert all(s.entry.subject == "alice" for s in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == list(range(0, 40, 4))

    support = await audit_log.list_entries(team="support", limit=100)
    assert [s.leaf_index for s in support.items] == list(range(40, 45))
    assert support.next_cursor is None

    purpose = await audit_log.list_entries(purpose="marketing.email", subject="bob")
    assert {s.entry.purpose for s in purpose.items} == {"marketing.email"}

    since = kit.base_time + timedelta(seconds=10)
    window = await audit_log.list_entries(since=since, until=since + timedelta(seconds=5))
    assert [s.leaf_index for s in window.items] == list(range(10, 15))

    latest = await audit_log.list_entries(descending=True, limit=2)
    assert [s.leaf_index for s in latest.items] == [44, 43]
    older = await audit_log.list_entries(descending=True, limit=2, cursor=latest.next_cursor)
    assert [s.leaf_index for s in older.items] == [42, 41]

    denials = await audit_log.list_entries(kinds=["denial"])
    assert [s.leaf_index for s in denials.items] == list(range(0, 45, 3))

    with pytest.raises(InvalidQuery):
        await audit_log.list_entries(limit=0)


async def test_tree_heads(audit_log: TransparencyLog, kit: type) -> None:
    assert await audit_log.latest_tree_head() is None
    assert await audit_log.size() == 0
    await _fill(audit_log, kit, [2, 3])
    head = await audit_log.latest_tree_head()
    assert head is not None
    assert head.tree_size == 5
    assert (await audit_log.get_tree_head(2)).tree_size == 2
    with pytest.raises(TreeHeadNotFound):
        await audit_log.get_tree_head(3)


async def test_proof_requests_out_of_range_are_invalid(
    audit_log: TransparencyLog, kit: type
) -> None:
    await _fill(audit_log, kit, [5])
    for call in (
        audit_log.inclusion_proof(5),
        audit_log.inclusion_proof(0, 6),
        audit_log.inclusion_proof(-1),
        audit_log.inclusion_proof(0, 0),
        audit_log.consistency_proof(0, 5),
        audit_log.consistency_proof(3, 2),
        audit_log.consistency_proof(1, 6),
        audit_log.root_at(0),
    ):
        with pytest.raises(InvalidProofRequest) as raised:
            await call
        assert raised.value.kind == "invalid"


async def test_append_refuses_an_empty_batch(audit_log: TransparencyLog) -> None:
    with pytest.raises(ValueError, match="at least one"):
        await audit_log.append([])


@pytest.fixture
async def filled_log(audit_log: TransparencyLog, kit: type) -> tuple[TransparencyLog, list[bytes]]:
    rng = random.Random(1)
    n = 0
    while n < 150:
        size = rng.randint(1, 20)
        await audit_log.append([kit.make_entry(n + i) for i in range(size)])
        n += size
    return audit_log, [leaf_hash(_leaf(kit, i)) for i in range(n)]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_stored_proofs_verify_for_any_sizes(
    filled_log: tuple[TransparencyLog, list[bytes]], data: st.DataObject
) -> None:
    log, hashes = filled_log
    n = len(hashes)
    second = data.draw(st.integers(1, n), label="second")
    first = data.draw(st.integers(1, second), label="first")
    index = data.draw(st.integers(0, second - 1), label="index")
    root2 = merkle_tree_hash(hashes[:second])
    root1 = merkle_tree_hash(hashes[:first])

    inclusion = await log.inclusion_proof(index, second)
    assert inclusion.leaf_hash == hashes[index]
    assert verify_inclusion(index, second, hashes[index], list(inclusion.audit_path), root2)

    consistency = await log.consistency_proof(first, second)
    assert verify_consistency(first, second, list(consistency.proof), root1, root2)

    bit = data.draw(st.integers(0, 255), label="bit")
    if inclusion.audit_path:
        path = list(inclusion.audit_path)
        mutated = bytearray(path[0])
        mutated[bit // 8] ^= 1 << (bit % 8)
        path[0] = bytes(mutated)
        assert not verify_inclusion(index, second, hashes[index], path, root2)


async def test_proofs_default_to_the_current_size(
    filled_log: tuple[TransparencyLog, list[bytes]],
) -> None:
    log, hashes = filled_log
    proof = await log.inclusion_proof(3)
    assert proof.tree_size == len(hashes)
    consistency = await log.consistency_proof(10)
    assert consistency.second == len(hashes)


async def test_two_processes_get_one_total_order(
    audit_engine: AsyncEngine, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    # A second engine on the same database file stands in for a second process.
    url = audit_engine.url
    other = create_async_engine(url, connect_args={"timeout": 30})
    try:
        logs = [
            TransparencyLog(audit_engine, signing_key, kit.key_id),
            TransparencyLog(other, signing_key, kit.key_id),
        ]

        async def worker(w: int) -> list[int]:
            got: list[int] = []
            for b in range(8):
                batch = [kit.make_entry(1000 * w + 10 * b + i) for i in range(3)]
                got += list((await logs[w % 2].append(batch)).indexes)
            return got

        results = await asyncio.gather(*(worker(w) for w in range(4)))
        all_indexes = sorted(i for r in results for i in r)
        assert all_indexes == list(range(4 * 8 * 3))
        report = await verify_log(audit_engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert report.tree_heads_checked == 4 * 8
    finally:
        await other.dispose()


def test_unsupported_dialect_is_refused(signing_key: Ed25519PrivateKey) -> None:
    engine = SimpleNamespace(dialect=SimpleNamespace(name="mysql"))
    with pytest.raises(ValueError, match="runs on"):
        TransparencyLog(engine, signing_key, "k")  # type: ignore[arg-type]


@pytest.mark.postgres
async def test_asyncpg_appends_extend_the_same_tree(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """``append_pg`` (asyncpg, no SQLAlchemy) and ``append`` build one tree: batches
    alternate between them and a fresh log object, whose first append must read the
    right edge from the stored nodes; every root equals a full recomputation."""
    audit_engine = create_async_engine(audit_pg_url)
    await kit.prepare_schema(audit_engine)
    dsn = audit_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        hashes: list[bytes] = []
        for round_, size in enumerate([1, 2, 5, 8, 3, 16, 1, 7]):
            start = len(hashes)
            batch = [kit.make_entry(start + i) for i in range(size)]
            if round_ % 3 == 0:
                result = await TransparencyLog(audit_engine, signing_key, kit.key_id).append(batch)
            else:
                # a new object each time: its edge memo is empty, so it reads the nodes
                log = TransparencyLog(audit_engine, signing_key, kit.key_id)
                async with conn.transaction():
                    result = await log.append_pg(conn, batch)
                    if round_ % 2:  # and a second batch on the same object uses its memo
                        hashes += [leaf_hash(_leaf(kit, start + i)) for i in range(size)]
                        start = len(hashes)
                        batch = [kit.make_entry(start + i) for i in range(size)]
                        result = await log.append_pg(conn, batch)
            assert result.indexes == range(start, start + size)
            hashes += [leaf_hash(_leaf(kit, start + i)) for i in range(size)]
            assert result.tree_head.root_hash == merkle_tree_hash(hashes)
        with pytest.raises(ValueError, match="at least one entry"):
            async with conn.transaction():
                await TransparencyLog(audit_engine, signing_key, kit.key_id).append_pg(conn, [])
        report = await verify_log(audit_engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert report.entries_checked == len(hashes)
    finally:
        await conn.close()
        await audit_engine.dispose()


@pytest.mark.postgres
async def test_asyncpg_appends_store_the_columns_the_filters_read(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """``append_pg`` writes a batch as one statement over column arrays: each
    entry's filter columns (subject, team, purpose, kind, time), absent ones as
    NULL, land in its own row, as ``append`` stores them."""
    audit_engine = create_async_engine(audit_pg_url)
    await kit.prepare_schema(audit_engine)
    dsn = audit_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        batch = [kit.make_entry(i, subject="alice" if i % 4 == 0 else "bob") for i in range(12)]
        batch.append(msgspec.structs.replace(kit.make_entry(12), subject=None, purpose=None))
        batch += [kit.make_entry(i, team="support") for i in range(13, 16)]
        log = TransparencyLog(audit_engine, signing_key, kit.key_id)
        async with conn.transaction():
            result = await log.append_pg(conn, batch)
        assert result.indexes == range(16)

        alice = await log.list_entries(subject="alice")
        assert [s.leaf_index for s in alice.items] == [0, 4, 8]
        support = await log.list_entries(team="support")
        assert [s.leaf_index for s in support.items] == [13, 14, 15]
        email = await log.list_entries(purpose="marketing.email")
        assert [s.leaf_index for s in email.items] == [1, 3, 5, 7, 9, 11, 13, 15]
        since = kit.base_time + timedelta(seconds=3)
        window = await log.list_entries(since=since, until=since + timedelta(seconds=3))
        assert [s.leaf_index for s in window.items] == [3, 4, 5]
        denials = await log.list_entries(kinds=["denial"])
        assert [s.leaf_index for s in denials.items] == [0, 3, 6, 9, 12, 15]
        stored = await log.get_entry(12)
        assert stored.entry == batch[12]
        row = await conn.fetchrow(
            "SELECT subject, purpose, actor FROM audit_entries WHERE leaf_index = 12"
        )
        assert tuple(row) == (None, None, "marketing")
        report = await verify_log(audit_engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert (report.entries_checked, report.tree_heads_checked) == (16, 1)
    finally:
        await conn.close()
        await audit_engine.dispose()


@pytest.mark.postgres
async def test_asyncpg_appends_store_every_value_exactly_as_sqlalchemy_does(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """The asyncpg paths send a batch's rows as JSON (bytes in base64): leaves with
    quotes, backslashes, control characters and letters beyond ASCII, timestamps to
    the microsecond, absent columns and the longest values a column takes are stored
    byte for byte as ``append`` (SQLAlchemy) stores the same batch, and a value too
    long for its column refuses the whole batch."""
    awkward = [
        msgspec.structs.replace(
            kit.make_entry(i),
            actor=actor,
            subject=subject,
            purpose=purpose,
            detail={"note": note, "n": -(2**53) + 1 + i},
            timestamp=kit.base_time + timedelta(seconds=i, microseconds=micro),
        )
        for i, (actor, subject, purpose, note, micro) in enumerate(
            [
                ('te"am\\', "Zoë 💡", None, "line\nbreak\ttab\u0001", 1),
                ("a" * 128, "s" * 128, "p" * 128, "'; DROP TABLE audit_entries; --", 999_999),
                ("日本", None, "marketing.email", "\u2028\u2029", 0),
                ("base64+/=", "cust-=", "x", "", 500_000),
            ]
        )
    ]

    async def stored(engine: AsyncEngine) -> list[tuple[object, ...]]:
        async with engine.connect() as conn:
            rows = await conn.exec_driver_sql(
                "SELECT leaf_index, leaf, leaf_hash, kind, actor, subject, purpose, created_at"
                " FROM audit_entries ORDER BY leaf_index"
            )
            entry_rows = [tuple(r) for r in rows]
            rows = await conn.exec_driver_sql(
                "SELECT level, node_index, hash FROM audit_nodes ORDER BY level, node_index"
            )
            return entry_rows + [tuple(r) for r in rows]

    engine, dsn = await _pg_log(audit_pg_url, kit)
    try:
        await TransparencyLog(engine, signing_key, kit.key_id).append(awkward)
        expected = await stored(engine)
        await kit.prepare_schema(engine)
        log = TransparencyLog(engine, signing_key, kit.key_id)
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():  # the locked way (``append_pg``)
                await log.append_pg(conn, awkward[:1])
            async with conn.transaction():
                await log.append_pg(conn, awkward[1:2])
            assert log.may_go_alone
            assert await log.append_pg_alone(conn, awkward[2:]) is not None  # the lone way
            too_long = msgspec.structs.replace(kit.make_entry(9), actor="a" * 129)
            with pytest.raises(DBAPIError):
                await log.append_pg_alone(conn, [too_long])
        finally:
            await conn.close()
        assert await stored(engine) == expected
        assert [r[4] for r in expected[:4]] == [e.actor for e in awkward]
        assert [r[7] for r in expected[:4]] == [e.timestamp.replace(tzinfo=None) for e in awkward]
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert report.entries_checked == 4
        assert [(await log.get_entry(i)).entry for i in range(4)] == awkward
    finally:
        await engine.dispose()


async def _pg_log(audit_pg_url: str, kit: type) -> tuple[AsyncEngine, str]:
    engine = create_async_engine(audit_pg_url)
    await kit.prepare_schema(engine)
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    return engine, dsn


async def _ready_to_go_alone(log: TransparencyLog, conn: asyncpg.Connection, kit: type) -> None:
    """Two locked batches of two entries: the second finds the log as the first left
    it, so ``log`` may go alone next (the log then holds four entries)."""
    for _ in range(2):
        async with conn.transaction():
            await log.append_pg(conn, [kit.make_entry(0), kit.make_entry(1)])
    assert log.may_go_alone


async def _stored_size(conn: asyncpg.Connection) -> tuple[int, int]:
    """(entries, tree heads) stored."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM audit_entries), (SELECT count(*) FROM audit_tree_heads)"
    )
    return int(row[0]), int(row[1])


@pytest.mark.postgres
async def test_a_lone_writer_appends_in_one_statement_and_builds_the_same_tree(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """``append_pg_alone`` writes nothing (and returns None at once) until a locked
    append has found the log as the object left it; from then on every batch goes
    alone, outside any transaction, and the tree is the one a full recomputation
    gives, verified end to end."""
    engine, dsn = await _pg_log(audit_pg_url, kit)
    conn = await asyncpg.connect(dsn)
    try:
        log = TransparencyLog(engine, signing_key, kit.key_id)
        hashes: list[bytes] = []

        def batch_of(size: int) -> list:
            start = len(hashes)
            hashes.extend(leaf_hash(_leaf(kit, start + i)) for i in range(size))
            return [kit.make_entry(start + i) for i in range(size)]

        assert await log.append_pg_alone(conn, [kit.make_entry(0)]) is None
        assert await _stored_size(conn) == (0, 0)
        async with conn.transaction():
            await log.append_pg(conn, batch_of(3))
        # The first locked append had no memo to compare: still not alone.
        assert await log.append_pg_alone(conn, [kit.make_entry(3)]) is None
        async with conn.transaction():
            await log.append_pg(conn, batch_of(2))
        for heads, size in enumerate([1, 7, 8, 16, 5], start=3):
            start = len(hashes)
            assert not conn.is_in_transaction()
            result = await log.append_pg_alone(conn, batch_of(size))
            assert result is not None
            assert result.indexes == range(start, start + size)
            assert result.tree_head.root_hash == merkle_tree_hash(hashes)
            assert await _stored_size(conn) == (len(hashes), heads)
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert (report.entries_checked, report.tree_heads_checked) == (len(hashes), 7)
    finally:
        await conn.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_writers_taking_turns_extend_the_state_they_read_in_one_statement_each(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """Two log objects (two processes) appending in turn. Each reads the log's newest
    state without the lock (``refresh_pg``: one statement) and extends it with one
    lone statement outside any transaction, so the lock is never held across a
    round trip. ``refresh_pg`` tells whether the other appended since; on an
    empty log there is nothing to extend alone. Every leaf is stored once, in one
    order whose tree is the one a full recomputation gives, and verifies."""
    engine, dsn = await _pg_log(audit_pg_url, kit)
    conns = [await asyncpg.connect(dsn), await asyncpg.connect(dsn)]
    try:
        logs = [TransparencyLog(engine, signing_key, kit.key_id) for _ in range(2)]
        assert await logs[0].refresh_pg(conns[0]) is False
        assert not logs[0].may_go_alone  # an empty log
        assert await logs[0].append_pg_alone(conns[0], [kit.make_entry(0)]) is None
        assert await _stored_size(conns[0]) == (0, 0)
        async with conns[0].transaction():
            await logs[0].append_pg(conns[0], [kit.make_entry(0), kit.make_entry(1)])
        hashes = [leaf_hash(_leaf(kit, i)) for i in range(2)]
        w = 0
        for turn, size in enumerate([1, 3, 2, 5, 8, 1, 4, 7]):
            w = (turn + 1) % 2
            # The other appended since this one's last batch (or this one has none).
            assert await logs[w].refresh_pg(conns[w]) is False
            assert logs[w].may_go_alone
            start = len(hashes)
            batch = [kit.make_entry(start + i) for i in range(size)]
            result = await logs[w].append_pg_alone(conns[w], batch)
            assert result is not None
            assert not conns[w].is_in_transaction()
            assert result.indexes == range(start, start + size)
            hashes.extend(leaf_hash(_leaf(kit, start + i)) for i in range(size))
            assert result.tree_head.root_hash == merkle_tree_hash(hashes)
            assert await _stored_size(conns[w]) == (len(hashes), turn + 2)
        # Nothing else appended since the last writer's batch: it reads its own state.
        assert await logs[w].refresh_pg(conns[w]) is True
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert (report.entries_checked, report.tree_heads_checked) == (len(hashes), 9)
    finally:
        for c in conns:
            await c.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_a_writer_that_finds_another_writers_batch_writes_nothing_and_extends_it_next(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """Two log objects (two processes) on one database. When the other appended
    since, ``append_pg_alone`` writes nothing and returns None, and brings back the
    log's newest state, read under the lock: the next lone call extends the other's
    batch, with no read of the state in between. A locked append then finds the
    log as its own call left it. Every leaf is stored once, in one total order
    that verifies."""
    engine, dsn = await _pg_log(audit_pg_url, kit)
    conns = [await asyncpg.connect(dsn), await asyncpg.connect(dsn)]
    try:
        logs = [TransparencyLog(engine, signing_key, kit.key_id) for _ in range(2)]
        n = 0

        async def locked(w: int, size: int) -> None:
            nonlocal n
            async with conns[w].transaction():
                await logs[w].append_pg(conns[w], [kit.make_entry(n + i) for i in range(size)])
            n += size

        await locked(0, 2)
        await locked(0, 2)  # log 0 found its own edge: may go alone
        await locked(1, 3)  # the other appends
        before = await _stored_size(conns[0])
        assert await logs[0].append_pg_alone(conns[0], [kit.make_entry(n)]) is None
        assert await _stored_size(conns[0]) == before
        assert logs[0].may_go_alone  # the other's batch is what it extends next
        for size in (1, 4):
            result = await logs[0].append_pg_alone(
                conns[0], [kit.make_entry(n + i) for i in range(size)]
            )
            assert result is not None
            assert result.indexes == range(n, n + size)
            n += size
        await locked(0, 2)
        assert logs[0].may_go_alone  # the locked append found its own last batch
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert report.entries_checked == n == 14
        assert await _stored_size(conns[0]) == (14, 6)
    finally:
        for c in conns:
            await c.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_writers_taking_turns_each_find_the_others_batch_in_their_refused_call(
    pg: PgServer, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """Two log objects appending in turn without reading the log's state apart:
    each call after the other's batch is refused (it writes nothing, and nothing
    reaches PostgreSQL's log as an error) and brings that batch's state back, and
    the next call extends it. Every leaf is stored once; the tree is the one a full
    recomputation gives, and verifies."""
    url = pg.create_database("audit_turns_" + uuid.uuid4().hex[:8])
    engine, dsn = await _pg_log(url, kit)
    conns = [await asyncpg.connect(dsn), await asyncpg.connect(dsn)]
    server_log = pg.root / "server.log"
    try:
        logs = [TransparencyLog(engine, signing_key, kit.key_id) for _ in range(2)]
        for w in (0, 1):
            await _ready_to_go_alone(logs[w], conns[w], kit)
        hashes = [leaf_hash(_leaf(kit, i)) for i in (0, 1) * 4]
        logged = server_log.stat().st_size
        for turn, size in enumerate([3, 1, 5, 2, 8, 1]):
            w = turn % 2
            start = len(hashes)
            batch = [kit.make_entry(start + i) for i in range(size)]
            assert await logs[w].append_pg_alone(conns[w], batch) is None  # the other's came first
            assert await _stored_size(conns[w]) == (start, turn + 4)
            result = await logs[w].append_pg_alone(conns[w], batch)
            assert result is not None
            assert result.indexes == range(start, start + size)
            hashes.extend(leaf_hash(_leaf(kit, start + i)) for i in range(size))
            assert result.tree_head.root_hash == merkle_tree_hash(hashes)
        with server_log.open("rb") as f:
            f.seek(logged)
            assert b"ERROR" not in f.read()
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert (report.entries_checked, report.tree_heads_checked) == (len(hashes), 10)
    finally:
        for c in conns:
            await c.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_a_lone_append_racing_a_locked_one_gives_way_without_an_error(
    pg: PgServer, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """A lone statement that starts while another process's locked append is in
    flight waits for the log's lock; when that append commits, the lone one
    writes nothing and returns None, and the locked append it raced is never the
    one that fails. Losing the race is not an error on the server: two writers
    lose it several times a second under load, and each loss was an ERROR, with
    the statement's text, in PostgreSQL's log (a primary key, the nodes' or the
    leaves', refused the batch). The refused call brings back the state the other's
    batch left, and the writer's next call extends it."""
    url = pg.create_database("audit_race_" + uuid.uuid4().hex[:8])
    engine, dsn = await _pg_log(url, kit)
    conns = [await asyncpg.connect(dsn), await asyncpg.connect(dsn)]
    server_log = pg.root / "server.log"
    try:
        alone = TransparencyLog(engine, signing_key, kit.key_id)
        other = TransparencyLog(engine, signing_key, kit.key_id)
        await _ready_to_go_alone(alone, conns[0], kit)
        logged = server_log.stat().st_size
        tx = conns[1].transaction()
        await tx.start()
        await other.append_pg(conns[1], [kit.make_entry(i) for i in range(4, 9)])
        racing = asyncio.ensure_future(
            alone.append_pg_alone(conns[0], [kit.make_entry(i) for i in range(9, 12)])
        )
        await asyncio.sleep(0.3)
        assert not racing.done()  # waiting for the lock the other holds
        await tx.commit()
        assert await racing is None
        assert await _stored_size(conns[0]) == (9, 3)
        # The refused call read the log once it held the lock: it brought the
        # other's batch back, and the next call extends it.
        assert alone.may_go_alone
        result = await alone.append_pg_alone(conns[0], [kit.make_entry(i) for i in range(9, 12)])
        assert result is not None
        assert result.indexes == range(9, 12)
        with server_log.open("rb") as f:
            f.seek(logged)
            assert b"ERROR" not in f.read()
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert report.entries_checked == 12
    finally:
        for c in conns:
            await c.close()
        await engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("then", ["nothing", "another_appends_as_many"])
async def test_a_lone_append_after_a_rolled_back_one_writes_nothing(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type, then: str
) -> None:
    """The object's memo of the right edge moves before its transaction commits; if
    that transaction rolls back, a lone append must not extend leaves that were
    never stored (a gap in the log), nor another instance's tree of the same size
    (its root differs, and the memo's edge is not that tree's): it writes nothing
    and returns None."""
    engine, dsn = await _pg_log(audit_pg_url, kit)
    conn = await asyncpg.connect(dsn)
    try:
        log = TransparencyLog(engine, signing_key, kit.key_id)
        await _ready_to_go_alone(log, conn, kit)
        tx = conn.transaction()
        await tx.start()
        await log.append_pg(conn, [kit.make_entry(4)])
        await tx.rollback()  # the batch's callers went away
        stored = (4, 2)
        if then == "another_appends_as_many":
            async with conn.transaction():
                other = TransparencyLog(engine, signing_key, kit.key_id)
                await other.append_pg(conn, [kit.make_entry(7)])
            stored = (5, 3)
        assert await log.append_pg_alone(conn, [kit.make_entry(8)]) is None
        assert await _stored_size(conn) == stored
        async with conn.transaction():
            result = await log.append_pg(conn, [kit.make_entry(8)])
        assert result.indexes == range(stored[0], stored[0] + 1)
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
    finally:
        await conn.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_a_lone_append_takes_the_log_lock_so_a_locked_one_behind_it_extends_it(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """The lone statement takes the log's lock as a locked append does: while
    someone holds it the statement waits, and a locked append queued behind it
    then reads the tree head it wrote and extends it. Neither fails."""
    engine, dsn = await _pg_log(audit_pg_url, kit)
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        alone = TransparencyLog(engine, signing_key, kit.key_id)
        await _ready_to_go_alone(alone, conns[0], kit)
        holder = conns[2].transaction()
        await holder.start()
        await conns[2].execute("SELECT pg_advisory_xact_lock($1)", DEFAULT_LOCK_ID)
        lone = asyncio.ensure_future(alone.append_pg_alone(conns[0], [kit.make_entry(4)]))
        await asyncio.sleep(0.3)
        assert not lone.done()  # waits for the lock

        async def locked() -> range:
            async with conns[1].transaction():
                log = TransparencyLog(engine, signing_key, kit.key_id)
                return (await log.append_pg(conns[1], [kit.make_entry(5)])).indexes

        behind = asyncio.ensure_future(locked())
        await asyncio.sleep(0.3)
        await holder.rollback()
        result = await lone
        assert result is not None
        assert result.indexes == range(4, 5)
        assert await behind == range(5, 6)
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
        assert report.entries_checked == 6
    finally:
        for c in conns:
            await c.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_a_lone_append_finds_the_newest_head_without_reading_every_head(
    audit_pg_url: str, kit: type
) -> None:
    """The lone call reads the newest tree head with the lock held, on every batch.
    That read must go through the primary key's index: a scan of every head would
    cost more with each batch the log has ever had. (It is the function's own
    statement: ``NEWEST_HEAD_SQL`` is spliced into its body.)"""
    engine, dsn = await _pg_log(audit_pg_url, kit)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO audit_tree_heads (tree_size, root_hash, timestamp_ms, signature, key_id)"
            " SELECT n, '\\x00', n, '\\x00', 'k' FROM generate_series(1, 50000) AS n"
        )
        await conn.execute("ANALYZE audit_tree_heads")
        body = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = $1", APPEND_FUNCTION)
        assert NEWEST_HEAD_SQL in body
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {NEWEST_HEAD_SQL}"))
        assert "Seq Scan on audit_tree_heads" not in plan, plan
        assert "audit_tree_heads_pkey" in plan, plan
    finally:
        await conn.close()
        await engine.dispose()


@pytest.mark.postgres
async def test_reading_the_right_edge_looks_up_only_its_subtrees_before_any_analyze(
    audit_pg_url: str, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    """A writer that shares the log reads its right edge before each lone append
    (``refresh_pg``), and a locked append that finds another's batch reads it too
    (``append_pg``). Both must look up just the edge's subtrees (one per bit of the
    log's size), one primary-key lookup each, planned generically and on a log whose
    tables were never analyzed (a new database, or the first minute after a bulk
    load): a plan that scans the nodes table costs more with every entry the log has
    ever had, and one that tries all 63 levels costs 63 lookups per read."""
    engine, dsn = await _pg_log(audit_pg_url, kit)
    conns = [await asyncpg.connect(dsn), await asyncpg.connect(dsn)]
    try:
        logs = [TransparencyLog(engine, signing_key, kit.key_id) for _ in range(2)]
        for start in range(0, 3000, 500):
            async with conns[1].transaction():
                await logs[1].append_pg(conns[1], [kit.make_entry(start + i) for i in range(500)])
        edge = bin(3000).count("1")  # perfect subtrees on the right edge of 3,000 leaves

        async def nodes_read(call: Any) -> tuple[int, int, int]:
            """(scans of the nodes table, lookups in its index, rows they found) by ``call``:
            the connection's counts not yet reported, read before and after it in one
            transaction (they are reported only between transactions)."""
            counts = (
                "SELECT seq_scan, idx_scan, idx_tup_fetch FROM pg_stat_xact_user_tables"
                " WHERE relname = 'audit_nodes'"
            )
            async with conns[0].transaction():
                before = await conns[0].fetchrow(counts)
                await call()
                after = await conns[0].fetchrow(counts)
            return after[0] - before[0], after[1] - before[1], after[2] - before[2]

        await conns[0].execute("SET plan_cache_mode = force_generic_plan")
        never_analyzed = "SELECT reltuples < 0 FROM pg_class WHERE relname = 'audit_nodes'"
        assert await conns[0].fetchval(never_analyzed)
        for _ in range(6):  # past the few runs a prepared statement is planned for its values
            assert await nodes_read(lambda: logs[0].refresh_pg(conns[0])) == (0, edge, edge)
        assert logs[0].may_go_alone
        # Each time the other writer appends first, a lone call is refused and reads
        # the new edge under the lock, as the function's own statement.
        for n in range(6):
            size = 3000 + n
            async with conns[1].transaction():
                await logs[1].append_pg(conns[1], [kit.make_entry(size)])

            async def refused(size: int = size) -> None:
                assert await logs[0].append_pg_alone(conns[0], [kit.make_entry(size)]) is None

            edge_now = bin(size + 1).count("1")
            assert await nodes_read(refused) == (0, edge_now, edge_now)
        # Each time the other writer appends first, a locked append reads the new edge.
        for n in range(6):
            size = 3007 + 2 * n
            async with conns[1].transaction():
                await logs[1].append_pg(conns[1], [kit.make_entry(size - 1)])

            async def locked(size: int = size) -> None:
                await logs[0].append_pg(conns[0], [kit.make_entry(size)])

            assert await nodes_read(locked) == (0, bin(size).count("1"), bin(size).count("1"))
        report = await verify_log(engine, {kit.key_id: signing_key.public_key()})
        assert report.ok, report.divergence
    finally:
        for c in conns:
            await c.close()
        await engine.dispose()
