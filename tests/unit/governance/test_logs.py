"""Decisions on the request's log line (``governance.logs.log_decision``)."""

from __future__ import annotations

import asyncio
from typing import Any

from governance.logs import end_request_fields, log_decision, start_request_fields


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
