"""SQLite's write-ahead log is copied into the database file in the background, not
inside the audit group commit (which would make every waiting request wait too)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.engine import Connection

import governance.db
from governance.db import Database, DatabaseBusy


def _hold_count() -> float:
    found = REGISTRY.get_sample_value("storyvault_sqlite_checkpoint_hold_seconds_count")
    return found or 0.0


def _fill(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.exec_driver_sql(
        "INSERT INTO t (v) SELECT randomblob(1000) FROM (SELECT 1 FROM sqlite_master LIMIT 1)"
    )


def _rows_in_main_file(db_file: Path, tmp: Path) -> int:
    """Rows visible from the database file alone, without its -wal file."""
    copy = tmp / "main-only.db"
    shutil.copy2(db_file, copy)
    with sqlite3.connect(copy) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
        except sqlite3.OperationalError:  # the table itself is still only in the log
            return 0


async def _write_rows(db: Database, n: int) -> None:
    for _ in range(n):
        async with db.write_lock():
            await db.write_inline(_fill)


async def test_the_background_checkpoint_moves_committed_rows_into_the_file(
    tmp_path: Path,
) -> None:
    db_file = tmp_path / "story.db"
    db = Database(f"sqlite+aiosqlite:///{db_file}", sqlite_synchronous="NORMAL")
    try:
        db.start_checkpointer(interval=0.05)
        await _write_rows(db, 50)
        assert db._writer is not None
        # the loop's writer never checkpoints in a commit of its own
        autocheckpoint = db._writer.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        assert autocheckpoint == 0
        deadline = asyncio.get_running_loop().time() + 5
        while _rows_in_main_file(db_file, tmp_path) < 50:
            assert asyncio.get_running_loop().time() < deadline, "no checkpoint within 5 s"
            await asyncio.sleep(0.05)
    finally:
        await db.dispose()
    assert db._checkpointer is None


async def test_without_the_checkpointer_the_rows_stay_in_the_log(tmp_path: Path) -> None:
    """The control: the same writes, no background task, nothing reached the file yet
    (SQLite's own checkpoint waits for 1,000 pages)."""
    db_file = tmp_path / "story.db"
    db = Database(f"sqlite+aiosqlite:///{db_file}", sqlite_synchronous="NORMAL")
    try:
        await _write_rows(db, 50)
        await asyncio.sleep(0.3)
        assert _rows_in_main_file(db_file, tmp_path) == 0
    finally:
        await db.dispose()


def _fill_large(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.exec_driver_sql("INSERT INTO t (v) VALUES (randomblob(16000))")


async def test_the_log_starts_over_under_steady_writes(tmp_path: Path) -> None:
    """Under writes that never pause (the audit group commit under load) and reads
    between them, the log is still started over from its beginning: it stays a small
    fraction of what was written through it instead of growing without bound."""
    db_file = tmp_path / "story.db"
    wal = tmp_path / "story.db-wal"
    db = Database(f"sqlite+aiosqlite:///{db_file}", sqlite_synchronous="NORMAL")
    rows = 9_000  # about 144 MB through the log
    largest = 0
    try:
        db.start_checkpointer(interval=0.05)
        for n in range(rows):
            async with db.write_lock():
                await db.write_inline(_fill_large)
            await asyncio.sleep(0)  # as the audit writer, between batches
            if n % 10 == 0:
                await db.read(lambda c: c.exec_driver_sql("SELECT count(*) FROM t").scalar())
                largest = max(largest, wal.stat().st_size)
        count = await db.read(lambda c: c.exec_driver_sql("SELECT count(*) FROM t").scalar())
    finally:
        await db.dispose()
    assert count == rows
    assert largest < 48 * 1024 * 1024, f"the log grew to {largest / 2**20:.0f} MiB"


async def test_the_log_starts_over_with_two_instances_writing(tmp_path: Path) -> None:
    """Two instances on one file (two workers), each with its own checkpointer,
    writing at the same time with the audit group commit's pause between batches
    (its 2 ms gathering window): the log still starts over."""
    db_file = tmp_path / "story.db"
    wal = tmp_path / "story.db-wal"
    dbs = [
        Database(f"sqlite+aiosqlite:///{db_file}", sqlite_synchronous="NORMAL") for _ in range(2)
    ]
    largest = 0

    async def write(db: Database, n: int) -> None:
        nonlocal largest
        for _ in range(n):
            while True:
                try:
                    async with db.write_lock():
                        await db.write_inline(_fill_large)
                    break
                except DatabaseBusy:  # the other instance holds the file: as the audit log does
                    await asyncio.sleep(0.001)
            if wal.exists():
                largest = max(largest, wal.stat().st_size)
            await asyncio.sleep(0.002)

    try:
        for db in dbs:
            db.start_checkpointer(interval=0.05)
        await write(dbs[0], 1)  # the table
        await asyncio.gather(write(dbs[0], 1_500), write(dbs[1], 1_500))
    finally:
        for db in dbs:
            await db.dispose()
    # About 48 MB went through the log (without the fix it grew to about 40 MiB).
    assert largest < 24 * 1024 * 1024, f"the log grew to {largest / 2**20:.0f} MiB"


async def _holds_over_steady_writes(db: Database, seconds: float) -> int:
    """Rounds in which the checkpointer held this process's writers back, while a
    writer writes steadily for ``seconds``."""
    holds = 0
    write_lock = db.write_lock

    def counting_write_lock() -> Any:
        nonlocal holds
        if asyncio.current_task() is db._checkpointer:
            holds += 1
        return write_lock()

    db.write_lock = counting_write_lock  # type: ignore[method-assign]
    db.start_checkpointer(interval=0.05)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        async with db.write_lock():
            await db.write_inline(_fill)
        await asyncio.sleep(0.002)  # the audit writer's window
    return holds


async def test_writers_are_held_back_in_one_round_of_four(tmp_path: Path) -> None:
    """Every request waiting on the audit group commit waits out a round that holds
    the writers back, so only every fourth round does (about 1.2 s: 24 rounds)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'story.db'}", sqlite_synchronous="NORMAL")
    try:
        holds = await _holds_over_steady_writes(db, 1.2)
    finally:
        await db.dispose()
    assert 2 <= holds <= 24 // 4 + 1


async def test_a_round_holds_the_writers_back_only_for_its_last_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the writers are held back, the round's passes catch up with the log
    while writes go on, so that the held pass has only the last few commits to
    copy: every request waiting on the audit group commit waits the hold out."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'story.db'}", sqlite_synchronous="NORMAL")
    passes: list[tuple[float, float, bool]] = []  # start, end, writers held back
    checkpoint = governance.db.wal_checkpoint
    holding = False
    write_lock = db.write_lock

    @contextlib.asynccontextmanager
    async def flagged_write_lock() -> AsyncIterator[None]:
        nonlocal holding
        async with write_lock():
            mine = asyncio.current_task() is db._checkpointer
            holding = holding or mine
            try:
                yield
            finally:
                holding = holding and not mine

    def recorded(engine: Any, mode: str) -> int:
        start = time.perf_counter()
        held = holding
        try:
            return checkpoint(engine, mode)
        finally:
            passes.append((start, time.perf_counter(), held))

    monkeypatch.setattr(governance.db, "wal_checkpoint", recorded)
    db.write_lock = flagged_write_lock  # type: ignore[method-assign]
    held_before = _hold_count()
    try:
        holds = await _holds_over_steady_writes(db, 1.2)
    finally:
        await db.dispose()
    assert holds >= 2
    assert _hold_count() - held_before == holds
    held = [i for i, p in enumerate(passes) if p[2]]
    assert len(held) == holds
    for i in held:
        # the two passes before it ran in the same round, with no writer held back:
        # each began as the one before ended (the rounds are 50 ms of sleep apart)
        assert i >= 2
        assert not passes[i - 1][2]
        assert not passes[i - 2][2]
        assert passes[i - 1][0] - passes[i - 2][1] < 0.045
        assert passes[i][0] - passes[i - 1][1] < 0.045


async def test_a_long_log_holds_the_writers_back_at_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(governance.db, "_HOLD_FRAMES", 1)
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'story.db'}", sqlite_synchronous="NORMAL")
    try:
        holds = await _holds_over_steady_writes(db, 1.2)
    finally:
        await db.dispose()
    assert holds >= 15  # nearly every round of 24
