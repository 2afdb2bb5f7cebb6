"""Database engine, sessions and migrations for the embedded SQLite default and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import asyncpg
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from audit import Batched, Prepared
from governance.metrics import PG_LOOKUP_BATCH_SIZE, SQLITE_CHECKPOINT_HOLD, SQLITE_COMMITS

__all__ = [
    "Database",
    "DatabaseBusy",
    "ReadStep",
    "ReadSteps",
    "alembic_config",
    "run_steps",
    "upgrade_database",
]

T = TypeVar("T")

ReadStep: TypeAlias = "tuple[Prepared | Batched, Mapping[str, Any]] | Callable[[Connection], Any]"
"""One statement of a read: a ``Prepared`` (or ``Batched``) statement and its
parameters (answered with its rows as tuples), or a synchronous function of a
connection (answered with what it returns) for a statement ``Prepared`` cannot take
(expanding ``IN`` parameters)."""

ReadSteps: TypeAlias = "Generator[ReadStep, Any, T]"
"""A read written once for both back ends: a generator that yields its statements and
receives their results (see ``Database.query``)."""


_PG_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
"""What asyncpg raises outside a statement when its server went away (TimeoutError,
an OSError, included: no connection came free in time)."""

_PG_ACQUIRE_TIMEOUT = 30.0
"""Seconds to wait for a connection of the asyncpg pool, as SQLAlchemy's pool waits."""


class _PgTake:
    """``async with`` a connection of a ``Database``'s asyncpg pool.

    asyncpg bounds an acquire's wait by arming a timer and a cancel scope on every
    call, and again around the connection's reset on release, even when a
    connection is free and nothing waits: measured, 10-15 µs of CPU a use (a gated
    read takes one). The database counts the connections its callers hold or wait
    for; while that is under the pool's size, a free one is in the pool (every
    holder of an asyncpg pool is in its queue unless taken), and the acquire takes
    it without waiting, so it goes unbounded (a connection that must be opened
    first is opened within the pool's connect timeout, the same bound). Otherwise
    it waits at most ``_PG_ACQUIRE_TIMEOUT`` seconds, as before. A connection is
    counted from before the acquire until its release has returned it to the pool."""

    __slots__ = ("_ctx", "_db", "_pool")

    def __init__(self, db: Database, pool: asyncpg.Pool) -> None:
        self._db = db
        self._pool = pool
        self._ctx: Any = None

    async def __aenter__(self) -> Any:
        db = self._db
        wait = None if db._pg_taken < db._pg_pool_size else _PG_ACQUIRE_TIMEOUT
        db._pg_taken += 1
        try:
            self._ctx = ctx = self._pool.acquire(timeout=wait)
            return await ctx.__aenter__()
        except BaseException:
            db._pg_taken -= 1
            raise

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._ctx.__aexit__(*exc_info)
        finally:
            self._db._pg_taken -= 1


def _disconnect(exc: BaseException) -> BaseException:
    """A lost server met outside a statement, as SQLAlchemy reports a disconnect."""
    return DBAPIError.instance("(connection)", None, exc, Exception, connection_invalidated=True)


