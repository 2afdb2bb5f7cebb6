"""Scale on PostgreSQL: the gated read at 10,000 customers and at 1,000,000 with
10,000,000 chapters, measured in turns, and the audience of a consent purpose
streamed at that size.

    .venv/bin/python -m bench.scale [--real 10000] [--customers 1000000]
                                    [--chapters 10000000] [--rounds 5] [--duration 10]

1. starts a PostgreSQL server (as the tests do) and seeds ``--real`` customers
   through the service layer exactly as ``make bench`` does (20 sealed chapters,
   5 profile fields, a consent grant and its audit entry each), then vacuums,
   analyzes and checkpoints it as ``make bench`` does (``bench.run.settle``);
2. copies that database (``CREATE DATABASE ... TEMPLATE``) and grows the copy to
   ``--customers`` customers and ``--chapters`` chapters with SQL
   (``generate_series``): filler customers, half of them granting the benchmarked
   purpose, and filler chapters spread over them with sealed-size bodies, so that
   every table and index the read and the audience touch has its full size; then
   settles it as the seed was;
3. starts ``storyvault serve`` (1 worker) on each database, warms both up over a
   fixed sample of the seeded customers (which both hold), and measures the gated
   read with wrk at full load over that sample, ``--rounds`` times, the two sizes
   taking turns (small then large, then large then small, ...);
4. pages through ``GET /v1/purposes/{purpose}/audience`` (10,000 ids a page) on
   each, timing the whole stream.

The sizes take turns within each round so that the shared machine's slow and fast
spells fall on both alike: measured one after the other, with the eight minutes
of growing between them, the ratio followed the host (docs/benchmarks-history.md,
the twenty-first round). The figure is the median of the rounds' ratios
(``paired_ratio``).

Goals (issue "performance"): the gated read at 1M keeps >= 80 % of its 10k
throughput; the audience streams in under 10 s. Results: bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
import urllib.request
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench.common import RESULTS
from bench.run import (
    BIN,
    ENDPOINTS,
    PURPOSE,
    Point,
    Server,
    ensure_wrk,
    free_port,
    log,
    lua_script,
    machine_info,
    measure,
    median_round,
    seed,
    settle,
    start_server,
    storyvault_env,
    warm_up,
)
from tests.pgserver import PgServer
from tests.pgserver import start_server as start_pg
from tests.pgserver import stop_server as stop_pg

DB = "storyvault"
LARGE_DB = "storyvault_large"
FILLER_SQL = """
SET synchronous_commit = off;
INSERT INTO customers (id, subject, external_ref, status, restricted, created_at, updated_at)
SELECT md5('filler-c' || g)::uuid::text, 'sp_f' || md5('filler-s' || g), NULL, 'active',
       false, now(), now()
FROM generate_series({first}, {last}) AS g;
INSERT INTO consent_state (subject, purpose, state, since, expires_at, last_event_id,
                           last_ledger_index)
SELECT 'sp_f' || md5('filler-s' || g), '{purpose}', 'granted', now(), NULL,
       md5('filler-e' || g)::uuid, 0
FROM generate_series({first}, {last}) AS g WHERE g % 2 = 0;
"""
# Filler chapters belong to filler customers, which no server has read (or cached):
# the story-version triggers (migration 0003) are off during the bulk load, as a
# restore tool would have them, and on again after it.
CHAPTER_SQL = """
SET synchronous_commit = off;
ALTER TABLE chapters DISABLE TRIGGER USER;
INSERT INTO chapters (id, customer_id, category, kind, occurred_at, author_team, dek_id,
                      sealed, created_at)
SELECT md5('filler-h' || g)::uuid::text, md5('filler-c' || (1 + g % {filler}))::uuid::text,
       'support.ticket', 'ticket', now() - (g % 1000) * interval '1 day', 'support',
       md5('filler-k' || (g % {filler}))::uuid::text,
       convert_to(repeat(md5(g::text), 6), 'UTF8'), now()
