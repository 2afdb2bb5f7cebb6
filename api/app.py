"""The Litestar application factory: all wiring happens here."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.app import ExperimentalFeatures  # noqa: F401  (kept for future flags)
from litestar.di import Provide
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController

from api.auth import PUBLIC_PATHS, BearerAuthMiddleware
from api.controllers.admin import TeamsController
from api.controllers.audit import AuditEntriesController, TransparencyController
from api.controllers.customers import CustomersController, GatedReadController
from api.controllers.insights import InsightsController, MyInsightsController
from api.controllers.me import MeController, SessionController, SignInController
from api.controllers.ops import health, ready
from api.controllers.policies import PoliciesController
from api.controllers.reports import ReportsController
from api.controllers.rights import (
    AdminRightsController,
    MyRightsController,
    TeamRequestsController,
    export_schema_doc,
)
from api.middleware import MetricsMiddleware, RequestLogMiddleware, security_headers
from api.openapi import document_problems
from api.portal import PortalController, portal_static_router, portal_template_config
from api.problems import exception_handlers
from api.ratelimit import FixedWindowLimiter, HeaderLimitMiddleware, RateLimitMiddleware
from audit import AuditError
from consent import ConsentError
from governance.catalog import CatalogError
from governance.errors import GovernanceError
from governance.keys import KeyRingError
from governance.service import StoryVault
from governance.settings import Settings, load_settings
from policies import PolicyError

__all__ = ["create_app"]

_YOUNG_THRESHOLD = 7_000
"""Net new container objects that trigger a collection of the youngest generation in
a serving process (see ``create_app``'s lifespan)."""


def create_app(
    settings: Settings | None = None, *, migrate: bool = True, freeze_heap: bool = False
) -> Litestar:
    """``freeze_heap`` is for a serving process (one app per process): see lifespan."""
    settings = settings or load_settings()
    vault = StoryVault(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await vault.start(migrate=migrate)
        if freeze_heap:
            # What exists once started (modules, the app, the catalog, compiled
            # statements: ~160,000 objects) lives as long as the process. Frozen,
            # the collector stops walking it: a full collection took ~95 ms here
            # before, a pause every request in flight had to wait out.
            gc.collect()
            gc.freeze()
            # The young generation is collected once 7,000 more container objects
            # live than at the last collection (700 by default), where a gated read
            # makes hundreds. Measured (bench.instructions, SQLite): -1.1 % of the
            # gated read's instructions, /health unchanged; 50,000 saved 0.3 %
            # more, with each collection walking that many objects.
            threshold = gc.get_threshold()
            gc.set_threshold(_YOUNG_THRESHOLD, *threshold[1:])
        try:
            yield
        finally:
            if freeze_heap:
                gc.set_threshold(*threshold)
            await vault.stop()

    async def provide_vault() -> StoryVault:
        return vault

    prometheus = PrometheusConfig(
        app_name="storyvault",
        prefix="storyvault",
        group_path=True,
        exclude=["/metrics"],
        middleware_class=MetricsMiddleware,
    )
    domain_errors: tuple[type[Exception], ...] = (
        GovernanceError,
        KeyRingError,
        CatalogError,
        AuditError,
        ConsentError,
        PolicyError,
    )
    app = Litestar(
        route_handlers=[
            health,
            ready,
            CustomersController,
            TeamsController,
            SignInController,
            SessionController,
            MeController,
            GatedReadController,
            InsightsController,
            MyInsightsController,
            PoliciesController,
            AuditEntriesController,
            TransparencyController,
            ReportsController,
            MyRightsController,
            TeamRequestsController,
            AdminRightsController,
            export_schema_doc,
            PrometheusController,
            PortalController,
            portal_static_router(),
        ],
        dependencies={"vault": Provide(provide_vault)},
        middleware=[
            RequestLogMiddleware,
            HeaderLimitMiddleware,
            prometheus.middleware,
            DefineMiddleware(
                RateLimitMiddleware, limiter=FixedWindowLimiter(settings.rate_limit_per_minute)
            ),
            DefineMiddleware(BearerAuthMiddleware, exclude=[f"^{p}" for p in PUBLIC_PATHS]),
        ],
        exception_handlers=exception_handlers(domain_errors),
        before_send=[security_headers],
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="Story Vault",
            version="0.1.0",
            path="/schema",
            render_plugins=[ScalarRenderPlugin()],
        ),
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
        template_config=portal_template_config(),
        debug=False,
    )
    if settings.bench_routes:
        # `make bench` only: the bare read the gated read is compared with.
        from api.controllers.bench import BenchController

        app.register(BenchController)
    document_problems(app)
    app.state.vault = vault
    return app
