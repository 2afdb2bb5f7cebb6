"""Decisions on the request's log line (``governance.logs.log_decision``), and where
the request lines go."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from governance.logs import (
    configure_logging,
    end_request_fields,
    log_decision,
    request_log,
    start_request_fields,
)
from tests.conftest import _Tee


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_a_decision_goes_on_the_request_line_while_the_request_is_served() -> None:
    logger = Recorder()
    token = start_request_fields()
    log_decision(logger, "gate.read", team="support", audit_index=7)
    fields = end_request_fields(token)
    assert fields == {"decision": "gate.read", "team": "support", "audit_index": 7}
    assert logger.lines == []  # no line of its own


def test_a_decision_outside_a_request_is_a_line_of_its_own() -> None:
    logger = Recorder()
    log_decision(logger, "gate.read", team="support")
    assert logger.lines == [("gate.read", {"team": "support"})]


async def test_a_decision_after_the_request_line_is_not_lost() -> None:
    """A task the request started copied its context; once the request's line is
    written, that task's decision gets a line of its own."""
    logger = Recorder()
    token = start_request_fields()
    release = asyncio.Event()

    async def later() -> None:
        await release.wait()
        log_decision(logger, "gate.read", team="late")

    task = asyncio.create_task(later())
    fields = end_request_fields(token)
    release.set()
    await task
    assert fields == {}
    assert logger.lines == [("gate.read", {"team": "late"})]


@pytest.fixture
def reconfigured() -> Iterator[None]:
    yield
    configure_logging(stream=_Tee())  # the test session's logging again


def test_request_lines_follow_the_latest_configuration(reconfigured: None) -> None:
    """The request logger is bound once per configuration, not per line: after the
    logs are configured again, lines go to the new stream at the new level, still
    JSON and still scrubbed of personal values."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    request_log().info("http.request", route="/a", status=200, email="ada@example.com")
    configure_logging(level=logging.WARNING, stream=second)
    request_log().info("http.request", route="/b", status=200)
    request_log().warning("http.request", route="/c", status=503, email="ada@example.com")
    lines = [json.loads(line) for line in first.getvalue().splitlines()]
    assert [(x["route"], x["email"]) for x in lines] == [("/a", "[scrubbed]")]
    lines = [json.loads(line) for line in second.getvalue().splitlines()]
    assert [(x["route"], x["level"], x["email"]) for x in lines] == [
        ("/c", "warning", "[scrubbed]")
    ]
