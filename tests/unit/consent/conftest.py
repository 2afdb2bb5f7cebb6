"""Fixtures for the consent package: a SQLite file engine, a catalog, a clock.

``consent_engine`` is parametrized onto a SQLite file and a scratch database on the
suite's real PostgreSQL (session ``pg`` fixture): every test reaches the database
only through it (and ``sessions`` built on it).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel import SQLModel

from consent import CONSENT_TABLES, Ledger, LegalBasis, PurposeTerms
from tests.pgserver import PgServer


def make_terms() -> list[PurposeTerms]:
    def terms(
        name: str,
        basis: LegalBasis,
        *,
        sale: bool = False,
        max_age: timedelta | None = None,
    ) -> PurposeTerms:
        return PurposeTerms(
            name=name,
            legal_basis=basis,
            sale_or_sharing=sale,
            max_age=max_age,
            notice_id=f"notice-{name}",
            notice_version="1",
            notice_text=f"We use your data for {name}.",
        )

    return [
        terms("service.support", LegalBasis.CONTRACT),
        terms("sales.outreach", LegalBasis.LEGITIMATE_INTEREST),
        terms("marketing.email", LegalBasis.CONSENT, max_age=timedelta(days=365)),
        terms("personalization", LegalBasis.CONSENT),
        terms("analytics.profiling", LegalBasis.CONSENT, max_age=timedelta(days=30)),
        terms("sharing.partners", LegalBasis.CONSENT, sale=True, max_age=timedelta(days=365)),
        terms("legal.retention", LegalBasis.LEGAL_OBLIGATION),
    ]


class FakeClock:
    """A controllable UTC clock; each reading advances by one microsecond."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(microseconds=1)
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


async def create_consent_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(
            lambda sync_conn: SQLModel.metadata.create_all(sync_conn, tables=list(CONSENT_TABLES))
        )


@pytest.fixture(scope="session")
def consent_pg_url(request: pytest.FixtureRequest) -> str:
    """One scratch PostgreSQL database for the whole run (tables are recreated per test)."""
    server: PgServer = request.getfixturevalue("pg")
    return server.create_database("consent_unit_" + uuid.uuid4().hex[:8])


async def reset_consent_tables(engine: AsyncEngine) -> None:
    """Drop what an earlier test left in a shared database (tables, triggers with them)."""
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS test_customers"))
        await conn.run_sync(
            lambda sync_conn: SQLModel.metadata.drop_all(sync_conn, tables=list(CONSENT_TABLES))
        )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def consent_engine(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        # A generous busy timeout: 50 concurrent appenders queue on SQLite's write lock.
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'consent.db'}", connect_args={"timeout": 30}
        )
    else:
        # 50 concurrent appenders each hold a connection while they wait for the lock.
        engine = create_async_engine(
            request.getfixturevalue("consent_pg_url"), pool_size=10, max_overflow=50
        )
        await reset_consent_tables(engine)
    await create_consent_tables(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(consent_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(consent_engine, expire_on_commit=False)


@pytest.fixture
def catalog() -> dict[str, PurposeTerms]:
    return {t.name: t for t in make_terms()}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(catalog: dict[str, PurposeTerms], clock: FakeClock) -> Ledger:
    return Ledger(catalog.values(), clock=clock)


@pytest.fixture
def make_clock() -> type[FakeClock]:
    """The clock class, for tests that need several independent clocks."""
    return FakeClock
