"""Opening a connection of the PostgreSQL hot path's pool is bounded as waiting for
one is: a server that accepts the connection and never answers costs a request the
bound (then 503), not asyncpg's own minute."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from sqlalchemy.exc import OperationalError

import governance.db
from governance.db import Database


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


async def test_opening_a_connection_waits_at_most_the_bound(
    silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(governance.db, "_PG_ACQUIRE_TIMEOUT", 0.5)
    db = Database(f"postgresql+asyncpg://storyvault@127.0.0.1:{silent_port}/storyvault")
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(OperationalError):
            await asyncio.wait_for(db.pg_connection(lambda conn: conn.fetchval("SELECT 1")), 10)
        assert 0.4 <= loop.time() - started < 5
    finally:
        await db.dispose()
