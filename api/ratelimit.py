"""Rate limits: per API key (or customer session) and per client address.

A request with a bearer credential counts against that credential (keyed by a hash,
so the secret is never kept); one without counts against its client address. Over
``limit`` requests in a one-minute window answer 429 problem+json with
``Retry-After`` (seconds to the window's end). Operations endpoints (``/health``,
``/ready``, ``/metrics``) are never limited, so probes and scrapers are not refused.

A fixed window counted in memory per instance: O(1) per request and lock-free (one
event loop), unlike Litestar's RateLimitMiddleware, which stores every request's
timestamp and re-encodes the whole history per request — ruinous at the generous
limits the benchmarks run with. Behind a load balancer each instance counts its own
share; the limit is per instance.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import msgspec
import structlog
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)

from api.problems import PROBLEM_JSON, STATUS_CODE, TITLES

__all__ = ["FixedWindowLimiter", "HeaderLimitMiddleware", "RateLimitMiddleware", "send_problem"]

EXEMPT = ("/health", "/ready", "/metrics")
WINDOW = 60.0
_MAX_BUCKETS = 100_000


def _identifier(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return "key:" + hashlib.sha256(token.strip()).hexdigest()[:32]
            break
    client = scope.get("client")
    return "addr:" + (str(client[0]) if client else "unknown")


class FixedWindowLimiter:
    """The counts of one app, shared by the middleware instances of all its routes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._window_start = 0.0
        self._counts: dict[str, int] = {}

    def hit(self, key: str) -> int | None:
        """Count one request of ``key``; None if allowed, else seconds to retry after."""
        now = time.monotonic()
        if now - self._window_start >= WINDOW or len(self._counts) > _MAX_BUCKETS:
            self._window_start = now
            self._counts = {}
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        if count <= self.limit:
            return None
        return max(1, math.ceil(self._window_start + WINDOW - now))


class RateLimitMiddleware:
    """ASGI middleware; ``limiter.limit`` requests per minute per identifier (module doc).

    Litestar builds one middleware instance per route, so the counts live in the
    ``limiter`` the app shares among them.
    """

    def __init__(self, app: ASGIApp, limiter: FixedWindowLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"].startswith(EXEMPT):
            await self.app(scope, receive, send)
            return
        retry = self.limiter.hit(_identifier(scope))
        if retry is not None:
            await send_problem(
                send,
                429,
                f"more than {self.limiter.limit} requests a minute; retry after {retry} s",
                [(b"retry-after", str(retry).encode())],
            )
            return
        await self.app(scope, receive, send)


class HeaderLimitMiddleware:
    """Refuse requests whose headers exceed ``max_bytes`` in all or ``max_count`` in
    number with 431 (uvicorn's httptools parser sets no limit of its own)."""

    def __init__(self, app: ASGIApp, max_bytes: int = 32 * 1024, max_count: int = 100) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
                # NUL in a path or query parameter: no id, purpose or name holds one, and
                # PostgreSQL text cannot compare with it (a 500 otherwise).
                await send_problem(send, 400, "NUL characters are not allowed in the URL")
                return
            headers = list(scope.get("headers", ()))
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            if len(headers) > self.max_count or size > self.max_bytes:
                await send_problem(
                    send,
                    431,
                    f"request headers over {self.max_count} fields or {self.max_bytes} bytes",
                )
                return
        await self.app(scope, receive, send)


async def send_problem(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer a problem+json from an ASGI middleware (before any handler ran)."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    code = STATUS_CODE[status]
    problem: dict[str, Any] = {
        "type": f"urn:storyvault:problem:{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if request_id:
        problem["request_id"] = request_id
    body = msgspec.json.encode(problem)
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)
