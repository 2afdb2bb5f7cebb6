"""Where SQLite's loop writer commits: in place while commits are quick (a worker
thread's hand-off costs more than the fsync), in a worker thread while the disk is
slow (a slow fsync in place would stall every request the loop serves)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event
from sqlalchemy.engine import Connection

from governance.db import _THREADED_COMMITS, Database


def _insert(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.exec_driver_sql("INSERT INTO t (v) VALUES (randomblob(100))")


class _Disk:
    """Records the thread of every commit of ``db``'s synchronous engine and, while
    ``slow``, makes each one take ``delay`` seconds first (a slow fsync)."""

    def __init__(self, db: Database, delay: float = 0.003) -> None:
        self.slow = False
        self.delay = delay
        self.threads: list[int] = []
        assert db.sync_engine is not None
        event.listen(db.sync_engine, "commit", self._commit)

    def _commit(self, conn: Any) -> None:
        self.threads.append(threading.get_ident())
        if self.slow:
            time.sleep(self.delay)


def _commits(where: str) -> float:
    value = REGISTRY.get_sample_value("storyvault_sqlite_commits_total", {"where": where})
    return value or 0.0


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    # NORMAL: no fsync per commit, so the quick case does not depend on the disk
    # the tests run on.
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'story.db'}", sqlite_synchronous="NORMAL")
    try:
        yield database
    finally:
        await database.dispose()


async def _write(db: Database, n: int) -> None:
    for _ in range(n):
        async with db.write_lock():
            await db.write_inline(_insert)


async def test_quick_commits_run_in_place_on_the_loop(db: Database) -> None:
    await _write(db, 1)  # opens the writer connection (its set-up commits once)
    disk = _Disk(db)
    in_place = _commits("in_place")
    await _write(db, 50)
    loop_thread = threading.get_ident()
    assert disk.threads == [loop_thread] * 50
    assert _commits("in_place") - in_place == 50
    count = await db.read(lambda c: c.exec_driver_sql("SELECT count(*) FROM t").scalar())
    assert count == 51


async def test_a_slow_disk_sends_commits_to_a_worker_thread_and_back(db: Database) -> None:
    await _write(db, 1)  # opens the writer connection (its set-up commits once)
    disk = _Disk(db)
    loop_thread = threading.get_ident()
    await _write(db, 3)  # quick, in place
    assert disk.threads == [loop_thread] * 3
    disk.slow = True
    threaded = _commits("thread")

    # While commits run in a worker thread, the loop goes on serving: this ticker
    # runs during them (it cannot during a commit in place).
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    # The running mean passes the limit after a few slow commits in place; then the
    # next commits go to a worker thread.
    await _write(db, 20 + _THREADED_COMMITS)
    stop.set()
    await ticking
    slow = disk.threads[3:]
    assert slow[0] == loop_thread
    first_threaded = next(i for i, t in enumerate(slow) if t != loop_thread)
    # Seven 3 ms commits bring the mean (the newest weighs 1/16) past 1 ms.
    assert 5 <= first_threaded <= 8
    block = slow[first_threaded : first_threaded + _THREADED_COMMITS]
    assert len(block) == _THREADED_COMMITS
    assert loop_thread not in block
    assert _commits("thread") - threaded >= _THREADED_COMMITS
    assert ticks > _THREADED_COMMITS

    # The disk is quick again: the next commit in place measures it, and the
    # commits stay on the loop.
    disk.slow = False
    done = len(disk.threads)
    await _write(db, _THREADED_COMMITS + 20)
    after = disk.threads[done:]
    back = next(i for i, t in enumerate(after) if t == loop_thread)
    assert set(after[back:]) == {loop_thread}
    assert len(after) - back >= 20
    count = await db.read(lambda c: c.exec_driver_sql("SELECT count(*) FROM t").scalar())
    assert count == 1 + 3 + 20 + _THREADED_COMMITS + _THREADED_COMMITS + 20
