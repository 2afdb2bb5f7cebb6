"""``make bench``: the gated read against the framework floor, a bare read and a naive build.

    .venv/bin/python -m bench.run [--customers 10000] [--duration 5] [--rounds 3] [--connections 32]
                                  [--workers 1,2] [--backends sqlite[,postgresql]]
                                  [--profile] [--soak SECONDS]

One run:

1. seeds a fresh data dir in-process through the service layer (StoryVault): N
   customers, each a 5-field profile and 20 chapters over the 7 chapter
   categories (12 categories in all), a consent grant for the benchmarked
   purpose (``analytics.profiling``, consent-based) in the ledger with its audit
   entry, a team ``analytics`` whose read rules allow all 12 categories for that
   purpose (two of them masked) and an API key for it;
2. starts ``storyvault serve`` as ``make run`` does (STORYVAULT_WORKERS=1, then 2)
   with STORYVAULT_BENCH_ROUTES=true, on loopback, and the naive reference
   (bench/naive_app.py) as its own uvicorn process;
3. drives load with wrk (another process; one thread, ``--connections`` connections,
   a Lua script rotating over the customer ids) against
   (a) ``GET /health``, (b) ``GET /bench/bare/{id}``, (c) ``GET /v1/customers/{id}/story``
   and (d) the naive app's same route, each at full load (closed loop, as fast as
   the server answers) and at half load (open loop at 50 % of that point's full-load
   rate: the Lua script paces requests on a fixed schedule, see ``PACER``), in
   ``--rounds`` rounds of ``--duration`` seconds in which a server's endpoints take
   turns; each point is its median round (``bench_server``);
4. records requests/s, p50/p99 latency, CPU per request (utime+stime of the server
   processes from /proc, divided by requests), the whole machine's busy CPU per
   request (/proc/stat) with the database server's and wrk's parts, and peak RSS
   (VmHWM) to bench/results/gated_read.json, and writes the tables and charts of
   docs/benchmarks.md (``machine_cpu_lines``: where the machine's CPU went, and
   (c)/(a) taken apart into what a gated read costs the machine beside ``/health``
   and how fully each kept its CPUs busy).

``--soak SECONDS`` instead runs the gated read at half load for that long
(``make bench-soak``: 600 s) and checks RSS growth < 10 % and no error
(bench/results/soak.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from api.workers import AUDIT_NAME, WORKER_NAME
from bench.common import RESULTS, base_settings, machine
from governance.demo import demo_stories

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BIN = Path(sys.executable).parent
TEAM = "analytics"
PURPOSE = "analytics.profiling"
HOST = "127.0.0.1"
BATCH = 200
"""Customers per seeding transaction."""

# A 20-chapter story over the 7 chapter categories (profile covers the other 5).
CHAPTER_PLAN: list[tuple[str, str, int]] = [
    ("commerce.purchase", "purchase", 4),
    ("commerce.invoice", "invoice", 4),
    ("support.ticket", "ticket", 3),
    ("engagement.interaction", "chat", 4),
    ("preference", "preference", 1),
    ("insight.sentiment", "sentiment", 3),
    ("insight.motivation", "motivation", 1),
]
RULES: list[dict[str, Any]] = [
    {"category": "*"},
    {"category": "contact.phone", "mask": "partial"},
    {"category": "demographic.birthday", "mask": "year_only"},
]
GOALS = {
    "c_over_a": 0.35,
    "c_over_b": 0.6,
    "c_over_d": 10.0,
    "half_p99_over_p50": 3.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- seeding
def _chapters(rng: random.Random, start: datetime) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    day = start
    for category, plan_kind, count in CHAPTER_PLAN:
        for n in range(count):
            kind = plan_kind
            day += timedelta(days=rng.randint(1, 30), hours=rng.randint(0, 23))
            if category == "commerce.purchase":
                body: dict[str, Any] = {
                    "order": f"SO-{rng.randint(100000, 999999)}",
                    "product": rng.choice(["Rain jacket", "Headlamp", "Day pack 22 l"]),
                    "amount": round(rng.uniform(10, 200), 2),
                    "currency": "EUR",
                }
            elif category == "commerce.invoice":
                body = {"invoice": f"INV-{rng.randint(100000, 999999)}", "total": 79.0}
            elif category == "support.ticket":
                body = {"subject": "Zip on the jacket broke", "status": "resolved"}
            elif category == "engagement.interaction":
                kind = ("chat", "email", "call", "visit")[n % 4]
                body = {"summary": "Customer asked about a delivery", "topic": "delivery"}
            elif category == "preference":
                body = {"channel": "email", "sizes": "EU 42"}
            elif category == "insight.sentiment":
                body = {"score": round(rng.uniform(-0.9, 0.6), 2), "note": "tone of the call"}
            else:
                body = {"statement": "Training for a first marathon"}
            out.append({"category": category, "kind": kind, "occurred_at": day, "body": body})
    return out


async def seed(data_dir: Path, url: str, customers: int) -> tuple[list[str], str]:
    """Seed in-process through the service layer; returns (customer ids, team API key)."""
    from sqlalchemy import insert

    from audit import AuditEntry, EntryKind
    from governance.keys import seal_value, value_aad
    from governance.models import ChapterRow, DataKeyRow
    from governance.service import StoryVault
    from governance.teams import ADMIN_ROLE, Principal
    from policies import RuleSpec

    vault = StoryVault(base_settings(data_dir, url))
    await vault.start()
    try:
        await vault.create_team(TEAM, roles=[], description="benchmark readers")
        admin = Principal(team="compliance", key_id="key_bench_seed", roles=frozenset([ADMIN_ROLE]))
        for rule in RULES:
            await vault.add_policy(
                admin, RuleSpec(team=TEAM, action="read", purpose=PURPOSE, **rule)
            )
        key = (await vault.issue_key(TEAM, label="bench")).secret
        templates = demo_stories(50)
        rng = random.Random(11)
        start = datetime(2022, 1, 1, tzinfo=UTC)
        ids: list[str] = []
        t0 = time.perf_counter()
        for first in range(0, customers, BATCH):
            async with vault.db.write_session() as session, session.begin():
                entries = []
                key_rows: list[dict[str, Any]] = []
                chapter_rows: list[dict[str, Any]] = []
                now = datetime.now(UTC)
                for i in range(first, min(first + BATCH, customers)):
                    profile = dict(templates[i % 50]["profile"])
                    profile["email"] = f"bench{i}@example.com"
                    cid = await vault.vault.create_customer(
                        session, external_ref=f"bench-{i}", profile=profile
                    )
                    # Chapters exactly as Vault.add_chapter seals them (one data key per
                    # category, AAD bound to customer + chapter), inserted in bulk below.
                    deks: dict[str, tuple[str, Any]] = {}
                    for ch in _chapters(rng, start):
                        category = ch["category"]
                        if category not in deks:
                            dek_id, aead, key_row = vault.keys.new_key(cid, category)
                            deks[category] = (dek_id, aead)
                            key_rows.append(key_row)
                        dek_id, aead = deks[category]
                        body = vault.vault.validate_chapter(category, ch["kind"], ch["body"])
                        chapter_id = str(uuid.uuid4())
                        chapter_rows.append(
                            {
                                "id": chapter_id,
                                "customer_id": cid,
                                "category": category,
                                "kind": ch["kind"],
                                "occurred_at": ch["occurred_at"],
                                "author_team": "support",
                                "dek_id": dek_id,
                                "sealed": seal_value(
                                    aead, body, value_aad(cid, chapter_id, category, dek_id)
                                ),
                                "created_at": now,
                            }
                        )
                    subject = vault.ring.pseudonym(cid)
                    event = await vault.ledger.record(session, subject, PURPOSE, granted=True)
                    entries.append(
                        AuditEntry(
                            kind=EntryKind.CONSENT,
                            actor="customer",
                            subject=subject,
                            purpose=PURPOSE,
                            consent_index=event.ledger_index,
                            detail={"event": "grant", "event_id": str(event.event_id)},
                        )
                    )
                    ids.append(cid)
                # The chapters' data keys go to the key store (its own database) and
                # commit before the values they seal, as DataKeys.create does.
                async with vault.keys.store.write_session() as keys_session:
                    await keys_session.execute(insert(DataKeyRow), key_rows)
                    await keys_session.commit()
                await session.execute(insert(ChapterRow), chapter_rows)
                await vault.audit_log.append_in(await session.connection(), entries)
            if (first // BATCH) % 10 == 9:
                rate = len(ids) / (time.perf_counter() - t0)
                log(f"  seeded {len(ids)}/{customers} customers ({rate:.0f}/s)")
        log(f"seeded {len(ids)} customers in {time.perf_counter() - t0:.1f} s")
    finally:
        await vault.stop()
    return ids, key


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _comm(pid: int) -> str:
    """The process's name (/proc/PID/comm); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """``root`` and every process descended from it, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = [root]
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid]
        found += kids
        frontier += kids
    return found


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds (utime + stime) of each of ``pids`` still running."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two ``cpu_by_pid`` readings (a process that started in
    between counts from zero)."""
    return sum(after.values()) - sum(before.get(pid, 0.0) for pid in after)


def host_busy_seconds(stat: Path = Path("/proc/stat")) -> float:
    """CPU seconds the whole machine has been busy, all CPUs: user, nice, system, irq
    and softirq time (guest time is in user). Idle, I/O wait and steal (time the
    hypervisor gave to another machine) are not busy."""
    fields = stat.read_text().splitlines()[0].split()
    if fields[:1] != ["cpu"]:
        raise RuntimeError(f"{stat} does not start with the machine's cpu line: {fields[:2]}")
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have exited and been waited for
    (``subprocess.run``'s wrk among them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Server:
    name: str
    workers: int
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    database: int | None = None
    """The process of the database server it uses, if one of its own (PostgreSQL's,
    whose processes descend from it): its CPU is counted apart (``Point``)."""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def database_cpu(self) -> dict[int, float]:
        """``cpu_by_pid`` of the database server's processes (none for SQLite, which
        runs in the server's own processes)."""
        return {} if self.database is None else cpu_by_pid(descendants(self.database))

    def pids(self) -> list[int]:
        """The server process and all its descendants (uvicorn workers)."""
        return descendants(self.proc.pid)

    def cpu_by_pid(self) -> dict[int, float]:
        """CPU seconds (utime + stime) of the server process and each descendant."""
        return cpu_by_pid(self.pids())

    def worker_shares(self, before: dict[int, float], after: dict[int, float]) -> list[float]:
        """Each worker's share of the workers' CPU between two ``cpu_by_pid`` readings,
        largest first (empty with one worker, which is the server process itself).
        The workers are the descendants that used the most CPU, other than Story
        Vault's audit process (a helper process of multiprocessing, if any, uses next
        to none)."""
        if self.workers < 2:
            return []
        used = sorted(
            (
                after[pid] - before.get(pid, 0.0)
                for pid in after
                if pid != self.proc.pid and _comm(pid) != AUDIT_NAME
            ),
            reverse=True,
        )[: self.workers]
        used += [0.0] * (self.workers - len(used))  # a worker gone counts as idle
        total = sum(used)
        return [round(u / total, 3) for u in used] if total > 0 else [0.0] * self.workers

    def memory(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory, MiB: max over processes, sum."""
        hwm: list[float] = []
        rss: list[float] = []
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            found = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", status, re.M))
            if "VmHWM" in found:
                hwm.append(int(found["VmHWM"]) / 1024)
                rss.append(int(found["VmRSS"]) / 1024)
        return {
            "peak_rss_mib_max": round(max(hwm, default=0), 1),
            "peak_rss_mib_sum": round(sum(hwm), 1),
            "rss_mib_sum": round(sum(rss), 1),
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def balanced(shares: list[float], workers: int) -> bool:
    """Whether a point's load reached every worker (see ``BALANCE``)."""
    return not shares or min(shares) >= BALANCE / workers


def start_server(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    port: int,
    workers: int,
    logs: Path,
    database: int | None = None,
) -> Server:
    log_path = logs / f"{name}-w{workers}.log"
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    server = Server(
        name=name, workers=workers, port=port, proc=proc, log=log_path, database=database
    )
    deadline = time.monotonic() + 120
    probe = "/ready" if name == "storyvault" else "/health"
    while not _http_ok(server.url + probe):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} did not start:\n{tail}")
        time.sleep(0.3)
    return server


