"""The audit group commit's log: one batch, one transaction, on each back end's fast path.

On PostgreSQL (``PgBatchLog``) the batch's statements run on an asyncpg
connection directly: through SQLAlchemy's async engine each statement cost a pool
checkout's share, an execution context and a greenlet hand-off, several times the
statement itself. A batch is one call in one round trip
(``TransparencyLog.append_pg_alone``): it takes the log's lock and extends the
log's newest state as this process last saw it. If another process appended since,
the call writes nothing and answers with the newest state, read under the lock, and
the batch tries again at once, extending that: the lock is held only while the
server runs a call and commits, where a transaction under the lock (``append_pg``,
five round trips) holds it across four of them, each of which waits for this event
loop's turn. A batch refused a few times running (other writers' batches landed
between its calls) goes under the lock, which always succeeds.

On SQLite (``InlineSqliteLog``) every
statement through aiosqlite, or every batch through a worker thread, costs a
thread hand-off and a fight for the GIL with the event loop; measured under
load, that overhead was larger than the append itself. So the batch's
statements (lock, tree state, leaves, nodes, signed tree head) run on the
loop's own writer connection, under the in-process write lock, in well under a
millisecond, and so does the commit while its fsync is quick; on a slow disk
the commit goes to a worker thread while the loop serves other requests
(``Database.write_inline``). The batch grows with the load.
If another process (a second worker) holds the database, the batch is retried
in place after short pauses, then in a worker thread that waits for the lock
as every other writer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy.engine import Connection

from audit import AppendResult, AuditEntry, EncodedEntry, RemoteLog, TransparencyLog
from governance.db import Database, DatabaseBusy
from governance.metrics import AUDIT_BATCH_WAYS

_ALONE = AUDIT_BATCH_WAYS.labels(way="alone")
_LOCKED = AUDIT_BATCH_WAYS.labels(way="locked")
_REFUSED = AUDIT_BATCH_WAYS.labels(way="alone_refused")

__all__ = ["InlineSqliteLog", "PgBatchLog", "RelayedLog"]

_ALONE_TRIES = 3
"""Lone statements a batch tries before it goes under the log's lock."""

_BACKOFF = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016)
"""Pauses between in-place attempts while another process writes (31.5 ms in all)."""


class InlineSqliteLog:
    """A ``BatchLog`` (see ``audit.AuditWriter``) for a SQLite ``Database``."""

    def __init__(self, log: TransparencyLog, db: Database) -> None:
        if db.sync_engine is None:
            raise ValueError("InlineSqliteLog needs a file-backed SQLite database")
        self._log = log
        self._db = db

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        encoded = [EncodedEntry.of(e) for e in batch]

        def append(conn: Connection) -> AppendResult:
            return self._log.append_sync(conn, encoded)

        async with self._db.write_lock():
            # Another process's write holds the file for a millisecond or two: wait
            # for it without blocking the loop, then, if it lasts, as every other
            # writer does (the busy timeout) in a worker thread.
            for pause in _BACKOFF:
                try:
                    return await self._db.write_inline(append)
                except DatabaseBusy:
                    await asyncio.sleep(pause)
            return await asyncio.to_thread(self._db.write_sync, append)


class PgBatchLog:
    """A ``BatchLog`` (see ``audit.AuditWriter``) for a PostgreSQL ``Database``."""

    def __init__(self, log: TransparencyLog, db: Database) -> None:
        self._log = log
        self._db = db

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        encoded = [EncodedEntry.of(e) for e in batch]
        log = self._log
        refused = 0
        for _ in range(_ALONE_TRIES):
            done = await self._db.pg_connection(lambda conn: self._alone(conn, encoded))
            if isinstance(done, AppendResult):
                _ALONE.inc()
                return replace(done, way="alone", refused=refused)
            if not done:
                break  # an empty log: nothing to extend alone, nothing was sent
            _REFUSED.inc()
            refused += 1
        result = await self._db.pg_transaction(lambda conn: log.append_pg(conn, encoded))
        _LOCKED.inc()
        return replace(result, way="locked", refused=refused)

    async def _alone(self, conn: Any, encoded: list[EncodedEntry]) -> AppendResult | bool:
        """One lone call on ``conn``, after a read of the log's state if this object
        has none it may extend (a new process, or a locked batch that found another
        writer's). Returns its result, else whether a call was sent (and refused,
        bringing back the newest state for the next try); False when the log is
        empty (nothing to extend alone)."""
        log = self._log
        if not log.may_go_alone:
            await log.refresh_pg(conn)
            if not log.may_go_alone:
                return False
        done = await log.append_pg_alone(conn, encoded)
        return True if done is None else done


class RelayedLog:
    """A worker's ``BatchLog`` when the audit process appends (``audit.RemoteLog``,
    ``governance.auditproc``): this worker's metrics count its batches by the way
    the audit process wrote the transaction that held them, as ``PgBatchLog`` counts
    its own."""

    def __init__(self, remote: RemoteLog) -> None:
        self._remote = remote

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        result = await self._remote.append(batch)
        if result.refused:
            _REFUSED.inc(result.refused)
        if result.way == "alone":
            _ALONE.inc()
        elif result.way == "locked":
            _LOCKED.inc()
        return result

    async def close(self) -> None:
        await self._remote.close()
