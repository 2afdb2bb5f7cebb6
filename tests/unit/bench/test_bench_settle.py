"""bench.run.settle: the seeded data is on disk before anything is measured, so no
write-back of the seed runs beside the measured reads' audit commits."""

from __future__ import annotations

from pathlib import Path

from bench.run import seed, settle
from tests.pgserver import PgServer


def _requested_checkpoints(pg: PgServer) -> int:
    return int(pg.psql("SELECT checkpoints_req FROM pg_stat_bgwriter").strip())


async def test_postgresql_is_checkpointed_after_seeding(pg: PgServer, tmp_path: Path) -> None:
    url = pg.create_database("bench_settle")
    ids, _ = await seed(tmp_path, url, 12)
    assert len(ids) == 12
    before = _requested_checkpoints(pg)
    settle(pg)
    assert _requested_checkpoints(pg) == before + 1


async def test_sqlite_seeding_leaves_no_log_to_copy(tmp_path: Path) -> None:
    db = tmp_path / "storyvault.db"
    ids, _ = await seed(tmp_path, f"sqlite+aiosqlite:///{db}", 12)
    assert len(ids) == 12
    settle(None)  # nothing to do: closing the last connection copied the log
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert db.stat().st_size > 100_000
