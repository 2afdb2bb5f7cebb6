"""structlog JSON logs: one event per decision, with ids and reason codes only.

The scrubbing processor is a second line of defence: code never logs personal
values, and if a key that usually carries one slips in, it is replaced.

A decision taken while serving an HTTP request (the gated read's) goes on that
request's own line (``decision``: its event name, then its fields) instead of a
line of its own: one line per request says what was asked, what was decided and
how it was answered, and costs one line's rendering and write, not two. Outside
a request the decision is a line of its own. See ``log_decision``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar, Token
from typing import Any, TextIO

import msgspec
import structlog

__all__ = [
    "PERSONAL_KEYS",
    "RequestFields",
    "configure_logging",
    "end_request_fields",
    "log_decision",
    "scrub_personal",
    "start_request_fields",
]

PERSONAL_KEYS = frozenset(
    {
        "email",
        "name",
        "phone",
        "address",
        "birthday",
        "profile",
        "body",
        "value",
        "values",
        "code",
        "token",
        "secret",
        "password",
        "authorization",
        "cookie",
        "external_ref",
        "query_string",
        "headers",
        "request_body",
        "text",
    }
)


def scrub_personal(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in PERSONAL_KEYS.intersection(event):
        event[key] = "[scrubbed]"
    return event


RequestFields = dict[str, Any]


class _Open:
    """The fields of one request being served, until its line is written."""

    __slots__ = ("fields", "open")

    def __init__(self) -> None:
        self.fields: RequestFields = {}
        self.open = True


_REQUEST_FIELDS: ContextVar[_Open | None] = ContextVar("storyvault_request_fields", default=None)


def start_request_fields() -> Token[_Open | None]:
    """Open the fields of the request being served (its log middleware calls this as
    the request starts, and ``end_request_fields`` with the token when it ends)."""
    return _REQUEST_FIELDS.set(_Open())


def end_request_fields(token: Token[_Open | None]) -> RequestFields:
    """The fields decisions added to the request (for its line), and close them: a
    decision logged later (by a task the request started, which copied its context)
    gets a line of its own instead of being lost."""
    pending = _REQUEST_FIELDS.get()
    _REQUEST_FIELDS.reset(token)
    if pending is None:
        return {}
    pending.open = False
    return pending.fields


def log_decision(logger: Any, event: str, **fields: Any) -> None:
    """Log the decision ``event`` with ``fields``: on the line of the request being
    served (as ``decision=event`` and the fields), or on a line of its own when no
    request is (a job, a command, a direct call) or its line is already written."""
    pending = _REQUEST_FIELDS.get()
    if pending is None or not pending.open:
        logger.info(event, **fields)
        return
    pending.fields["decision"] = event
    pending.fields.update(fields)


_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def _dumps(event: Any, **_: Any) -> str:
    """structlog's serializer: msgspec (a few times faster than ``json.dumps``, and
    every request logs at least one line); values it cannot encode become repr()."""
    return _ENCODER.encode(event).decode()


_REQUEST_LOGGER = "storyvault.request"


class _Bound:
    """Loggers bound once per ``configure_logging``."""

    request: Any = structlog.get_logger(_REQUEST_LOGGER)


def request_log() -> Any:
    """The logger of the request lines (one per request): bound once per
    ``configure_logging``, where structlog's lazy logger binds a new one (and a new
    output logger) on every call."""
    return _Bound.request


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_personal,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _Bound.request = structlog.get_logger(_REQUEST_LOGGER).bind()
    # Libraries that use stdlib logging (uvicorn, SQLAlchemy, casbin) go through
    # the same JSON shape; their access logs are off: our middleware logs requests.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                scrub_personal,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for noisy in ("uvicorn.access", "casbin", "casbin.policy", "casbin.enforcer", "casbin.role"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)
