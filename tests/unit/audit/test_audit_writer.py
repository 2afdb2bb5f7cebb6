"""AuditWriter: group commit, durability contract, failure closes every waiter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import (
    AppendResult,
    AuditEntry,
    AuditUnavailable,
    AuditWriter,
    InvalidEntry,
    TransparencyLog,
    tree_heads,
)


async def test_concurrent_appends_share_few_transactions(
    audit_log: TransparencyLog, audit_engine: AsyncEngine, kit: type
) -> None:
    n = 1000
    async with AuditWriter(audit_log, max_delay=0.005, max_batch=512) as writer:
        indexes = await asyncio.gather(*(writer.append(kit.make_entry(i)) for i in range(n)))
        batches = writer.batches_committed
    assert sorted(indexes) == list(range(n))
    assert len(set(indexes)) == n
    assert batches <= 6, batches  # 1000 concurrent callers, batches of up to 512
    async with audit_engine.connect() as conn:
        heads = (await conn.execute(select(func.count()).select_from(tree_heads))).scalar()
    assert heads == batches
    # Each caller's index points at its own entry.
    for i in (0, 17, 999):
        assert (await audit_log.get_entry(indexes[i])).entry == kit.make_entry(i)


async def test_append_returns_only_after_commit(audit_log: TransparencyLog, kit: type) -> None:
    async with AuditWriter(audit_log) as writer:
        index = await writer.append(kit.make_entry(0))
        # Durable: visible through a fresh connection with a signed head covering it.
        assert (await audit_log.get_entry(index)).entry == kit.make_entry(0)
        head = await audit_log.latest_tree_head()
        assert head is not None
        assert head.tree_size > index


async def test_max_batch_bounds_each_transaction(audit_log: TransparencyLog, kit: type) -> None:
    async with AuditWriter(audit_log, max_delay=0.05, max_batch=10) as writer:
        await asyncio.gather(*(writer.append(kit.make_entry(i)) for i in range(35)))
        assert writer.batches_committed == 4
    sizes = []
    for size in range(1, 36):
        try:
            await audit_log.get_tree_head(size)
            sizes.append(size)
        except Exception:
            continue
    assert sizes == [10, 20, 30, 35]


@pytest.mark.parametrize("early_close", [True, False])
async def test_callers_that_wait_for_their_entry_do_not_wait_out_the_window(
    audit_log: TransparencyLog, kit: type, early_close: bool
) -> None:
    """Eight callers that each send their next entry only once the previous one is
    durable (a service's connection pool) can never fill a batch beyond eight: once
    a batch of eight was seen, a batch commits as soon as all eight are pending
    instead of idling through the rest of the window. The window is long beside a
    commit, so a loaded machine's slow commits cannot pass for waiting it out."""
    window = 0.3
    rounds = 6
    writer = AuditWriter(audit_log, max_delay=window, max_batch=512, early_close=early_close)
    async with writer:

        async def caller(n: int) -> None:
            for i in range(rounds):
                await writer.append(kit.make_entry(n * rounds + i))

        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(caller(n) for n in range(8)))
        elapsed = loop.time() - start
        assert writer.batches_committed == rounds
        if not early_close:  # every batch waits out its window
            assert elapsed >= 0.9 * window * rounds, elapsed
            return
        # The first batch waits out its window (nothing known yet); the other five
        # commit at once, where each used to wait the whole window.
        assert elapsed < window + 0.5 * window * (rounds - 1), elapsed

        # The goal follows the load down: a lone caller waits out the window until
        # the batches of eight (and the one gathered while the last of them
        # committed) have left the history, then commits at once.
        for i in range(17):
            await writer.append(kit.make_entry(100 + i))
        start = loop.time()
        for i in range(4):
            await writer.append(kit.make_entry(200 + i))
        assert loop.time() - start < 2 * window, loop.time() - start
    assert await audit_log.size() == 8 * rounds + 21


