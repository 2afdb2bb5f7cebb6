"""Fixtures for the audit package's tests.

Database tests take the ``audit_engine`` fixture: an AsyncEngine whose database has
the audit tables and their append-only triggers, and nothing else. It is
parametrized: a SQLite file, and a scratch database on the suite's real PostgreSQL
(the session ``pg`` fixture; ``AUDIT_TEST_DATABASE_URL`` points it at another server
instead). Another fixture only needs to yield an engine prepared with
``prepare_audit_schema`` (the helpers below use ``engine.dialect.name``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit import (
    TABLE_NAMES,
    TABLES,
    AuditEntry,
    EntryKind,
    TransparencyLog,
    Withheld,
    append_function_ddl,
    append_only_ddl,
    drop_append_only_ddl,
)
from audit._store import metadata
from tests.pgserver import PgServer

KEY_ID = "audit-test-key"
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)


async def prepare_audit_schema(engine: AsyncEngine) -> None:
    """(Re)create only the audit tables, then make them append-only."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: metadata.drop_all(c, tables=list(TABLES)))
        await conn.run_sync(lambda c: metadata.create_all(c, tables=list(TABLES)))
        for statement in append_only_ddl(engine.dialect.name, TABLE_NAMES):
            await conn.exec_driver_sql(statement)
        for statement in append_function_ddl(engine.dialect.name):
            await conn.exec_driver_sql(statement)


async def drop_triggers(engine: AsyncEngine) -> None:
    """What an attacker with database access would do first."""
    async with engine.begin() as conn:
        for statement in drop_append_only_ddl(engine.dialect.name, TABLE_NAMES):
            await conn.exec_driver_sql(statement)


def make_entry(i: int, *, subject: str | None = None, team: str = "marketing") -> AuditEntry:
    """A deterministic disclosure entry number ``i``."""
    return AuditEntry(
        kind=EntryKind.DISCLOSURE if i % 3 else EntryKind.DENIAL,
        actor=team,
        actor_key_id=f"key-{team}",
        subject=subject if subject is not None else f"cust-{i % 7}",
        purpose="marketing.email" if i % 2 else "service.support",
        policy_version=3,
        categories=("contact.email", "identity.name"),
        withheld=(Withheld(category="insight.sentiment", reason="no_consent"),),
        consent_index=i,
        request_id=f"req-{i}",
        detail={"n": i, "ok": True},
        timestamp=BASE_TIME + timedelta(seconds=i),
    )


@pytest.fixture(scope="session")
def audit_pg_url(request: pytest.FixtureRequest) -> str:
    """One scratch PostgreSQL database for the whole run (tables are recreated per test)."""
    url = os.environ.get("AUDIT_TEST_DATABASE_URL")
    if url:
        return url
    server: PgServer = request.getfixturevalue("pg")
    return server.create_database("audit_unit_" + uuid.uuid4().hex[:8])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def audit_engine(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    else:
        url = request.getfixturevalue("audit_pg_url")
    engine = create_async_engine(url)
    await prepare_audit_schema(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def audit_log(audit_engine: AsyncEngine, signing_key: Ed25519PrivateKey) -> TransparencyLog:
    return TransparencyLog(audit_engine, signing_key, KEY_ID)


class AuditKit:
    """The helpers above, handed to test modules by the ``kit`` fixture so that no test
    imports a module named ``conftest`` (several test packages have one)."""

    key_id = KEY_ID
    base_time = BASE_TIME
    make_entry = staticmethod(make_entry)
    drop_triggers = staticmethod(drop_triggers)
    prepare_schema = staticmethod(prepare_audit_schema)


@pytest.fixture
def kit() -> type[AuditKit]:
    return AuditKit
