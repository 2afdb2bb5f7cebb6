"""Group commit: many concurrent ``append`` calls share one transaction.

A background task waits for the first pending entry, gathers more until
``max_delay`` seconds after it arrived or until enough are pending, and appends
them in one transaction with one signed tree head. While a batch commits, the
next one gathers, so the write rate is bounded by commits per second times the
batch size. Without ``early_close`` (below), entries that waited out the window
while the batch before them committed are sent as soon as it has.

"Enough" is ``max_batch``; with ``early_close``, fewer once batches have been
committed: as many entries as were ever outstanding at once (pending, or in the
batch being committed) while the last ``_HISTORY`` batches gathered. Callers
that wait for their entry before they send the next one (a service's pool of
connections, a load generator) can never have more outstanding than their
number, so once all of them are pending the rest of the window would be idle
time: every one of them waits, and nothing else comes. Counting the batch being
committed keeps such callers in one batch: had they split into two that
alternate (one gathering while the other commits), neither would fill the goal
alone, and the window joins them again. The goal follows the load: it rises as
soon as more entries are outstanding, and when the load drops it falls as the
batches gathered at the higher load leave the last ``_HISTORY``.

``early_close`` suits callers that reach ``append`` in lock step, as the gated
read does on SQLite: its statements run in place on the event loop, so a read
goes from its request to its entry without yielding, and the callers resumed
by one commit are all pending again within one pass of the loop. Where
callers reach ``append`` spread out in time (reads that wait for database
round trips, as on PostgreSQL), a batch that closes as soon as the callers
then pending reach the goal leaves behind the ones a millisecond away, and
the log commits more, smaller batches: measured there, no gain.

With ``in_flight`` > 1 the writer sends a batch while up to ``in_flight - 1``
batches before it still commit, for a log that appends batches in the order they
were sent without holding this event loop (``RemoteLog``: another process
commits). Each caller is still answered once its own batch has committed. With
``send_at`` too, the caller whose entry makes ``send_at`` entries pending sends
them itself, at once: callers that reach ``append`` in lock step (SQLite's reads,
above) would otherwise send all their entries together at the end of the loop's
pass and then wait, idle, for that one commit; sent in parts, the first parts
commit while the loop serves the requests after them.

Durability contract: ``append`` returns the leaf index only after the batch holding
the entry has committed. If that commit fails, every caller of the batch gets
``AuditUnavailable`` and must fail closed (disclose nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from audit._entry import AuditEntry, EncodedEntry
from audit._errors import AuditUnavailable
from audit._log import AppendResult

_log = logging.getLogger(__name__)


class BatchLog(Protocol):
    """What the writer needs of a log: ``TransparencyLog.append``."""

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult: ...


_Pending = tuple[EncodedEntry, "asyncio.Future[int]"]

_HISTORY = 16
"""Batches over which the gathering goal is the most entries outstanding at once
(see the module docstring)."""


class AuditWriter:
    """Durable, batched appends to a transparency log; see the module docstring."""

    def __init__(
        self,
        log: BatchLog,
        *,
        max_delay: float = 0.002,
        max_batch: int = 512,
        early_close: bool = True,
        in_flight: int = 1,
        send_at: int = 0,
    ) -> None:
        if max_delay < 0 or max_batch < 1 or in_flight < 1:
            raise ValueError("max_delay must be >= 0, max_batch and in_flight >= 1")
        if early_close and in_flight > 1:
            raise ValueError("early_close counts one batch committing at a time")
        self._log = log
        self._max_delay = max_delay
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        # The gathering goal: the most entries outstanding at once (pending, or in
        # the batch being committed) over the last _HISTORY batches.
        self._early_close = early_close
        self._peaks: deque[int] = deque(maxlen=_HISTORY)
        self._peak = 0
        self._committing = 0
        self._goal = max_batch
        self._first_at = 0.0  # loop time at which the oldest pending entry arrived
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._batches = 0
        # Batches committing at once: more than one where the log appends them in
        # order without holding this loop (a RemoteLog).
        self._slots = asyncio.Semaphore(in_flight)
        self._in_flight = in_flight
        self._committing_tasks: set[asyncio.Task[None]] = set()
        # With in_flight > 1: the caller whose entry makes send_at pending sends them.
        self._send_at = send_at if in_flight > 1 else 0

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    @property
    def batches_committed(self) -> int:
        """Transactions committed so far (one per batch)."""
        return self._batches

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the audit writer is already started")
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Stop accepting entries, commit the pending ones, and wait for the task."""
        if self._task is None:
            return
        self._stopping = True
        self._arrived.set()
        self._full.set()
        task, self._task = self._task, None
        await task

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def append(self, entry: AuditEntry) -> int:
        """Queue ``entry``; return its leaf index once it is durable.

        Raises InvalidEntry (for this entry only) before queueing, and
        AuditUnavailable if the writer is not running or its batch did not commit.
        """
        if not self.running:
            raise AuditUnavailable("the audit writer is not running")
        # Encode now (once) so a malformed entry fails its caller, not its whole batch.
        encoded = EncodedEntry.of(entry)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        pending = self._pending
        if not pending:
            self._first_at = loop.time()
        pending.append((encoded, future))
        if self._send_at and len(pending) >= self._send_at and not self._stopping:
            # Sent by this caller, now, not at the end of the loop's pass: the log's
            # process commits these while this loop serves the requests after them.
            self._pending = []
            async with self._slots:
                await self._commit(pending)
            return await future
        self._peak = max(self._peak, len(pending) + self._committing)
        self._arrived.set()
        if len(pending) >= self._goal:
            self._full.set()
        return await future

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._stopping:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                left = self._max_delay
                if not self._early_close:
                    # The window runs from the first pending entry's arrival: entries
                    # that came while the batch before committed may have waited it
                    # out already. (With early close the goal decides, and the window
                    # restarts: closing on age split callers into two halves.)
                    left -= self._loop_time() - self._first_at
                if not self._stopping and len(self._pending) < self._goal and left > 0:
                    # Event.wait is safe to time out (no lost item).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), left)
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                if self._pending:  # more than max_batch: the rest start a window
                    self._first_at = self._loop_time()
                if self._early_close:
                    self._peaks.append(self._peak)
                    self._goal = min(self._max_batch, max(self._peaks))
                self._peak = len(self._pending) + len(batch)
                if len(self._pending) < self._goal and not self._stopping:
                    self._full.clear()
                if self._in_flight > 1:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._commit_in_slot(batch))
                    self._committing_tasks.add(task)
                    task.add_done_callback(self._committing_tasks.discard)
                    continue
                self._committing = len(batch)
                try:
                    await self._commit(batch)
                finally:
                    self._committing = 0
        finally:
            # Whatever ended the loop (stop, cancellation, a bug), nobody waits forever.
            self._stopping = True
            self._fail(self._pending, None)
            self._pending = []
            if self._committing_tasks:
                await asyncio.gather(*self._committing_tasks, return_exceptions=True)

    async def _commit_in_slot(self, batch: list[_Pending]) -> None:
        try:
            await self._commit(batch)
        finally:
            self._slots.release()

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            result = await self._log.append([entry for entry, _ in batch])
        except Exception as exc:  # noqa: BLE001 - any failure means "not durable"
            _log.warning("audit batch of %d entries failed: %s", len(batch), type(exc).__name__)
            self._fail(batch, exc)
            return
        except BaseException as exc:  # cancellation: the outcome is unknown, fail closed
            self._fail(batch, exc)
            raise
        self._batches += 1
        for offset, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result(result.first_index + offset)

    @staticmethod
    def _fail(batch: list[_Pending], cause: BaseException | None) -> None:
        for _, future in batch:
            if not future.done():
                error = AuditUnavailable("the audit entry could not be made durable")
                error.__cause__ = cause
                future.set_exception(error)
