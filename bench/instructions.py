"""Instructions per request in the app, counted by valgrind: figures the host's noise
does not move.

    .venv/bin/python -m bench.instructions [--customers 300] [--requests 640]
                                           [--repeat 2] [--trees /path/to/A,/path/to/B]
                                           [--backend sqlite|postgresql]

On a shared host, CPU time per request moves 10-30 % between runs minutes apart,
and more when a neighbour is busy; a change worth a few per cent cannot be told
from that. Valgrind's callgrind counts the instructions the process executes (every
thread: the audit commits' too), the same count for the same code and inputs
whatever else the machine does. This seeds one database as ``make bench``
does (fewer customers), then for each tree and each endpoint of ``bench.inprocess``
(``/health``, the bare read, the gated read) runs that app in a process of its own
under callgrind, on a fresh copy of the database: it warms the caches with
counting off, turns counting on, drives ``--requests`` requests from 32 tasks at
once, and turns it off. Instructions are not time (a cache miss or a system call
costs more than its count), so this measures the app's own work, not the HTTP
server's or the kernel's: see ``make bench`` for those.

With ``--backend postgresql`` the database is on a PostgreSQL server this starts
(as ``make bench`` does), outside valgrind, and each count runs on a copy of the
seeded database (``CREATE DATABASE ... TEMPLATE``): the count is the app's side of
each statement (the driver, the pool, the audit batch's parameters), not the server's.
Results: bench/results/instructions.json (or instructions-postgresql.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ENDPOINT_NAMES = ("health", "bare", "gated")
CONCURRENCY = 32
"""Requests in flight at once, as ``bench.inprocess`` and ``make bench`` drive them."""


def counted(valgrind_stderr: str) -> int:
    """The instructions callgrind counted while counting was on (what it prints as
    ``Collected :`` when the process exits)."""
    found = re.search(r"^==\d+== Collected : (\d+)$", valgrind_stderr, re.M)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{valgrind_stderr[-2000:]}")
    return int(found.group(1))


def per_request(total: int, requests: int) -> int:
    if requests <= 0:
        raise ValueError("requests must be > 0")
    return round(total / requests)


def tree_commit(tree: Path) -> str | None:
    """The tree's commit (``git describe --always --dirty``: a "-dirty" suffix when
    it holds changes not committed), so that a result names the build it measured;
    None when the tree is not a git checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(tree), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def ratios(figures: dict[str, int]) -> dict[str, float]:
    """(c)/(a) and (c)/(b) as ``make bench`` states them (requests per unit of work:
    the cheaper endpoint's count over the gated read's)."""
    return {
        "c_over_a": round(figures["health"] / figures["gated"], 3),
        "c_over_b": round(figures["bare"] / figures["gated"], 3),
    }


def _toggle(on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        check=True,
        capture_output=True,
    )


async def _child(data_dir: Path, endpoint: str, requests: int) -> None:
    from bench.inprocess import asgi_caller, drive, serving_app, warm

    meta = json.loads((data_dir / "meta.json").read_text())
    ids, key = meta["ids"], meta["key"]
    with open(os.devnull, "w") as logs:  # noqa: ASYNC230 - once, before any request
        app = serving_app(data_dir, meta["url"], len(ids), logs)
        async with app.lifespan():
            call = asgi_caller(app, endpoint, key)
            await warm(call, ids)
            await drive(call, ids, 256, CONCURRENCY)  # the audit batches in their rhythm
            _toggle(True)
            await drive(call, ids, requests, CONCURRENCY)
            _toggle(False)


def count(
    tree: Path, seeded: Path, endpoint: str, requests: int, work: Path, pg: Any = None
) -> int:
    """Instructions per request of ``endpoint`` served by ``tree``'s code (this
    harness, ``work/harness/bench``, drives it), on a fresh copy of the seeded
    database: a copy of the SQLite file, or with ``pg`` (a ``tests.pgserver``
    server) a PostgreSQL database made from the seeded one (named in the seeded
    ``meta.json``'s URL)."""
    data = Path(tempfile.mkdtemp(prefix=f"{endpoint}-", dir=work))
    shutil.rmtree(data)
    shutil.copytree(seeded, data)
    meta = json.loads((data / "meta.json").read_text())
    database = data.name.replace("-", "_").lower()
    if pg is None:
        meta["url"] = f"sqlite+aiosqlite:///{data / 'storyvault.db'}"
    else:
        template = meta["url"].rsplit("/", 1)[1]
        pg.psql(f'CREATE DATABASE "{database}" TEMPLATE "{template}"')
        meta["url"] = pg.url(database)
    (data / "meta.json").write_text(json.dumps(meta))
    try:
        return _count_in(tree, data, endpoint, requests, work)
    finally:
        if pg is not None:
            pg.psql(f'DROP DATABASE IF EXISTS "{database}"')
        shutil.rmtree(data, ignore_errors=True)


