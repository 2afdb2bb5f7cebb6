"""The benchmark's check that a point's load reached every worker: read from /proc
for a real process tree, it must tell a lopsided point from an even one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.run import Server, balanced, ratios
from tests.unit.bench.points import make_point

_BUSY = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"
_IDLE = "import time; time.sleep(1.5)"


def _shares(children: list[str], tmp_path: Path) -> list[float]:
    """Worker shares of a parent that runs ``children`` (Python code) as its workers."""
    parent = (
        "import subprocess, sys\n"
        f"kids = [subprocess.Popen([sys.executable, '-c', c]) for c in {children!r}]\n"
        "for k in kids: k.wait()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    server = Server(
        name="storyvault", workers=len(children), port=0, proc=proc, log=tmp_path / "log"
    )
    try:
        deadline = time.monotonic() + 5
        while len(server.pids()) < len(children) + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        before = server.cpu_by_pid()
        time.sleep(1.0)
        return server.worker_shares(before, server.cpu_by_pid())
    finally:
        proc.kill()
        proc.wait()


def test_a_point_whose_load_missed_a_worker_is_not_balanced(tmp_path: Path) -> None:
    shares = _shares([_BUSY, _IDLE], tmp_path)
    assert shares[0] > 0.9
    assert not balanced(shares, 2)


def test_a_point_that_kept_both_workers_busy_is_balanced(tmp_path: Path) -> None:
    shares = _shares([_BUSY, _BUSY], tmp_path)
    assert len(shares) == 2
    assert balanced(shares, 2)


def test_one_worker_is_always_balanced() -> None:
    assert balanced([], 1)
    assert not balanced([1.0, 0.0], 2)
    assert balanced([0.6, 0.4], 2)


def test_a_ratio_with_a_point_on_one_worker_is_not_judged() -> None:
    """The bare read's load reached one worker in every attempt: (c)/(b) compares
    two workers with one, so the table keeps the figure but marks no goal met."""
    even = [0.5, 0.5]
    points = [
        make_point("health", 9000, shares=even),
        make_point("bare", 2500, shares=[0.99, 0.01]),
        make_point("gated", 2750, shares=even),
        make_point("gated", 1375, shares=even, load="half"),
    ]
    naive = make_point("naive", 230, shares=even)
    naive.server = "naive"
    (row,) = ratios([*points, naive])
    assert row["c_over_b"] == 1.1
    assert row["met"]["c_over_b"] is None
    assert row["met"]["c_over_a"] is False
    assert row["met"]["c_over_d"] is True
    assert row["met"]["half_p99_over_p50"] is True
