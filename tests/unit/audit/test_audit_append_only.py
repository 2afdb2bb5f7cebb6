"""The database refuses UPDATE and DELETE on the audit tables."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import (
    TABLE_NAMES,
    TransparencyLog,
    append_only_ddl,
    drop_append_only_ddl,
    entries,
    nodes,
    tree_heads,
)

_EDITS = [
    update(entries).values(leaf=b"{}").where(entries.c.leaf_index == 0),
    update(entries).values(subject="someone-else"),
    delete(entries).where(entries.c.leaf_index == 1),
    update(nodes).values(hash=b"\0" * 32),
    delete(nodes),
    update(tree_heads).values(signature=b"\0" * 64),
    delete(tree_heads),
]


@pytest.mark.parametrize("edit", _EDITS, ids=lambda e: f"{type(e).__name__}-{e.table.name}")
async def test_edits_are_refused(
    audit_log: TransparencyLog, audit_engine: AsyncEngine, kit: type, edit: object
) -> None:
    await audit_log.append([kit.make_entry(i) for i in range(3)])
    with pytest.raises(DBAPIError, match="append-only"):
        async with audit_engine.begin() as conn:
            await conn.execute(edit)  # type: ignore[call-overload]
    assert await audit_log.size() == 3
    assert (await audit_log.get_entry(1)).entry == kit.make_entry(1)


async def test_dropping_the_triggers_allows_edits(
    audit_log: TransparencyLog, audit_engine: AsyncEngine, kit: type
) -> None:
    await audit_log.append([kit.make_entry(0)])
    await kit.drop_triggers(audit_engine)
    async with audit_engine.begin() as conn:
        result = await conn.execute(update(entries).values(subject="x"))
    assert result.rowcount == 1


async def test_ddl_is_idempotent(
    audit_engine: AsyncEngine, audit_log: TransparencyLog, kit: type
) -> None:
    async with audit_engine.begin() as conn:
        for statement in append_only_ddl(audit_engine.dialect.name, TABLE_NAMES):
            await conn.exec_driver_sql(statement)
    await audit_log.append([kit.make_entry(0)])  # appends still work
    with pytest.raises(DBAPIError, match="append-only"):
        async with audit_engine.begin() as conn:
            await conn.execute(delete(entries))


def test_ddl_for_both_dialects_names_every_table() -> None:
    for dialect in ("sqlite", "postgresql"):
        ddl = " ".join(append_only_ddl(dialect, ["consent_events"]))
        assert "consent_events" in ddl
        assert "UPDATE" in ddl
        assert "DELETE" in ddl
        assert drop_append_only_ddl(dialect, ["consent_events"])
    assert "TRUNCATE" in " ".join(append_only_ddl("postgresql", ["t"]))


@pytest.mark.parametrize("name", ["Robert'); DROP TABLE x;--", "a b", "", "UPPER"])
def test_ddl_refuses_odd_table_names(name: str) -> None:
    with pytest.raises(ValueError, match="plain table name"):
        append_only_ddl("sqlite", [name])


def test_ddl_refuses_other_dialects() -> None:
    with pytest.raises(ValueError, match="not 'mysql'"):
        append_only_ddl("mysql", ["t"])
    with pytest.raises(ValueError, match="not 'mysql'"):
        drop_append_only_ddl("mysql", ["t"])