def _count_in(tree: Path, data: Path, endpoint: str, requests: int, work: Path) -> int:
    harness = work / "harness"
    if not harness.exists():
        harness.mkdir()
        (harness / "bench").symlink_to(REPO / "bench")
    # The app's packages from the tree, this benchmark's from this repository.
    env = dict(os.environ, PYTHONPATH=f"{harness}{os.pathsep}{tree}")
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={data / 'callgrind.out.%p'}",
            sys.executable,
            "-m",
            "bench.instructions",
            "--child",
            str(data),
            endpoint,
            str(requests),
        ],
        cwd=harness,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{endpoint} under valgrind failed:\n{proc.stderr[-3000:]}")
    return per_request(counted(proc.stderr), requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--trees", default=str(REPO), help="comma-separated source trees")
    parser.add_argument("--endpoints", default=",".join(ENDPOINT_NAMES))
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--child", nargs=3, metavar=("DATA", "ENDPOINT", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        import uvloop

        data, endpoint, n = args.child
        uvloop.run(_child(Path(data), endpoint, int(n)))
        return 0
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    for tree in trees:
        if not (tree / "governance").is_dir():
            parser.error(f"{tree} is not a source tree of Story Vault")
    endpoints = args.endpoints.split(",")
    if unknown := set(endpoints) - set(ENDPOINT_NAMES):
        parser.error(f"unknown endpoints: {', '.join(sorted(unknown))}")
    if args.requests < CONCURRENCY or args.requests % CONCURRENCY or args.repeat < 1:
        parser.error(f"--requests must be a multiple of {CONCURRENCY}, --repeat >= 1")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (Debian's valgrind package)")

    from bench.common import write_result
    from bench.run import log, seed, settle, start_backend

    work = Path(tempfile.mkdtemp(prefix="sv-instructions-"))
    seeded = work / "seeded"
    seeded.mkdir()
    url, pg = start_backend(args.backend, seeded)
    rows: list[dict[str, Any]] = []
    try:
        ids, key = asyncio.run(seed(seeded, url, args.customers))
        settle(pg, url)
        random.Random(5).shuffle(ids)  # as bench.inprocess reads them
        (seeded / "meta.json").write_text(json.dumps({"ids": ids, "key": key, "url": url}))
        for tree in trees:
            figures: dict[str, int] = {}
            runs: dict[str, list[int]] = {}
            for endpoint in endpoints:
                runs[endpoint] = [
                    count(tree, seeded, endpoint, args.requests, work, pg)
                    for _ in range(args.repeat)
                ]
                figures[endpoint] = round(statistics.median(runs[endpoint]))
                log(f"{tree.name}: {endpoint} {runs[endpoint]} instructions per request")
            row: dict[str, Any] = {
                "tree": str(tree),
                "commit": tree_commit(tree),
                "instructions_per_request": figures,
                "runs": runs,
            }
            if set(ENDPOINT_NAMES) <= set(figures):
                r = row["ratios"] = ratios(figures)
                log(f"{tree.name}: (c)/(a) {r['c_over_a']}, (c)/(b) {r['c_over_b']}")
            rows.append(row)
    finally:
        if pg is not None:
            from tests.pgserver import stop_server

            stop_server(pg)
        shutil.rmtree(work, ignore_errors=True)
    path = write_result(
        "instructions" if args.backend == "sqlite" else f"instructions-{args.backend}",
        {
            "command": " ".join(["python -m bench.instructions", *(argv or sys.argv[1:])]),
            "backend": args.backend,
            "customers": args.customers,
            "requests": args.requests,
            "concurrency": CONCURRENCY,
            "valgrind": subprocess.run(
                ["valgrind", "--version"], check=False, capture_output=True, text=True
            ).stdout.strip(),
            "builds": rows,
        },
    )
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
