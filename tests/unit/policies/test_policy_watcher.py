"""Cross-instance sync over one database (SQLite: the polling watcher)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from policies import (
    POLICY_TABLES,
    PolicyCatalog,
    PolicyEngine,
    PolicyStore,
    PollingPolicyWatcher,
    PostgresPolicyWatcher,
    RuleSpec,
    create_policy_watcher,
)
from policies._watcher import asyncpg_dsn

EngineFactory = Callable[[Path], AsyncEngine]


async def _wait_for(predicate: Callable[[], bool], limit: float) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > limit:
            break
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def test_two_engines_converge_within_a_second(
    tmp_path: Path, catalog: PolicyCatalog, sqlite_engines: EngineFactory
) -> None:
    db = tmp_path / "shared.db"
    first_db, second_db = sqlite_engines(db), sqlite_engines(db)
    async with first_db.begin() as conn:
        await conn.run_sync(lambda c: SQLModel.metadata.create_all(c, tables=list(POLICY_TABLES)))
    store_a, store_b = PolicyStore(first_db), PolicyStore(second_db)
    engine_a = await PolicyEngine.open(store_a, catalog)
    engine_b = await PolicyEngine.open(store_b, catalog)
    watcher_a, watcher_b = engine_a.watcher(), engine_b.watcher()
    assert isinstance(watcher_a, PollingPolicyWatcher)
    async with watcher_a, watcher_b:
        rule = await store_a.add_rule(
            RuleSpec("marketing", "contact.*", "read", "marketing.email"), catalog
        )
        # both engines follow through their watchers (the writer's own included)
        elapsed = await _wait_for(
            lambda: (
                "contact.email" in engine_b.table("marketing", "marketing.email").allowed
                and engine_a.version == 1
            ),
            limit=2,
        )
        assert elapsed < 1.0
        assert engine_a.version == engine_b.version == 1

        await store_b.remove_rule(rule.id)
        elapsed = await _wait_for(
            lambda: (
                not engine_a.table("marketing", "marketing.email").allowed and engine_b.version == 2
            ),
            limit=2,
        )
        assert elapsed < 1.0
        assert engine_a.version == engine_b.version == 2
    assert not watcher_a.running
    assert not watcher_b.running


async def test_change_before_watcher_start_is_not_missed(
    store: PolicyStore, catalog: PolicyCatalog
) -> None:
    engine = await PolicyEngine.open(store, catalog)
    await store.add_rule(RuleSpec("support", "*", "read", "service.support"), catalog)
    async with PollingPolicyWatcher(store, engine.reload, interval=0.05):
        elapsed = await _wait_for(lambda: engine.version == 1, limit=2)
    assert elapsed < 1.0


async def test_reload_errors_are_logged_and_polling_continues(store: PolicyStore) -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")

    async with PollingPolicyWatcher(store, flaky, interval=0.02) as watcher:
        assert isinstance(watcher, PollingPolicyWatcher)
        await _wait_for(lambda: calls >= 1, limit=1)
        await store.set_roles(
            "compliance",
            ["admin"],
            PolicyCatalog.of(teams=["compliance"], categories=["a"], purposes=["p"]),
        )
        await _wait_for(lambda: calls >= 2, limit=1)
        assert watcher.running
    assert calls >= 2


def test_watcher_choice_and_dsn(
    tmp_path: Path, catalog: PolicyCatalog, sqlite_engines: EngineFactory
) -> None:
    store = PolicyStore(sqlite_engines(tmp_path / "x.db"))
    engine = PolicyEngine(store, catalog)
    assert isinstance(create_policy_watcher(engine), PollingPolicyWatcher)
    pg = create_policy_watcher(engine, dsn="postgresql+asyncpg://u:p@db:5432/vault")
    assert isinstance(pg, PostgresPolicyWatcher)
    assert asyncpg_dsn("postgresql+asyncpg://u:p@db:5432/vault") == "postgresql://u:p@db:5432/vault"
    assert asyncpg_dsn("postgresql://u@db/vault") == "postgresql://u@db/vault"
