"""Two builds of the gated read against each other, alternately, on one seeded database.

    .venv/bin/python -m bench.ab --trees /path/to/A,/path/to/B [--backend sqlite]
                                 [--rounds 2] [--customers 2000] [--workers 1]

On this shared, noisy host a change of 10-30 % does not show between two runs
of ``make bench`` minutes apart. This seeds one database (as ``make bench``
does), then for each round starts ``storyvault serve`` from each tree in turn
(a checkout of each build, e.g. ``git worktree add``; each server imports its
tree's code through ``PYTHONPATH``, the interpreter and libraries are this
one's) and measures the gated read as ``make bench`` does: a warm-up that fills
the caches, full load, then half load at half that rate. With 1 worker it also
reads the audit group commit's mean batch size over the full- and half-load points
(``/metrics``). Results: bench/results/ab-<backend>.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import write_result
from bench.run import (
    BIN,
    ENDPOINTS,
    Server,
    ensure_wrk,
    free_port,
    log,
    lua_script,
    measure,
    seeded_database,
    start_server,
    storyvault_env,
    warm_up,
)


def batch_counters(server: Server) -> tuple[float, float]:
    """(batches, entries) committed so far by the audit group commit of a 1-worker server."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    return value("storyvault_audit_batch_size_count"), value("storyvault_audit_batch_size_sum")


def mean_batch(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    """Mean entries per audit batch between two ``batch_counters`` readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round((after[1] - before[1]) / (after[0] - before[0]), 1)


def one_build(
    tree: Path,
    wrk: str,
    args: argparse.Namespace,
    data_dir: Path,
    url: str,
    ids: list[str],
    key: str,
    root: Path,
) -> dict[str, Any]:
    port = free_port()
    env = storyvault_env(data_dir, url, port, args.workers, len(ids))
    env["PYTHONPATH"] = str(tree)
    server = start_server(
        "storyvault", [str(BIN / "storyvault"), "serve"], env, port, args.workers, root
    )
    try:
        full = lua_script(root, "ab-full", ENDPOINTS["gated"], ids, key, None)
        warm_up(wrk, server, full, len(ids), args)
        before = batch_counters(server) if args.workers == 1 else None
        point = measure(
            wrk,
            server,
            args.backend,
            "gated",
            full,
            load="full",
            duration=args.duration,
            connections=args.connections,
            target=None,
        )
        after = batch_counters(server) if before is not None else None
        target = point.rps / 2
        half = lua_script(root, "ab-half", ENDPOINTS["gated"], ids, key, target)
        half_before = after
        half_point = measure(
            wrk,
            server,
            args.backend,
            "gated",
            half,
            load="half",
            duration=args.duration,
            connections=args.connections,
            target=target,
        )
        half_after = batch_counters(server) if half_before is not None else None
    finally:
        server.stop()
    batches = mean_batch(before, after)
    half_batches = mean_batch(half_before, half_after)
    row = {
        "tree": str(tree),
        "rps": point.rps,
        "cpu_ms_per_request": point.cpu_ms_per_request,
        "cpu_util": point.cpu_util,
        "p50_ms": point.p50_ms,
        "p99_ms": point.p99_ms,
        "mean_audit_batch": batches,
        "half_p50_ms": half_point.p50_ms,
        "half_p99_ms": half_point.p99_ms,
        "half_p99_over_p50": round(half_point.p99_ms / half_point.p50_ms, 2),
        "half_cpu_ms_per_request": half_point.cpu_ms_per_request,
        "half_mean_audit_batch": half_batches,
    }
    log(
        f"{tree.name}: {point.rps:.1f} req/s, {point.cpu_ms_per_request:.3f} ms of CPU,"
        f" utilisation {point.cpu_util:.2f}, mean batch {batches};"
        f" half load p99/p50 {row['half_p99_over_p50']},"
        f" {half_point.cpu_ms_per_request:.3f} ms of CPU, mean batch {half_batches}"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, help="comma-separated source trees")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    for tree in trees:
        if not (tree / "governance").is_dir():
            parser.error(f"{tree} is not a source tree of Story Vault")
    wrk = ensure_wrk()
    root = Path(tempfile.mkdtemp(prefix="sv-ab-"))
    data_dir = root / args.backend
    data_dir.mkdir()
    rows: list[dict[str, Any]] = []
    with seeded_database(args.backend, data_dir, args.customers) as db:
        for n in range(args.rounds):
            for tree in trees:
                row = one_build(tree, wrk, args, data_dir, db.url, db.ids, db.key, root)
                rows.append({"round": n, **row})
    path = write_result(
        f"ab-{args.backend}",
        {
            "command": " ".join(["python -m bench.ab", *(argv or sys.argv[1:])]),
            "backend": args.backend,
            "workers": args.workers,
            "customers": args.customers,
            "runs": rows,
        },
    )
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
