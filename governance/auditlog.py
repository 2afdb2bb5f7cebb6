"""The audit group commit's log: one batch, one transaction, on each back end's fast path.

On PostgreSQL (``PgBatchLog``) the batch's statements run on an asyncpg
connection directly: through SQLAlchemy's async engine each statement cost a pool
checkout's share, an execution context and a greenlet hand-off, several times the
statement itself. While this process is the log's only writer a batch is one
statement in one round trip (``TransparencyLog.append_pg_alone``); otherwise it
runs in a transaction under the log's lock (``append_pg``).

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

from sqlalchemy.engine import Connection

from audit import AppendResult, AuditEntry, EncodedEntry, RemoteLog, TransparencyLog
from governance.db import Database, DatabaseBusy
from governance.metrics import AUDIT_BATCH_WAYS

_ALONE = AUDIT_BATCH_WAYS.labels(way="alone")
_LOCKED = AUDIT_BATCH_WAYS.labels(way="locked")
_REFUSED = AUDIT_BATCH_WAYS.labels(way="alone_refused")

__all__ = ["InlineSqliteLog", "PgBatchLog", "RelayedLog"]

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
        # One round trip while this process is the log's only writer; under the lock
        # in a transaction (five) when another appended since, or went first.
        log = self._log
        refused = False
        if log.may_go_alone:
            done = await self._db.pg_connection(lambda conn: log.append_pg_alone(conn, encoded))
            if done is not None:
                _ALONE.inc()
                return replace(done, way="alone")
            _REFUSED.inc()
            refused = True
        result = await self._db.pg_transaction(lambda conn: log.append_pg(conn, encoded))
        _LOCKED.inc()
        return replace(result, way="refused_locked" if refused else "locked")


class RelayedLog:
    """A worker's ``BatchLog`` when the audit process appends (``audit.RemoteLog``,
    ``governance.auditproc``): this worker's metrics count its batches by the way
    the audit process wrote the transaction that held them, as ``PgBatchLog`` counts
    its own."""

    def __init__(self, remote: RemoteLog) -> None:
        self._remote = remote

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        result = await self._remote.append(batch)
        way = result.way
        if way == "alone":
            _ALONE.inc()
        elif way in {"locked", "refused_locked"}:
            if way == "refused_locked":
                _REFUSED.inc()
            _LOCKED.inc()
        return result

    async def close(self) -> None:
        await self._remote.close()
