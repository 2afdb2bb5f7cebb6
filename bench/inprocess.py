"""The app's own CPU per request, without an HTTP server in between.

    .venv/bin/python -m bench.inprocess [--customers 2000] [--requests 20000]
                                        [--concurrency 32] [--backend sqlite|postgresql]

``make bench`` measures whole requests through uvicorn and the loopback sockets.
This calls the ASGI app that a worker serves (``api.app.create_app``, the same
settings as the benchmark's servers) directly with ASGI messages, from
``--concurrency`` tasks at once on one uvloop event loop (as in a worker), for
(a) ``/health``, (b) the bare read and (c) the gated read over the same data set
``make bench`` seeds. CPU
per request is the process's CPU time (every thread: the audit commits' too)
divided by requests. Set against ``make bench``'s figures, the difference is what
the HTTP server, the sockets and the kernel add to each request; between the
three endpoints here, it is what each step of the gated read adds in the app.
Results: bench/results/inprocess-<backend>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import uvloop

from bench import run
from bench.common import base_settings, write_result
from bench.run import log, seeded_database

# make bench's endpoints, as ASGI wants them: (path template, query string).
ENDPOINTS: dict[str, tuple[str, bytes]] = {
    name: (path, query.encode())
    for name, url in run.ENDPOINTS.items()
    for path, _, query in [url.replace("%s", "{id}").partition("?")]
}

Call = Callable[[str], Awaitable[int]]


def asgi_caller(app: Any, endpoint: str, key: str) -> Call:
    """A function that sends one GET of ``endpoint`` for a customer id through the
    ASGI app and returns the response's status."""
    template, query = ENDPOINTS[endpoint]
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode())]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def call(customer_id: str) -> int:
        path = template.format(id=customer_id)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        return status

    return call


async def drive(call: Call, ids: list[str], requests: int, concurrency: int) -> dict[str, float]:
    """``requests`` calls from ``concurrency`` tasks, rotating over ``ids``; CPU and
    wall time per request. Every answer must be 200."""
    per_task = requests // concurrency
    failures: list[int] = []

    async def task(n: int) -> None:
        for i in range(per_task):
            status = await call(ids[(n * per_task + i) % len(ids)])
            if status != 200:
                failures.append(status)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(task(n) for n in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if failures:
        raise RuntimeError(f"{len(failures)} answers were not 200 (first: {failures[0]})")
    done = per_task * concurrency
    return {"requests": done, "cpu_us": cpu / done * 1e6, "wall_us": wall / done * 1e6}


def serving_app(data_dir: Path, url: str, customers: int, logs: TextIO) -> Any:
    """The ASGI app as a benchmark server's worker serves it (the settings of
    ``make bench``'s servers), its JSON log lines written to ``logs``."""
    from api.app import create_app
    from governance.logs import configure_logging

    settings = base_settings(
        data_dir,
        url,
        bench_routes=True,
        dek_cache_size=max(10_000, customers * 13),
        rate_limit_per_minute=10_000_000,
    )
    # The JSON log lines are written as a server writes them, to a file.
    configure_logging(stream=logs)
    # As a worker serves it (api.asgi): its heap frozen once started.
    return create_app(settings, migrate=False, freeze_heap=True)


async def warm(call: Call, ids: list[str]) -> None:
    """Every customer read twice, so that their rows and data keys are cached."""
    for _ in range(2):
        await drive(call, ids, len(ids), 1)


async def measure(
    data_dir: Path, url: str, ids: list[str], key: str, args: argparse.Namespace, logs: TextIO
) -> dict[str, Any]:
    app = serving_app(data_dir, url, len(ids), logs)
    out: dict[str, Any] = {}
    async with app.lifespan():
        for endpoint in ENDPOINTS:
            call = asgi_caller(app, endpoint, key)
            await warm(call, ids)
            runs = [
                await drive(call, ids, args.requests, args.concurrency) for _ in range(args.repeat)
            ]
            cpu = statistics.median(r["cpu_us"] for r in runs)
            out[endpoint] = {"cpu_us_per_request": round(cpu, 1), "runs": runs}
            log(f"{endpoint}: {cpu:.1f} us of CPU per request (median of {args.repeat})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="sv-inprocess-"))
    data_dir = root / args.backend
    data_dir.mkdir()
    with (
        seeded_database(args.backend, data_dir, args.customers) as db,
        open(os.devnull, "w") as logs,
    ):
        # uvloop, as uvicorn runs the app in a worker
        result = uvloop.run(measure(data_dir, db.url, db.ids, db.key, args, logs))
    cpu = {k: v["cpu_us_per_request"] for k, v in result.items()}
    ratios = {
        "c_over_a": round(cpu["health"] / cpu["gated"], 3),
        "c_over_b": round(cpu["bare"] / cpu["gated"], 3),
    }
    path = write_result(
        f"inprocess-{args.backend}",
        {
            "command": " ".join(["python -m bench.inprocess", *(argv or sys.argv[1:])]),
            "backend": args.backend,
            "customers": args.customers,
            "concurrency": args.concurrency,
            "endpoints": result,
            "cpu_ratios": ratios,
        },
    )
    log(
        f"(c)/(a) {ratios['c_over_a']}, (c)/(b) {ratios['c_over_b']} "
        f"(requests per CPU-second); wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