def storyvault_env(
    data_dir: Path, url: str, port: int, workers: int, customers: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYVAULT_")}
    env.update(
        STORYVAULT_DATA_DIR=str(data_dir),
        STORYVAULT_HOST=HOST,
        STORYVAULT_PORT=str(port),
        STORYVAULT_DEMO_DATA="false",
        STORYVAULT_BENCH_ROUTES="true",
        STORYVAULT_WORKERS=str(workers),
        # 12 data keys per customer: size the unwrapped-key cache for the whole data set.
        STORYVAULT_DEK_CACHE_SIZE=str(max(10_000, customers * 13)),
        STORYVAULT_RATE_LIMIT_PER_MINUTE="10000000",
    )
    if not url.startswith("sqlite"):
        env["STORYVAULT_DATABASE_URL"] = url
    return env


# --------------------------------------------------------------------------- wrk
PACER = """
-- Half load: requests leave on a fixed schedule (rate/threads per thread, evenly
-- spaced), whatever the answers' latency: an open-loop load within the connection cap.
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } sv_timespec;
           int clock_gettime(int, sv_timespec*); ]]
local ts = ffi.new("sv_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = 1000 / RATE
local next_at = nil
function delay()
  local now = now_ms()
  if next_at == nil then next_at = now end
  local at = next_at
  next_at = next_at + interval
  local wait = at - now
  if wait < 0 then return 0 end
  return math.floor(wait)
end
"""

ROTATE = """
local ids = {}
for line in io.lines("{IDS}") do ids[#ids + 1] = line end
local fmt = "{PATH}"
local i = 0
local step = 1
wrk.headers["Authorization"] = "Bearer {KEY}"
local counter = 0
function setup(thread)
  thread:set("offset", counter)
  counter = counter + 1
end
function init(args)
  i = (offset or 0) * 7919 % #ids
end
function request()
  i = i + 1
  if i > #ids then i = 1 end
  return wrk.format("GET", string.format(fmt, ids[i]))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
"""


def lua_script(
    workdir: Path, name: str, path_fmt: str, ids: list[str], key: str, rate: float | None
) -> Path:
    # One file per id list: each backend's run has its own customers.
    text = "\n".join(ids) + "\n"
    ids_file = workdir / f"ids-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
    if not ids_file.exists():
        ids_file.write_text(text)
    text = ROTATE.replace("{IDS}", str(ids_file))
    text = text.replace("{PATH}", path_fmt).replace("{KEY}", key)
    if rate is not None:
        text = PACER.replace("RATE", f"{rate:.3f}") + text
    path = workdir / f"{name}.lua"
    path.write_text(text)
    return path


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("bench: wrk is not installed; run: sudo apt-get install -y wrk")
    log("installing wrk (apt-get update; apt-get install -y wrk) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"],
        check=True,
        env=env,
    )
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench: wrk still not found after apt-get install")
    return found


