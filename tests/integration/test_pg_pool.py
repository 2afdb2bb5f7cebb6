"""The PostgreSQL hot path's own asyncpg pool: a statement costs one round trip and
giving the connection back costs none, while a failed transaction still leaves
nothing behind for the next user of the connection."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])


async def _log_every_query(direct: Any) -> list[str]:
    """Open every connection the pool may hand out and log what each one runs."""
    assert await direct.db.query(lambda: direct.teams.authenticate("svk_warm")) is None
    pool = direct.db._pg_pool
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    logged: list[str] = []
    for conn in held:
        conn.add_query_logger(lambda record: logged.append(record.query))
    for conn in held:
        await pool.release(conn)
    logged.clear()
    return logged


async def test_a_hot_read_is_one_round_trip_and_release_adds_none(direct: Any) -> None:
    logged = await _log_every_query(direct)
    for _ in range(3):
        assert await direct.db.query(lambda: direct.teams.authenticate("svk_unknown")) is None
    assert len(logged) == 3, logged
    assert all("api_keys" in q for q in logged)
    assert not any("RESET" in q.upper() or "UNLISTEN" in q.upper() for q in logged)


async def test_a_failed_transaction_leaves_the_connection_clean(direct: Any) -> None:
    logged = await _log_every_query(direct)

    async def fails(conn: asyncpg.Connection) -> None:
        await conn.execute("CREATE TEMP TABLE scratch (n int) ON COMMIT DROP")
        await conn.execute("SELECT 1 / 0")

    with pytest.raises(DBAPIError, match="division by zero"):
        await direct.db.pg_transaction(fails)

    async def state(conn: asyncpg.Connection) -> tuple[Any, ...]:
        return (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'"),
            await conn.fetchval("SELECT 1"),
        )

    # The connection the failed transaction used comes back first (the pool hands
    # out the last one released): it, and every other, is outside any transaction.
    for _ in range(direct.db._pg_pool.get_max_size()):
        assert await direct.db.pg_transaction(state) == (0, 1)
    assert "SELECT 1 / 0" in logged
