"""Shared fixtures: databases (SQLite and a real PostgreSQL), app clients, and the
whole-run log capture that proves no personal value reaches the logs."""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from governance.logs import configure_logging
from governance.settings import Settings
from tests.pgserver import PgServer, start_server, stop_server

ADMIN_KEY = "svk_test_admin_key_0123456789abcdef"
_LOG = io.StringIO()
PERSONAL_VALUES: set[str] = set()


class _Tee(io.TextIOBase):
    def write(self, s: str) -> int:
        _LOG.write(s)
        return len(s)


def pytest_configure(config: pytest.Config) -> None:
    configure_logging(stream=_Tee())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Invariant 2: the logs of the whole run contain no stored personal value."""
    from governance.demo import demo_stories

    values = set(PERSONAL_VALUES)
    for story in demo_stories():
        values.update(v for v in story["profile"].values())
        for ch in story["chapters"]:
            values.update(str(v) for v in ch["body"].values() if isinstance(v, str) and len(v) > 6)
    text = _LOG.getvalue()
    leaked = sorted(v for v in values if len(v) >= 6 and v in text)
    if leaked:
        session.exitstatus = 1
        print(
            f"\nPERSONAL DATA IN LOGS: {len(leaked)} stored values appear in the captured logs, e.g. "
            f"{[re.sub(r'[A-Za-z0-9]', '*', v)[:20] for v in leaked[:3]]}"
        )
    elif text:
        print(
            f"\nlog check: {len(text.splitlines())} log lines scanned for {len(values)} personal values: none found"
        )


def remember_personal(*values: str) -> None:
    PERSONAL_VALUES.update(values)


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'storyvault.db'}"
    server: PgServer = request.getfixturevalue("pg")
    return server.create_database("t_" + uuid.uuid4().hex[:12])


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    base = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        admin_key=ADMIN_KEY,
        mail_url=f"file://{tmp_path / 'outbox'}",
        demo_data=False,
        secure_cookies=False,
        sqlite_synchronous="NORMAL",
        retention_interval=0,
    )
    return replace(base, **overrides)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, request: pytest.FixtureRequest) -> Settings:
    if database_url.startswith("postgresql"):
        # production shape: the key store in a database of its own
        server: PgServer = request.getfixturevalue("pg")
        keystore = server.create_database("k_" + uuid.uuid4().hex[:12])
        return make_settings(tmp_path, database_url, keystore_url=keystore)
    return make_settings(tmp_path, database_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    from api.app import create_app

    app = create_app(settings)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
async def direct(settings: Settings) -> AsyncIterator[Any]:
    """A second StoryVault on the same database and key ring, bound to the test's loop
    (the test client runs the app on its own loop, whose connections cannot be shared)."""
    from governance.service import StoryVault

    vault = StoryVault(settings)
    try:
        yield vault
    finally:
        await vault.stop()


DEMO_TEAMS = ("sales", "marketing", "support", "product")


@pytest.fixture
async def org(
    client: AsyncTestClient[Any], admin: dict[str, str], direct: Any
) -> dict[str, dict[str, str]]:
    """The demo organisation: four teams with keys (over HTTP) and the starter policy
    (stored directly, then picked up by the app's policy watcher, as on any instance).
    Returns auth headers per team (and 'compliance' for the admin key)."""
    headers = {"compliance": admin}
    for team in DEMO_TEAMS:
        resp = await client.post("/v1/admin/teams", json={"name": team}, headers=admin)
        assert resp.status_code == 201, resp.text
        key = (await client.post(f"/v1/admin/teams/{team}/keys", json={}, headers=admin)).json()
        headers[team] = {"Authorization": f"Bearer {key['key']}"}
    await direct.seed_demo_policy()
    await wait_for_policy(client, await direct.policy_store.current_version())
    return headers


async def wait_for_policy(client: AsyncTestClient[Any], version: int, within: float = 5.0) -> None:
    """Wait until the app under test has compiled policy ``version``."""
    import asyncio
    import time

    deadline = time.monotonic() + within
    while client.app.state.vault.policy.version < version:
        assert time.monotonic() < deadline, "the app did not pick up the policy change"
        await asyncio.sleep(0.05)


@pytest.fixture
def support(org: dict[str, dict[str, str]]) -> dict[str, str]:
    return org["support"]


@pytest.fixture
def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # In CI nothing may skip: PostgreSQL and browser tests must run.
    if os.environ.get("CI"):
        for item in items:
            for mark in item.iter_markers("skip"):
                raise pytest.UsageError(
                    f"{item.nodeid} is marked skip ({mark.kwargs}); CI forbids skips"
                )
