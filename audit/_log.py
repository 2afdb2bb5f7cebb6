"""The transparency log service: sequenced batch appends, entry reads, proofs.

Sequencing. Every append runs in one transaction that first takes the log's write
lock, then reads the tree size and right edge, then writes the leaves, the perfect
subtrees they complete and one signed tree head. So all processes sharing the
database see one total order of leaves:

* PostgreSQL: ``pg_advisory_xact_lock(lock_id)``, released at commit or rollback.
* SQLite: a no-op ``DELETE ... WHERE 0 = 1`` as the transaction's first statement. Any
  write statement takes SQLite's RESERVED lock even when it touches no row, which
  gives ``BEGIN IMMEDIATE`` semantics without changing how the caller's engine
  begins transactions; other writers wait (busy timeout) until commit. Touching no
  row, it fires no append-only trigger.

The tree size is the largest signed ``tree_size``: a batch's leaves, nodes and tree
head commit together, so the newest head always covers every stored leaf.

On PostgreSQL a writer may send the whole append as one statement, its own
transaction (``append_pg_alone``): it takes the same lock, checks that the newest
tree head is the one the writer extends, and writes. The writer extends the right
edge it last left, or one it has just read without the lock (``refresh_pg``) when
another process appends too; the lock is then held only while the server runs
that statement and commits, never across a round trip to the writer. The
statement's snapshot predates the lock, so a batch another process committed
meanwhile is caught by the batch's first leaf, inserted first ON CONFLICT DO
NOTHING, on which the rest of the statement depends; either way nothing is written
(and no error is raised) and the writer tries again or appends as above. A locked
append never fails because of one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    LargeBinary,
    Row,
    SmallInteger,
    String,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeEngine

from audit._entry import AuditEntry, EncodedEntry, decode_leaf
from audit._errors import (
    EntryNotFound,
    InvalidProofRequest,
    InvalidQuery,
    LogStateConflict,
    TreeHeadNotFound,
)
from audit._merkle import (
    CompactRange,
    consistency_proof,
    consistency_proof_ranges,
    inclusion_path_ranges,
    inclusion_proof,
    leaf_hash,
    nodes_for_ranges,
    perfect_subtrees,
    subtree_hash_from,
)
from audit._pg_append import APPEND_FUNCTION
from audit._sql import Prepared
from audit._store import entries, nodes, tree_heads
from audit._tree_head import SignedTreeHead, sign_tree_head

DEFAULT_LOCK_ID = 0x53544F5259415544
"""PostgreSQL advisory lock key of the audit log ("STORYAUD"); one log per database."""

MAX_PAGE = 1000

_NODE_CHUNK = 100
"""Node keys per query where they are OR terms (not SQLite): keeps the lists short."""

_SUPPORTED_DIALECTS = ("sqlite", "postgresql")

# The append's statements, built once (it runs for every batch of the group commit).
_PG_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_PG_LOCK_PREPARED = Prepared(select(func.pg_advisory_xact_lock(bindparam("k", type_=BigInteger))))
_SQLITE_LOCK = Prepared(delete(tree_heads).where(false()))
_LAST_HEAD = Prepared(
    select(tree_heads.c.tree_size, tree_heads.c.timestamp_ms, tree_heads.c.root_hash)
    .order_by(tree_heads.c.tree_size.desc())
    .limit(1)
)
_INSERT_ENTRIES = Prepared(insert(entries), [c.name for c in entries.c])
_INSERT_NODES = Prepared(insert(nodes), [c.name for c in nodes.c])
_INSERT_HEAD = Prepared(insert(tree_heads), [c.name for c in tree_heads.c])
# PostgreSQL only (``append_pg``): the stored hashes of the given subtrees, in one
# statement over two arrays instead of one OR term per subtree. Each subtree is one
# primary-key lookup (a LATERAL subquery with LIMIT 1) whatever the table's
# statistics say: as a plain join, the plan made while the nodes table was small
# or not yet analyzed (a new database, the first minute after a bulk load) was a
# hash join over a scan of the whole table, and a prepared statement keeps its plan.
_NODES_BY_KEY = Prepared(
    text(
        "SELECT k.level, k.node_index, n.hash FROM unnest(:levels, :indexes)"
        " AS k(level, node_index) CROSS JOIN LATERAL (SELECT n.hash FROM audit_nodes AS n"
        " WHERE n.level = k.level AND n.node_index = k.node_index LIMIT 1) AS n"
    ).bindparams(
        bindparam("levels", type_=ARRAY(SmallInteger)),
        bindparam("indexes", type_=ARRAY(BigInteger)),
    )
)


def _batch_binds() -> list[BindParameter[Any]]:
    """The parameters of a batch written from JSON: its entries' rows and its nodes'
    rows, each one JSON array of objects (``_batch_params``), then the tree head's
    values. Strings are read as ``text`` and the key id goes as VARCHAR without a
    length: a cast to the column's VARCHAR(n) would cut a longer value short where
    the insert refuses it."""
    head: list[tuple[str, TypeEngine[Any]]] = [
        ("tree_size", BigInteger()),
        ("root_hash", LargeBinary()),
        ("timestamp_ms", BigInteger()),
        ("signature", LargeBinary()),
        ("key_id", String()),
    ]
    return [bindparam("entries", type_=String()), bindparam("nodes", type_=String())] + [
        bindparam(name, type_=t) for name, t in head
    ]


# PostgreSQL only (``append_pg``): a batch's entries, nodes and tree head in one
# statement, where one INSERT per row (even pipelined) cost the server a
# parse-bind-execute cycle per row and the client an encoding per row. The rows come
# as JSON (``_batch_params``): bytes in base64 (msgspec's encoding of bytes), the
# timestamp in ISO 8601 without a zone. One JSON text per table, where a column
# array per column (``unnest``) cost the driver a few thousand instructions per
# value to tell an element from a sub-array (about 3 % of a gated read's).
_WRITE_BATCH_PG = Prepared(
    text(
        "WITH e AS (INSERT INTO audit_entries"
        " (leaf_index, leaf, leaf_hash, kind, actor, subject, purpose, created_at)"
        " SELECT r.leaf_index, decode(r.leaf, 'base64'), decode(r.leaf_hash, 'base64'),"
        " r.kind, r.actor, r.subject, r.purpose, r.created_at"
        " FROM json_to_recordset(CAST(:entries AS json)) AS r(leaf_index bigint, leaf text,"
        " leaf_hash text, kind text, actor text, subject text, purpose text,"
        " created_at timestamp)),"
        " n AS (INSERT INTO audit_nodes (level, node_index, hash)"
        " SELECT r.level, r.node_index, decode(r.hash, 'base64')"
        " FROM json_to_recordset(CAST(:nodes AS json)) AS r(level smallint,"
        " node_index bigint, hash text))"
        " INSERT INTO audit_tree_heads (tree_size, root_hash, timestamp_ms, signature, key_id)"
        " VALUES (:tree_size, :root_hash, :timestamp_ms, :signature, :key_id)"
    ).bindparams(*_batch_binds())
)

# PostgreSQL only (``append_pg_alone``): the batch in one call of
# ``storyvault_audit_append`` (``audit._pg_append``, migration 0005) outside any
# transaction. It takes the log's lock, then reads the newest tree head in a
# statement of its own (so it sees a batch another writer committed while this one
# waited for the lock), and writes the batch only if that head is still the one the
# writer extended (``prev_size``, ``prev_root``): one row, ``written``. Otherwise it
# writes nothing and returns that head and the perfect subtrees of its right edge,
# which the writer's next call extends.
#
# Before, one statement (data-modifying CTEs) did this: its snapshot was taken
# before it waited for the lock, so a batch committed during the wait showed only as
# a conflict on the batch's first leaf (written first, ON CONFLICT DO NOTHING), and a
# refused writer had to read the log's state in a statement of its own before trying
# again; a writer sharing the log read it before every batch. (Earlier still, the
# primary keys refused the whole statement: an ERROR in PostgreSQL's log for every
# race, 556 in 40 s with 2 workers.)
_WRITE_BATCH_PG_ALONE = Prepared(
    text(
        "SELECT written, head_size, head_root, head_timestamp_ms, edge_level, edge_hash"  # noqa: S608  (constant fragments)
        f" FROM {APPEND_FUNCTION}(:k, :prev_size, :prev_root, CAST(:entries AS json),"
        " CAST(:nodes AS json), :tree_size, :root_hash, :timestamp_ms, :signature, :key_id)"
    ).bindparams(
        bindparam("k", type_=BigInteger),
        bindparam("prev_size", type_=BigInteger),
        bindparam("prev_root", type_=LargeBinary),
        *_batch_binds(),
    )
)

# PostgreSQL only (``refresh_pg``): the newest tree head and the perfect subtrees of
# its right edge (one per bit of its size), in one statement and so one snapshot.
# The levels are chosen first (the bits of the size; OFFSET 0 keeps the planner from
# folding that choice into the join and checking it after each lookup), then each
# subtree is one primary-key lookup, as in ``_NODES_BY_KEY``. As one join, the plan
# was a scan of the whole nodes table while it was small or not yet analyzed, and
# otherwise a lookup for each of the 63 levels.
_STATE_PG = Prepared(
    text(
        "SELECT h.tree_size, h.root_hash, h.timestamp_ms, e.level, e.hash"
        " FROM (SELECT tree_size, root_hash, timestamp_ms FROM audit_tree_heads"
        " ORDER BY tree_size DESC LIMIT 1) AS h"
        " LEFT JOIN LATERAL (SELECT b.level, n.hash"
        " FROM (SELECT g.level FROM generate_series(0, 62) AS g(level)"
        " WHERE (h.tree_size >> g.level) & 1 = 1 OFFSET 0) AS b"
        " CROSS JOIN LATERAL (SELECT n.hash FROM audit_nodes AS n WHERE n.level = b.level"
        " AND n.node_index = (h.tree_size >> b.level) - 1 LIMIT 1) AS n) AS e ON true"
    )
)

# SQLite: the same over a JSON array of [level, node_index] pairs, one primary-key
# lookup per pair (an append that finds another instance's batch before it reads
# the log's right edge this way: about 30 µs for a dozen subtrees, where an OR
# term per subtree, built and compiled for each append, took about 470 µs).
_NODES_BY_KEY_SQLITE = Prepared(
    text(
        "SELECT n.level, n.node_index, n.hash FROM json_each(:keys) AS k"
        " CROSS JOIN audit_nodes AS n"
        " ON n.level = json_extract(k.value, '$[0]')"
        " AND n.node_index = json_extract(k.value, '$[1]')"
    )
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def naive_utc(ts: datetime) -> datetime:
    """The storage form of a time: naive UTC. Naive input is taken to be UTC already."""
    if ts.tzinfo is None:
        return ts
    return ts.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as stored: its index, the exact leaf bytes and their leaf hash."""

    leaf_index: int
    entry: AuditEntry
    leaf: bytes
    leaf_hash: bytes


