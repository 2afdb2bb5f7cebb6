"""Entry point for ASGI servers: ``uvicorn api.asgi:app_factory --factory``."""

from __future__ import annotations

from litestar import Litestar

from api.app import create_app


def app_factory() -> Litestar:
    # The serving command migrates and bootstraps once before workers start.
    return create_app(migrate=False, freeze_heap=True)
