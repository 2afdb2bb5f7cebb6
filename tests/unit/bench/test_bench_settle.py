"""bench.run.settle: before anything is measured, the seeded database is as a running
service's would be: on disk, and on PostgreSQL vacuumed and with statistics, so that
no write-back of the seed, no first pass of autovacuum and no plan made for tables
of unknown size run beside the measured reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import seed, seeded_database, settle
from tests.pgserver import PgServer

_SEEDED = ("customers", "chapters", "data_keys", "consent_state", "audit_entries", "audit_nodes")


def _requested_checkpoints(pg: PgServer) -> int:
    return int(pg.psql("SELECT checkpoints_req FROM pg_stat_bgwriter").strip())


def _settled_tables(pg: PgServer, db: str) -> set[str]:
    """The seeded tables vacuumed and analyzed since the seed, with their size known."""
    names = ", ".join(f"'{t}'" for t in _SEEDED)
    out = pg.psql(
        "SELECT s.relname FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid"
        f" WHERE s.relname IN ({names}) AND s.last_vacuum IS NOT NULL"
        " AND s.last_analyze IS NOT NULL AND c.reltuples > 0",
        db,
    )
    return set(out.split())


async def test_postgresql_is_vacuumed_analyzed_and_checkpointed_after_seeding(
    pg: PgServer, tmp_path: Path
) -> None:
    url = pg.create_database("bench_settle")
    ids, _ = await seed(tmp_path, url, 12)
    assert len(ids) == 12
    assert _settled_tables(pg, "bench_settle") == set()
    before = _requested_checkpoints(pg)
    settle(pg, url)
    assert _settled_tables(pg, "bench_settle") == set(_SEEDED)
    assert _requested_checkpoints(pg) == before + 1


async def test_sqlite_seeding_leaves_no_log_to_copy(tmp_path: Path) -> None:
    db = tmp_path / "storyvault.db"
    url = f"sqlite+aiosqlite:///{db}"
    ids, _ = await seed(tmp_path, url, 12)
    assert len(ids) == 12
    settle(None, url)  # nothing to do: closing the last connection copied the log
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert db.stat().st_size > 100_000


def test_a_seeded_database_is_settled_and_its_server_stopped_on_the_way_out(
    tmp_path: Path,
) -> None:
    """``seeded_database``: the seed and the settling every benchmark tool starts
    from, and the PostgreSQL server it started stopped afterwards, even when the
    measurement in between fails."""
    with seeded_database("sqlite", tmp_path, 12) as db:
        assert len(db.ids) == len(set(db.ids)) == 12
        assert db.key
        assert db.pg is None
        assert (tmp_path / "storyvault.db").stat().st_size > 100_000
    pg_dir = tmp_path / "pg"
    pg_dir.mkdir()
    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="measurement failed"),
        seeded_database("postgresql", pg_dir, 12) as db,
    ):
        server = db.pg
        assert len(db.ids) == 12
        assert _settled_tables(server, "storyvault") == set(_SEEDED)
        raise RuntimeError("measurement failed")
    assert server.proc.poll() is not None  # the server was stopped