@dataclass(frozen=True, slots=True)
class EntryPage:
    """One page of entries; ``next_cursor`` is None on the last page."""

    items: list[StoredEntry]
    next_cursor: int | None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Leaves ``first_index .. tree_head.tree_size - 1`` and the head that signs them."""

    first_index: int
    tree_head: SignedTreeHead
    way: str = ""
    """How the transaction was written, where a caller chose among ways (PostgreSQL:
    ``alone`` or ``locked``)."""
    refused: int = 0
    """Lone statements (``append_pg_alone``) that wrote nothing before this one."""

    @property
    def indexes(self) -> range:
        return range(self.first_index, self.tree_head.tree_size)


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """RFC 9162 §2.1.3: the audit path of ``leaf_index`` in the tree of ``tree_size``."""

    leaf_index: int
    tree_size: int
    leaf_hash: bytes
    audit_path: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """RFC 9162 §2.1.4: the proof that tree ``second`` extends tree ``first``."""

    first: int
    second: int
    proof: tuple[bytes, ...]


def _head_from_row(row: Row[Any]) -> SignedTreeHead:
    return SignedTreeHead(
        tree_size=row.tree_size,
        root_hash=bytes(row.root_hash),
        timestamp_ms=row.timestamp_ms,
        signature=bytes(row.signature),
        key_id=row.key_id,
    )


def _stored_from_row(row: Row[Any]) -> StoredEntry:
    leaf = bytes(row.leaf)
    return StoredEntry(row.leaf_index, decode_leaf(leaf), leaf, bytes(row.leaf_hash))


def read_nodes_sync(
    conn: Connection, keys: Collection[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    """The stored hashes of the perfect subtrees ``keys`` that exist."""
    wanted = sorted(keys)
    if conn.dialect.name == "sqlite":
        pairs = json.dumps([[lv, ix] for lv, ix in wanted])
        return {
            (lv, ix): bytes(h) for lv, ix, h in _NODES_BY_KEY_SQLITE.rows(conn, {"keys": pairs})
        }
    found: dict[tuple[int, int], bytes] = {}
    for start in range(0, len(wanted), _NODE_CHUNK):
        chunk = wanted[start : start + _NODE_CHUNK]
        condition = or_(*(and_(nodes.c.level == lv, nodes.c.node_index == ix) for lv, ix in chunk))
        rows = conn.execute(
            select(nodes.c.level, nodes.c.node_index, nodes.c.hash).where(condition)
        )
        found.update(((r.level, r.node_index), bytes(r.hash)) for r in rows)
    return found


_Step = tuple[Any, ...]
"""A statement of ``TransparencyLog._append_steps``: ("lock",), ("rows", Prepared,
params), ("nodes", keys) or ("write", entry rows, node rows, tree head row)."""


_ROWS_JSON = msgspec.json.Encoder()
"""Bytes as base64 and naive datetimes as ISO 8601 without a zone, as the statements read them."""


def _batch_params(
    entry_rows: list[dict[str, Any]], node_rows: list[dict[str, Any]], head: dict[str, Any]
) -> dict[str, Any]:
    """``_WRITE_BATCH_PG``'s parameters: the rows of each table as one JSON text."""
    params = dict(head)
    params["entries"] = _ROWS_JSON.encode(entry_rows).decode()
    params["nodes"] = _ROWS_JSON.encode(node_rows).decode()
    return params


