"""Consent events per second, each with its audit entry and a signed receipt (JWS EdDSA).

    .venv/bin/python -m bench.consent_events [--customers 200] [--events 3000]
                                             [--concurrency 16] [--backends sqlite,postgresql]

Each event runs exactly as ``PUT /v1/me/consents/{purpose}`` does without HTTP
(``StoryVault.set_my_consent``): one transaction that takes the ledger's sequencing
lock, appends the hash-chained event and its projection row, appends the audit entry
(audit log lock), commits, then signs the receipt. ``concurrency`` customers toggle
at once. Afterwards the chain is verified and the event count checked. Receipt
signing alone is timed too, so its share of the cost is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from sqlalchemy import func, select

from bench.common import vault_on, write_result
from consent import ConsentEvent, verify_chain
from governance.identity import CustomerPrincipal

PURPOSES = ["marketing.email", "personalization", "analytics.profiling", "sharing.partners"]


async def _run(backend: str, customers: int, events: int, concurrency: int) -> dict[str, Any]:
    async with vault_on(backend) as (vault, _):
        ids: list[str] = []
        for i in range(customers):
            async with vault.db.write_session() as session:
                ids.append(
                    await vault.vault.create_customer(
                        session, external_ref=None, profile={"name": f"Bench Person {i}"}
                    )
                )
                await session.commit()
        rng = random.Random(5)
        plan = [(rng.choice(ids), rng.choice(PURPOSES), rng.random() < 0.6) for _ in range(events)]
        latencies: list[float] = []
        receipts: list[str] = []

        async def worker() -> None:
            while plan:
                cid, purpose, granted = plan.pop()
                t = time.perf_counter()
                outcome = await vault.set_my_consent(
                    CustomerPrincipal(customer_id=cid, session_id="bench"),
                    purpose,
                    granted=granted,
                )
                latencies.append(time.perf_counter() - t)
                receipts.append(outcome.receipt)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0

        async with vault.db.session() as session:
            stored = (
                await session.execute(select(func.count()).select_from(ConsentEvent))
            ).scalar()
            chain_ok = await verify_chain(session) is None
            sample = (await session.execute(select(ConsentEvent).limit(1))).scalar_one()
        terms = vault.ledger.terms(sample.purpose)
        n_sign = 2000
        t = time.perf_counter()
        for i in range(n_sign):
            vault.receipts.issue(sample, terms, audit_leaf_index=i)
        sign_us = (time.perf_counter() - t) / n_sign * 1e6
        latencies.sort()
    assert stored == events, (stored, events)
    assert chain_ok
    return {
        "backend": backend,
        "events": events,
        "customers": customers,
        "concurrency": concurrency,
        "events_per_s": round(events / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "receipt_sign_us": round(sign_us, 1),
        "chain_verified": chain_ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = [
        asyncio.run(_run(b, args.customers, args.events, args.concurrency))
        for b in args.backends.split(",")
    ]
    for row in rows:
        print(row)
    print("written to", write_result("consent_events", {"runs": rows}))


if __name__ == "__main__":
    main()
