"""Fixtures of the policy package tests.

``policy_engine_db`` is an AsyncEngine on a fresh database with the policy
tables; it is a tmp SQLite file here, and the suite may parametrize it onto
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import SQLModel

from policies import POLICY_TABLES, PolicyCatalog, PolicyStore

DEFAULT_CATEGORIES = (
    "identity.name",
    "contact.email",
    "contact.phone",
    "contact.address",
    "demographic.birthday",
    "commerce.purchase",
    "commerce.invoice",
    "support.ticket",
    "engagement.interaction",
    "preference",
    "insight.sentiment",
    "insight.motivation",
)
DEFAULT_PURPOSES = (
    "service.support",
    "sales.outreach",
    "marketing.email",
    "personalization",
    "analytics.profiling",
    "sharing.partners",
    "legal.retention",
)
DEFAULT_TEAMS = ("sales", "marketing", "support", "product", "compliance")


def default_catalog() -> PolicyCatalog:
    return PolicyCatalog.of(
        teams=DEFAULT_TEAMS, categories=DEFAULT_CATEGORIES, purposes=DEFAULT_PURPOSES
    )


async def create_policy_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: SQLModel.metadata.create_all(c, tables=list(POLICY_TABLES)))


def sqlite_engine(path: Path) -> AsyncEngine:
    return create_async_engine(f"sqlite+aiosqlite:///{path}")


@pytest.fixture
async def policy_engine_db(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = sqlite_engine(tmp_path / "policy.db")
    await create_policy_tables(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def sqlite_engines() -> AsyncIterator[Callable[[Path], AsyncEngine]]:
    """Open several AsyncEngines (e.g. two instances on one file); all disposed after."""
    opened: list[AsyncEngine] = []

    def open_engine(path: Path) -> AsyncEngine:
        engine = sqlite_engine(path)
        opened.append(engine)
        return engine

    yield open_engine
    for engine in opened:
        await engine.dispose()


@pytest.fixture
def catalog() -> PolicyCatalog:
    return default_catalog()


@pytest.fixture
def store(policy_engine_db: AsyncEngine) -> PolicyStore:
    return PolicyStore(policy_engine_db)