async def _require_nodes_pg(
    conn: Any, keys: Collection[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    """``_require_nodes_sync`` on an asyncpg connection: one statement over arrays."""
    wanted = sorted(set(keys))
    rows = await _NODES_BY_KEY.rows_pg(
        conn, {"levels": [lv for lv, _ in wanted], "indexes": [ix for _, ix in wanted]}
    )
    found = {(lv, ix): bytes(h) for lv, ix, h in rows}
    if len(found) != len(wanted):
        raise LogStateConflict("the stored tree lacks subtree hashes it should have")
    return found


def _require_nodes_sync(
    conn: Connection, keys: Collection[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    found = read_nodes_sync(conn, keys)
    if len(found) != len(set(keys)):
        raise LogStateConflict("the stored tree lacks subtree hashes it should have")
    return found


async def _require_nodes(
    conn: AsyncConnection, keys: Collection[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    return await conn.run_sync(_require_nodes_sync, keys)


class TransparencyLog:
    """An RFC 9162 log of audit entries in the caller's database.

    ``signing_key`` signs one tree head per appended batch; ``key_id`` names its public
    key (e.g. in a JWKS). ``lock_id`` is the PostgreSQL advisory lock key: logs in
    different databases (shards) may share it, logs in one database may not exist.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        signing_key: Ed25519PrivateKey,
        key_id: str,
        *,
        lock_id: int = DEFAULT_LOCK_ID,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        dialect = engine.dialect.name
        if dialect not in _SUPPORTED_DIALECTS:
            raise ValueError(f"the audit log runs on {_SUPPORTED_DIALECTS}, not {dialect!r}")
        self._engine = engine
        # The right edge after the last append this object made, keyed by the tree
        # size and root it produced. An append whose locked read of the newest
        # tree head finds that same (size, root) reuses it instead of reading
        # log2(n) stored nodes; anything else (another instance appended, or that
        # transaction rolled back) falls back to the stored nodes. The root hash
        # pins the exact leaves, so a rolled-back append can never be mistaken
        # for a later one of the same size.
        # Its timestamp too: the next head's may not be older.
        self._edge_memo: tuple[int, bytes, dict[int, bytes], int] | None = None
        # Whether the memo is believed to be the log's newest state: the last append
        # went alone, or found under the lock the log as this object had left it,
        # or ``refresh_pg`` has just read it. The condition for ``append_pg_alone``.
        self._memo_current = False
        self._dialect = dialect
        self._signing_key = signing_key
        self._key_id = key_id
        self._lock_id = lock_id
        self._clock = clock

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._signing_key.public_key()

    @property
    def may_go_alone(self) -> bool:
        """Whether ``append_pg_alone`` would try: this object's last append went alone,
        or found under the lock the log as this object had left it, or
        ``refresh_pg`` has read the log's newest state since (and the log is not
        empty)."""
        return self._edge_memo is not None and self._memo_current

    # -- writing ---------------------------------------------------------------

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        """Append ``batch`` in one transaction of its own and sign one tree head for it."""
        encoded = [EncodedEntry.of(e) for e in batch]  # encode before taking the lock
        if not encoded:
            raise ValueError("an append needs at least one entry")
        async with self._engine.begin() as conn:
            return await conn.run_sync(self._append_sync, encoded)

    def append_sync(
        self, conn: Connection, batch: Sequence[AuditEntry | EncodedEntry]
    ) -> AppendResult:
        """``append_in`` for a synchronous connection (same database as the engine): the
        append joins the caller's transaction on ``conn``; the caller commits."""
        encoded = [EncodedEntry.of(e) for e in batch]
        if not encoded:
            raise ValueError("an append needs at least one entry")
        if conn.dialect.name != self._dialect:
            raise ValueError("the connection must reach the log's database")
        return self._append_sync(conn, encoded)

    async def append_in(
        self, conn: AsyncConnection, batch: Sequence[AuditEntry | EncodedEntry]
    ) -> AppendResult:
        """Append ``batch`` inside the caller's transaction on ``conn``.

        The append (and the log lock) commits or rolls back with the caller's
        transaction. Call it before other statements of that transaction: on SQLite a
        transaction that read first may fail to become a writer.
        """
        encoded = [EncodedEntry.of(e) for e in batch]
        if not encoded:
            raise ValueError("an append needs at least one entry")
        return await conn.run_sync(self._append_sync, encoded)

    def _append_sync(self, conn: Connection, batch: list[EncodedEntry]) -> AppendResult:
        """The append itself, on the caller's transaction (synchronous: on a sync
        connection, or through ``run_sync`` on an async one)."""
        steps = self._append_steps(batch)
        try:
            step = next(steps)
            while True:
                kind = step[0]
                result: Any = None
                if kind == "lock":
                    if self._dialect == "postgresql":
                        conn.execute(_PG_LOCK, {"k": self._lock_id})
                    else:
                        _SQLITE_LOCK.execute(conn)
                elif kind == "rows":
                    result = step[1].rows(conn, step[2])
                elif kind == "nodes":
                    result = _require_nodes_sync(conn, step[1])
                else:
                    _INSERT_ENTRIES.execute_many(conn, step[1])
                    _INSERT_NODES.execute_many(conn, step[2])
                    _INSERT_HEAD.execute(conn, step[3])
                step = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def append_pg(
        self, conn: Any, batch: Sequence[AuditEntry | EncodedEntry]
    ) -> AppendResult:
        """``append_in`` on an asyncpg connection of the log's PostgreSQL database,
        inside the caller's transaction on it, without SQLAlchemy (the statements
        are the same; see ``audit._sql``). The caller commits."""
        if self._dialect != "postgresql":
            raise ValueError("append_pg is for a log on PostgreSQL")
        encoded = [EncodedEntry.of(e) for e in batch]
        if not encoded:
            raise ValueError("an append needs at least one entry")
        steps = self._append_steps(encoded)
        try:
            step = next(steps)
            while True:
                kind = step[0]
                result: Any = None
                if kind == "lock":
                    await _PG_LOCK_PREPARED.rows_pg(conn, {"k": self._lock_id})
                elif kind == "rows":
                    result = await step[1].rows_pg(conn, step[2])
                elif kind == "nodes":
                    result = await _require_nodes_pg(conn, step[1])
                else:
                    await _WRITE_BATCH_PG.execute_pg(conn, _batch_params(*step[1:]))
                step = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def append_pg_alone(
        self, conn: Any, batch: Sequence[AuditEntry | EncodedEntry]
    ) -> AppendResult | None:
        """Append ``batch`` in one call of its own on an asyncpg connection outside any
        transaction: one round trip, where ``append_pg`` in a transaction takes five
        (BEGIN, the lock, the newest tree head, the rows, COMMIT).

        It extends the log's right edge as this object last left it or last read it,
        so it is tried only while that is likely current (``may_go_alone``): after
        this object's previous append went this way, or found under the lock that
        nothing else had appended since its own, or after ``refresh_pg``, or after a
        call that another writer's batch had come before. The call takes the log's
        lock and writes only if the newest tree head is still that one. Otherwise it
        writes nothing and this returns None, having taken the newest head and its
        right edge (read under the lock) as what the next call extends: the caller
        tries again at once, or appends with ``append_pg`` in a transaction. With
        nothing to extend (``may_go_alone`` false) this returns None at once,
        without a round trip.
        """
        if self._dialect != "postgresql":
            raise ValueError("append_pg_alone is for a log on PostgreSQL")
        encoded = [EncodedEntry.of(e) for e in batch]
        if not encoded:
            raise ValueError("an append needs at least one entry")
        memo = self._edge_memo
        if memo is None or not self._memo_current:
            return None
        size, root, edge_nodes, last_ms = memo
        edge = CompactRange(size, edge_nodes)
        entry_rows, node_rows, head_row, head = self._extend(edge, encoded, last_ms)
        params = _batch_params(entry_rows, node_rows, head_row)
        params.update(k=self._lock_id, prev_size=size, prev_root=root)
        rows = await _WRITE_BATCH_PG_ALONE.rows_pg(conn, params)
        if rows and rows[0][0]:
            self._edge_memo = (head.tree_size, head.root_hash, edge.edge(), head.timestamp_ms)
            return AppendResult(size, head)
        # Another writer appended first: nothing was written; its state is the next
        # call's to extend.
        self._adopt_state([row[1:] for row in rows])
        return None

    async def refresh_pg(self, conn: Any) -> bool:
        """Read, in one statement on an asyncpg connection and without the log's lock,
        the newest tree head and the perfect subtrees of its right edge, and make
        them what the next ``append_pg_alone`` extends (for a writer with nothing
        to extend yet, e.g. after a restart). Returns whether the log was as this
        object had left it (nothing else appended since). Raises LogStateConflict
        if the stored tree lacks subtree hashes it should have. On an empty log
        there is nothing to extend alone: ``may_go_alone`` becomes false."""
        if self._dialect != "postgresql":
            raise ValueError("refresh_pg is for a log on PostgreSQL")
        return self._adopt_state(await _STATE_PG.rows_pg(conn))

    def _adopt_state(self, rows: Sequence[Sequence[Any]]) -> bool:
        """Make the log's state in ``rows`` (tree size, root, timestamp, then a level
        and subtree hash per row) what the next ``append_pg_alone`` extends; no
        row, or a size of None: an empty log. Returns whether it is the state this
        object had left."""
        if not rows or rows[0][0] is None:
            self._edge_memo = None
            self._memo_current = False
            return False
        size, root, last_ms = rows[0][0], bytes(rows[0][1]), rows[0][2]
        edge = {level: bytes(h) for *_, level, h in rows if level is not None and h is not None}
        if len(edge) != size.bit_count():
            self._memo_current = False
            raise LogStateConflict("the stored tree lacks subtree hashes it should have")
        memo = self._edge_memo
        unchanged = memo is not None and memo[0] == size and memo[1] == root
        self._edge_memo = (size, root, edge, last_ms)
        self._memo_current = True
        return unchanged

    def _extend(
        self, edge: CompactRange, batch: list[EncodedEntry], last_ms: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], SignedTreeHead]:
        """The rows that append ``batch`` to the tree whose right edge is ``edge``
        (which this extends): its entries, the perfect subtrees they complete and its
        signed tree head, never older than ``last_ms``."""
        size = edge.size
        entry_rows: list[dict[str, Any]] = []
        node_rows: list[dict[str, Any]] = []
        for offset, encoded in enumerate(batch):
            entry, leaf = encoded.entry, encoded.leaf
            hashed = leaf_hash(leaf)
            entry_rows.append(
                {
                    "leaf_index": size + offset,
                    "leaf": leaf,
                    "leaf_hash": hashed,
                    "kind": str(entry.kind),
                    "actor": entry.actor,
                    "subject": entry.subject,
                    "purpose": entry.purpose,
                    "created_at": naive_utc(entry.timestamp),
                }
            )
            node_rows.extend(
                {"level": lv, "node_index": ix, "hash": h} for lv, ix, h in edge.append(hashed)
            )
        # Tree-head timestamps never go backwards, even if the clock does.
        timestamp_ms = max(int(self._clock().timestamp() * 1000), last_ms)
        head = sign_tree_head(self._signing_key, self._key_id, edge.size, edge.root(), timestamp_ms)
        head_row = {
            "tree_size": head.tree_size,
            "root_hash": head.root_hash,
            "timestamp_ms": head.timestamp_ms,
            "signature": head.signature,
            "key_id": head.key_id,
        }
        return entry_rows, node_rows, head_row, head

    def _append_steps(self, batch: list[EncodedEntry]) -> Generator[_Step, Any, AppendResult]:
        """The append, written once for both drivers: it yields its statements
        (``_Step``) and receives their results."""
        yield ("lock",)
        # Read the state only inside the lock: it is the state this batch extends.
        found_head = yield ("rows", _LAST_HEAD, {})
        last = found_head[0] if found_head else None
        size, last_ms, last_root = (last[0], last[1], bytes(last[2])) if last else (0, 0, b"")
        memo = self._edge_memo
        # Nothing else appended since this object's last append: the next may go
        # alone (``append_pg_alone``).
        self._memo_current = memo is not None and memo[0] == size and memo[1] == last_root
        if memo is not None and self._memo_current:
            edge = CompactRange(size, memo[2])
        else:
            edge_keys = CompactRange.edge_nodes(size)
            found = yield ("nodes", edge_keys)
            edge = CompactRange(size, {lv: found[(lv, ix)] for lv, ix in edge_keys})
        entry_rows, node_rows, head_row, head = self._extend(edge, batch, last_ms)
        yield ("write", entry_rows, node_rows, head_row)
        self._edge_memo = (head.tree_size, head.root_hash, edge.edge(), head.timestamp_ms)
        return AppendResult(size, head)

    # -- reading ---------------------------------------------------------------

    @staticmethod
    async def _size(conn: AsyncConnection) -> int:
        size = (await conn.execute(select(func.max(tree_heads.c.tree_size)))).scalar()
        return int(size or 0)

    async def size(self) -> int:
        """The number of committed leaves."""
        async with self._engine.connect() as conn:
            return await self._size(conn)

    async def latest_tree_head(self) -> SignedTreeHead | None:
        """The newest signed tree head, or None while the log is empty."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(tree_heads).order_by(tree_heads.c.tree_size.desc()))
            ).first()
        return _head_from_row(row) if row else None

    async def get_tree_head(self, tree_size: int) -> SignedTreeHead:
        """The signed tree head for exactly ``tree_size`` leaves."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(tree_heads).where(tree_heads.c.tree_size == tree_size))
            ).first()
        if row is None:
            raise TreeHeadNotFound(f"no signed tree head for size {tree_size}")
        return _head_from_row(row)

    async def get_entry(self, leaf_index: int) -> StoredEntry:
        """The entry at ``leaf_index`` with the exact bytes its leaf hash covers."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(entries).where(entries.c.leaf_index == leaf_index))
            ).first()
        if row is None:
            raise EntryNotFound(f"no audit entry at index {leaf_index}")
        return _stored_from_row(row)

    async def list_entries(
        self,
        *,
        subject: str | None = None,
        team: str | None = None,
        purpose: str | None = None,
        kinds: Iterable[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: int | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> EntryPage:
        """Entries matching every given filter, ordered by leaf index.

        ``team`` matches the actor column (a team name, "customer" or "system").
        ``since`` is inclusive, ``until`` exclusive. ``cursor`` is the ``next_cursor`` of
        the previous page: the leaf index after (or, descending, before) which to go on.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidQuery(f"page size must be between 1 and {MAX_PAGE}")
        conditions: list[ColumnElement[bool]] = []
        if subject is not None:
            conditions.append(entries.c.subject == subject)
        if team is not None:
            conditions.append(entries.c.actor == team)
        if purpose is not None:
            conditions.append(entries.c.purpose == purpose)
        if kinds is not None:
            conditions.append(entries.c.kind.in_([str(k) for k in kinds]))
        if since is not None:
            conditions.append(entries.c.created_at >= naive_utc(since))
        if until is not None:
            conditions.append(entries.c.created_at < naive_utc(until))
        order = entries.c.leaf_index.desc() if descending else entries.c.leaf_index.asc()
        if cursor is not None:
            conditions.append(
                entries.c.leaf_index < cursor if descending else entries.c.leaf_index > cursor
            )
        query = select(entries).where(*conditions).order_by(order).limit(limit + 1)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        items = [_stored_from_row(r) for r in rows[:limit]]
        next_cursor = items[-1].leaf_index if len(rows) > limit else None
        return EntryPage(items, next_cursor)

    # -- proofs ----------------------------------------------------------------

    async def root_at(self, tree_size: int) -> bytes:
        """MTH of the first ``tree_size`` leaves, from at most log2(n) stored subtrees."""
        async with self._engine.connect() as conn:
            current = await self._size(conn)
            if not 0 < tree_size <= current:
                raise InvalidProofRequest(f"tree size {tree_size} is not in 1..{current}")
            keys = perfect_subtrees(0, tree_size)
            found = await _require_nodes(conn, keys)
        return subtree_hash_from(found)(0, tree_size)

    async def inclusion_proof(
        self, leaf_index: int, tree_size: int | None = None
    ) -> InclusionProof:
        """The audit path of ``leaf_index`` in the tree of ``tree_size`` (default: current)."""
        async with self._engine.connect() as conn:
            current = await self._size(conn)
            size = current if tree_size is None else tree_size
            if not 0 < size <= current:
                raise InvalidProofRequest(f"tree size {size} is not in 1..{current}")
            if not 0 <= leaf_index < size:
                raise InvalidProofRequest(f"leaf index {leaf_index} is not in a tree of {size}")
            ranges = inclusion_path_ranges(leaf_index, size)
            # Stored nodes never change once written, so reading them after the size
            # needs no snapshot: a size once seen has all its nodes committed.
            found = await _require_nodes(conn, nodes_for_ranges(ranges) | {(0, leaf_index)})
        path = inclusion_proof(leaf_index, size, subtree_hash_from(found))
        return InclusionProof(leaf_index, size, found[(0, leaf_index)], tuple(path))

    async def consistency_proof(self, first: int, second: int | None = None) -> ConsistencyProof:
        """The proof that the tree of ``second`` (default: current) extends that of ``first``."""
        async with self._engine.connect() as conn:
            current = await self._size(conn)
            size = current if second is None else second
            if not 0 < first <= size <= current:
                raise InvalidProofRequest(
                    f"need 0 < first <= second <= {current}, got {first} and {size}"
                )
            ranges = consistency_proof_ranges(first, size)
            found = await _require_nodes(conn, nodes_for_ranges(ranges))
        proof = consistency_proof(first, size, subtree_hash_from(found))
        return ConsistencyProof(first, size, tuple(proof))