@dataclass
class Point:
    backend: str
    server: str
    workers: int
    endpoint: str
    load: str
    connections: int
    target_rps: float | None
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    cpu_ms_per_request: float
    cpu_util: float
    memory: dict[str, float] = field(default_factory=dict)
    loadavg_1m: float = 0.0
    """Machine load when the point ended: other processes share the CPUs."""
    host_cpu_ms_per_request: float = 0.0
    """The whole machine's busy CPU during the point (``host_busy_seconds``: the
    server, its database server, wrk and anything else) ÷ requests."""
    host_cpu_util: float = 0.0
    """CPUs the whole machine kept busy during the point (at most its CPU count)."""
    database_cpu_ms_per_request: float | None = None
    """CPU of the database server's processes ÷ requests (PostgreSQL's, when the
    ``Server`` names it; None otherwise, and for SQLite, whose work is in the
    server's own CPU)."""
    loadgen_cpu_ms_per_request: float = 0.0
    """wrk's CPU ÷ requests."""
    cache_misses: int | None = None
    """Story- and data-key-cache misses during the point, all workers (Story Vault's
    reads of a customer; None elsewhere)."""
    worker_cpu_shares: list[float] = field(default_factory=list)
    """Each worker's share of the workers' CPU during the point (several workers)."""
    attempts: int = 1
    """Runs of the point until its load reached every worker (see ``BALANCE``)."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """Every round of this point, in time order (see ``median_round``): this point is
    the median one."""


def run_wrk(
    wrk: str, server: Server, script: Path, *, duration: float, connections: int
) -> dict[str, Any]:
    cmd = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        server.url,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    return dict(json.loads(line.removeprefix("BENCHJSON ")))


def measure(
    wrk: str,
    server: Server,
    backend: str,
    endpoint: str,
    script: Path,
    *,
    load: str,
    duration: float,
    connections: int,
    target: float | None,
) -> Point:
    probe = server.name == "storyvault" and endpoint != "health"
    for attempt in range(1, BALANCE_ATTEMPTS + 1):
        misses0 = cache_misses(server) if probe else None
        per0, db0 = server.cpu_by_pid(), server.database_cpu()
        host0, gen0 = host_busy_seconds(), children_cpu_seconds()
        res = run_wrk(wrk, server, script, duration=duration, connections=connections)
        host1, gen1 = host_busy_seconds(), children_cpu_seconds()
        per1, db1 = server.cpu_by_pid(), server.database_cpu()
        misses1 = cache_misses(server) if misses0 is not None else None
        shares = server.worker_shares(per0, per1)
        if balanced(shares, server.workers):
            break
        log(
            f"  {endpoint} {load}: the workers' CPU shares were {shares} (wrk's connections"
            f" did not reach every worker); attempt {attempt} of {BALANCE_ATTEMPTS}"
        )
    cpu = cpu_used(per0, per1)
    secs = res["duration_us"] / 1e6
    n = max(1, res["requests"])
    errors = res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
    point = Point(
        backend=backend,
        server=server.name,
        workers=server.workers,
        endpoint=endpoint,
        load=load,
        connections=connections,
        target_rps=None if target is None else round(target, 1),
        rps=round(res["requests"] / secs, 1),
        requests=res["requests"],
        errors=errors,
        p50_ms=res["p50_us"] / 1000,
        p90_ms=res["p90_us"] / 1000,
        p99_ms=res["p99_us"] / 1000,
        mean_ms=round(res["mean_us"] / 1000, 3),
        max_ms=res["max_us"] / 1000,
        cpu_ms_per_request=round(cpu * 1000 / n, 3),
        cpu_util=round(cpu / secs, 2),
        memory=server.memory(),
        loadavg_1m=round(os.getloadavg()[0], 2),
        host_cpu_ms_per_request=round((host1 - host0) * 1000 / n, 3),
        host_cpu_util=round((host1 - host0) / secs, 2),
        database_cpu_ms_per_request=(
            None if server.database is None else round(cpu_used(db0, db1) * 1000 / n, 3)
        ),
        loadgen_cpu_ms_per_request=round((gen1 - gen0) * 1000 / n, 3),
        cache_misses=None if misses1 is None or misses0 is None else misses1 - misses0,
        worker_cpu_shares=shares,
        attempts=attempt,
    )
    log(
        f"  {backend} {server.name} w{server.workers} {endpoint:7s} {load:4s}: "
        f"{point.rps:8.1f} req/s  p50 {point.p50_ms:7.2f} ms  p99 {point.p99_ms:7.2f} ms  "
        f"cpu {point.cpu_ms_per_request:.2f} ms/req  "
        f"host cpu {point.host_cpu_ms_per_request:.2f} ms/req ({point.host_cpu_util} busy)  "
        f"errors {errors}  "
        f"peak rss {point.memory['peak_rss_mib_max']} MiB"
        + ("" if point.cache_misses is None else f"  cache misses {point.cache_misses}")
    )
    return point


BALANCE = 0.5
"""With several workers a point counts only if every worker did at least this part of
its even share of the CPU (a quarter each for two): each worker serves the
connections it accepted, and when one of them accepts all of wrk's connections
the point measures one worker. Such a point is run again, up to
``BALANCE_ATTEMPTS`` times in all (the last run is kept, with its shares)."""
BALANCE_ATTEMPTS = 4


ENDPOINTS = {
    "health": "/health",
    "bare": "/bench/bare/%s",
    "gated": f"/v1/customers/%s/story?purpose={PURPOSE}",
}


CACHE_COUNTERS = (
    "storyvault_story_cache_misses_total",
    "storyvault_key_cache_misses_total",
)


def cache_misses(server: Server) -> int | None:
    """Story-cache plus data-key-cache misses summed over the server's workers, or None
    if not every worker answered. ``/metrics`` is per process: each scrape, on a new
    connection, reaches one worker; an idle worker's counters do not move, so each
    distinct set of counter values is one worker."""
    workers: dict[tuple[str, ...], int] = {}
    for _ in range(12 * server.workers):
        try:
            with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        values = dict(re.findall(r"^(storyvault_\w+_cache_\w+_total) (\S+)$", text, re.M))
        if not all(c in values for c in CACHE_COUNTERS):
            return None
        workers[tuple(values[k] for k in sorted(values))] = sum(
            int(float(values[c])) for c in CACHE_COUNTERS
        )
        if len(workers) == server.workers:
            return sum(workers.values())
    return None


def warm_up(
    wrk: str, server: Server, script: Path, customers: int, args: argparse.Namespace
) -> None:
    """Warm up as a service that has been running: at least ``--warmup`` seconds and,
    for a read with caches (``customers`` > 0), every customer read by every worker,
    so that the row and data-key caches of each worker hold them. Each worker serves
    the connections it accepted, so which worker reads a customer is chance: the
    warm-up reads all customers again (wrk's script starts at the first id on every
    run) until a whole pass adds no cache miss on any worker (at most 12 passes)."""
    res = run_wrk(wrk, server, script, duration=args.warmup, connections=args.connections)
    if not customers:
        return
    rate = max(1.0, res["requests"] / (res["duration_us"] / 1e6))
    before = cache_misses(server)
    for n in range(1, 13):
        secs = customers / rate * 1.25 + 1
        res = run_wrk(wrk, server, script, duration=secs, connections=args.connections)
        rate = max(1.0, res["requests"] / (res["duration_us"] / 1e6))
        after = cache_misses(server)
        if after is None or before is None:
            return  # no cache counters that tell the workers apart (the bare read): one pass
        log(f"  warm-up pass {n}: {after - before} cache misses over {res['requests']} reads")
        if after == before:
            return
        before = after


def _round(p: Point) -> dict[str, Any]:
    return {
        "rps": p.rps,
        "p50_ms": p.p50_ms,
        "p99_ms": p.p99_ms,
        "cpu_ms_per_request": p.cpu_ms_per_request,
        "cpu_util": p.cpu_util,
        "worker_cpu_shares": p.worker_cpu_shares,
        "loadavg_1m": p.loadavg_1m,
        "host_cpu_ms_per_request": p.host_cpu_ms_per_request,
        "host_cpu_util": p.host_cpu_util,
        "database_cpu_ms_per_request": p.database_cpu_ms_per_request,
        "loadgen_cpu_ms_per_request": p.loadgen_cpu_ms_per_request,
    }


def median_round(points: list[Point], key: Callable[[Point], float]) -> Point:
    """The round of a point whose ``key`` is the median (the lower middle of an even
    count), with every round's figures attached (``Point.rounds``, in time order).
    Rounds whose load reached every worker are preferred: a round on one worker
    of two measures something else."""
    even = [p for p in points if balanced(p.worker_cpu_shares, p.workers)] or points
    ordered = sorted(even, key=key)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.rounds = [_round(p) for p in points]
    return chosen


def _tail(p: Point) -> float:
    return p.p99_ms / p.p50_ms if p.p50_ms > 0 else math.inf


def bench_server(
    wrk: str,
    server: Server,
    backend: str,
    endpoints: dict[str, str],
    ids: list[str],
    key: str,
    workdir: Path,
    args: argparse.Namespace,
    profile_dir: Path | None = None,
) -> list[Point]:
    """Each endpoint at full load, then at half load, ``args.rounds`` times: the
    server's endpoints take turns round by round, so a slow spell of the shared
    machine falls on one round of each rather than on one endpoint's whole point;
    each point is its median round (``median_round``: by requests/s at full load,
    by p99/p50 at half load)."""
    tags = {e: f"{backend}-{server.name}-w{server.workers}-{e}" for e in endpoints}
    full_scripts: dict[str, Path] = {}
    for endpoint, path_fmt in endpoints.items():
        full_scripts[endpoint] = lua_script(
            workdir, tags[endpoint] + "-full", path_fmt, ids, key, None
        )
        # The naive reference keeps no cache of its own (every request unwraps its
        # keys again) and reads the file Story Vault's points already brought into
        # the page cache: --warmup seconds are its whole warm-up.
        cached = "%s" in path_fmt and server.name == "storyvault"
        warm_up(wrk, server, full_scripts[endpoint], len(ids) if cached else 0, args)

    def rounds_of(
        load: str, scripts: dict[str, Path], targets: dict[str, float | None]
    ) -> dict[str, list[Point]]:
        runs: dict[str, list[Point]] = {endpoint: [] for endpoint in endpoints}
        for _ in range(args.rounds):
            for endpoint in endpoints:
                runs[endpoint].append(
                    measure(
                        wrk,
                        server,
                        backend,
                        endpoint,
                        scripts[endpoint],
                        load=load,
                        duration=args.duration,
                        connections=args.connections,
                        target=targets[endpoint],
                    )
                )
        return runs

    full_runs = rounds_of("full", full_scripts, dict.fromkeys(endpoints))
    full = {e: median_round(runs, key=lambda p: p.rps) for e, runs in full_runs.items()}
    targets: dict[str, float | None] = {e: full[e].rps / 2 for e in endpoints}
    half_scripts = {
        e: lua_script(workdir, tags[e] + "-half", path_fmt, ids, key, targets[e])
        for e, path_fmt in endpoints.items()
    }
    half_runs = rounds_of("half", half_scripts, targets)
    points: list[Point] = []
    for endpoint in endpoints:
        points += [full[endpoint], median_round(half_runs[endpoint], key=_tail)]
        log(
            f"  {backend} {server.name} w{server.workers} {endpoint}: median of "
            f"{args.rounds} rounds: {full[endpoint].rps:.1f} req/s, "
            f"half-load p99/p50 {_tail(points[-1]):.2f}"
        )
    # After every point: the profile's extra load perturbs no measured point.
    if profile_dir is not None and "gated" in endpoints:
        profile(server, full_scripts["gated"], wrk, args, profile_dir / tags["gated"])
    return points


def profile(server: Server, script: Path, wrk: str, args: argparse.Namespace, out: Path) -> None:
    """py-spy (if installed) on the server's worker while the gated read runs at full load."""
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        log("  (py-spy not installed: no profile; pip install py-spy into .venv)")
        return
    # The worker (not the audit process or the serving process that supervises them).
    workers = [p for p in server.pids() if _comm(p) == WORKER_NAME]
    pid = workers[0] if workers else server.pids()[-1]
    secs = max(5, round(args.duration))
    rec = subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(secs),
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            str(out.with_suffix(".txt")),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_wrk(wrk, server, script, duration=secs + 1, connections=args.connections)
    rec.wait(timeout=60)
    raw = out.with_suffix(".txt")
    if not raw.exists():
        log("  (py-spy wrote no profile)")
        return
    RESULTS.mkdir(exist_ok=True)
    summary = RESULTS / f"profile-{out.name}.md"
    summary.write_text(profile_table(raw.read_text()))
    log(f"  profile: {summary} (raw stacks: {raw})")


