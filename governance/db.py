"""Database engine, sessions and migrations for the embedded SQLite default and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = ["Database", "alembic_config", "upgrade_database"]

_MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def upgrade_database(engine: AsyncEngine) -> None:
    """Apply every pending Alembic migration."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, engine.url.render_as_string(hide_password=False))


class Database:
    """The engine and a session factory; SQLite gets WAL and a busy timeout."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            # Each pooled aiosqlite connection is a thread and a file handle: keep
            # enough of them open that bursts do not churn through new ones.
            kwargs.update(pool_size=pool_size * 2, max_overflow=pool_size)
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            sync = sqlite_synchronous

            @event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={sync}")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time and its busy handler is not fair: under
        # steady load a waiting writer can starve past any timeout. Writers in
        # this process therefore queue on a FIFO lock; other processes (several
        # workers on one file) still meet the busy timeout as a last resort.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    @asynccontextmanager
    async def write_session(self) -> AsyncIterator[AsyncSession]:
        """A session for a write transaction (serialized in-process on SQLite)."""
        if self._write_lock is None:
            async with self.sessions() as session:
                yield session
            return
        async with self._write_lock, self.sessions() as session:
            yield session

    async def upgrade(self) -> None:
        await upgrade_database(self.engine)

    async def dispose(self) -> None:
        await self.engine.dispose()
