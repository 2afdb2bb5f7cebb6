"""Two instances appending to one PostgreSQL audit log: each batch is a lone call
that extends the newest state the instance knows; one that finds the other's batch
landed first writes nothing and brings back the newest state, which the next call
extends. The log's lock is held only while the server runs a call and commits,
never across a round trip to an instance (where a transaction under the lock held
it across four of its five)."""

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
        # Each instance's first batch reads the log's state and goes alone. From then
        # on each batch first extends the state its instance knows, which the other's
        # batch has followed: refused, it brings that batch's state back, and the
        # next call extends it. No batch reads the state apart.
        assert ways[:2] == [("alone", 0)] * 2, ways
        assert ways[2:] == [("alone", 1)] * 8, ways

        # The other stops appending: after one more refusal (its last batch), each
        # batch is one call, nothing else.
        result = await logs[0].append(_entries(n, 2))
        assert (result.way, result.refused) == ("alone", 1)
        n += 2
        logged = await log_every_statement(direct.db)
        for _ in range(3):
            result = await logs[0].append(_entries(n, 2))
            assert (result.way, result.refused) == ("alone", 0)
            n += 2
        assert len(logged) == 3, logged  # no read, no BEGIN, no COMMIT: no transaction
        assert all("storyvault_audit_append" in q for q in logged), logged

        log = direct.audit_log
        report = await verify_log(log.engine, {log.key_id: log.public_key})
        assert report.ok, report.divergence
        assert report.entries_checked == result.tree_head.tree_size
    finally:
        await other.stop()
