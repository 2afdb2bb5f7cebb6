"""(c)/(a) of server configurations taking turns on one seeded database.

    .venv/bin/python -m bench.pairs --config "" --config STORYVAULT_AUDIT_BATCH_MS=1
                                    [--backend postgresql] [--workers 2] [--pairs 3]
                                    [--rounds 3] [--duration 4] [--customers 3000]

A configuration is a comma-separated list of ``NAME=VALUE`` settings added to the
environment ``make bench`` gives the server (``STORYVAULT_*``; ``PYTHONPATH=<tree>``
serves another checkout's code); ``""`` is ``make bench``'s own. The first one given
is the baseline.

A change to a setting can move (c)/(a) by a few per cent, less than this shared
host drifts between two runs of ``make bench`` minutes apart. So this seeds one
database (as ``make bench`` does) and measures the configurations in pairs: in each
pair every configuration in turn gets a server of its own, warmed up as ``make
bench`` warms up, whose ``/health`` and gated read take turns at full load for
``--rounds`` rounds; its (c)/(a) is the median rounds' ratio, taken apart into cost
times busy (``bench.run.c_over_a_apart``). The order of the configurations is reversed
in every other pair, so that none always runs first after a server stops. Each
configuration is then ahead of the baseline, level with it, or behind it in each
pair (``tally``). Results: bench/results/pairs-<backend>-w<workers>.json, every
pair and round.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import write_result
from bench.run import (
    BIN,
    ENDPOINTS,
    Point,
    c_over_a_apart,
    ensure_wrk,
    free_port,
    log,
    lua_script,
    measure,
    median_round,
    seeded_database,
    start_server,
    storyvault_env,
    warm_up,
)

_NAME = re.compile(r"STORYVAULT_[A-Z0-9_]+|PYTHONPATH")

LEVEL = 0.005
"""Two (c)/(a) figures closer than this are level."""


def parse_config(text: str) -> dict[str, str]:
    """The settings of one ``--config``: ``NAME=VALUE`` items separated by commas
    (none for ``""``). Only ``STORYVAULT_*`` settings and ``PYTHONPATH`` (a source
    tree of Story Vault) are taken; anything else is refused with ValueError."""
    settings: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise ValueError(f"not a STORYVAULT_* or PYTHONPATH setting: {item!r}")
        if name in settings:
            raise ValueError(f"{name} set twice in one configuration")
        if name == "PYTHONPATH" and not (Path(value) / "governance").is_dir():
            raise ValueError(f"PYTHONPATH={value} is not a source tree of Story Vault")
        settings[name] = value
    return settings


def turn_order(configs: list[str], pair: int) -> list[str]:
    """The configurations in the order pair ``pair`` (from 0) measures them."""
    return list(configs) if pair % 2 == 0 else list(reversed(configs))


def tally(rows: list[dict[str, Any]], baseline: str) -> dict[str, dict[str, int]]:
    """For each configuration but ``baseline``: the pairs in which its (c)/(a) was
    ahead of the baseline's, level (within ``LEVEL``) or behind."""
    by_pair: dict[int, dict[str, float]] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], {})[row["config"]] = row["c_over_a"]
    counts: dict[str, dict[str, int]] = {}
    for figures in by_pair.values():
        if baseline not in figures:
            raise ValueError(f"a pair without the baseline {baseline!r}")
        for config, value in figures.items():
            if config == baseline:
                continue
            count = counts.setdefault(config, {"ahead": 0, "level": 0, "behind": 0})
            diff = value - figures[baseline]
            count["level" if abs(diff) < LEVEL else "ahead" if diff > 0 else "behind"] += 1
    return counts


def one_config(
    config: str,
    wrk: str,
    args: argparse.Namespace,
    scripts: dict[str, Path],
    env: dict[str, str],
    customers: int,
    root: Path,
    database: int | None,
) -> dict[str, Any]:
    """A server with ``env``; its ``/health`` and gated read in turn; their median rounds."""
    port = free_port()
    server_env = storyvault_env(root / args.backend, args.url, port, args.workers, customers)
    server_env.update(env)
    server = start_server(
        "storyvault",
        [str(BIN / "storyvault"), "serve"],
        server_env,
        port,
        args.workers,
        root,
        database,
    )
    try:
        warm_up(wrk, server, scripts["gated"], customers, args)
        warm_up(wrk, server, scripts["health"], 0, args)
        rounds: dict[str, list[Point]] = {"health": [], "gated": []}
        for _ in range(args.rounds):
            for endpoint in ("health", "gated"):
                rounds[endpoint].append(
                    measure(
                        wrk,
                        server,
                        args.backend,
                        endpoint,
                        scripts[endpoint],
                        load="full",
                        duration=args.duration,
                        connections=args.connections,
                        target=None,
                    )
                )
    finally:
        server.stop()
    health = median_round(rounds["health"], key=lambda p: p.rps)
    gated = median_round(rounds["gated"], key=lambda p: p.rps)
    apart = c_over_a_apart(health, gated)
    row = {
        "config": config,
        "health_rps": health.rps,
        "gated_rps": gated.rps,
        "c_over_a": round(gated.rps / health.rps, 3),
        "c_over_a_apart": apart,
        "gated_cpu_ms_per_request": gated.cpu_ms_per_request,
        "gated_host_cpu_ms_per_request": gated.host_cpu_ms_per_request,
        "gated_host_cpu_util": gated.host_cpu_util,
        "health_host_cpu_ms_per_request": health.host_cpu_ms_per_request,
        "health_host_cpu_util": health.host_cpu_util,
        "rounds": {"health": health.rounds, "gated": gated.rounds},
    }
    log(
        f"[{config or 'make bench'}] (c)/(a) {row['c_over_a']}: gated {gated.rps:.0f} req/s,"
        f" /health {health.rps:.0f}; apart {apart}"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help='NAME=VALUE[,NAME=VALUE...] ("" for make bench\'s own); the first is the baseline',
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--customers", type=int, default=3_000)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if len(args.config) < 2 or len(set(args.config)) != len(args.config):
        parser.error("give at least two different --config")
    for name in ("workers", "pairs", "rounds", "customers", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        envs = {config: parse_config(config) for config in args.config}
    except ValueError as exc:
        parser.error(str(exc))
    wrk = ensure_wrk()
    root = Path(tempfile.mkdtemp(prefix="sv-pairs-"))
    data_dir = root / args.backend
    data_dir.mkdir()
    rows: list[dict[str, Any]] = []
    with seeded_database(args.backend, data_dir, args.customers) as db:
        args.url = db.url
        scripts = {
            e: lua_script(root, f"pairs-{e}", ENDPOINTS[e], db.ids, db.key, None)
            for e in ("health", "gated")
        }
        database = None if db.pg is None else db.pg.proc.pid
        for pair in range(args.pairs):
            for config in turn_order(args.config, pair):
                row = one_config(
                    config, wrk, args, scripts, envs[config], len(db.ids), root, database
                )
                rows.append({"pair": pair, **row})
    counts = tally(rows, args.config[0])
    for config, count in counts.items():
        log(f"[{config}] against [{args.config[0] or 'make bench'}]: {count}")
    path = write_result(
        f"pairs-{args.backend}-w{args.workers}",
        {
            "command": " ".join(["python -m bench.pairs", *(argv or sys.argv[1:])]),
            "backend": args.backend,
            "workers": args.workers,
            "customers": args.customers,
            "baseline": args.config[0],
            "tally": counts,
            "runs": rows,
        },
    )
    shutil.rmtree(root, ignore_errors=True)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
