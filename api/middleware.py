"""ASGI middleware: request ids, one log line per request, security headers.

The request line logs method, route template, status and duration only —
never the query string (it may carry an e-mail), headers or bodies.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestLogMiddleware", "request_id", "security_headers"]


def request_id() -> str | None:
    """The current request's id (bound by the middleware), for audit entries."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return str(value) if value else None


log = structlog.get_logger("storyvault.request")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
API_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]


async def security_headers(message: Message, scope: Scope) -> None:
    """``before_send`` hook: every response the app sends — including those Litestar
    answers outside the route's middleware (401 from authentication, 404/405 from the
    router) — carries the security headers; API responses also no-store and a CSP."""
    if message["type"] != "http.response.start" or scope["type"] != ScopeType.HTTP:
        return
    headers: list[Any] = list(message.get("headers", []))
    present = {bytes(h[0]).lower() for h in headers}
    wanted = list(SECURITY_HEADERS)
    path: str = scope["path"]
    if path.startswith("/schema"):
        wanted.append((b"content-security-policy", DOCS_CSP))
    elif not path.startswith(("/portal", "/v1/reports")):
        wanted += API_HEADERS
    for name, value in wanted:
        if name not in present:
            headers.append((name, value))
    message["headers"] = headers


# The API docs page (Scalar) loads its script and stylesheet from jsDelivr and
# injects styles at run time; it may fetch only this origin (the OpenAPI JSON).
DOCS_CSP = (
    b"default-src 'none'; script-src https://cdn.jsdelivr.net; "
    b"style-src 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    b"font-src data: https://cdn.jsdelivr.net https://fonts.gstatic.com; "
    b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
)


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        start = time.perf_counter()
        status = 500
        path: str = scope["path"]
        is_page = path.startswith(("/portal", "/schema", "/v1/reports"))

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers: list[Any] = list(message.get("headers", []))
                present = {h[0].lower() for h in headers}
                headers.append((b"x-request-id", request_id.encode()))
                for name, value in SECURITY_HEADERS:
                    if name not in present:
                        headers.append((name, value))
                if not is_page:
                    for name, value in API_HEADERS:
                        if name not in present:
                            headers.append((name, value))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("path_template") or "unmatched"
            if route != "/metrics":
                log.info(
                    "http.request",
                    method=scope.get("method"),
                    route=route,
                    status=status,
                    duration_ms=round((time.perf_counter() - start) * 1000, 2),
                )
            structlog.contextvars.unbind_contextvars("request_id")
