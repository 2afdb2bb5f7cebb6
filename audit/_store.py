"""Tables of the transparency log, on ``SQLModel.metadata``.

* ``audit_entries``: one row per leaf. ``leaf`` holds the exact bytes the leaf hash
  covers; ``kind``/``actor``/``subject``/``purpose``/``created_at`` are copies of leaf
  fields for indexed filtering (``verify_log`` checks they agree with the leaf).
* ``audit_nodes``: the hash of every perfect subtree ``(level, node_index)``, covering
  leaves ``[node_index * 2**level, (node_index + 1) * 2**level)``; level 0 are the leaf
  hashes. A tree of n leaves has fewer than 2n of them. Any range of the RFC
  recursion is a fold of at most log2(n) of them, so appends, roots of past sizes
  and proofs never read all leaves.
* ``audit_tree_heads``: one signed tree head per appended batch.

All three are append-only (see ``append_only_ddl``); rows are never updated.
``created_at`` is naive UTC (``TIMESTAMP WITHOUT TIME ZONE``) so SQLite and
PostgreSQL compare it the same way.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    LargeBinary,
    SmallInteger,
    String,
    Table,
)
from sqlmodel import SQLModel

metadata = SQLModel.metadata

entries = Table(
    "audit_entries",
    metadata,
    Column("leaf_index", BigInteger, primary_key=True, autoincrement=False),
    Column("leaf", LargeBinary, nullable=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("subject", String(128), nullable=True),
    Column("purpose", String(128), nullable=True),
    Column("created_at", DateTime(timezone=False), nullable=False),
    # Filters are paginated by leaf_index, hence the composite indexes.
    Index("ix_audit_entries_subject", "subject", "leaf_index"),
    Index("ix_audit_entries_actor", "actor", "leaf_index"),
    Index("ix_audit_entries_purpose", "purpose", "leaf_index"),
    Index("ix_audit_entries_kind", "kind", "leaf_index"),
    Index("ix_audit_entries_created_at", "created_at"),
)

nodes = Table(
    "audit_nodes",
    metadata,
    Column("level", SmallInteger, primary_key=True, autoincrement=False),
    Column("node_index", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary(32), nullable=False),
)

tree_heads = Table(
    "audit_tree_heads",
    metadata,
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("timestamp_ms", BigInteger, nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
    Column("key_id", String(128), nullable=False),
)

TABLES: tuple[Table, ...] = (entries, nodes, tree_heads)
"""The audit log's tables, for ``metadata.create_all(conn, tables=TABLES)``."""

TABLE_NAMES: tuple[str, ...] = tuple(t.name for t in TABLES)
"""Their names, e.g. for ``append_only_ddl``."""
