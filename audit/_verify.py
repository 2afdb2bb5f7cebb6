"""Full verification of a stored log against its own leaves and signatures.

``verify_log`` replays the log from leaf 0 in pages of ``page_size`` rows, holding
only one page and the tree's right edge (``CompactRange``) in memory, so it runs in
bounded memory for any size. For each leaf index ``i`` in order it checks:

1. the entry row exists (``missing_entry``) and its index is the next one
   (``entry_out_of_sequence``);
2. the stored leaf hash is SHA-256(0x00 || leaf bytes) (``leaf_hash_mismatch``);
3. the leaf decodes (``undecodable_leaf``) and the indexed filter columns agree
   with it (``filter_columns_mismatch``);
4. every perfect subtree completed by leaf ``i`` (level 0 included) is stored
   (``missing_node``) with the recomputed hash (``node_mismatch``);
5. a signed tree head of size ``i + 1``, if any, has the recomputed root
   (``root_mismatch``), a known key (``unknown_key``), a valid Ed25519 signature
   (``bad_signature``) and no earlier timestamp than the previous head
   (``timestamp_regressed``).

Finally every stored entry must be covered by a signed tree head
(``unsigned_entry``) and no head may cover more leaves than exist
(``tree_head_beyond_log``). The first divergence in leaf order is reported.
Entries appended while verification runs are covered by the final check only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import ColumnElement, Row, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit._entry import decode_leaf
from audit._errors import InvalidEntry
from audit._log import naive_utc
from audit._merkle import CompactRange, leaf_hash
from audit._store import entries, nodes, tree_heads
from audit._tree_head import SignedTreeHead, verify_tree_head

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(leaves_checked, total_leaves)`` after each page."""


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first place the stored log disagrees with its recomputation."""

    what: str
    leaf_index: int | None
    tree_size: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class LogVerification:
    """The outcome of ``verify_log``: counts of what was checked and the first divergence."""

    tree_size: int
    entries_checked: int
    nodes_checked: int
    tree_heads_checked: int
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None


class _Diverged(Exception):
    def __init__(self, divergence: Divergence) -> None:
        super().__init__(divergence.what)
        self.divergence = divergence


def _fail(
    what: str, detail: str, *, leaf_index: int | None = None, tree_size: int | None = None
) -> _Diverged:
    return _Diverged(Divergence(what, leaf_index, tree_size, detail))


def _page_node_condition(start: int, end: int) -> ColumnElement[bool]:
    """Nodes completed by leaves [start, end): (level, ix) completes at (ix+1)*2**level - 1."""
    ranges = []
    for level in range(end.bit_length()):
        low = ((start + (1 << level)) >> level) - 1
        high = (end >> level) - 1
        if low <= high:
            ranges.append(and_(nodes.c.level == level, nodes.c.node_index.between(low, high)))
    return or_(*ranges)


def _head(row: Row[Any]) -> SignedTreeHead:
    return SignedTreeHead(
        row.tree_size, bytes(row.root_hash), row.timestamp_ms, bytes(row.signature), row.key_id
    )


class _Replay:
    """The recomputation state carried from page to page."""

    def __init__(self, public_keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.public_keys = public_keys
        self.edge = CompactRange()
        self.nodes_checked = 0
        self.heads_checked = 0
        self.last_timestamp_ms = 0

    def check_entry(self, row: Row[Any], stored_nodes: dict[tuple[int, int], bytes]) -> None:
        index = self.edge.size
        if row.leaf_index != index:
            if row.leaf_index > index:
                raise _fail("missing_entry", f"no entry row at index {index}", leaf_index=index)
            raise _fail(
                "entry_out_of_sequence",
                f"entry row at index {row.leaf_index} where {index} was expected",
                leaf_index=index,
            )
        leaf = bytes(row.leaf)
        hashed = leaf_hash(leaf)
        if bytes(row.leaf_hash) != hashed:
            raise _fail(
                "leaf_hash_mismatch", "stored leaf hash != hash of leaf bytes", leaf_index=index
            )
        try:
            entry = decode_leaf(leaf)
        except InvalidEntry as exc:
            raise _fail("undecodable_leaf", str(exc), leaf_index=index) from None
        columns = {
            "kind": (row.kind, str(entry.kind)),
            "actor": (row.actor, entry.actor),
            "subject": (row.subject, entry.subject),
            "purpose": (row.purpose, entry.purpose),
            "created_at": (naive_utc(row.created_at), naive_utc(entry.timestamp)),
        }
        for name, (stored, expected) in columns.items():
            if stored != expected:
                raise _fail(
                    "filter_columns_mismatch",
                    f"column {name} disagrees with the leaf",
                    leaf_index=index,
                )
        for level, node_index, expected_hash in self.edge.append(hashed):
            stored_hash = stored_nodes.get((level, node_index))
            if stored_hash is None:
                raise _fail("missing_node", f"no node ({level}, {node_index})", leaf_index=index)
            if stored_hash != expected_hash:
                raise _fail(
                    "node_mismatch",
                    f"node ({level}, {node_index}) has another hash",
                    leaf_index=index,
                )
            self.nodes_checked += 1

    def check_head(self, head: SignedTreeHead) -> None:
        size = head.tree_size
        if head.root_hash != self.edge.root():
            raise _fail("root_mismatch", "signed root != recomputed root", tree_size=size)
        key = self.public_keys.get(head.key_id)
        if key is None:
            raise _fail(
                "unknown_key", f"tree head signed by unknown key {head.key_id!r}", tree_size=size
            )
        if not verify_tree_head(head, key):
            raise _fail("bad_signature", "tree head signature does not verify", tree_size=size)
        if head.timestamp_ms < self.last_timestamp_ms:
            raise _fail(
                "timestamp_regressed", "tree head older than its predecessor", tree_size=size
            )
        self.last_timestamp_ms = head.timestamp_ms
        self.heads_checked += 1


async def _replay_page(conn: AsyncConnection, replay: _Replay, start: int, end: int) -> int:
    """Check leaves [start, end) and the heads they complete; returns leaves read."""
    entry_query = select(entries).where(entries.c.leaf_index < end)
    if start > 0:
        # The first page has no lower bound, so rows at negative indexes show up.
        entry_query = entry_query.where(entries.c.leaf_index >= start)
    rows = (await conn.execute(entry_query.order_by(entries.c.leaf_index))).all()
    node_rows = await conn.execute(
        select(nodes.c.level, nodes.c.node_index, nodes.c.hash).where(
            _page_node_condition(start, end)
        )
    )
    stored_nodes = {(r.level, r.node_index): bytes(r.hash) for r in node_rows}
    head_query = select(tree_heads).where(tree_heads.c.tree_size <= end)
    if start > 0:
        head_query = head_query.where(tree_heads.c.tree_size > start)
    heads = [_head(r) for r in await conn.execute(head_query.order_by(tree_heads.c.tree_size))]
    head_at = 0
    if heads and heads[0].tree_size <= 0:
        raise _fail(
            "invalid_tree_head", "a tree head of size 0 or less", tree_size=heads[0].tree_size
        )
    for row in rows:
        replay.check_entry(row, stored_nodes)
        while head_at < len(heads) and heads[head_at].tree_size == replay.edge.size:
            replay.check_head(heads[head_at])
            head_at += 1
    if replay.edge.size < end:
        index = replay.edge.size
        raise _fail("missing_entry", f"no entry row at index {index}", leaf_index=index)
    return len(rows)


async def verify_log(
    engine: AsyncEngine,
    public_keys: Mapping[str, Ed25519PublicKey],
    *,
    progress: ProgressCallback | None = None,
    page_size: int = 5000,
) -> LogVerification:
    """Recompute the whole log and compare; see the module docstring for the checks.

    ``public_keys`` maps tree-head ``key_id`` to its Ed25519 public key (every key the
    log was ever signed with, for logs that rotated keys).
    """
    if page_size < 1:
        raise ValueError("page_size must be positive")
    replay = _Replay(public_keys)
    async with engine.connect() as conn:
        # Verify up to the newest head seen at the start; later appends are only
        # checked for being signed (below).
        total = int((await conn.execute(select(func.max(tree_heads.c.tree_size)))).scalar() or 0)
        divergence: Divergence | None = None
        try:
            start = 0
            while start < total:
                end = min(start + page_size, total)
                await _replay_page(conn, replay, start, end)
                start = end
                if progress is not None:
                    progress(start, total)
            # One statement, so one consistent view even while appends commit.
            last_entry, last_head = (
                await conn.execute(
                    select(
                        select(func.max(entries.c.leaf_index)).scalar_subquery(),
                        select(func.max(tree_heads.c.tree_size)).scalar_subquery(),
                    )
                )
            ).one()
            entry_count = -1 if last_entry is None else int(last_entry)
            entry_count += 1
            head_size = int(last_head or 0)
            if entry_count > head_size:
                raise _fail(
                    "unsigned_entry",
                    f"entries up to {entry_count - 1} but the newest head covers {head_size}",
                    leaf_index=head_size,
                )
            if head_size > entry_count:
                raise _fail(
                    "tree_head_beyond_log",
                    f"a head covers {head_size} leaves but {entry_count} exist",
                    tree_size=head_size,
                )
        except _Diverged as diverged:
            divergence = diverged.divergence
    return LogVerification(
        tree_size=replay.edge.size,
        entries_checked=replay.edge.size,
        nodes_checked=replay.nodes_checked,
        tree_heads_checked=replay.heads_checked,
        divergence=divergence,
    )
