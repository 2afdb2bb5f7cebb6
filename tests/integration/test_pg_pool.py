"""The PostgreSQL hot path's own asyncpg pool: a statement costs one round trip and
giving the connection back costs none, while a failed transaction still leaves
nothing behind for the next user of the connection."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from tests.conftest import log_every_statement

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])


async def test_a_hot_read_is_one_round_trip_and_release_adds_none(direct: Any) -> None:
    logged = await log_every_statement(direct.db)
    for _ in range(3):
        assert await direct.db.query(lambda: direct.teams.authenticate("svk_unknown")) is None
    assert len(logged) == 3, logged
    assert all("api_keys" in q for q in logged)
    assert not any("RESET" in q.upper() or "UNLISTEN" in q.upper() for q in logged)


async def test_a_failed_transaction_leaves_the_connection_clean(direct: Any) -> None:
    logged = await log_every_statement(direct.db)

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


async def test_a_read_waits_for_a_taken_pool_at_most_the_bound(
    direct: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection free in the pool is taken at once; once callers hold every one,
    the next waits at most the bound and then fails as a lost server does (503),
    also after statements that failed or were cancelled while holding one."""
    import asyncio

    import governance.db

    monkeypatch.setattr(governance.db, "_PG_ACQUIRE_TIMEOUT", 0.3)
    db = direct.db

    def lookup() -> Any:
        return direct.teams.authenticate("svk_unknown")

    assert await db.query(lookup) is None

    # Failures and cancellations while holding a connection give it back.
    async def fails(conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT 1 / 0")

    for _ in range(3):
        with pytest.raises(DBAPIError, match="division by zero"):
            await db.pg_connection(fails)
    sleeping = asyncio.create_task(
        db.pg_connection(lambda conn: conn.execute("SELECT pg_sleep(5)"))
    )
    await asyncio.sleep(0.2)
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeping

    size = db._pg_pool.get_max_size()
    release, all_held = asyncio.Event(), asyncio.Event()
    held = 0

    async def hold(conn: asyncpg.Connection) -> None:
        nonlocal held
        held += 1
        if held == size:
            all_held.set()
        await release.wait()

    holders = [asyncio.create_task(db.pg_connection(hold)) for _ in range(size)]
    await asyncio.wait_for(all_held.wait(), 10)
    started = asyncio.get_running_loop().time()
    with pytest.raises(DBAPIError) as refused:
        await asyncio.wait_for(db.query(lookup), 5)  # an unbounded wait fails here
    waited = asyncio.get_running_loop().time() - started
    assert refused.value.connection_invalidated
    assert 0.25 <= waited < 3.0

    # A caller waiting when a connection comes free gets it.
    waiting = asyncio.create_task(db.query(lookup))
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(*holders)
    assert await waiting is None
    assert await asyncio.gather(*(db.query(lookup) for _ in range(size + 4))) == [None] * (size + 4)