async def test_entries_that_waited_out_the_window_during_a_commit_go_at_once(kit: type) -> None:
    """Without early close the gathering window runs from an entry's arrival: one
    that came while the batch before it committed, and has waited longer than the
    window by the time that commit ends, is sent at once instead of waiting a
    window more."""
    window, commit = 0.1, 0.3
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    ends: list[float] = []

    class SlowLog:
        async def append(self, batch: Sequence[AuditEntry]) -> AppendResult:
            starts.append(loop.time())
            await asyncio.sleep(commit)
            ends.append(loop.time())
            return AppendResult(len(starts) - 1, None)  # type: ignore[arg-type]

    async with AuditWriter(SlowLog(), max_delay=window, early_close=False) as writer:
        first = asyncio.create_task(writer.append(kit.make_entry(0)))
        await asyncio.sleep(window + commit / 2)  # the first batch is committing
        second = asyncio.create_task(writer.append(kit.make_entry(1)))
        assert await asyncio.gather(first, second) == [0, 1]
        # A lone entry on an idle writer still waits out the window.
        arrived = loop.time()
        assert await writer.append(kit.make_entry(2)) == 2
    assert starts[2] - arrived >= 0.9 * window
    assert starts[1] - ends[0] < window / 2, (starts, ends)


async def test_with_several_in_flight_a_batch_does_not_wait_for_the_one_before(
    kit: type,
) -> None:
    """``in_flight`` > 1 (a log in another process): the next batch is sent while the
    one before commits, up to the limit, and each caller still gets its own index
    only once its batch has committed."""
    commit = 0.2
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    committed: list[int] = []
    open_ = 0
    most_open = 0

    class SlowLog:
        async def append(self, batch: Sequence[AuditEntry]) -> AppendResult:
            nonlocal open_, most_open
            starts.append(loop.time())
            first = len(committed)
            committed.extend(range(len(batch)))
            open_ += 1
            most_open = max(most_open, open_)
            await asyncio.sleep(commit)
            open_ -= 1
            return AppendResult(first, None)  # type: ignore[arg-type]

    async with AuditWriter(SlowLog(), max_delay=0.0, early_close=False, in_flight=2) as writer:
        tasks = []
        for i in range(6):  # six batches of one, 10 ms apart
            tasks.append(asyncio.create_task(writer.append(kit.make_entry(i))))
            await asyncio.sleep(0.01)
        assert not any(t.done() for t in tasks[:2])  # not before their commit ends
        assert sorted(await asyncio.gather(*tasks)) == list(range(6))
    assert most_open == 2  # never more than the limit at once
    assert starts[1] - starts[0] < commit / 2  # the second did not wait for the first


async def test_the_caller_that_fills_send_at_sends_at_once(kit: type) -> None:
    """With ``send_at``, entries appended in one pass of the loop go in parts of
    ``send_at``, each sent by the caller that completes it before the pass goes on
    (not all together once the pass is over); the rest follow with the writer."""
    events: list[tuple[str, int]] = []
    first = 0

    class Log:
        async def append(self, batch: Sequence[AuditEntry]) -> AppendResult:
            nonlocal first
            events.append(("sent", len(batch)))
            start, first = first, first + len(batch)
            await asyncio.sleep(0.05)
            return AppendResult(start, None)  # type: ignore[arg-type]

    class Caller:
        def __init__(self, i: int) -> None:
            self.i = i

        async def run(self, writer: AuditWriter) -> int:
            events.append(("read", self.i))  # the request's own work, before its entry
            return await writer.append(kit.make_entry(self.i))

    writer = AuditWriter(Log(), max_delay=0.0, early_close=False, in_flight=8, send_at=4)
    async with writer:
        indexes = await asyncio.gather(*(Caller(i).run(writer) for i in range(10)))
    assert sorted(indexes) == list(range(10))
    assert events[:12] == [
        *(("read", i) for i in range(4)),
        ("sent", 4),  # sent by the fourth caller, before the fifth request ran
        *(("read", i) for i in range(4, 8)),
        ("sent", 4),
        ("read", 8),
        ("read", 9),
    ]
    assert events[12:] == [("sent", 2)]  # the rest, by the writer


