"""audit.Prepared: statements compiled once and run on SQLite's driver directly must
behave exactly as SQLAlchemy's own execution (same values, same errors)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    insert,
    literal,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from audit import Prepared
from consent._models import UTCDateTime

meta = MetaData()
things = Table(
    "things",
    meta,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", String(40), nullable=False),
    Column("flag", Boolean, nullable=False),
    Column("at", DateTime(timezone=True), nullable=True),
    Column("utc", UTCDateTime, nullable=True),
    Column("blob", LargeBinary, nullable=False),
)
ROWS = [
    {
        "id": n,
        "name": f"thing-{n}",
        "flag": n % 2 == 0,
        "at": None if n == 3 else datetime(2026, 1, n + 1, 12, 30, 15, 123456),
        "utc": None if n == 2 else datetime(2025, 6, n + 1, 8, 0, tzinfo=UTC),
        "blob": bytes([n]) * 40,
    }
    for n in range(6)
]


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = create_engine(f"sqlite:///{tmp_path / 'things.db'}")
    meta.create_all(eng)
    return eng


def test_rows_equal_sqlalchemy_execution_value_for_value(engine: Engine) -> None:
    with engine.begin() as conn:
        Prepared(insert(things), [c.name for c in things.c]).execute_many(conn, ROWS)
    query = (
        select(things, literal(7).label("seven"))
        .where(things.c.id >= bindparam("low"))
        .order_by(things.c.id)
    )
    prepared = Prepared(query)
    with engine.connect() as conn:
        expected = [tuple(r) for r in conn.execute(query, {"low": 1})]
        got = prepared.rows(conn, {"low": 1})
        assert got == expected
        assert len(got) == 5
        assert isinstance(got[0][2], bool)
        assert got[0][4] == datetime(2025, 6, 2, 8, 0, tzinfo=UTC)  # UTC re-attached
        assert got[2][3] is None  # NULL passes through the processors
        assert prepared.first(conn, {"low": 99}) is None


def test_expanding_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="expanding"):
        Prepared(select(things.c.id).where(things.c.name.in_(bindparam("names", expanding=True))))


def test_driver_errors_are_sqlalchemy_errors_without_the_parameters(engine: Engine) -> None:
    add = Prepared(insert(things), [c.name for c in things.c])
    with engine.begin() as conn:
        add.execute(conn, ROWS[0])
    secret = {**ROWS[0], "name": "Never Logged"}
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        add.execute(conn, secret)
    assert "Never Logged" not in str(caught.value)
    with engine.connect() as conn:
        assert len(Prepared(select(things.c.id)).rows(conn)) == 1  # nothing half-written
