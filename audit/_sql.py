"""Statements prepared once for the drivers, for hot paths.

On SQLite a hot statement (an indexed lookup, the audit batch's inserts) runs in
about 20-100 µs; SQLAlchemy's per-execution work around it (cache key,
execution context, parameter and result set-up) adds 60-120 µs more. A
``Prepared`` statement is compiled once for the SQLite dialect and then runs on
the driver's connection directly, with the same bind and result type processors
SQLAlchemy would apply, so it returns the same values. On any other dialect it
simply runs through SQLAlchemy (``Connection.execute``), and so it does on
SQLite through an async driver (aiosqlite), whose connection is not the
standard library's.

It is also compiled once for PostgreSQL's asyncpg: ``rows_pg`` runs it on an
asyncpg connection directly (asyncpg prepares it once per connection and keeps
it), without SQLAlchemy's pool checkout, execution context and greenlet bridge,
which cost several times the statement itself. Driver errors are wrapped as
SQLAlchemy wraps them, so callers see the same exception types on every path.

It only takes statements whose SQL does not change per execution (no expanding
``IN`` parameters) and whose parameters all have names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Executable
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["Batched", "Prepared"]

_SQLITE = SQLiteDialect_pysqlite()
_PG = PGDialect_asyncpg()  # type: ignore[no-untyped-call]

_Processor = Callable[[Any], Any] | None


def _direct(conn: Connection) -> bool:
    """Whether ``conn`` is the standard library's sqlite3 driver (pysqlite)."""
    return conn.dialect.driver == "pysqlite"


