"""Shared fixtures: databases (SQLite and a real PostgreSQL), app clients, and the
whole-run log capture that proves no personal value reaches the logs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import sqlite3
import tempfile
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
    if not hasattr(config, "workerinput"):
        # With pytest-xdist each worker reports its logs here; the controller checks them.
        os.environ.setdefault("STORYVAULT_TEST_LOGCHECK", tempfile.mkdtemp(prefix="sv-logcheck-"))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Invariant 2: the logs of the whole run contain no stored personal value."""
    from governance.demo import demo_stories

    shared = Path(os.environ.get("STORYVAULT_TEST_LOGCHECK", tempfile.gettempdir()))
    worker = getattr(session.config, "workerinput", None)
    if worker is not None:
        (shared / f"{worker['workerid']}.json").write_text(
            json.dumps({"log": _LOG.getvalue(), "values": sorted(PERSONAL_VALUES)})
        )
        return
    values = set(PERSONAL_VALUES)
    text = _LOG.getvalue()
    for part in shared.glob("*.json") if "STORYVAULT_TEST_LOGCHECK" in os.environ else []:
        data = json.loads(part.read_text())
        text += data["log"]
        values.update(data["values"])
    for story in demo_stories():
        values.update(v for v in story["profile"].values())
        for ch in story["chapters"]:
            values.update(str(v) for v in ch["body"].values() if isinstance(v, str) and len(v) > 6)
    leaked = sorted(v for v in values if len(v) >= 6 and v in text)
    if leaked:
        session.exitstatus = 1
        print(
            f"\nPERSONAL DATA IN LOGS: {len(leaked)} stored values appear in the captured logs, "
            f"e.g. {[re.sub(r'[A-Za-z0-9]', '*', v)[:20] for v in leaked[:3]]}"
        )
    elif text:
        print(
            f"\nlog check: {len(text.splitlines())} log lines scanned for {len(values)} "
            "personal values: none found"
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


class _Templates:
    """Migrated databases built once per session and copied for each test: a test
    then starts from a ready schema (and, when it asks for ``org``, the demo
    organisation) instead of running migrations and seeding itself."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str], Any] = {}

    def build(self, backend: str, kind: str, pg: PgServer | None) -> Any:
        key = (backend, kind)
        if key not in self.built:
            self.built[key] = asyncio.run(self._build(backend, kind, pg))
        return self.built[key]

    async def _build(self, backend: str, kind: str, pg: PgServer | None) -> Any:
        from governance.service import StoryVault

        where = self.root / f"{backend}-{kind}"
        where.mkdir(parents=True)
        if backend == "sqlite":
            url = f"sqlite+aiosqlite:///{where / 'storyvault.db'}"
            keystore = ""
        else:
            assert pg is not None
            url = pg.create_database(f"tmpl_{kind}")
            keystore = pg.create_database(f"tmpl_{kind}_keys")
        settings = make_settings(where, url, keystore_url=keystore)
        vault = StoryVault(settings)
        await vault.start()
        headers: dict[str, dict[str, str]] = {
            "compliance": {"Authorization": f"Bearer {ADMIN_KEY}"}
        }
        if kind == "org":
            async with vault.db.write_session() as session:
                for team in DEMO_TEAMS:
                    await vault.teams.create_team(session, team, roles=[])
                    issued = await vault.teams.issue_key(session, team, label="test")
                    headers[team] = {"Authorization": f"Bearer {issued.secret}"}
                await session.commit()
            await vault.refresh_policy_catalog()
            await vault.seed_demo_policy()
        await vault.stop()
        return {"dir": where, "url": url, "keystore": keystore, "headers": headers}


_TEMPLATES: _Templates | None = None


def _copy_sqlite(source: Path, target: Path) -> None:
    """A copy of the database ``source`` with everything committed to it, through
    SQLite's backup API: the file alone can lack what is still in its write-ahead
    log (a checkpoint that a reader held back when the template's app stopped)."""
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> _Templates:
    global _TEMPLATES  # noqa: PLW0603  (one set per test session)
    if _TEMPLATES is None:
        _TEMPLATES = _Templates(tmp_path_factory.mktemp("templates"))
    return _TEMPLATES


@pytest.fixture
def database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, templates: _Templates
) -> str:
    kind = "org" if "org" in request.fixturenames else "bare"
    server: PgServer | None = request.getfixturevalue("pg") if backend == "postgresql" else None
    tmpl = templates.build(backend, kind, server)
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tmpl["dir"] / "data" / "keyring.json", data / "keyring.json")
    request.node.stash[_ORG_KEY] = tmpl["headers"]
    if backend == "sqlite":
        for name in ("storyvault.db", "storyvault-keys.db"):
            _copy_sqlite(tmpl["dir"] / name, tmp_path / name)
        return f"sqlite+aiosqlite:///{tmp_path / 'storyvault.db'}"
    assert server is not None
    name = "t_" + uuid.uuid4().hex[:12]
    server.psql(f'CREATE DATABASE "{name}" TEMPLATE "tmpl_{kind}"')
    server.psql(f'CREATE DATABASE "k{name}" TEMPLATE "tmpl_{kind}_keys"')
    return server.url(name)


_ORG_KEY = pytest.StashKey[dict[str, dict[str, str]]]()


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
def settings(tmp_path: Path, database_url: str) -> Settings:
    if database_url.startswith("postgresql"):
        # production shape: the key store in a database of its own
        base, name = database_url.rsplit("/", 1)
        return make_settings(tmp_path, database_url, keystore_url=f"{base}/k{name}")
    return make_settings(tmp_path, database_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    from api.app import create_app

    # The database comes from a migrated template (see _Templates): no migration run.
    app = create_app(settings, migrate=False)
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
    client: AsyncTestClient[Any], request: pytest.FixtureRequest
) -> dict[str, dict[str, str]]:
    """The demo organisation: four teams with keys and the starter policy, already in
    the database the test starts from (built once per session, see _Templates).
    Returns auth headers per team (and 'compliance' for the admin key)."""
    return dict(request.node.stash[_ORG_KEY])


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


async def log_every_statement(db: Any) -> list[str]:
    """Open every connection ``db``'s PostgreSQL pool may hand out; return the list
    that every statement run on them from now on is added to."""
    await db.pg_connection(lambda conn: conn.fetchval("SELECT 1"))
    pool = db._pg_pool
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    logged: list[str] = []
    for conn in held:
        conn.add_query_logger(lambda record: logged.append(record.query))
    for conn in held:
        await pool.release(conn)
    logged.clear()
    return logged


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # In CI nothing may skip: PostgreSQL and browser tests must run.
    if os.environ.get("CI"):
        for item in items:
            for mark in item.iter_markers("skip"):
                raise pytest.UsageError(
                    f"{item.nodeid} is marked skip ({mark.kwargs}); CI forbids skips"
                )