class _Lookups:
    """The lookups of one ``Batched`` statement that reads wait for at the same time,
    sent to PostgreSQL as one statement (``Batched.each_pg``).

    At most one such statement is in flight: the lookups that come while it is go
    out together as the next one once it has answered, so a lookup waits at most
    for the statement before its own, and under load each statement carries the
    lookups of many reads. The statements are sent by a task of their own, never by
    a read's own task, so a read that is cancelled (its client went away) takes no
    other read's lookup with it.

    If a statement of several lookups fails other than by a lost server, each of
    them goes again on its own, so one lookup's error (a value PostgreSQL refuses)
    is never another read's."""

    __slots__ = ("_db", "_sender", "_stmt", "_waiting")

    def __init__(self, db: Database, stmt: Batched) -> None:
        self._db = db
        self._stmt = stmt
        self._waiting: list[tuple[Mapping[str, Any], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    def lookup(self, params: Mapping[str, Any]) -> asyncio.Future[Any]:
        """A future of the lookup's rows (a list of its one row)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((params, answer))
        if self._sender is None:
            self._sender = loop.create_task(self._send())
        return answer

    async def _send(self) -> None:
        batch: list[tuple[Mapping[str, Any], asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                batch = [(params, answer) for params, answer in batch if not answer.done()]
                if batch:
                    PG_LOOKUP_BATCH_SIZE.observe(len(batch))
                    await self._answer(batch)
        except BaseException as exc:  # cancelled (shutting down): nobody is left waiting
            for _, answer in batch + self._waiting:
                if answer.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    answer.cancel()
                else:
                    answer.set_exception(exc)
            self._waiting = []
            raise
        finally:
            self._sender = None

    async def _answer(self, batch: list[tuple[Mapping[str, Any], asyncio.Future[Any]]]) -> None:
        db = self._db
        stmt = self._stmt
        try:
            async with _PgTake(db, db._pg_pool or await db._open_pg_pool()) as pg:
                if len(batch) == 1:
                    rows = [await stmt.rows_pg(pg, batch[0][0])]
                else:
                    rows = [[row] for row in await stmt.each_pg(pg, [p for p, _ in batch])]
        except _PG_CONNECTION_ERRORS as exc:
            failed: BaseException = _disconnect(exc)
        except DBAPIError as exc:
            if exc.connection_invalidated or len(batch) == 1:
                failed = exc
            else:
                for one in batch:
                    await self._answer([one])
                return
        except Exception as exc:  # noqa: BLE001 - handed to the reads that wait for it
            failed = exc
        else:
            for (_, answer), found in zip(batch, rows, strict=True):
                if not answer.done():
                    answer.set_result(found)
            return
        for _, answer in batch:
            if not answer.done():
                answer.set_exception(failed)


def run_steps(conn: Connection, steps: ReadSteps[T]) -> T:
    """Run ``steps`` on a synchronous connection (SQLite in place, or ``run_sync``)."""
    try:
        step = next(steps)
        while True:
            result = step[0].rows(conn, step[1]) if isinstance(step, tuple) else step(conn)
            step = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


log = structlog.get_logger("storyvault.db")


_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for another's lock (the busy timeout)."""

_HOLD_EVERY = 4
"""Checkpoint rounds per round that holds this process's writers back for its last
pass, so the log starts over (2 s at the default interval; see
``_checkpoint_forever``)."""

_HOLD_FRAMES = 8192
"""Frames (pages: 32 MiB at SQLite's 4 KiB) past which the next round holds the
writers back whatever the count of rounds."""

_RESTART_FRAMES = 16384
"""Frames (64 MiB) past which a holding round makes sure the write-ahead log starts
over, waiting for other writers and readers if need be: a log this long did not
start over when it should have (another process writing all the time, or
readers of old frames)."""

_RESTART_WAIT_MS = 50
"""How long that RESTART checkpoint waits for other writers and readers."""

_WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes of write-ahead log file SQLite keeps when the log starts over."""


_INLINE_COMMIT_LIMIT = 0.001
"""Mean duration past which ``write_inline`` stops committing in place: a commit in
place blocks the event loop for its fsync (0.1-0.3 ms on a local SSD), which
costs less than handing it to a worker thread, but not on a slow disk."""

_COMMIT_WEIGHT = 1 / 16
"""Weight of the newest commit in that running mean (one slow fsync moves it little)."""

_THREADED_COMMITS = 64
"""Commits that go to a worker thread once the mean passes the limit, before one in
place measures the disk again."""


_CATCH_UP_PASSES = 2
"""Passes, while writes go on, between a round's bulk pass and its held one (see
``_checkpoint_forever``)."""

_IN_PLACE = SQLITE_COMMITS.labels(where="in_place")
_IN_THREAD = SQLITE_COMMITS.labels(where="thread")


def wal_checkpoint(engine: Engine, mode: str) -> int:
    """One checkpoint of SQLite's write-ahead log (``PASSIVE`` or ``RESTART``) on a
    connection of ``engine``, in the calling thread; returns the frames the log held
    when it began."""
    with engine.connect() as conn:
        if mode == "PASSIVE":
            return int(conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()[1])
        # The pooled connection gets its usual busy timeout back.
        conn.exec_driver_sql(f"PRAGMA busy_timeout={_RESTART_WAIT_MS}")
        try:
            return int(conn.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)").one()[1])
        finally:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")


class DatabaseBusy(Exception):
    """Another process holds the SQLite database's write lock (nothing was written)."""


def _is_busy(exc: OperationalError) -> bool:
    return "database is locked" in str(exc.orig) or "database is busy" in str(exc.orig)


_MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def upgrade_database(engine: AsyncEngine) -> None:
    """Apply every pending Alembic migration."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, engine.url.render_as_string(hide_password=False))


async def _keep_clean_session(_: asyncpg.Connection) -> None:
    """The hot-path pool's ``reset`` on release: nothing to undo, no round trip.

    Its connections run only prepared statements and managed transactions (the audit
    batch's advisory lock is transaction-scoped); nothing on them sets a session
    variable, listens, opens a cursor or takes a session lock. asyncpg still rolls
    back a transaction left open and drops listeners before calling this. Its default
    (``RESET ALL; UNLISTEN *; CLOSE ALL; SELECT pg_advisory_unlock_all()``) cost one
    extra round trip per release: two on every gated read, as many as its statements.
    """


class Database:
    """The engine and a session factory; SQLite gets WAL and a busy timeout.

    On SQLite there is also a synchronous engine on the same file (the standard
    library's driver, no thread hand-offs). It serves two hot paths:

    * ``read(fn)``: the gated read's few indexed SELECTs run on the event loop's
      own connection, in place. A WAL reader never waits for the writer, and the
      rows come from the page cache in tens of microseconds, less than one hand-off
      to aiosqlite's thread would cost (measured: 2 statements through
      SQLAlchemy + aiosqlite cost 3-4 ms of CPU here; in place, 0.15-0.25 ms).
    * ``write_inline``: the audit group commit runs a batch's statements on the
      loop's own writer connection and only its commit (fsync) in a worker thread
      (see governance.auditlog).

    On PostgreSQL ``read(fn)`` runs ``fn`` through ``AsyncConnection.run_sync`` on an
    autocommit connection, so the same synchronous code serves both back ends.
    """

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "FULL",
        pool_size: int = 32,
        pre_ping: bool = False,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            # Each pooled aiosqlite connection is a thread and a file handle: keep
            # enough of them open that bursts do not churn through new ones (the
            # hot paths do not use them: see read and write_inline).
            kwargs.update(pool_size=20, max_overflow=10)
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            # PostgreSQL: ``pool_size`` connections stay open (a pool smaller than
            # the concurrent requests closes and reopens connections all the time:
            # measured, a third of the gated read's time). On the hot database no
            # ping per checkout (a round trip per request): a connection broken by
            # a server restart fails its request with 503 and the pool then drops
            # every connection of that age; connections are renewed every 5
            # minutes anyway. ``pre_ping`` is for rarely used databases (the key
            # store), whose idle connections are the likeliest to be stale.
            kwargs.update(
                pool_size=pool_size,
                max_overflow=pool_size // 2,
                pool_recycle=300,
                pool_pre_ping=pre_ping,
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            sync = sqlite_synchronous

            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={sync}")
                cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
                cur.execute("PRAGMA foreign_keys=ON")
                # When the log starts over, its file is cut back to this size (it
                # may have grown during a burst, or while a reader held old frames).
                cur.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
                cur.close()

            event.listen(self.engine.sync_engine, "connect", _pragmas)
        self.sync_engine: Engine | None = None
        if self.is_sqlite and self.engine.url.database not in (None, "", ":memory:"):
            self.sync_engine = create_engine(
                self.engine.url.set(drivername="sqlite"), pool_size=4, max_overflow=4
            )
            event.listen(self.sync_engine, "connect", _pragmas)
        self._reader: Connection | None = None
        self._writer: Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # Where write_inline commits: in place while its commits (their fsync) stay
        # quick on average, else in a worker thread (see _time_commit).
        self._commit_seconds: float | None = None
        self._threaded_commits = 0
        # PostgreSQL: asyncpg connections of the hot reads' own (see ``query``).
        self._pg_pool_size = pool_size
        self._pg_pool: asyncpg.Pool | None = None
        self._pg_taken = 0  # connections held or waited for (``_PgTake``)
        self._pg_lookups: dict[Batched, _Lookups] = {}
        self._pg_pool_opening: asyncio.Lock | None = None if self.is_sqlite else asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

        # The same pool, its connections in autocommit mode while they read (the
        # level is reset when a connection goes back to the pool).
        self._read_engine = (
            self.engine
            if self.is_sqlite
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time and its busy handler is not fair: under
        # steady load a waiting writer can starve past any timeout. Writers in
        # this process therefore queue on a FIFO lock; other processes (several
        # workers on one file) still meet the busy timeout as a last resort.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    @asynccontextmanager
    async def write_session(self) -> AsyncIterator[AsyncSession]:
        """A session for a write transaction (serialized in-process on SQLite)."""
        if self._write_lock is None:
            async with self.sessions() as session:
                yield session
            return
        async with self._write_lock, self.sessions() as session:
            yield session

    @asynccontextmanager
    async def write_lock(self) -> AsyncIterator[None]:
        """The in-process writers' FIFO lock on SQLite (nothing on PostgreSQL). Never
        wait for the audit group commit while holding it: the commit takes it too."""
        if self._write_lock is None:
            yield
            return
        async with self._write_lock:
            yield

    async def write_inline(self, fn: Callable[[Connection], T]) -> T:
        """SQLite: run ``fn`` in a transaction on the loop's own writer connection, in
        place, and commit it in place too while commits are quick: on a local SSD
        the commit's fsync blocks the loop for 0.1-0.3 ms, less than the CPU a
        worker thread's hand-off costs (measured: 0.04-0.23 ms less CPU per gated
        read at half load, where batches are small). Once commits average a
        millisecond or more (a slow disk), the next ones run in a worker thread,
        where the fsync needs no GIL and the loop serves other requests meanwhile;
        one in place now and then measures the disk again (``_time_commit``).
        The connection never waits for a lock: if another process holds the
        database, ``DatabaseBusy`` is raised at once (nothing written) and the
        caller retries with ``write_sync`` in a worker thread. Call it holding
        ``write_lock``, so no writer of this process can hold the database, and
        nothing else uses the connection until it is committed."""
        assert self.sync_engine is not None, "write_inline is for SQLite"
        conn = self._writer
        if conn is None or conn.closed or conn.invalidated:
            conn = self.sync_engine.connect()
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            if self._checkpointer is not None:
                conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
            conn.commit()
            self._writer = conn
        try:
            trans = conn.begin()
            try:
                result = fn(conn)
            except BaseException:
                trans.rollback()
                raise
            if not self._threaded_commits:
                start = time.perf_counter()
                trans.commit()
                _IN_PLACE.inc()
                self._time_commit(time.perf_counter() - start)
            else:
                self._threaded_commits -= 1
                done = asyncio.ensure_future(asyncio.to_thread(trans.commit))
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    # The commit goes on in its thread: this connection is its until
                    # then, so the next batch opens another.
                    self._writer = None
                    raise
                _IN_THREAD.inc()
        except OperationalError as exc:
            if _is_busy(exc):
                raise DatabaseBusy(str(exc.orig)) from exc
            self._writer = None
            conn.invalidate()
            raise
        return result

    def _time_commit(self, seconds: float) -> None:
        """Fold an in-place commit's duration into the running mean; past the limit,
        the next ``_THREADED_COMMITS`` commits run in a worker thread, and the first
        in place after them starts the mean over."""
        if self._commit_seconds is None:
            self._commit_seconds = seconds
        else:
            self._commit_seconds += (seconds - self._commit_seconds) * _COMMIT_WEIGHT
        if self._commit_seconds >= _INLINE_COMMIT_LIMIT:
            self._threaded_commits = _THREADED_COMMITS
            self._commit_seconds = None

    def write_sync(self, fn: Callable[[Connection], T]) -> T:
        """SQLite: run ``fn`` in a transaction on a pooled connection that waits for
        locks up to the busy timeout (thread-safe: for a worker thread)."""
        assert self.sync_engine is not None, "write_sync is for SQLite"
        with self.sync_engine.begin() as conn:
            return fn(conn)

    async def read(self, fn: Callable[[Connection], T], *, bulk: bool = False) -> T:
        """Run the read-only ``fn`` on a connection and return its result.

        ``fn`` is synchronous and must not write. On SQLite it runs in place on the
        event loop's own connection, which is left outside any transaction after
        every call (so it never pins an old snapshot); on PostgreSQL through
        ``run_sync`` on a pooled connection. ``bulk``: a read long enough to stall
        the loop (a page of thousands of rows) runs on SQLite in a pooled
        connection's own thread instead.
        """
        if self.sync_engine is None or bulk:
            # PostgreSQL: autocommit, so no BEGIN and ROLLBACK round trips around
            # the statements (under READ COMMITTED each statement takes its own
            # snapshot inside a transaction too, so what ``fn`` sees is the same).
            # SQLite (bulk): a pooled aiosqlite connection, off the loop's thread.
            async with self._read_engine.connect() as pooled:
                return await pooled.run_sync(fn)
        conn = self._reader
        if conn is None or conn.closed or conn.invalidated:
            conn = self.sync_engine.connect()
            # Reads only, and never a long wait on the loop: a WAL reader meets a
            # lock only in rare cases (recovery after a crash), and then fails fast.
            conn.exec_driver_sql("PRAGMA query_only=ON")
            conn.exec_driver_sql("PRAGMA busy_timeout=2000")
            conn.commit()
            self._reader = conn
        try:
            return fn(conn)
        finally:
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - a broken connection is replaced next time
                self._reader = None
                conn.invalidate()

    async def query(self, make: Callable[[], ReadSteps[T]]) -> T:
        """Run the read-only ``steps`` that ``make`` returns, and return their result.

        On SQLite (and wherever ``read`` would) this is ``read`` with ``run_steps``.
        On PostgreSQL the ``Prepared`` steps run on an asyncpg connection of this
        database's own small pool, directly (``Prepared.rows_pg``): measured, a
        gated read's statements through SQLAlchemy's pool, execution context and
        greenlet bridge cost several times the statements themselves. Such a
        connection is in autocommit, as ``read``'s are, so each statement sees what
        was committed when it started. A function step runs through ``read``.

        A ``Batched`` first step goes with the same step of other reads waiting at
        the same time, as one statement (``_Lookups``), and takes no connection of
        its own; a connection is taken only for the steps after it, if any. Each
        read's lookup is sent after the read asked for it, so it sees at least what
        was committed before then, as a statement of its own would.
        """
        if self._pg_pool_opening is None:
            return await self.read(lambda conn: run_steps(conn, make()))
        pool = self._pg_pool or await self._open_pg_pool()
        steps = make()
        take: _PgTake | None = None
        pg: Any = None
        try:
            try:
                step = next(steps)
                if isinstance(step, tuple) and isinstance(step[0], Batched):
                    step = steps.send(await self._lookups_of(step[0]).lookup(step[1]))
                while True:
                    if isinstance(step, tuple):
                        if pg is None:
                            take = _PgTake(self, pool)
                            pg = await take.__aenter__()
                        result = await step[0].rows_pg(pg, step[1])
                    else:
                        result = await self.read(step)
                    step = steps.send(result)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            finally:
                if take is not None:
                    await take.__aexit__(None, None, None)
        except _PG_CONNECTION_ERRORS as exc:
            # Taking a connection, or resetting it when it goes back, met a lost
            # server: a disconnect, as SQLAlchemy reports one (503 to a client).
            raise _disconnect(exc) from exc

    def _lookups_of(self, stmt: Batched) -> _Lookups:
        lookups = self._pg_lookups.get(stmt)
        if lookups is None:
            lookups = self._pg_lookups[stmt] = _Lookups(self, stmt)
        return lookups

    async def pg_connection(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """PostgreSQL: ``await fn(conn)`` on an asyncpg connection of ``query``'s pool,
        in autocommit (each statement its own transaction); driver errors as in
        ``query``."""
        if self._pg_pool_opening is None:
            raise ValueError("PostgreSQL only")
        pool = self._pg_pool or await self._open_pg_pool()
        try:
            async with _PgTake(self, pool) as pg:
                return await fn(pg)
        except _PG_CONNECTION_ERRORS as exc:
            # BEGIN, COMMIT, or taking or resetting the connection met a lost server
            # (a statement's own error arrives wrapped already): a disconnect.
            raise _disconnect(exc) from exc

    async def pg_transaction(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``pg_connection`` with ``fn`` in a transaction, committed if it returns."""

        async def in_transaction(pg: Any) -> T:
            async with pg.transaction():
                return await fn(pg)

        return await self.pg_connection(in_transaction)

    async def _open_pg_pool(self) -> asyncpg.Pool:
        assert self._pg_pool_opening is not None
        async with self._pg_pool_opening:
            if self._pg_pool is None:
                url = self.engine.url.set(drivername="postgresql")
                try:
                    self._pg_pool = await asyncpg.create_pool(
                        url.render_as_string(hide_password=False),
                        min_size=1,
                        max_size=self._pg_pool_size,
                        # As the SQLAlchemy pool: connections renewed every 5 minutes.
                        max_inactive_connection_lifetime=300,
                        reset=_keep_clean_session,
                        # Opening a connection (on an acquire, ``_PgTake``) within the
                        # same bound as waiting for one, not asyncpg's 60 s.
                        timeout=_PG_ACQUIRE_TIMEOUT,
                    )
                except _PG_CONNECTION_ERRORS as exc:
                    raise OperationalError("connect", None, exc) from exc
            return self._pg_pool

    def start_checkpointer(self, interval: float = 0.5) -> None:
        """SQLite: copy the write-ahead log into the database file every ``interval``
        seconds, in a worker thread, instead of in the commit that crosses SQLite's
        1,000-page mark. That commit used to pay for the copy and its fsync (tens of
        milliseconds here) while every request waiting on the audit group commit
        waited with it. A PASSIVE checkpoint never blocks readers or writers."""
        if self.sync_engine is None or self._checkpointer is not None:
            return
        self._checkpointer = asyncio.create_task(self._checkpoint_forever(interval))
        # The loop's writer connection stops checkpointing from its next opening on
        # (the service starts this before its first write).
        if self._writer is not None:
            self._writer.invalidate()
            self._writer = None

    async def _checkpoint_forever(self, interval: float) -> None:
        """Each round copies the log into the database file, in a worker thread: a
        PASSIVE checkpoint of the bulk while writes go on. Every ``_HOLD_EVERY``
        rounds (or once the log passes ``_HOLD_FRAMES``) the round then makes sure
        the whole log is copied, so that the next write starts it over from its
        beginning. (Without that, a log written to every few milliseconds was
        never found fully copied when a write began, so it was never started over
        and grew without bound: gigabytes in minutes under load, its index mapped
        into every connection.)

        Such a round first runs up to ``_CATCH_UP_PASSES`` more passes while writes
        go on: each copies what was written during the one before, so each is
        shorter. Only the last pass runs with this process's writers held back
        (``write_lock``), and it copies only what the last of those was too slow
        for. Every request waiting on the audit group commit waits a hold out:
        when the held pass followed the bulk at once, holds at half load (1 worker
        and the audit process, 5,000 customers) lasted up to 29 ms, the held pass
        copying what a 5-20 ms bulk pass let through, and the slowest reads
        gathered around them. ``storyvault_sqlite_checkpoint_hold_seconds``
        measures the holds.

        A SQLite checkpoint that reports the whole log copied counts the log as it
        was when the pass began: commits during the pass are not in it, so
        without a hold a log "fully copied" under steady writes was never started
        over (tried: it grew to 200 MiB in a test). The hold is what makes the copy
        whole when this process's next write begins.

        Should the log pass ``_RESTART_FRAMES`` at a hold (another process writing
        all the time, or readers of old frames), a RESTART checkpoint waits up to
        ``_RESTART_WAIT_MS`` for them, holding new writers back, and starts it over."""
        assert self.sync_engine is not None
        engine = self.sync_engine
        since_hold = 0
        while True:
            await asyncio.sleep(interval)
            try:
                frames = await asyncio.to_thread(wal_checkpoint, engine, "PASSIVE")
                since_hold += 1
                if since_hold < _HOLD_EVERY and frames <= _HOLD_FRAMES:
                    continue
                since_hold = 0
                for _ in range(_CATCH_UP_PASSES):
                    before = frames
                    frames = await asyncio.to_thread(wal_checkpoint, engine, "PASSIVE")
                    if frames == before:  # nothing was written during the pass before
                        break
                async with self.write_lock():
                    start = time.perf_counter()
                    frames = await asyncio.to_thread(wal_checkpoint, engine, "PASSIVE")
                    if frames > _RESTART_FRAMES:
                        await asyncio.to_thread(wal_checkpoint, engine, "RESTART")
                    SQLITE_CHECKPOINT_HOLD.observe(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - the next round retries
                log.warning("sqlite.checkpoint_failed", error=type(exc).__name__)

    async def stop_checkpointer(self) -> None:
        task, self._checkpointer = self._checkpointer, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def recycle(self) -> None:
        """Open fresh connections from now on: the loop's own reader and writer are
        dropped and both pools forget their idle connections (connections in use
        finish their work first). For fault drills and operators' tooling."""
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.invalidate()
        self._reader = self._writer = None
        self.engine.sync_engine.dispose(close=False)
        if self.sync_engine is not None:
            self.sync_engine.dispose(close=False)
        pool, self._pg_pool = self._pg_pool, None
        if pool is not None:
            # The next query opens a new pool; this one closes once its connections
            # are released (or at once if there is no loop to wait on).
            try:
                closing = asyncio.get_running_loop().create_task(pool.close())
            except RuntimeError:
                pool.terminate()
            else:
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def upgrade(self) -> None:
        await upgrade_database(self.engine)

    async def dispose(self) -> None:
        await self.stop_checkpointer()
        for conn in (self._reader, self._writer):
            if conn is not None:
                # Closed, not pooled: their pragmas (query_only, no busy wait) are theirs.
                conn.invalidate()
                conn.close()
        self._reader = self._writer = None
        if self.sync_engine is not None:
            self.sync_engine.dispose()
        pool, self._pg_pool = self._pg_pool, None
        if pool is not None:
            await pool.close()
        await self.engine.dispose()
