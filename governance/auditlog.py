"""The audit group commit's log on the SQLite default: one batch, one commit, in place.

On PostgreSQL the writer appends through the async engine. On SQLite every
statement through aiosqlite, or every batch through a worker thread, costs a
thread hand-off and a fight for the GIL with the event loop; measured under
load, that overhead was larger than the append itself. So the batch's whole
transaction (lock, tree state, leaves, nodes, signed tree head, commit) runs on
the loop's own writer connection, under the in-process write lock. The loop
is blocked for that transaction, fsync included (about 0.5-1 ms here), once
per batch, and the batch grows with the load. If another process (a second
worker) holds the database, the batch is retried in a worker thread that waits
for the lock as every other writer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from audit import AppendResult, AuditEntry, EncodedEntry, TransparencyLog
from governance.db import Database, DatabaseBusy

__all__ = ["InlineSqliteLog"]


class InlineSqliteLog:
    """A ``BatchLog`` (see ``audit.AuditWriter``) for a SQLite ``Database``."""

    def __init__(self, log: TransparencyLog, db: Database) -> None:
        if db.sync_engine is None:
            raise ValueError("InlineSqliteLog needs a file-backed SQLite database")
        self._log = log
        self._db = db

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        encoded = [EncodedEntry.of(e) for e in batch]
        async with self._db.write_lock():
            try:
                return self._db.write_inline(lambda conn: self._log.append_sync(conn, encoded))
            except DatabaseBusy:
                return await asyncio.to_thread(
                    self._db.write_sync, lambda conn: self._log.append_sync(conn, encoded)
                )
