"""Insights latency for stories of 10, 1,000 and 10,000 chapters.

    .venv/bin/python -m bench.insights [--sizes 10,1000,10000] [--backends sqlite,postgresql]
                                       [--no-http]

For each size, one customer is seeded through direct vault calls in one transaction
(a mix over two years: 30 % interactions, 20 % tickets, 25 % sentiment notes, 25 %
purchases, a tenth of them in the last 30 days) with the analytics.profiling consent.
Then, sequentially (one request at a time), it times:

- ``team``: ``StoryVault.customer_insights`` for team product / analytics.profiling
  (all four signals): policy + consent checks, decrypting the four input categories,
  computing, and the durable audit append (group commit), in process;
- ``me``: ``StoryVault.my_insights`` (the customer's own view), in process;
- ``load``: ``load_inputs`` alone, what the service reads: the input categories'
  chapters, decrypting only the bodies a signal looks at;
- ``decrypt_all``: ``Vault.read_story`` of the four input categories alone (every
  body decrypted), for comparison;
- ``compute``: ``compute_signals`` over the loaded chapters alone;
- ``http``: ``GET /v1/customers/{id}/insights`` through the Litestar app in process
  (ASGI, no socket), unless ``--no-http``.

Results: bench/results/insights.json (p50 / p95 / mean in milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import vault_on, write_result
from governance.demo import DEMO_TEAMS
from governance.identity import CustomerPrincipal
from governance.insights import ALL_INPUTS, SIGNALS, compute_signals
from governance.service import StoryVault
from governance.teams import Principal

KINDS = ["chat", "call", "email", "visit"]
TOPICS = ["Zip broke", "Refund late", "Wrong size", "Parcel damaged", "Headlamp dead"]


def _chapters(
    n: int, rng: random.Random, now: datetime
) -> list[tuple[str, str, datetime, dict[str, Any]]]:
    out: list[tuple[str, str, datetime, dict[str, Any]]] = []
    for i in range(n):
        recent = i % 10 == 0
        at = now - timedelta(days=rng.uniform(0, 30) if recent else rng.uniform(30, 730))
        r = rng.random()
        if r < 0.30:
            topic = rng.choice(TOPICS)
            out.append(
                (
                    "engagement.interaction",
                    rng.choice(KINDS),
                    at,
                    {"summary": f"about {topic}", "topic": topic},
                )
            )
        elif r < 0.50:
            status = rng.choice(["open", "resolved", "resolved"])
            out.append(
                ("support.ticket", "ticket", at, {"subject": rng.choice(TOPICS), "status": status})
            )
        elif r < 0.75:
            out.append(
                (
                    "insight.sentiment",
                    "sentiment",
                    at,
                    {"score": round(rng.uniform(-1, 1), 2), "note": "tone"},
                )
            )
        else:
            out.append(
                ("commerce.purchase", "purchase", at, {"product": "Rain jacket", "amount": 189.0})
            )
    return out


async def _seed(vault: StoryVault, n: int) -> str:
    rng = random.Random(n)
    now = datetime.now(UTC)
    async with vault.db.write_session() as session:
        cid = await vault.vault.create_customer(
            session, external_ref=None, profile={"name": f"Bench {n}"}
        )
        for category, kind, at, body in _chapters(n, rng, now):
            await vault.vault.add_chapter(
                session,
                cid,
                category=category,
                kind=kind,
                occurred_at=at,
                body=vault.vault.validate_chapter(category, kind, body),
                author_team="support",
            )
        await session.commit()
    await vault.set_my_consent(CustomerPrincipal(cid, "bench"), "analytics.profiling", granted=True)
    return cid


async def _time(fn: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    await fn()  # warm (data-key cache, compiled tables, statement cache)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {
        "p50_ms": round(samples[len(samples) // 2], 3),
        "p95_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
        "n": repeat,
    }


async def _run(backend: str, sizes: list[int], http: bool) -> dict[str, Any]:
    async with vault_on(backend) as (vault, _):
        async with vault.db.write_session() as session:
            for team, description in DEMO_TEAMS.items():
                await vault.teams.create_team(session, team, roles=[], description=description)
            issued = await vault.teams.issue_key(session, "product", label="bench")
            await session.commit()
        await vault.refresh_policy_catalog()
        await vault.seed_demo_policy()
        product = Principal(team="product", key_id=issued.id, roles=frozenset())
        client = None
        if http:
            from litestar.testing import AsyncTestClient

            from api.app import create_app

            client = AsyncTestClient(app=create_app(vault.settings, migrate=False))
            await client.__aenter__()
        rows = []
        try:
            for n in sizes:
                t = time.perf_counter()
                cid = await _seed(vault, n)
                seed_s = time.perf_counter() - t
                repeat = 50 if n <= 1000 else 15
                me = CustomerPrincipal(cid, "bench")

                async def team_read(cid: str = cid) -> Any:
                    return await vault.customer_insights(product, cid, "analytics.profiling")

                async def mine(me: CustomerPrincipal = me) -> Any:
                    return await vault.my_insights(me)

                async def decrypt(cid: str = cid) -> Any:
                    async with vault.db.session() as session:
                        return await vault.vault.read_story(session, cid, ALL_INPUTS)

                now = datetime.now(UTC)

                async def load(cid: str = cid, now: datetime = now) -> Any:
                    async with vault.db.session() as session:
                        return await vault.load_inputs(session, [cid], ALL_INPUTS, now)

                chapters = (await load())[cid]
                decrypted = sum(1 for ch in chapters if ch.body)

                async def compute(chapters: Any = chapters, now: datetime = now) -> Any:
                    return compute_signals(chapters, now, list(SIGNALS))

                out = await team_read()
                assert len(out["signals"]) == 4, out["withheld"]
                row: dict[str, Any] = {
                    "backend": backend,
                    "chapters": n,
                    "input_chapters": len(chapters),
                    "bodies_decrypted": decrypted,
                    "seed_s": round(seed_s, 2),
                    "team": await _time(team_read, repeat),
                    "me": await _time(mine, repeat),
                    "load": await _time(load, repeat),
                    "decrypt_all": await _time(decrypt, repeat),
                    "compute": await _time(compute, repeat),
                }
                if client is not None:
                    headers = {"Authorization": f"Bearer {issued.secret}"}

                    async def over_http(cid: str = cid, headers: dict[str, str] = headers) -> Any:
                        resp = await client.get(
                            f"/v1/customers/{cid}/insights",
                            params={"purpose": "analytics.profiling"},
                            headers=headers,
                        )
                        assert resp.status_code == 200, resp.text
                        return resp

                    row["http"] = await _time(over_http, repeat)
                print(row, flush=True)
                rows.append(row)
        finally:
            if client is not None:
                await client.__aexit__(None, None, None)
    return {"backend": backend, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = [asyncio.run(_run(b, sizes, not args.no_http)) for b in args.backends.split(",")]
    print("written to", write_result("insights", {"sizes": sizes, "runs": runs}))


if __name__ == "__main__":
    main()
