"""Where the machine's CPU goes during a point: the whole machine from /proc/stat,
the database server's processes, and wrk, so that a point at the machine's CPU
ceiling shows what each request cost everything that ran for it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.run import (
    Server,
    c_over_a_apart,
    children_cpu_seconds,
    cpu_by_pid,
    cpu_split,
    descendants,
    host_busy_seconds,
    machine_cpu_lines,
    ratios,
)
from tests.unit.bench.points import make_point

_SPIN = "import time\nend = time.process_time() + {secs}\nwhile time.process_time() < end: pass"


def test_busy_time_leaves_out_idle_io_wait_and_steal(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  500 20 130 9000 400 7 13 900 0 0\ncpu0 250 10 65 4500 200 3 7 450 0 0\n")
    ticks = os.sysconf("SC_CLK_TCK")
    assert host_busy_seconds(stat) == pytest.approx((500 + 20 + 130 + 7 + 13) / ticks)


def test_a_busy_process_shows_in_the_machine_and_in_its_parents_children() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    host0, kids0 = host_busy_seconds(), children_cpu_seconds()
    subprocess.run([sys.executable, "-c", _SPIN.format(secs=0.4)], check=True)
    host1, kids1 = host_busy_seconds(), children_cpu_seconds()
    # The child spun for 0.4 s of CPU (plus its start): it counts as this process's
    # waited-for child (how wrk's CPU is read), and the machine was busy at least that.
    assert kids1 - kids0 >= 0.4 - 2 / ticks
    assert host1 - host0 >= kids1 - kids0 - 2 / ticks


def test_the_database_servers_cpu_counts_its_descendants(tmp_path: Path) -> None:
    """PostgreSQL's work is done by backends the postmaster forked (under runuser when
    run as root): the CPU of the whole tree counts, not the first process's."""
    spin = _SPIN.format(secs=0.3) + "\ntime.sleep(60)"
    parent = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {spin!r}])\n"
    database = subprocess.Popen([sys.executable, "-c", parent])
    server = Server(
        name="storyvault",
        workers=1,
        port=0,
        proc=database,
        log=tmp_path / "log",
        database=database.pid,
    )
    try:
        # The child's 0.3 s of CPU show once it has spun them, however busy the
        # machine; counting the first process alone, they never would.
        deadline = time.monotonic() + 30
        while sum(server.database_cpu().values()) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = server.database_cpu()
        assert len(found) >= 2  # the parent and the spinning child
        assert sum(found.values()) >= 0.3
        assert sum(cpu_by_pid([database.pid]).values()) < 0.3
    finally:
        for pid in reversed(descendants(database.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        database.wait()
    alone = dataclasses.replace(server, database=None)
    assert alone.database_cpu() == {}


def _point(endpoint: str, rps: float, machine_ms: float, busy: float, db: float | None):  # type: ignore[no-untyped-def]
    return dataclasses.replace(
        make_point(endpoint, rps),
        backend="postgresql",
        cpu_ms_per_request=machine_ms / 2,
        host_cpu_ms_per_request=machine_ms,
        host_cpu_util=busy,
        database_cpu_ms_per_request=db,
        loadgen_cpu_ms_per_request=0.02,
    )


def test_c_over_a_is_the_cost_factor_times_the_busy_factor() -> None:
    # requests/s = CPUs busy / machine CPU per request, for both points.
    health = _point("health", 1.9 / 0.2e-3, 0.2, 1.9, 0.0)
    gated = _point("gated", 1.8 / 0.6e-3, 0.6, 1.8, 0.15)
    parts = c_over_a_apart(health, gated)
    assert parts == {"cost": 0.333, "busy": 0.947, "product": 0.316}
    row = ratios([health, gated])[0]
    assert row["c_over_a"] == pytest.approx(parts["product"], abs=0.001)
    assert row["c_over_a_apart"] == parts
    # A point without the machine's figures (an older JSON) is not taken apart.
    assert c_over_a_apart(dataclasses.replace(health, host_cpu_ms_per_request=0.0), gated) is None


def test_the_split_adds_up_to_the_machine_and_the_table_shows_it() -> None:
    gated = _point("gated", 3000, 0.6, 1.8, 0.15)
    split = cpu_split(gated)
    assert split == {"server": 0.3, "database": 0.15, "wrk": 0.02, "rest": 0.13, "machine": 0.6}
    sqlite = dataclasses.replace(gated, backend="sqlite", database_cpu_ms_per_request=None)
    assert cpu_split(sqlite)["rest"] == pytest.approx(0.28)
    health = _point("health", 9500, 0.2, 1.9, 0.0)
    half = dataclasses.replace(gated, load="half")
    points = [health, gated, half, sqlite]
    lines = machine_cpu_lines(points, ratios(points))
    rows = [
        line for line in lines if line.startswith("| postgresql") or line.startswith("| sqlite")
    ]
    # Full-load points only: health and gated on PostgreSQL, gated on SQLite, then
    # PostgreSQL's (c)/(a) taken apart (SQLite has no /health point here).
    assert rows[:3] == [
        "| postgresql | storyvault | 2 | (a) health | 0.100 | 0.000 | 0.020 | 0.080 | 0.200 | 1.90 |",
        "| postgresql | storyvault | 2 | (c) gated | 0.300 | 0.150 | 0.020 | 0.130 | 0.600 | 1.80 |",
        "| sqlite | storyvault | 2 | (c) gated | 0.300 | — | 0.020 | 0.280 | 0.600 | 1.80 |",
    ]
    assert rows[3:] == ["| postgresql | 2 | 0.333 | 0.947 | 0.316 |"]
