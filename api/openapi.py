"""The OpenAPI document states the problem responses every operation can give.

Litestar documents only the success response (and its own 400 shape, which is not
what this service sends). Every error here is RFC 9457 ``application/problem+json``
(api/problems.py); this module adds those responses to each operation, so a client
generated from ``/schema/openapi.json`` — and schemathesis — know them.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Reference,
    Schema,
)
from litestar.routes import HTTPRoute

from api.auth import PUBLIC_PATHS
from api.problems import PROBLEM_JSON

__all__ = ["document_problems"]

PROBLEM_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    description="RFC 9457 problem details; `code` is stable, `type` is its URN.",
    required=["type", "title", "status", "code", "detail"],
    properties={
        "type": Schema(type=OpenAPIType.STRING),
        "title": Schema(type=OpenAPIType.STRING),
        "status": Schema(type=OpenAPIType.INTEGER, minimum=400, maximum=599),
        "code": Schema(type=OpenAPIType.STRING),
        "detail": Schema(type=OpenAPIType.STRING),
        "request_id": Schema(type=OpenAPIType.STRING),
        "reason": Schema(type=OpenAPIType.STRING, description="a reason code (API.md)"),
        "errors": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(
                type=OpenAPIType.OBJECT,
                additional_properties=Schema(type=OpenAPIType.STRING),
            ),
        ),
    },
)

DESCRIPTIONS = {
    400: "Malformed request (syntax, type, missing or unknown parameter)",
    401: "Missing, unknown, revoked or expired credential",
    403: "The principal may not do this (role, policy or consent); `reason` says why",
    404: "No such resource",
    409: "Conflicts with the current state",
    413: "Request body too large",
    422: "Well-formed but invalid value",
    429: "Too many requests; retry after `Retry-After` seconds",
    503: "A dependency (database, key store, audit log) is unavailable; nothing was disclosed",
}
# Operations that answer without touching the database, the keys or the limiter.
STATIC = ("/health", "/metrics", "/v1/schemas")
UNLIMITED = ("/health", "/ready", "/metrics")
# Public operations that still check a credential of their own.
OWN_CREDENTIAL = {"/v1/me/verify": [401]}


def _response(status: int) -> OpenAPIResponse:
    headers: dict[str, OpenAPIHeader | Reference] | None = None
    if status == 429:
        headers = {
            "Retry-After": OpenAPIHeader(
                schema=Schema(type=OpenAPIType.INTEGER), description="seconds", required=True
            )
        }
    return OpenAPIResponse(
        description=DESCRIPTIONS[status],
        headers=headers,
        content={PROBLEM_JSON: OpenAPIMediaType(schema=Reference("#/components/schemas/Problem"))},
    )


def _statuses(path: str, method: str, public: bool) -> list[int]:
    if path.startswith(STATIC):
        return [] if path != "/v1/schemas" else [429]
    codes = [400, 404, 422, 503]
    if not path.startswith(UNLIMITED):
        codes.append(429)
    if not public:
        codes += [401, 403]
    codes += OWN_CREDENTIAL.get(path, [])
    if method in {"post", "put", "patch", "delete"}:
        codes.append(409)
    if method in {"post", "put", "patch"}:
        codes.append(413)
    return sorted(codes)


def document_problems(app: Litestar) -> None:
    """Add the problem responses to every operation of ``app``'s OpenAPI document."""
    public_ops: set[tuple[str, str]] = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for verb, (handler, _) in route.route_handler_map.items():
            if handler.opt.get("exclude_from_auth") or route.path.startswith(PUBLIC_PATHS):
                public_ops.add((route.path_format or "/", str(verb).lower()))
    openapi = app.openapi_schema
    if openapi.components.schemas is None:
        openapi.components.schemas = {}
    openapi.components.schemas["Problem"] = PROBLEM_SCHEMA
    for path, item in (openapi.paths or {}).items():
        for method in ("get", "put", "post", "delete", "patch"):
            operation: Any = getattr(item, method, None)
            if operation is None:
                continue
            responses = operation.responses or {}
            for status in _statuses(path, method, (path, method) in public_ops):
                responses[str(status)] = _response(status)
            operation.responses = responses
    metrics = (openapi.paths or {}).get("/metrics")
    if metrics is not None and metrics.get is not None and metrics.get.responses:
        # Prometheus text exposition format, not JSON.
        ok: Any = metrics.get.responses.get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {"text/plain": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))}
