"""structlog JSON logs: one event per decision, with ids and reason codes only.

The scrubbing processor is a second line of defence: code never logs personal
values, and if a key that usually carries one slips in, it is replaced.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import msgspec
import structlog

__all__ = ["PERSONAL_KEYS", "configure_logging", "scrub_personal"]

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


_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def _dumps(event: Any, **_: Any) -> str:
    """structlog's serializer: msgspec (a few times faster than ``json.dumps``, and
    every request logs at least one line); values it cannot encode become repr()."""
    return _ENCODER.encode(event).decode()


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
