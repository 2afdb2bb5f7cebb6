"""One place that turns every error into RFC 9457 problem+json.

Domain errors of every package carry ``code`` and ``kind``; this module maps
``kind`` to a status. Nothing here echoes a submitted value.
"""

from __future__ import annotations

import errno
import traceback
from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from policies import PolicyError

__all__ = ["PROBLEM_JSON", "exception_handlers", "problem"]

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("storyvault.api")

KIND_STATUS = {
    "invalid": 422,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "too_many": 429,
    "unavailable": 503,
}
# Codes that are a malformed request rather than a well-formed but refused one.
BAD_REQUEST_CODES = frozenset(
    {"purpose_required", "unknown_purpose", "invalid_query", "invalid_cursor", "invalid_id"}
)
STATUS_CODE = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    431: "headers_too_large",
    503: "unavailable",
}
TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    422: "Unprocessable request",
    431: "Request headers too large",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    request: Request[Any, Any, Any] | None = None,
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {
        "type": f"urn:storyvault:problem:{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail[:500],
    }
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id:
        body["request_id"] = request_id
    if extra:
        body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _domain(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    code = str(getattr(exc, "code", "error"))
    kind = str(getattr(exc, "kind", "invalid"))
    # A rule naming an unknown purpose is an invalid rule (422, like an unknown team or
    # category); 400 is for a request's own malformed purpose/id/query parameter.
    bad_request = code in BAD_REQUEST_CODES and not isinstance(exc, PolicyError)
    status = 400 if bad_request and kind == "invalid" else KIND_STATUS.get(kind, 422)
    extra: dict[str, Any] = {}
    reason = getattr(exc, "extra", {}).get("reason") if hasattr(exc, "extra") else None
    if reason:
        extra["reason"] = reason
    headers = None
    retry = getattr(exc, "extra", {}).get("retry_after") if hasattr(exc, "extra") else None
    if retry is not None:
        headers = {"Retry-After": str(int(retry))}
    elif status == 503:  # e.g. the audit writer could not make an entry durable
        headers = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE)}
    elif status == 401:  # RFC 6750: say which scheme would be accepted
        headers = {"WWW-Authenticate": 'Bearer realm="storyvault"'}
    detail = getattr(exc, "message", None) or str(exc)
    return problem(status, code, detail, extra=extra or None, headers=headers, request=request)


def _validation(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    # msgspec's messages name the path and the expected type, never the value.
    errors: list[dict[str, str]] = []
    if isinstance(exc.extra, list):
        for item in exc.extra[:20]:
            if isinstance(item, dict):
                errors.append(
                    {k: str(v)[:200] for k, v in item.items() if k in {"message", "key", "source"}}
                )
    return problem(
        400,
        "validation_error",
        str(exc.detail)[:300] or "the request is malformed",
        extra={"errors": errors},
        request=request,
    )


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if status >= 500:
        return problem(
            status,
            STATUS_CODE.get(status, "unavailable"),
            "the service is unavailable",
            request=request,
        )
    code = STATUS_CODE.get(status, "client_error")
    detail = str(exc.detail) if exc.detail else TITLES.get(status, "error")
    headers = dict(exc.headers) if exc.headers else None
    return problem(status, code, detail[:300], headers=headers, request=request)


def _unauthorized(
    request: Request[Any, Any, Any], exc: NotAuthorizedException
) -> Response[dict[str, Any]]:
    return problem(
        401,
        "unauthorized",
        str(exc.detail or "a valid bearer credential is required"),
        headers={"WWW-Authenticate": 'Bearer realm="storyvault"'},
        request=request,
    )


def _forbidden(
    request: Request[Any, Any, Any], exc: PermissionDeniedException
) -> Response[dict[str, Any]]:
    return problem(403, "forbidden", str(exc.detail or "forbidden"), request=request)


# Errors that say "the database (or the disk under it) is not usable right now", not
# "this request is wrong": the server is down, restarting or unreachable, a pooled
# connection died, the disk is full or read-only. They get 503 with Retry-After (the
# transaction was rolled back, so nothing is half-written), never 500.
_DB_UNAVAILABLE_ORIG = frozenset(
    {
        "CannotConnectNowError",
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "AdminShutdownError",
        "CrashShutdownError",
        "OperatorInterventionError",
        "PostgresConnectionError",
        "TooManyConnectionsError",
        "ConnectionRejectionError",
    }
)
# SQLSTATE classes: connection exception, insufficient resources (disk full, too many
# connections), operator intervention (shutdown, cannot connect now), system error (I/O).
_UNAVAILABLE_SQLSTATE = frozenset({"08", "53", "57", "58"})
_UNAVAILABLE_ERRNO = frozenset({errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT})
RETRY_AFTER_UNAVAILABLE = 2


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the database cannot be used right now."""
    from sqlalchemy import exc as sa_exc

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError
        ):
            return True
        if isinstance(current, sa_exc.DBAPIError) and (
            current.connection_invalidated
            or type(current.orig).__name__ in _DB_UNAVAILABLE_ORIG
            or type(current.orig).__name__.endswith("InterfaceError")
            or str(getattr(current.orig, "sqlstate", "") or "")[:2] in _UNAVAILABLE_SQLSTATE
            or getattr(current.orig, "sqlstate", None) == "25006"  # read-only transaction
        ):
            return True
        if isinstance(current, ConnectionError | TimeoutError):
            return True  # ConnectionRefusedError, ConnectionResetError, ...
        if isinstance(current, OSError) and (
            current.errno in _UNAVAILABLE_ERRNO or "Connect call failed" in str(current)
        ):
            return True  # disk full or read-only, I/O error; asyncio's "Multiple exceptions"
        current = current.__cause__ or current.__context__
    return False


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if hasattr(exc, "code") and hasattr(exc, "kind"):
        return _domain(request, exc)
    if database_unavailable(exc):
        log.warning(
            "request.unavailable",
            error=type(exc).__name__,
            route=request.scope.get("path_template"),
        )
        return problem(
            503,
            "unavailable",
            "the database is unavailable; nothing was changed or disclosed, retry later",
            headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
            request=request,
        )
    # The message of an unexpected error may carry anything; log its type only.
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    orig = getattr(exc, "orig", None)  # a driver's error wrapped by SQLAlchemy
    log.error(
        "request.failed",
        error=type(exc).__name__,
        cause=None if orig is None else type(orig).__name__,
        route=request.scope.get("path_template"),
        where=[f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames],
    )
    return problem(
        HTTP_500_INTERNAL_SERVER_ERROR,
        "internal_error",
        "an internal error occurred; nothing was disclosed",
        request=request,
    )


def exception_handlers(domain_errors: tuple[type[Exception], ...]) -> dict[Any, Any]:
    handlers: dict[Any, Any] = {
        ValidationException: _validation,
        NotAuthorizedException: _unauthorized,
        PermissionDeniedException: _forbidden,
        HTTPException: _http,
        Exception: _internal,
    }
    for err in domain_errors:
        handlers[err] = _domain
    return handlers


__all__ += ["MediaType"]
