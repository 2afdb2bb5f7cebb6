"""Entry point for ASGI servers: ``uvicorn api.asgi:app_factory --factory``."""

from __future__ import annotations

from litestar import Litestar

from api.app import create_app
from governance.logs import configure_logging


def app_factory() -> Litestar:
    # A worker process that uvicorn spawns (``STORYVAULT_WORKERS`` > 1) starts from a
    # fresh interpreter: without this, its structlog would keep the library's
    # default (console lines, no scrubbing of personal fields). In a single
    # process the serving command configured it already; doing it again is harmless.
    configure_logging()
    # The serving command migrates and bootstraps once before workers start.
    return create_app(migrate=False, freeze_heap=True)
