"""PostgreSQL: a batch appended in one call that, when another writer's batch came
first, answers with the log's newest state instead (``storyvault_audit_append``).

A writer that shares the log with other processes extends the log's right edge as
it last saw it (``TransparencyLog.append_pg_alone``). A single statement cannot
both wait for the log's lock and then see what was committed during the wait: its
snapshot is taken when it starts. A function's statements, in READ COMMITTED, each
take a snapshot of their own, so this function takes the lock, then reads the
newest tree head as it is once the lock is held. If that head is the one the
writer extended, it writes the batch (entries, nodes, signed tree head). Otherwise
it writes nothing and returns that head and the perfect subtrees of its right edge,
read under the lock, which the writer's next call extends: a writer that finds
another's batch spends one more round trip, where reading the state apart before
each call (``refresh_pg``) spent one on every batch, and another after every refusal.

Called outside a transaction, the call is its own transaction: the lock is held
while the server runs it and commits, never across a round trip. The statements are
plain strings so that Alembic migrations can ``op.execute`` them (migration 0005).
"""

from __future__ import annotations

APPEND_FUNCTION = "storyvault_audit_append"

NEWEST_HEAD_SQL = (
    "SELECT h.tree_size, h.root_hash, h.timestamp_ms FROM audit_tree_heads AS h"
    " ORDER BY h.tree_size DESC LIMIT 1"
)
"""The function's read of the newest tree head: one step down the primary key's
index (tests/unit/audit/test_audit_log.py checks its plan on a log of many heads)."""

_CREATE = f"""
CREATE OR REPLACE FUNCTION {APPEND_FUNCTION}(
    lock_key bigint, prev_size bigint, prev_root bytea, batch_entries json, batch_nodes json,
    new_size bigint, new_root bytea, new_timestamp_ms bigint, new_signature bytea,
    new_key_id text)
RETURNS TABLE (written boolean, head_size bigint, head_root bytea, head_timestamp_ms bigint,
    edge_level integer, edge_hash bytea)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    cur_size bigint;
    cur_root bytea;
    cur_ms bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    -- A statement of its own: its snapshot is taken now, with the lock held.
    {NEWEST_HEAD_SQL} INTO cur_size, cur_root, cur_ms;
    IF cur_size = prev_size AND cur_root = prev_root THEN
        INSERT INTO audit_entries
            (leaf_index, leaf, leaf_hash, kind, actor, subject, purpose, created_at)
        SELECT r.leaf_index, decode(r.leaf, 'base64'), decode(r.leaf_hash, 'base64'),
            r.kind, r.actor, r.subject, r.purpose, r.created_at
        FROM json_to_recordset(batch_entries) AS r(leaf_index bigint, leaf text,
            leaf_hash text, kind text, actor text, subject text, purpose text,
            created_at timestamp);
        INSERT INTO audit_nodes (level, node_index, hash)
        SELECT r.level, r.node_index, decode(r.hash, 'base64')
        FROM json_to_recordset(batch_nodes) AS r(level smallint, node_index bigint, hash text);
        INSERT INTO audit_tree_heads (tree_size, root_hash, timestamp_ms, signature, key_id)
        VALUES (new_size, new_root, new_timestamp_ms, new_signature, new_key_id);
        RETURN QUERY SELECT true, new_size, NULL::bytea, NULL::bigint, NULL::integer,
            NULL::bytea;
        RETURN;
    END IF;
    -- Another writer's batch came first: the newest head and its right edge (one
    -- primary-key lookup per bit of its size), for the caller's next call.
    RETURN QUERY SELECT false, cur_size, cur_root, cur_ms, b.level, n.hash
        FROM (SELECT g.level FROM generate_series(0, 62) AS g(level)
              WHERE (cur_size >> g.level) & 1 = 1 OFFSET 0) AS b
        LEFT JOIN LATERAL (SELECT s.hash FROM audit_nodes AS s WHERE s.level = b.level
              AND s.node_index = (cur_size >> b.level) - 1 LIMIT 1) AS n ON true;
    IF NOT FOUND THEN  -- an empty log
        RETURN QUERY SELECT false, NULL::bigint, NULL::bytea, NULL::bigint, NULL::integer,
            NULL::bytea;
    END IF;
END
$fn$
"""  # noqa: S608  (constant fragments)


def append_function_ddl(dialect: str) -> list[str]:
    """Statements creating ``storyvault_audit_append`` (PostgreSQL; none for SQLite,
    whose writers append under the database's own write lock). Idempotent."""
    if dialect == "postgresql":
        return [_CREATE.strip()]
    if dialect == "sqlite":
        return []
    raise ValueError(f"the audit log runs on sqlite and postgresql, not {dialect!r}")


def drop_append_function_ddl(dialect: str) -> list[str]:
    """The inverse of ``append_function_ddl`` (for downgrades)."""
    if dialect == "postgresql":
        return [
            f"DROP FUNCTION IF EXISTS {APPEND_FUNCTION}"
            "(bigint, bigint, bytea, json, json, bigint, bytea, bigint, bytea, text)"
        ]
    return append_function_ddl(dialect)
