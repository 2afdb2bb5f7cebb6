"""Two instances appending to one PostgreSQL audit log: each batch is a lone statement
that extends the newest state the instance has just read, so the log's lock is held
only while the server runs that statement and commits, never across a round trip
to an instance (where a transaction under the lock held it across four of its
five)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest

from audit import AppendResult, AuditEntry, EntryKind, verify_log
from governance.settings import Settings
from tests.conftest import log_every_statement

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])


def _entries(start: int, n: int) -> list[AuditEntry]:
    return [
        AuditEntry(
            kind=EntryKind.DISCLOSURE,
            actor="support",
            subject=f"subject-{start + i}",
            purpose="support.case",
            request_id=f"req-{start + i}",
        )
        for i in range(start, start + n)
    ]


async def test_instances_taking_turns_append_each_batch_alone(
    direct: Any, settings: Settings
) -> None:
    from governance.service import StoryVault

    other = StoryVault(settings)
    try:
        logs = [direct._batch_log, other._batch_log]
        await direct.audit_log.append(_entries(0, 2))  # a log to extend
        results: list[AppendResult] = []
        n = 2
        for turn in range(10):
            results.append(await logs[turn % 2].append(_entries(n, 3)))
            n += 3
        # One order: each batch starts where the one before ended.
        for before, after in pairwise(results):
            assert after.first_index == before.tree_head.tree_size
        ways = [(r.way, r.refused) for r in results]
        # Each instance's first batch reads the log's state; its second first tries
        # to extend its own last batch, which the other's has followed (refused);
        # from then on each batch reads the state first and goes alone at once.
        assert ways[:2] == [("alone", 0)] * 2, ways
        assert ways[2:4] == [("alone", 1)] * 2, ways
        assert ways[4:] == [("alone", 0)] * 6, ways

        # The other stops appending: once a read finds the log as this instance
        # left it, its batches are one statement again, without the read.
        logged = await log_every_statement(direct.db)
        result = results[-1]
        for _ in range(3):
            result = await logs[0].append(_entries(n, 2))
            assert (result.way, result.refused) == ("alone", 0)
            n += 2
        batches = [q for q in logged if "pg_advisory_xact_lock" in q]
        reads = [q for q in logged if "generate_series" in q]
        assert len(batches) == 3, logged
        assert len(reads) == 2, logged  # the other's batch since, then its own
        assert len(logged) == 5, logged  # no BEGIN, no COMMIT: no transaction

        log = direct.audit_log
        report = await verify_log(log.engine, {log.key_id: log.public_key})
        assert report.ok, report.divergence
        assert report.entries_checked == result.tree_head.tree_size
    finally:
        await other.stop()
