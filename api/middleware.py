"""ASGI middleware: request ids, one log line per request, security headers.

The request line logs method, route template, status and duration — never the
query string (it may carry an e-mail), headers or bodies — and the decision the
request led to, if any (the gated read's: team, customer pseudonym, purpose,
categories disclosed and withheld with reasons, policy version, audit index;
see ``governance.logs.log_decision``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

import structlog
from litestar.connection import Request
from litestar.enums import ScopeType
from litestar.plugins.prometheus import PrometheusMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from governance.logs import RequestFields, end_request_fields, request_log, start_request_fields

__all__ = ["MetricsMiddleware", "RequestLogMiddleware", "request_id", "security_headers"]


def request_id() -> str | None:
    """The current request's id (bound by the middleware), for audit entries."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return str(value) if value else None


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


# Set by RequestLogMiddleware in the scope: None while it will write the request's
# line itself, (request id, start) when Litestar's outer exception handler answers
# instead (see RequestLogMiddleware) and this hook writes the line.
_LOG_STATE = "storyvault.request_log"


async def security_headers(message: Message, scope: Scope) -> None:
    """``before_send`` hook: every response the app sends — including those Litestar
    answers outside the route's middleware (401 from authentication, 404/405 from the
    router) — carries the security headers; API responses also no-store and a CSP.

    It also sees the answers RequestLogMiddleware's own ``send`` cannot: for those it
    adds the request id and writes the request line with the status actually sent."""
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
    state = cast(dict[str, Any], scope)
    if _LOG_STATE not in state:
        # The router answered (404, 405) before any route's middleware ran.
        rid = uuid.uuid4().hex
        _write_line(scope, message["status"], None, {}, request_id=rid)
        wanted.append((b"x-request-id", rid.encode()))
    elif (deferred := state[_LOG_STATE]) is not None:
        state[_LOG_STATE] = None
        rid, start, fields = deferred
        _write_line(scope, message["status"], start, fields)
        structlog.contextvars.unbind_contextvars("request_id")
        wanted.append((b"x-request-id", rid.encode()))
    for name, value in wanted:
        if name not in present:
            headers.append((name, value))
    message["headers"] = headers


def _write_line(
    scope: Scope, status: int, start: float | None, fields: RequestFields, **extra: Any
) -> None:
    route = scope.get("path_template") or "unmatched"
    if route != "/metrics":
        event = dict(
            extra,
            method=scope.get("method"),
            route=route,
            status=status,
            duration_ms=None if start is None else round((time.perf_counter() - start) * 1000, 2),
        )
        for name, value in fields.items():  # the decision's, after the request's own
            event.setdefault(name, value)
        request_log().info("http.request", **event)


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
        started = False
        state = cast(dict[str, Any], scope)
        state[_LOG_STATE] = None
        header = (b"x-request-id", request_id.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                # The security headers come from the before_send hook (security_headers).
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        deferred = False
        token = start_request_fields()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # A middleware refused or failed (401 from authentication, 503 when the
            # key lookup cannot reach the database): Litestar's outer exception
            # handler answers after this frame, past send_wrapper. Its before_send
            # hook (security_headers) sees that answer and writes the line then.
            deferred = not started
            raise
        finally:
            fields = end_request_fields(token)
            if deferred:
                state[_LOG_STATE] = (request_id, start, fields)
            else:
                _write_line(scope, status, start, fields)
                structlog.contextvars.unbind_contextvars("request_id")


class MetricsMiddleware(PrometheusMiddleware):
    """Litestar's Prometheus middleware with the same metrics and labels, its path
    label the route's template (``group_path``) read straight from the scope.
    Litestar's own builds the request's whole URL first (``request.url``), query
    string and all, only to set its path aside for the template: 19,300 (PostgreSQL)
    to 29,800 (SQLite) of the gated read's instructions and 7,500 to 9,400 of
    ``/health``'s (``python -m bench.instructions``; bench/results/instructions*.json)."""

    def _get_default_labels(self, request: Request[Any, Any, Any]) -> dict[str, str | int | float]:
        scope = request.scope
        return {
            "method": scope["method"] if scope["type"] == ScopeType.HTTP else scope["type"],
            "path": scope["path_template"],
            "status_code": 200,
            "app_name": self._config.app_name,
        }
