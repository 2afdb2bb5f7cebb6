"""TransparencyLog on a database: incremental tree, reads, proofs, sequencing."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from types import SimpleNamespace

import asyncpg
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit import (
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