# Parts of the gated read: the samples (with callees) of stacks holding all the
# named functions. The reads are steps (generators) run by ``Database.query``, so
# their statements are under it, not under the generator's own frame.
PROFILE_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gated read handler (`Gate.read_story`)", ("Gate.read_story",)),
    (
        "&nbsp;&nbsp;API key, customer + consent, story rows"
        " (`Database.query` in `Gate.read_story`)",
        ("Gate.read_story", "Database.query"),
    ),
    ("&nbsp;&nbsp;&nbsp;&nbsp;story rows from the database (cache misses)", ("story_rows",)),
    ("&nbsp;&nbsp;opening the story (`Vault.open_loaded`)", ("Vault.open_loaded",)),
    ("&nbsp;&nbsp;&nbsp;&nbsp;from its rows (story cache misses)", ("Vault.open_story",)),
    ("&nbsp;&nbsp;&nbsp;&nbsp;from the story cache (`StoryCache.get`)", ("StoryCache.get",)),
    ("&nbsp;&nbsp;audit leaf encoding (`EncodedEntry.of`)", ("EncodedEntry.of",)),
    ("audit group commit (`AuditWriter._run`)", ("AuditWriter._run",)),
    ("&nbsp;&nbsp;its commit (SQLite)", ("DefaultDialect.do_commit",)),
    ("JSON log lines (structlog)", ("BoundLoggerBase._proxy_to_logger",)),
    ("response model and encoding (`to_response`)", ("HTTPRouteHandler.to_response",)),
    (
        "whole HTTP request (uvicorn to response, all middleware)",
        ("RequestResponseCycle.run_asgi",),
    ),
)