FROM generate_series({first}, {last}) AS g;
ALTER TABLE chapters ENABLE TRIGGER USER;
"""


def gated_rounds(
    wrk: str,
    servers: dict[str, Server],
    sample: list[str],
    key: str,
    workdir: Path,
    args: argparse.Namespace,
) -> dict[str, list[Point]]:
    """Warm each server up, then ``--rounds`` full-load points of the gated read on
    each, the servers taking turns: in round r the order is reversed when r is odd,
    so that neither size is always measured first."""
    script = lua_script(
        workdir, f"scale-{time.monotonic_ns()}", ENDPOINTS["gated"], sample, key, None
    )
    for server in servers.values():
        warm_up(wrk, server, script, len(sample), args)
    points: dict[str, list[Point]] = {name: [] for name in servers}
    for r in range(args.rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        for name in order:
            log(f"  round {r + 1} of {args.rounds}: {name}")
            points[name].append(
                measure(
                    wrk,
                    servers[name],
                    "postgresql",
                    "gated",
                    script,
                    load="full",
                    duration=args.duration,
                    connections=args.connections,
                    target=None,
                )
            )
    return points


def paired_ratio(small: list[Point], large: list[Point]) -> tuple[float, list[float]]:
    """The median of the rounds' large/small requests/s (the lower middle of an even
    count) and each round's ratio, in round order. A round's two points ran
    back to back, so the host's spell is the same for both."""
    if not small or len(small) != len(large):
        raise ValueError("one large point per small point is needed")
    each = [round(lg.rps / sm.rps, 3) for sm, lg in zip(small, large, strict=True)]
    ordered = sorted(each)
    return ordered[(len(ordered) - 1) // 2], each


def serve(url: str, data_dir: Path, customers: int, logs: Path, database: int) -> Server:
    """``storyvault serve`` on the database, whose server's CPU (``database``, its
    process) each point counts apart; its log in ``logs``."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = storyvault_env(data_dir, url, port, 1, customers)
    cmd = [str(BIN / "storyvault"), "serve"]
    return start_server("storyvault", cmd, env, port, 1, logs, database)


def grow(pg: PgServer, url: str, real: int, customers: int, chapters: int) -> dict[str, float]:
    """Grow the database at ``url`` (a copy of the seed) to its full size."""
    db = make_url(url).database or DB
    filler = customers - real
    t0 = time.perf_counter()
    step = 100_000
    for first in range(1, filler + 1, step):
        last = min(filler, first + step - 1)
        pg.psql(FILLER_SQL.format(first=first, last=last, purpose=PURPOSE), db)
    t1 = time.perf_counter()
    log(f"  {filler} filler customers in {t1 - t0:.0f} s")
    existing = int(pg.psql("SELECT count(*) FROM chapters", db).split()[-1])
    todo = chapters - existing
    step = 1_000_000
    for first in range(1, todo + 1, step):
        last = min(todo, first + step - 1)
        pg.psql(CHAPTER_SQL.format(first=first, last=last, filler=filler), db)
        log(f"  chapters {existing + last:,}/{chapters:,} ({time.perf_counter() - t1:.0f} s)")
    t2 = time.perf_counter()
    settle(pg, url)  # as the seed before the first phase
    t3 = time.perf_counter()
    return {"customers_s": t1 - t0, "chapters_s": t2 - t1, "settle_s": t3 - t2}


def stream_audience(base: str, key: str) -> dict[str, Any]:
    """Page through the whole audience; the time to the last id."""
    total = pages = 0
    cursor: str | None = None
    t0 = time.perf_counter()
    while True:
        url = f"{base}/v1/purposes/{PURPOSE}/audience?limit=10000"
        if cursor:
            url += f"&cursor={cursor}"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            page = json.loads(resp.read())
        total += len(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    return {"ids": total, "pages": pages, "seconds": round(time.perf_counter() - t0, 2)}


def counts(pg: PgServer, db: str) -> dict[str, int]:
    out = {}
    for table in ("customers", "chapters", "profile_values", "consent_state", "audit_entries"):
        out[table] = int(pg.psql(f"SELECT count(*) FROM {table}", db).split()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=int, default=10_000)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--chapters", type=int, default=10_000_000)
    parser.add_argument("--sample", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each size once in each")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    wrk = ensure_wrk()
    root = Path(tempfile.mkdtemp(prefix="sv-scale-"))
    pg = start_pg(durable=True)
    result: dict[str, Any] = {
        "run_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
    }
    servers: dict[str, Server] = {}
    try:
        url = pg.create_database(DB)
        data = {"small": root / "data-small", "large": root / "data-large"}
        data["small"].mkdir()
        log(f"seeding {args.real} customers through the service")
        ids, key = asyncio.run(seed(data["small"], url, args.real))
        settle(pg, url)  # as make bench, and as grow() leaves the grown database
        sample = random.Random(7).sample(ids, min(args.sample, len(ids)))
        # The copy has the seed's keys: its own copy of the key ring beside it.
        pg.psql(f'CREATE DATABASE "{LARGE_DB}" TEMPLATE "{DB}"')
        shutil.copytree(data["small"], data["large"])
        urls = {"small": url, "large": pg.url(LARGE_DB)}
        log(f"growing a copy to {args.customers:,} customers and {args.chapters:,} chapters")
        result["grow_seconds"] = grow(pg, urls["large"], args.real, args.customers, args.chapters)
        for size in ("small", "large"):
            result[size] = {"counts": counts(pg, make_url(urls[size]).database or DB)}
            servers[size] = serve(
                urls[size], data[size], args.real, root / "logs" / size, pg.proc.pid
            )
        points = gated_rounds(wrk, servers, sample, key, root, args)
        for size, server in servers.items():
            result[size]["gated"] = asdict(median_round(points[size], key=lambda p: p.rps))
            result[size]["audience"] = stream_audience(server.url, key)
        ratio, each = paired_ratio(points["small"], points["large"])
    finally:
        for server in servers.values():
            server.stop()
        stop_pg(pg)
    result["round_ratios"] = each
    result["gated_ratio_large_over_small"] = ratio
    result["goals"] = {
        "gated_large_over_small >= 0.8": ratio >= 0.8,
        "audience_stream_under_10s": result["large"]["audience"]["seconds"] < 10,
    }
    out = RESULTS / "scale.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    small, large = result["small"]["gated"]["rps"], result["large"]["gated"]["rps"]
    log(
        f"gated read: median {small:.0f} req/s at {args.real:,} customers, {large:.0f} at "
        f"{args.customers:,}; rounds' ratios {each}, median {ratio:.2f}; audience "
        f"{result['large']['audience']['ids']:,} ids in {result['large']['audience']['seconds']} s"
    )
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
