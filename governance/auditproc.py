"""The audit log's own process: the group commit of every worker, in one place.

``storyvault serve`` starts this process before its workers and points them at its
Unix socket (``Settings.audit_socket``). Each worker still gathers its requests'
entries into batches (``audit.AuditWriter``), and sends each batch here
(``audit.RemoteLog``) instead of appending it itself; this process appends every
batch that arrived while the one before committed, in one transaction with one
signed tree head (``audit.LogServer``), on the back end's fast path
(``governance.auditlog``), and answers each worker once its entries are durable.

Why: a batch's own work (its leaves' and Merkle nodes' hashes, the signed head,
the inserts and the commit's fsync) ran on the worker's event loop, between the
requests it serves, at 70-100 µs of a gated read's CPU. Here it runs beside them,
on another CPU where there is one. With several workers, their batches share one
commit instead of taking turns on the log's lock (SQLite's write lock, or
PostgreSQL's advisory lock and five round trips).

The durability contract is unchanged: a worker's read returns its data only after
this process has committed its entry. If this process cannot be reached, the
worker's reads fail closed (``AuditUnavailable``, 503) until it is back;
``storyvault serve`` starts it again when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import structlog

from audit import BatchLog, LogServer, TransparencyLog
from governance.auditlog import InlineSqliteLog, PgBatchLog
from governance.db import Database
from governance.keys import KeyRing
from governance.settings import Settings

__all__ = ["serve_audit_log"]

log = structlog.get_logger("storyvault.audit")


async def serve_audit_log(
    settings: Settings, path: str, *, ready: Callable[[], None] | None = None
) -> None:
    """Serve the audit log of ``settings``' database at ``path`` until SIGTERM or SIGINT;
    call ``ready`` once the socket accepts batches. The database must be migrated."""
    ring, _ = KeyRing.load_or_create(settings.data_dir, settings.keyring_json)
    db = Database(
        settings.database_url, sqlite_synchronous=settings.sqlite_synchronous, pool_size=2
    )
    signing = ring.signing_key
    transparency = TransparencyLog(db.engine, signing.private, signing.kid)
    batch_log: BatchLog
    if db.sync_engine is not None:
        batch_log = InlineSqliteLog(transparency, db)
    elif db.dialect == "postgresql":
        batch_log = PgBatchLog(transparency, db)
    else:
        raise ValueError("the audit process needs a file-backed SQLite or a PostgreSQL database")
    server = LogServer(batch_log, path, max_delay=settings.audit_batch_ms / 1000.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        db.start_checkpointer()
        await server.start()
        log.info("audit_process.started", database=db.dialect)
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        # Workers are stopped first; what they sent is appended before this exits.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await server.stop()
        await db.dispose()
        log.info("audit_process.stopped", batches=server.batches)