def profile_table(raw: str) -> str:
    """py-spy's raw (collapsed) stacks as a table of the read's parts: each part's
    share of all samples, counting a function's callees with it."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames = {frame.split(" (")[0] for frame in stack.split(";")}
        for label, names in PROFILE_PARTS:
            if all(name in frames for name in names):
                inclusive[label] = inclusive.get(label, 0) + int(count)
    lines = [
        f"{total} samples at 200 Hz (`py-spy record --nonblocking`); a part's share counts"
        " what it calls. py-spy cuts some stacks short, so shares are lower bounds.",
        "",
        "| part | share of samples |",
        "|---|---:|",
    ]
    for label, _ in PROFILE_PARTS:
        share = 100 * inclusive.get(label, 0) / max(total, 1)
        lines.append(f"| {label} | {share:.1f} % |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- analysis
def _find(points: list[Point], **kw: Any) -> Point | None:
    for p in points:
        if all(getattr(p, k) == v for k, v in kw.items()):
            return p
    return None


def ratios(points: list[Point]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for backend in sorted({p.backend for p in points}):
        for workers in sorted({p.workers for p in points if p.server == "storyvault"}):
            sv = {"backend": backend, "server": "storyvault", "workers": workers, "load": "full"}
            a = _find(points, endpoint="health", **sv)
            b = _find(points, endpoint="bare", **sv)
            c = _find(points, endpoint="gated", **sv)
            d = _find(points, backend=backend, server="naive", workers=workers, load="full")
            ch = _find(
                points,
                backend=backend,
                server="storyvault",
                workers=workers,
                endpoint="gated",
                load="half",
            )
            if c is None:
                continue
            row: dict[str, Any] = {"backend": backend, "workers": workers}
            if a:
                row["c_over_a"] = round(c.rps / a.rps, 3)
                if (apart := c_over_a_apart(a, c)) is not None:
                    row["c_over_a_apart"] = apart
            if b:
                row["c_over_b"] = round(c.rps / b.rps, 3)
            if d:
                row["c_over_d"] = round(c.rps / d.rps, 2)
            if ch:
                row["half_p99_over_p50"] = round(ch.p99_ms / ch.p50_ms, 2)
            # A ratio with a point whose load reached one worker only (after every
            # attempt) compares one worker with two: it is kept, but not judged.
            parts: dict[str, tuple[Point | None, ...]] = {
                "c_over_a": (c, a),
                "c_over_b": (c, b),
                "c_over_d": (c, d),
                "half_p99_over_p50": (ch,),
            }
            met: dict[str, bool | None] = {}
            for k, goal in GOALS.items():
                if k not in row:
                    continue
                if not all(balanced(p.worker_cpu_shares, p.workers) for p in parts[k] if p):
                    met[k] = None
                else:
                    met[k] = row[k] <= goal if k == "half_p99_over_p50" else row[k] >= goal
            row["met"] = met
            out.append(row)
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "litestar",
        "uvicorn",
        "uvloop",
        "httptools",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "pycasbin",
        "cryptography",
        "msgspec",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    try:
        out["sqlite"] = __import__("sqlite3").sqlite_version
        wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        out["wrk"] = (wrk_v.stdout + wrk_v.stderr).split()[1]
    except (OSError, IndexError):
        pass
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- report
def charts(points: list[Point]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    full = [p for p in points if p.load == "full"]
    labels = [f"{p.backend}\n{_label(p)}" for p in full]
    fig, ax = plt.subplots(figsize=(max(8, len(full) * 0.9), 4.5))
    colors = [_color(p) for p in full]
    ax.bar(range(len(full)), [p.rps for p in full], color=colors)
    ax.set_xticks(range(len(full)), labels, fontsize=7)
    ax.set_ylabel("requests/s (full load)")
    ax.set_title("Throughput at full load (higher is better)")
    for x, p in enumerate(full):
        ax.text(x, p.rps, f"{p.rps:.0f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "bench_throughput.png", dpi=110)
    plt.close(fig)
    names.append("bench_throughput.png")

    fig, axes = plt.subplots(1, 2, figsize=(max(10, len(full) * 1.2), 4.5), sharey=False)
    for ax, load in zip(axes, ("full", "half"), strict=True):
        sel = [p for p in points if p.load == load]
        xs = range(len(sel))
        ax.bar([x - 0.2 for x in xs], [p.p50_ms for p in sel], width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [p.p99_ms for p in sel], width=0.4, label="p99")
        ax.set_xticks(list(xs), [f"{p.backend}\n{_label(p)}" for p in sel], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms (log scale)")
        ax.set_title(f"Latency at {load} load (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "bench_latency.png", dpi=110)
    plt.close(fig)
    names.append("bench_latency.png")
    return names


def _label(p: Point) -> str:
    letter = {"health": "(a)", "bare": "(b)", "gated": "(c)", "naive": "(d)"}[
        p.endpoint if p.server == "storyvault" else "naive"
    ]
    return f"{letter} {p.endpoint} w{p.workers}"


def _color(p: Point) -> str:
    return {"health": "#9aa", "bare": "#69c", "gated": "#2a7", "naive": "#c64"}[
        p.endpoint if p.server == "storyvault" else "naive"
    ]


MARK_BEGIN = "<!-- bench:begin (generated by `make bench`; edits inside are overwritten) -->"
MARK_END = "<!-- bench:end -->"


def cpu_split(p: Point) -> dict[str, float | None]:
    """A point's machine CPU per request (ms) by where it went: the server's processes,
    the database server's (None without one), wrk, and the rest (the kernel's work
    outside those processes and anything else running)."""
    database = p.database_cpu_ms_per_request
    rest = p.host_cpu_ms_per_request - p.cpu_ms_per_request - (database or 0.0)
    return {
        "server": p.cpu_ms_per_request,
        "database": database,
        "wrk": p.loadgen_cpu_ms_per_request,
        "rest": round(rest - p.loadgen_cpu_ms_per_request, 3),
        "machine": p.host_cpu_ms_per_request,
    }


def c_over_a_apart(a: Point, c: Point) -> dict[str, float] | None:
    """(c)/(a) as the product of two factors, from the machine's CPU: requests/s is
    the CPUs kept busy ÷ the machine's CPU per request, so (c)/(a) = (a)'s CPU per
    request ÷ (c)'s (what a gated read costs beside ``/health``) times (c)'s busy CPUs ÷
    (a)'s (how fully each kept the machine busy). None without the figures."""
    if min(a.host_cpu_ms_per_request, c.host_cpu_ms_per_request, a.host_cpu_util) <= 0:
        return None
    cost = a.host_cpu_ms_per_request / c.host_cpu_ms_per_request
    busy = c.host_cpu_util / a.host_cpu_util
    return {"cost": round(cost, 3), "busy": round(busy, 3), "product": round(cost * busy, 3)}


