"""The PostgreSQL path: version upsert, pg_notify in the bump transaction, LISTEN watcher."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from policies import (
    POLICY_TABLES,
    PolicyCatalog,
    PolicyEngine,
    PolicyError,
    PolicyStore,
    PostgresPolicyWatcher,
    RuleSpec,
)

pytestmark = pytest.mark.postgres


async def _wait_for(predicate: Any, limit: float) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > limit:
            break
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def test_two_engines_converge_over_listen_notify(pg: Any, catalog: PolicyCatalog) -> None:
    url = pg.create_database("pol_" + uuid.uuid4().hex[:12])
    db_a, db_b = create_async_engine(url), create_async_engine(url)
    try:
        async with db_a.begin() as conn:
            await conn.run_sync(
                lambda c: SQLModel.metadata.create_all(c, tables=list(POLICY_TABLES))
            )
        store_a, store_b = PolicyStore(db_a), PolicyStore(db_b)
        engine_a = await PolicyEngine.open(store_a, catalog)
        engine_b = await PolicyEngine.open(store_b, catalog)
        watcher_a, watcher_b = engine_a.watcher(), engine_b.watcher()
        assert isinstance(watcher_b, PostgresPolicyWatcher)
        async with watcher_a, watcher_b:
            assert isinstance(watcher_a, PostgresPolicyWatcher)
            await asyncio.wait_for(watcher_a.connected.wait(), 5)
            await asyncio.wait_for(watcher_b.connected.wait(), 5)

            rule = await store_a.add_rule(
                RuleSpec("support", "contact.*", "read", "service.support", "allow", "partial"),
                catalog,
            )
            elapsed = await _wait_for(lambda: engine_b.version == 1, 2)
            assert elapsed < 1.0
            assert "contact.email" in engine_b.table("support", "service.support").allowed

            with pytest.raises(PolicyError):
                await store_b.add_rule(
                    RuleSpec("support", "contact.*", "read", "service.support", "allow", "partial"),
                    catalog,
                )
            assert await store_b.current_version() == 1

            await store_b.remove_rule(rule.id)
            elapsed = await _wait_for(lambda: engine_a.version == 2, 2)
            assert elapsed < 1.0
            assert engine_a.table("support", "service.support").allowed == frozenset()
    finally:
        await db_a.dispose()
        await db_b.dispose()
