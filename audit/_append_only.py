"""DDL that makes tables append-only: the database itself refuses UPDATE and DELETE.

This is defence in depth, not the tamper evidence itself (an owner of the database
can drop a trigger; ``verify_log`` then still finds the edit). The statements are
plain strings so Alembic migrations can ``op.execute`` them, and the consent ledger
can reuse them for its own tables. Each list item is one statement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_PG_FUNCTION = "storyvault_refuse_change"
"""One shared trigger function; it names the table in its error message."""


def _checked(tables: Iterable[str]) -> list[str]:
    names = list(tables)
    for name in names:
        # Identifiers are spliced into DDL, so only plain lower-case names pass.
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain table name: {name!r}")
    return names


def _unsupported(dialect: str) -> ValueError:
    return ValueError(f"append-only triggers exist for sqlite and postgresql, not {dialect!r}")


def append_only_ddl(dialect: str, tables: Iterable[str]) -> list[str]:
    """Statements creating triggers that refuse UPDATE and DELETE (and TRUNCATE) on ``tables``.

    Idempotent: running them twice leaves one set of triggers.
    """
    names = _checked(tables)
    if dialect == "sqlite":
        return [
            f"CREATE TRIGGER IF NOT EXISTS {t}_refuse_{op.lower()} BEFORE {op} ON {t} "
            f"BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END"
            for t in names
            for op in ("UPDATE", "DELETE")
        ]
    if dialect == "postgresql":
        statements = [
            f"CREATE OR REPLACE FUNCTION {_PG_FUNCTION}() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION '% is append-only', TG_TABLE_NAME "
            "USING ERRCODE = 'insufficient_privilege'; "
            "END $$"
        ]
        for t in names:
            statements += [
                f"DROP TRIGGER IF EXISTS {t}_refuse_change ON {t}",
                f"CREATE TRIGGER {t}_refuse_change BEFORE UPDATE OR DELETE ON {t} "
                f"FOR EACH ROW EXECUTE FUNCTION {_PG_FUNCTION}()",
                f"DROP TRIGGER IF EXISTS {t}_refuse_truncate ON {t}",
                f"CREATE TRIGGER {t}_refuse_truncate BEFORE TRUNCATE ON {t} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {_PG_FUNCTION}()",
            ]
        return statements
    raise _unsupported(dialect)


def drop_append_only_ddl(dialect: str, tables: Iterable[str]) -> list[str]:
    """The inverse of ``append_only_ddl`` (for downgrades and tamper tests).

    The shared PostgreSQL function is left in place: other tables may still use it.
    """
    names = _checked(tables)
    if dialect == "sqlite":
        return [
            f"DROP TRIGGER IF EXISTS {t}_refuse_{op}" for t in names for op in ("update", "delete")
        ]
    if dialect == "postgresql":
        return [
            f"DROP TRIGGER IF EXISTS {t}_refuse_{what} ON {t}"
            for t in names
            for what in ("change", "truncate")
        ]
    raise _unsupported(dialect)