class Prepared:
    """``stmt`` compiled once for SQLite; see the module docstring."""

    __slots__ = ("_bind", "_defaults", "_names", "_pg", "_result", "_sql", "stmt")

    def __init__(self, stmt: Executable, column_keys: Sequence[str] | None = None) -> None:
        self.stmt = stmt
        compiled = stmt.compile(  # type: ignore[attr-defined]
            dialect=_SQLITE, column_keys=list(column_keys) if column_keys is not None else None
        )
        assert isinstance(compiled, SQLCompiler)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("a Prepared statement cannot have expanding parameters")
        self._sql: str = compiled.string
        self._names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self._defaults: dict[str, Any] = dict(compiled.params)
        self._bind: dict[str, _Processor] = {
            name: compiled.binds[name].type._cached_bind_processor(_SQLITE) for name in self._names
        }
        self._result: tuple[_Processor, ...] = tuple(
            col.type._cached_result_processor(_SQLITE, None)
            for col in getattr(stmt, "selected_columns", ())
        )
        self._pg: _PgForm | None = None  # compiled on first use (most never run there)

    def _args(self, params: Mapping[str, Any]) -> list[Any]:
        args = []
        for name in self._names:
            value = params[name] if name in params else self._defaults[name]
            proc = self._bind[name]
            args.append(value if proc is None else proc(value))
        return args

    def _run(self, conn: Connection, args: Any, *, many: bool = False) -> Any:
        """The driver call, its errors wrapped as SQLAlchemy wraps them (so callers
        catch ``sqlalchemy.exc.OperationalError`` and the like on every path);
        parameters are kept out of the message."""
        driver = conn.connection.driver_connection
        error = conn.dialect.loaded_dbapi.Error
        try:
            if many:
                return driver.executemany(self._sql, args)  # type: ignore[union-attr]
            return driver.execute(self._sql, args)  # type: ignore[union-attr]
        except error as exc:
            raise DBAPIError.instance(
                self._sql, None, exc, error, hide_parameters=True, dialect=conn.dialect
            ) from exc

    def rows(
        self, conn: Connection, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """All result rows as tuples, in the statement's column order."""
        params = params or {}
        if not _direct(conn):
            return [tuple(row) for row in conn.execute(self.stmt, dict(params))]
        cursor = self._run(conn, self._args(params))
        found = cursor.fetchall()
        cursor.close()
        procs = self._result
        if not any(procs):
            return [tuple(row) for row in found]
        return [
            tuple(v if p is None or v is None else p(v) for p, v in zip(procs, row, strict=True))
            for row in found
        ]

    def _pg_form(self) -> _PgForm:
        form = self._pg
        if form is None:
            form = self._pg = _PgForm(self.stmt)
        return form

    async def rows_pg(
        self, conn: Any, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """``rows`` on an asyncpg connection (PostgreSQL), without SQLAlchemy."""
        form = self._pg_form()
        found = await _pg_call(conn, form.sql, conn.fetch, form.sql, *form.args(params or {}))
        procs = form.result
        if not any(procs):
            return [tuple(row) for row in found]
        return [
            tuple(v if p is None or v is None else p(v) for p, v in zip(procs, row, strict=True))
            for row in found
        ]

    async def execute_pg(self, conn: Any, params: Mapping[str, Any] | None = None) -> None:
        """``execute`` on an asyncpg connection."""
        form = self._pg_form()
        await _pg_call(conn, form.sql, conn.execute, form.sql, *form.args(params or {}))

    async def execute_many_pg(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        """``execute_many`` on an asyncpg connection (pipelined by asyncpg)."""
        if not rows:
            return
        form = self._pg_form()
        await _pg_call(conn, form.sql, conn.executemany, form.sql, [form.args(r) for r in rows])

    def first(
        self, conn: Connection, params: Mapping[str, Any] | None = None
    ) -> tuple[Any, ...] | None:
        found = self.rows(conn, params)
        return found[0] if found else None

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns no rows."""
        if not _direct(conn):
            conn.execute(self.stmt, dict(params or {}))
            return
        self._run(conn, self._args(params or {})).close()

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run an INSERT (or other statement without results) once per row."""
        if not rows:
            return
        if not _direct(conn):
            conn.execute(self.stmt, [dict(r) for r in rows])
            return
        self._run(conn, [self._args(r) for r in rows], many=True).close()


class Batched:
    """A lookup that answers exactly one row for each set of parameters (``one``, a
    ``Prepared`` statement), with its form for many lookups at once on PostgreSQL
    (``many``).

    ``many`` takes each of ``one``'s parameters as an array, the lookups' values in
    their order, and answers one row per lookup, its 1-based position in the arrays
    (``WITH ORDINALITY``) first. ``Database.query`` sends the lookups that concurrent
    reads make at the same time as one ``many`` statement there: measured, a lookup
    sent on its own cost PostgreSQL about 150 µs of CPU and its client about 190,
    against about 22 and 26 each in statements of 32. Everywhere else (SQLite) it
    runs as ``one``. ``many`` is compiled for asyncpg only, when first used."""

    __slots__ = ("_many", "many", "names", "one")

    def __init__(self, one: Prepared, many: Executable) -> None:
        self.one = one
        self.many = many
        self.names: tuple[str, ...] = one._names
        self._many: _PgForm | None = None

    def rows(
        self, conn: Connection, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """``one``'s rows (``Prepared.rows``)."""
        return self.one.rows(conn, params)

    async def rows_pg(
        self, conn: Any, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """``one``'s rows on an asyncpg connection (``Prepared.rows_pg``)."""
        return await self.one.rows_pg(conn, params)

    async def each_pg(
        self, conn: Any, lookups: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Any, ...]]:
        """The row of each of ``lookups`` (in their order), in one ``many`` statement
        on an asyncpg connection."""
        form = self._many
        if form is None:
            form = self._many = _PgForm(self.many)
        arrays = {name: [lookup[name] for lookup in lookups] for name in self.names}
        found = await _pg_call(conn, form.sql, conn.fetch, form.sql, *form.args(arrays))
        procs = form.result[1:]
        answers: list[tuple[Any, ...] | None] = [None] * len(lookups)
        for row in found:
            answers[row[0] - 1] = tuple(
                v if p is None or v is None else p(v)
                for p, v in zip(procs, tuple(row)[1:], strict=True)
            )
        if len(found) != len(lookups) or None in answers:
            raise ValueError("a batched lookup must answer exactly one row per lookup")
        return answers  # type: ignore[return-value]


async def _pg_call(conn: Any, sql: str, method: Any, *args: Any) -> Any:
    """``method(*args)`` of an asyncpg connection, its errors wrapped as SQLAlchemy
    wraps them (parameters kept out of the message). A connection lost
    mid-statement (the server restarted) surfaces as one of several errors; as
    SQLAlchemy does, it then counts as a disconnect."""
    try:
        return await method(*args)
    except Exception as exc:  # asyncpg's errors and its connection's OSErrors
        raise DBAPIError.instance(
            sql,
            None,
            exc,
            Exception,
            hide_parameters=True,
            connection_invalidated=conn.is_closed(),
            dialect=_PG,
        ) from exc


class _PgForm:
    """A statement compiled for asyncpg: SQL with $n parameters, in their order."""

    __slots__ = ("bind", "defaults", "result", "sql")

    def __init__(self, stmt: Executable) -> None:
        compiled = stmt.compile(dialect=_PG)  # type: ignore[attr-defined]
        assert isinstance(compiled, SQLCompiler)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("a Prepared statement cannot have expanding parameters")
        self.sql: str = compiled.string
        self.defaults: dict[str, Any] = dict(compiled.params)
        self.bind: tuple[tuple[str, _Processor], ...] = tuple(
            (name, compiled.binds[name].type._cached_bind_processor(_PG))
            for name in compiled.positiontup or ()
        )
        self.result: tuple[_Processor, ...] = tuple(
            col.type._cached_result_processor(_PG, None)
            for col in getattr(stmt, "selected_columns", ())
        )

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        args = []
        for name, proc in self.bind:
            value = params[name] if name in params else self.defaults[name]
            args.append(value if proc is None else proc(value))
        return args