def test_early_close_and_several_in_flight_are_refused(audit_log: TransparencyLog) -> None:
    with pytest.raises(ValueError, match="early_close"):
        AuditWriter(audit_log, early_close=True, in_flight=2)
    with pytest.raises(ValueError, match="in_flight"):
        AuditWriter(audit_log, early_close=False, in_flight=0)


class _BrokenLog:
    def __init__(self) -> None:
        self.calls = 0

    async def append(self, batch: Sequence[AuditEntry]) -> AppendResult:
        self.calls += 1
        await asyncio.sleep(0)
        raise OSError("disk on fire")


async def test_a_failed_batch_fails_every_waiter(kit: type) -> None:
    log = _BrokenLog()
    async with AuditWriter(log, max_delay=0.01) as writer:
        results = await asyncio.gather(
            *(writer.append(kit.make_entry(i)) for i in range(20)), return_exceptions=True
        )
    assert log.calls == 1
    assert all(isinstance(r, AuditUnavailable) for r in results)
    error = results[0]
    assert isinstance(error, AuditUnavailable)
    assert error.kind == "unavailable"
    assert error.code == "audit_unavailable"
    assert isinstance(error.__cause__, OSError)


async def test_a_real_database_failure_fails_closed_and_the_writer_recovers(
    audit_log: TransparencyLog, audit_engine: AsyncEngine, kit: type
) -> None:
    async with AuditWriter(audit_log, max_delay=0.005) as writer:
        await writer.append(kit.make_entry(0))
        async with audit_engine.begin() as conn:
            await conn.execute(text("ALTER TABLE audit_tree_heads RENAME TO audit_heads_away"))
        results = await asyncio.gather(
            *(writer.append(kit.make_entry(i)) for i in range(1, 11)), return_exceptions=True
        )
        assert all(isinstance(r, AuditUnavailable) for r in results), results
        async with audit_engine.begin() as conn:
            await conn.execute(text("ALTER TABLE audit_heads_away RENAME TO audit_tree_heads"))
        # Nothing of the failed batch was written; the next batch continues at 1.
        assert await writer.append(kit.make_entry(11)) == 1


async def test_stop_flushes_pending_entries(audit_log: TransparencyLog, kit: type) -> None:
    writer = AuditWriter(audit_log, max_delay=10.0)  # a window far longer than the test
    await writer.start()
    tasks = [asyncio.create_task(writer.append(kit.make_entry(i))) for i in range(5)]
    await asyncio.sleep(0.01)
    await writer.stop()
    assert sorted(await asyncio.gather(*tasks)) == [0, 1, 2, 3, 4]
    assert await audit_log.size() == 5


async def test_append_when_not_running_is_unavailable(
    audit_log: TransparencyLog, kit: type
) -> None:
    writer = AuditWriter(audit_log)
    with pytest.raises(AuditUnavailable):
        await writer.append(kit.make_entry(0))
    await writer.start()
    await writer.stop()
    with pytest.raises(AuditUnavailable):
        await writer.append(kit.make_entry(0))


async def test_an_invalid_entry_fails_only_its_caller(
    audit_log: TransparencyLog, kit: type
) -> None:
    bad = AuditEntry(kind="nope", actor="system")  # type: ignore[arg-type]
    async with AuditWriter(audit_log) as writer:
        results = await asyncio.gather(
            writer.append(kit.make_entry(0)), writer.append(bad), return_exceptions=True
        )
    assert results[0] == 0
    assert isinstance(results[1], InvalidEntry)


def test_bad_settings_are_refused(audit_log: TransparencyLog) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        AuditWriter(audit_log, max_batch=0)
