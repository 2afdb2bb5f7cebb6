"""Authentication: team API keys and customer sessions, both as bearer tokens.

An async middleware resolves the principal once per request; guards then
only look at it. A missing, unknown or revoked credential is a 401 problem.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.authentication import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
)

from governance.service import StoryVault
from governance.teams import PresentedKey, Principal

__all__ = [
    "LOOKS_UP_ITS_KEY",
    "BearerAuthMiddleware",
    "bearer_token",
    "require_admin",
    "require_customer",
    "require_team",
    "team_of",
]

PUBLIC_PATHS = (
    "/health",
    "/ready",
    "/metrics",
    "/schema",
    "/.well-known",
    "/portal",
    "/v1/me/login",
    "/v1/me/verify",
    "/v1/schemas",
    "/favicon.ico",
)


LOOKS_UP_ITS_KEY = "looks_up_its_key"
"""A route handler ``opt``: the handler looks the team's API key up itself, in the
same database round trip as its own read (the gated read), so the middleware only
checks that a bearer credential is there and passes it on as a ``PresentedKey``."""


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The first ``Authorization`` header's bearer token, if that is what it holds.
    Read from the ASGI scope's raw headers (names arrive lower-cased), not through
    ``connection.headers``, which would build a headers object for this alone."""
    for name, value in connection.scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None
            return token
    return None


class BearerAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        vault: StoryVault = connection.app.state.vault
        token = bearer_token(connection)
        if token is None:
            raise NotAuthorizedException("a bearer credential is required")
        if connection.scope["path"].startswith("/v1/me"):
            customer = await vault.authenticate_customer(token)
            if customer is None:
                raise NotAuthorizedException("the session is unknown, expired or ended")
            if customer.erased and not connection.scope["path"].startswith("/v1/me/requests"):
                raise NotAuthorizedException("this customer's story was erased")
            if connection.headers.get("sec-gpc", "").strip() == "1":
                # Global Privacy Control: an opt-out of every sale/sharing purpose,
                # recorded once (the ledger call is idempotent).
                await vault.apply_gpc(customer.customer_id)
            return AuthenticationResult(user=customer, auth="customer")
        if connection.scope["route_handler"].opt.get(LOOKS_UP_ITS_KEY):
            return AuthenticationResult(user=vault.presented_key(token), auth="team")
        principal = await vault.authenticate_team(token)
        if principal is None:
            raise NotAuthorizedException("the API key is unknown or revoked")
        return AuthenticationResult(user=principal, auth="team")


def team_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The team principal of ``connection``, or 403: ``require_team`` inside a handler.

    For the gated read's hot path: a Litestar guard copies the route handler object
    on every call, which cost more than the check itself."""
    user = connection.user
    if not isinstance(user, Principal):
        raise PermissionDeniedException("this endpoint needs a team API key")
    return user


def team_credential(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal | PresentedKey:
    """``team_of`` for a ``LOOKS_UP_ITS_KEY`` route: the principal, or the key the
    handler's read will look up."""
    user = connection.user
    if isinstance(user, PresentedKey):
        return user
    return team_of(connection)


async def require_team(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    team_of(connection)


async def require_admin(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    user = connection.user
    if not isinstance(user, Principal) or not user.is_admin:
        raise PermissionDeniedException("this endpoint needs a key of a team with the admin role")


async def require_customer(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    if connection.auth != "customer":
        raise PermissionDeniedException("this endpoint needs a customer session")
