"""A serving process's app (``create_app(freeze_heap=True)``, as ``storyvault serve``
builds it) keeps the garbage collector off what lives as long as the process."""

from __future__ import annotations

import gc

from litestar.testing import AsyncTestClient

from api.app import create_app
from governance.settings import Settings


async def test_a_serving_app_freezes_its_startup_heap_and_collects_young_objects_less_often(
    settings: Settings,
) -> None:
    before = gc.get_threshold()
    app = create_app(settings, migrate=False, freeze_heap=True)
    try:
        async with AsyncTestClient(app) as client:
            # modules, the app, the catalog: the collector no longer walks them
            assert gc.get_freeze_count() > 50_000
            assert gc.get_threshold() == (7_000, *before[1:])
            assert (await client.get("/health")).status_code == 200
        # stopped, the process's collector is as it was
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_an_app_that_does_not_serve_alone_leaves_the_collector_alone(
    settings: Settings,
) -> None:
    before = gc.get_threshold()
    app = create_app(settings, migrate=False)
    async with AsyncTestClient(app) as client:
        assert (await client.get("/health")).status_code == 200
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0
