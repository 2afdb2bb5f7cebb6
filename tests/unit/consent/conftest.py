"""Fixtures for the consent package: a SQLite file engine, a catalog, a clock.

``consent_engine`` is the one fixture to parametrize onto PostgreSQL later: every
test reaches the database only through it (and ``sessions`` built on it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel import SQLModel

from consent import CONSENT_TABLES, Ledger, LegalBasis, PurposeTerms


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


@pytest.fixture
async def consent_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    # A generous busy timeout: 50 concurrent appenders queue on SQLite's write lock.
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'consent.db'}", connect_args={"timeout": 30}
    )
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
