"""verify_log: a clean log verifies; every kind of tampering is found where it happened."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit import (
    CompactRange,
    Divergence,
    TransparencyLog,
    encode_leaf,
    entries,
    leaf_hash,
    nodes,
    tree_heads,
    verify_log,
)

BATCHES = [1, 4, 7, 13, 25]  # 50 leaves; heads at 1, 5, 12, 25, 50
N = sum(BATCHES)
PAGE = 7  # small pages, so checks cross page boundaries


@pytest.fixture
async def filled(audit_log: TransparencyLog, kit: type) -> TransparencyLog:
    n = 0
    for size in BATCHES:
        await audit_log.append([kit.make_entry(n + i) for i in range(size)])
        n += size
    return audit_log


async def _verify(engine: AsyncEngine, key: Ed25519PrivateKey, kit: type) -> Divergence | None:
    report = await verify_log(engine, {kit.key_id: key.public_key()}, page_size=PAGE)
    return report.divergence


async def test_a_clean_log_verifies_with_progress(
    filled: TransparencyLog, audit_engine: AsyncEngine, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    calls: list[tuple[int, int]] = []
    report = await verify_log(
        audit_engine,
        {kit.key_id: signing_key.public_key()},
        progress=lambda done, total: calls.append((done, total)),
        page_size=PAGE,
    )
    assert report.ok, report.divergence
    assert report.tree_size == report.entries_checked == N
    assert report.tree_heads_checked == len(BATCHES)
    assert report.nodes_checked == sum(N >> lv for lv in range(N.bit_length()))
    assert calls[-1] == (N, N)
    assert [done for done, _ in calls] == [*range(PAGE, N, PAGE), N]


async def test_an_empty_log_verifies(
    audit_engine: AsyncEngine, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    report = await verify_log(audit_engine, {kit.key_id: signing_key.public_key()})
    assert report.ok
    assert report.tree_size == 0


async def _row(conn: AsyncConnection, index: int) -> dict[str, Any]:
    row = (await conn.execute(select(entries).where(entries.c.leaf_index == index))).one()
    return dict(row._mapping)


def _other_leaf(kit: type, i: int) -> bytes:
    leaf: bytes = encode_leaf(kit.make_entry(i, subject="cust-forged"))
    return leaf


async def _edit_leaf_bytes(conn: AsyncConnection, kit: type) -> None:
    await conn.execute(
        update(entries).where(entries.c.leaf_index == 17).values(leaf=_other_leaf(kit, 17))
    )


async def _edit_leaf_and_hash(conn: AsyncConnection, kit: type) -> None:
    leaf = _other_leaf(kit, 17)
    await conn.execute(
        update(entries)
        .where(entries.c.leaf_index == 17)
        .values(leaf=leaf, leaf_hash=leaf_hash(leaf), subject="cust-forged")
    )


async def _rewrite_tree_without_the_key(conn: AsyncConnection, kit: type) -> None:
    # The attacker edits leaf 17 and recomputes every stored hash, but cannot sign.
    await _edit_leaf_and_hash(conn, kit)
    rows = (await conn.execute(select(entries.c.leaf_hash).order_by(entries.c.leaf_index))).all()
    edge = CompactRange()
    for row in rows:
        for level, index, hashed in edge.append(bytes(row.leaf_hash)):
            await conn.execute(
                update(nodes)
                .where(nodes.c.level == level, nodes.c.node_index == index)
                .values(hash=hashed)
            )


async def _delete_row(conn: AsyncConnection, kit: type) -> None:
    await conn.execute(delete(entries).where(entries.c.leaf_index == 20))


async def _delete_tail(conn: AsyncConnection, kit: type) -> None:
    await conn.execute(delete(entries).where(entries.c.leaf_index >= N - 3))


async def _swap_rows(conn: AsyncConnection, kit: type) -> None:
    a, b = await _row(conn, 5), await _row(conn, 30)
    for target, source in ((5, b), (30, a)):
        values = {k: v for k, v in source.items() if k != "leaf_index"}
        await conn.execute(update(entries).where(entries.c.leaf_index == target).values(**values))


async def _swap_leaf_bytes(conn: AsyncConnection, kit: type) -> None:
    a, b = await _row(conn, 8), await _row(conn, 9)
    await conn.execute(update(entries).where(entries.c.leaf_index == 8).values(leaf=b["leaf"]))
    await conn.execute(update(entries).where(entries.c.leaf_index == 9).values(leaf=a["leaf"]))


async def _insert_at_end(conn: AsyncConnection, kit: type) -> None:
    row = await _row(conn, 3)
    await conn.execute(insert(entries).values(**{**row, "leaf_index": N}))


async def _insert_before_start(conn: AsyncConnection, kit: type) -> None:
    row = await _row(conn, 3)
    await conn.execute(insert(entries).values(**{**row, "leaf_index": -1}))


async def _move_to_other_customer(conn: AsyncConnection, kit: type) -> None:
    await conn.execute(update(entries).where(entries.c.leaf_index == 12).values(subject="x"))


async def _corrupt_node(conn: AsyncConnection, kit: type) -> None:
    await conn.execute(
        update(nodes).where(nodes.c.level == 3, nodes.c.node_index == 1).values(hash=b"\1" * 32)
    )


async def _delete_node(conn: AsyncConnection, kit: type) -> None:
    await conn.execute(delete(nodes).where(nodes.c.level == 1, nodes.c.node_index == 10))


async def _corrupt_signature(conn: AsyncConnection, kit: type) -> None:
    head = (await conn.execute(select(tree_heads).where(tree_heads.c.tree_size == 25))).one()
    signature = bytearray(head.signature)
    signature[0] ^= 1
    await conn.execute(
        update(tree_heads).where(tree_heads.c.tree_size == 25).values(signature=bytes(signature))
    )


async def _delete_last_head(conn: AsyncConnection, kit: type) -> None:
    await conn.execute(delete(tree_heads).where(tree_heads.c.tree_size == N))


async def _forge_head_beyond(conn: AsyncConnection, kit: type) -> None:
    head = dict(
        (await conn.execute(select(tree_heads).where(tree_heads.c.tree_size == N))).one()._mapping
    )
    await conn.execute(insert(tree_heads).values(**{**head, "tree_size": N + 5}))


Tamper = Callable[[AsyncConnection, type], Awaitable[None]]

CASES: list[tuple[str, Tamper, str, int | None, int | None]] = [
    # (id, tamper, expected what, leaf_index, tree_size)
    ("edit-leaf-bytes", _edit_leaf_bytes, "leaf_hash_mismatch", 17, None),
    ("edit-leaf-and-hash", _edit_leaf_and_hash, "node_mismatch", 17, None),
    ("rewrite-tree", _rewrite_tree_without_the_key, "root_mismatch", None, 25),
    ("delete-row", _delete_row, "missing_entry", 20, None),
    ("delete-tail", _delete_tail, "missing_entry", N - 3, None),
    ("swap-rows", _swap_rows, "node_mismatch", 5, None),
    ("swap-leaf-bytes", _swap_leaf_bytes, "leaf_hash_mismatch", 8, None),
    ("insert-at-end", _insert_at_end, "unsigned_entry", N, None),
    ("insert-before-start", _insert_before_start, "entry_out_of_sequence", 0, None),
    ("move-to-other-customer", _move_to_other_customer, "filter_columns_mismatch", 12, None),
    ("corrupt-node", _corrupt_node, "node_mismatch", 15, None),
    ("delete-node", _delete_node, "missing_node", 21, None),
    ("corrupt-signature", _corrupt_signature, "bad_signature", None, 25),
    ("delete-last-head", _delete_last_head, "unsigned_entry", 25, None),
    # A head claiming more leaves than stored: the first leaf it lacks is reported.
    ("forge-head-beyond", _forge_head_beyond, "missing_entry", N, None),
]


@pytest.mark.parametrize(
    ("tamper", "what", "leaf_index", "tree_size"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_tampering_is_found_at_the_right_place(
    filled: TransparencyLog,
    audit_engine: AsyncEngine,
    signing_key: Ed25519PrivateKey,
    kit: type,
    tamper: Tamper,
    what: str,
    leaf_index: int | None,
    tree_size: int | None,
) -> None:
    assert await _verify(audit_engine, signing_key, kit) is None
    await kit.drop_triggers(audit_engine)
    async with audit_engine.begin() as conn:
        await tamper(conn, kit)
    divergence = await _verify(audit_engine, signing_key, kit)
    assert divergence is not None
    assert (divergence.what, divergence.leaf_index, divergence.tree_size) == (
        what,
        leaf_index,
        tree_size,
    ), divergence.detail


async def test_an_unknown_or_wrong_key_is_reported(
    filled: TransparencyLog, audit_engine: AsyncEngine, kit: type
) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    unknown = (await verify_log(audit_engine, {"someone-else": other})).divergence
    assert unknown is not None
    assert (unknown.what, unknown.tree_size) == ("unknown_key", 1)
    wrong = (await verify_log(audit_engine, {kit.key_id: other})).divergence
    assert wrong is not None
    assert (wrong.what, wrong.tree_size) == ("bad_signature", 1)


async def test_a_larger_log_verifies_across_many_pages(
    audit_log: TransparencyLog, audit_engine: AsyncEngine, signing_key: Ed25519PrivateKey, kit: type
) -> None:
    n = 0
    for size in (512, 1, 511, 2000, 977):
        await audit_log.append([kit.make_entry(n + i) for i in range(size)])
        n += size
    report = await verify_log(audit_engine, {kit.key_id: signing_key.public_key()}, page_size=333)
    assert report.ok, report.divergence
    assert report.tree_size == n
    assert report.tree_heads_checked == 5