def machine_cpu_lines(points: list[Point], ratio_rows: list[dict[str, Any]]) -> list[str]:
    """The generated table of where the machine's CPU went at full load, and (c)/(a)
    taken apart as ``ratios`` did it (``c_over_a_apart``)."""
    full = [p for p in points if p.load == "full" and p.host_cpu_ms_per_request > 0]
    if not full:
        return []
    lines = [
        "",
        "Where the machine's CPU went at full load, ms per request (/proc/stat for the "
        "machine, less the server's processes, the database server's and wrk's; *rest* "
        "is the kernel's work outside them and anything else running):",
        "",
        "| backend | server | workers | endpoint | server | database server | wrk | rest | "
        "machine | CPUs busy |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in full:
        s = cpu_split(p)
        db = "—" if s["database"] is None else f"{s['database']:.3f}"
        lines.append(
            f"| {p.backend} | {p.server} | {p.workers} | {_label(p).split()[0]} {p.endpoint} "
            f"| {s['server']:.3f} | {db} | {s['wrk']:.3f} | {s['rest']:.3f} | "
            f"{s['machine']:.3f} | {p.host_cpu_util:.2f} |"
        )
    apart = [
        f"| {r['backend']} | {r['workers']} | {parts['cost']} | {parts['busy']} | "
        f"{parts['product']} |"
        for r in ratio_rows
        if (parts := r.get("c_over_a_apart")) is not None
    ]
    if apart:
        lines += [
            "",
            "(c)/(a) taken apart: requests/s = CPUs busy ÷ machine CPU per request, so "
            "(c)/(a) = *cost* ((a)'s machine CPU per request ÷ (c)'s) times *busy* ((c)'s "
            "CPUs busy ÷ (a)'s). With the machine's CPUs all busy for both, only *cost* "
            "can move the ratio:",
            "",
            "| backend | workers | cost | busy | (c)/(a) |",
            "|---|---|---:|---:|---:|",
            *apart,
        ]
    return lines


def write_docs(result: dict[str, Any], points: list[Point], pictures: list[str]) -> Path:
    cfg = result["config"]
    m = result["machine"]
    lines = [
        MARK_BEGIN,
        "",
        f"Run of {m['when']} on **{m['cpu_model']}**, {m['cpus']} CPUs, "
        f"{m['mem_gib']} GiB RAM, {m['platform']}; load generator and servers on the same "
        "machine (loopback).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        f"Data set: {cfg['customers']} customers x (5 profile fields + 20 chapters; 12 "
        f"categories), consent granted for `{PURPOSE}`; team `{TEAM}` may read all 12 "
        "categories for it (phone `partial`, birthday `year_only`), so the gated read "
        "decrypts and discloses the whole story (~25 values) and appends a durable audit "
        "entry. Before the servers start the seeded database is as a running service's "
        "would be: on PostgreSQL `VACUUM ANALYZE` and a `CHECKPOINT` after seeding "
        "(SQLite's seeding copies its log into the file).",
        "",
        f"Load: `wrk -t1 -c{cfg['connections']} -d{cfg['duration']}s`, "
        f"{cfg.get('rounds', 1)} rounds per point: a server's endpoints take turns round "
        "by round (every endpoint at full load, again and again, then every one at half "
        "load), and each point is its median round (by req/s at full load, by p99/p50 at "
        "half load; every round is in the JSON, `rounds`), so that a slow spell of the "
        "shared machine falls on one round of each endpoint instead of on one endpoint. "
        f"Before the rounds, a warm-up of at least {cfg['warmup']} s that, for Story "
        "Vault's reads, reads all "
        "customers again until a whole pass adds no story- or data-key-cache miss on any "
        "worker (as in a service that has been running: its caches and the page cache "
        "warm; the naive reference caches nothing); wrk rotates over all customer ids. "
        "*Cache misses* are those counted during the point itself (`/metrics`, all "
        "workers; — for a read without caches, or where idle counters left the workers "
        "indistinguishable). "
        "*Full* = closed loop "
        "(as fast as answered); *half* = open loop at 50 % of that point's full-load rate "
        "(the Lua script paces requests on a fixed schedule; see `PACER` in bench/run.py). "
        "CPU/req = utime+stime of the server processes (/proc) ÷ requests; peak RSS = "
        "VmHWM (largest process). Each point's 1-minute load average is in the JSON "
        "(`loadavg_1m`): on a shared machine, other processes compete for the CPUs. "
        "With several workers, each serves the connections it accepted: a point in which "
        f"a worker did less than {BALANCE:g} of its even share of the CPU (wrk's "
        f"connections did not reach it) is run again, up to {BALANCE_ATTEMPTS} times; "
        "each point's shares are in the JSON (`worker_cpu_shares`, `attempts`).",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in cfg["commands"]),
        "",
        "| backend | server | workers | endpoint | load | req/s | p50 ms | p99 ms | "
        "CPU ms/req | CPU util | peak RSS MiB | cache misses | errors |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        letter = _label(p).split()[0]
        lines.append(
            f"| {p.backend} | {p.server} | {p.workers} | {letter} {p.endpoint} | {p.load} | "
            f"{p.rps:.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | {p.cpu_ms_per_request:.2f} | "
            f"{p.cpu_util:.2f} | {p.memory['peak_rss_mib_max']:.0f} | "
            f"{'—' if p.cache_misses is None else p.cache_misses} | {p.errors} |"
        )
    lines += [
        "",
        "Ratios (requests/s at full load, same backend and worker count; the naive "
        "reference runs with as many workers) and goals:",
        "",
        "| backend | workers | (c)/(a) ≥ 0.35 | (c)/(b) ≥ 0.6 | (c)/(d) ≥ 10 | "
        "half-load p99/p50 of (c) ≤ 3 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["ratios"]:

        def cell(k: str, row: dict[str, Any] = r) -> str:
            if k not in row:
                return "—"
            met = row["met"][k]
            if met is None:
                return f"{row[k]} **not judged** (a point's load reached one worker only)"
            return f"{row[k]} {'met' if met else '**not met**'}"

        lines.append(
            f"| {r['backend']} | {r['workers']} | {cell('c_over_a')} | {cell('c_over_b')} | "
            f"{cell('c_over_d')} | {cell('half_p99_over_p50')} |"
        )
    lines += machine_cpu_lines(points, result["ratios"])
    lines += [""] + [f"![{n}]({n})" for n in pictures] + ["", MARK_END]
    block = "\n".join(lines)
    path = DOCS / "benchmarks.md"
    if path.exists() and MARK_BEGIN in path.read_text():
        old = path.read_text()
        head, rest = old.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1] if MARK_END in rest else ""
        path.write_text(head + block + tail)
    else:
        path.write_text(
            "# Benchmarks\n\n`make bench` (bench/run.py) writes the section between the "
            "markers and bench/results/gated_read.json.\n\n" + block + "\n"
        )
    return path


# --------------------------------------------------------------------------- main
def start_backend(backend: str, data_dir: Path) -> tuple[str, Any]:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{data_dir / 'storyvault.db'}", None
    from tests.pgserver import start_server as start_pg

    pg = start_pg(durable=True)
    return pg.create_database("storyvault"), pg


@dataclass
class Seeded:
    """A database seeded for a benchmark (``seeded_database``)."""

    url: str
    pg: Any
    """The PostgreSQL server it runs on (``tests.pgserver.PgServer``), None on SQLite."""
    ids: list[str]
    """Its customers' ids, in the benchmark's fixed shuffled order."""
    key: str
    """The API key of the reading team."""


@contextlib.contextmanager
def seeded_database(backend: str, data_dir: Path, customers: int) -> Iterator[Seeded]:
    """A database of ``customers`` seeded as ``make bench`` seeds it and settled
    (``settle``), its ids shuffled in the benchmark's fixed order; the PostgreSQL
    server started for it is stopped on the way out."""
    url, pg = start_backend(backend, data_dir)
    try:
        ids, key = asyncio.run(seed(data_dir, url, customers))
        settle(pg, url)
        random.Random(5).shuffle(ids)
        yield Seeded(url, pg, ids, key)
    finally:
        if pg is not None:
            from tests.pgserver import stop_server

            stop_server(pg)


def machine_info() -> dict[str, Any]:
    info = machine()
    info["cpu_model"] = cpu_model()
    try:
        kb = int(re.findall(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[0])
        info["mem_gib"] = round(kb / 1024 / 1024, 1)
    except (OSError, IndexError):
        info["mem_gib"] = "?"
    return info


def settle(pg: Any, url: str) -> None:
    """Bring the freshly seeded database to the state of one a service has been
    running on, before anything is measured. On PostgreSQL: ``VACUUM ANALYZE`` (what
    autovacuum does to a running service's tables; ``bench.scale`` does the same),
    then a ``CHECKPOINT``. SQLite's seeding copies its log into the database file
    when its last connection closes, and SQLite keeps no statistics unless told to:
    nothing to do there (``pg`` is None).

    Without the checkpoint, PostgreSQL's first timed checkpoint wrote the seed's dirty
    pages during the measurements, beside the audit commits' WAL flushes: measured
    at half load on the gated read (1 worker, 900 req/s, three 8-s rounds each), the
    share of audit commits under 1 ms was 0.71 / 0.33 / 0.17 without it and 0.67 /
    0.65 / 0.54 with it. Without the vacuum and statistics, the first minutes of
    reads set the seed's hint bits, autovacuum worked through the new tables beside
    them, and statements were planned for tables of unknown size: measured with 1
    worker (2,000 customers, two runs of three 5-s rounds each), PostgreSQL spent
    0.40-0.59 ms of CPU per gated read without them and 0.17-0.19 ms with them."""
    if pg is not None:
        pg.psql("VACUUM ANALYZE", make_url(url).database or "postgres")
        pg.psql("CHECKPOINT")
        log("postgresql: vacuum, statistics and a checkpoint after seeding")


def run_backend(wrk: str, backend: str, args: argparse.Namespace, root: Path) -> list[Point]:
    data_dir = root / backend
    data_dir.mkdir(parents=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    url, pg = start_backend(backend, data_dir)
    database = None if pg is None else pg.proc.pid
    points: list[Point] = []
    try:
        log(f"{backend}: seeding {args.customers} customers in {data_dir}")
        ids, key = asyncio.run(seed(data_dir, url, args.customers))
        settle(pg, url)
        random.Random(5).shuffle(ids)
        storyvault = [str(BIN / "storyvault"), "serve"]
        for workers in args.workers:
            port = free_port()
            env = storyvault_env(data_dir, url, port, workers, args.customers)
            log(f"{backend}: storyvault serve, {workers} worker(s), port {port}")
            server = start_server("storyvault", storyvault, env, port, workers, logs, database)
            try:
                profile_dir = root if args.profile and workers == 1 else None
                points += bench_server(
                    wrk, server, backend, ENDPOINTS, ids, key, root, args, profile_dir
                )
            finally:
                server.stop()
            if not args.skip_naive:
                port = free_port()
                env = {
                    **{k: v for k, v in os.environ.items() if not k.startswith("STORYVAULT_")},
                    "NAIVE_DATA_DIR": str(data_dir),
                    "NAIVE_DATABASE_URL": url,
                    "NAIVE_KEYSTORE_URL": base_settings(data_dir, url).effective_keystore_url,
                }
                cmd = [
                    str(BIN / "uvicorn"),
                    "bench.naive_app:app_factory",
                    "--factory",
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--workers",
                    str(workers),
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ]
                log(f"{backend}: naive reference, {workers} worker(s), port {port}")
                server = start_server("naive", cmd, env, port, workers, logs, database)
                try:
                    points += bench_server(
                        wrk, server, backend, {"naive": ENDPOINTS["gated"]}, ids, key, root, args
                    )
                finally:
                    server.stop()
    finally:
        if pg is not None:
            from tests.pgserver import stop_server as stop_pg

            stop_pg(pg)
    return points


def soak(wrk: str, args: argparse.Namespace, root: Path) -> None:
    data_dir = root / "sqlite"
    data_dir.mkdir(parents=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    url, _ = start_backend("sqlite", data_dir)
    log(f"soak: seeding {args.customers} customers")
    ids, key = asyncio.run(seed(data_dir, url, args.customers))
    port = free_port()
    env = storyvault_env(data_dir, url, port, 1, args.customers)
    server = start_server("storyvault", [str(BIN / "storyvault"), "serve"], env, port, 1, logs)
    samples: list[dict[str, Any]] = []
    try:
        full = lua_script(root, "soak-full", ENDPOINTS["gated"], ids, key, None)
        warm_up(wrk, server, full, len(ids), args)
        p = measure(
            wrk,
            server,
            "sqlite",
            "gated",
            full,
            load="full",
            duration=args.duration,
            connections=args.connections,
            target=None,
        )
        half = lua_script(root, "soak-half", ENDPOINTS["gated"], ids, key, p.rps / 2)
        # The reference RSS is taken after warm-up and one full-load point.
        rss0 = server.memory()["rss_mib_sum"]
        chunk = 60.0
        rounds = max(1, math.ceil(args.soak / chunk))
        for n in range(rounds):
            q = measure(
                wrk,
                server,
                "sqlite",
                "gated",
                half,
                load="half",
                duration=min(chunk, args.soak),
                connections=args.connections,
                target=p.rps / 2,
            )
            samples.append({"t_s": (n + 1) * chunk, **q.__dict__})
        rss1 = server.memory()["rss_mib_sum"]
        errors = sum(s["errors"] for s in samples)
        growth = (rss1 - rss0) / rss0
        result = {
            "config": {
                "customers": args.customers,
                "seconds": args.soak,
                "connections": args.connections,
                "target_rps": round(p.rps / 2, 1),
            },
            "rss_start_mib": rss0,
            "rss_end_mib": rss1,
            "rss_growth": round(growth, 4),
            "errors": errors,
            "goal_met": growth < 0.10 and errors == 0,
            "samples": samples,
        }
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / "soak.json"
        out.write_text(json.dumps({"machine": machine_info(), **result}, indent=2))
        log(
            f"soak: RSS {rss0} -> {rss1} MiB ({growth:+.1%}), errors {errors}: "
            f"{'met' if result['goal_met'] else 'NOT met'}; written to {out}"
        )
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="make bench: the gated read benchmark")
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round of a point")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per point (the median one is kept)"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each point")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--backends", default="sqlite")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy on the gated read (w1)")
    parser.add_argument(
        "--soak", type=float, default=0.0, help="soak seconds instead of the matrix"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument("--out", default="gated_read")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    cli_args = argv if argv is not None else sys.argv[1:]
    wrk = ensure_wrk()
    root = Path(tempfile.mkdtemp(prefix="sv-bench-"))
    if os.geteuid() == 0:
        root.chmod(0o755)  # the postgres user (PostgreSQL variant) must traverse it
    log(f"work dir {root}")
    started = time.monotonic()
    try:
        if args.soak:
            soak(wrk, args, root)
            return 0
        points: list[Point] = []
        for backend in args.backends.split(","):
            points += run_backend(wrk, backend, args, root)
        result: dict[str, Any] = {
            "machine": machine_info(),
            "versions": versions(),
            "config": {
                "customers": args.customers,
                "chapters_per_customer": sum(n for _, _, n in CHAPTER_PLAN),
                "profile_fields": 5,
                "purpose": PURPOSE,
                "duration": args.duration,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "connections": args.connections,
                "workers": args.workers,
                "backends": args.backends.split(","),
                "commands": [
                    "make bench",
                    f"python -m bench.run {' '.join(cli_args)}".strip(),
                    f"wrk -t1 -c{args.connections} -d{args.duration:g}s --timeout 10s "
                    "-s <rotate.lua> URL",
                    "STORYVAULT_WORKERS=N STORYVAULT_BENCH_ROUTES=true STORYVAULT_DEMO_DATA=false "
                    "storyvault serve",
                    "uvicorn bench.naive_app:app_factory --factory --workers N",
                ],
            },
            "points": [p.__dict__ for p in points],
        }
        result["ratios"] = ratios(points)
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"{args.out}.json"
        out.write_text(json.dumps(result, indent=2, default=str))
        pictures = charts(points)
        doc = write_docs(result, points, pictures)
        for r in result["ratios"]:
            log(f"ratios {r}")
        log(f"written {out}, {doc}, {', '.join(pictures)} in {result['elapsed_s']} s")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
