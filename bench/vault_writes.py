"""Customer-create and chapter-append throughput through the vault, SQLite and PostgreSQL.

    .venv/bin/python -m bench.vault_writes [--customers 2000] [--chapters 5000] [--concurrency 8]

Each write runs in its own transaction exactly as the HTTP handlers do
(validate, seal every value, commit), with ``concurrency`` writers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import vault_on, write_result
from governance.demo import demo_stories


async def _run(backend: str, customers: int, chapters: int, concurrency: int) -> dict[str, Any]:
    stories = demo_stories(50)
    async with vault_on(backend) as (vault, _):
        ids: list[str] = []
        queue = list(range(customers))

        async def create_worker() -> None:
            while queue:
                i = queue.pop()
                profile = dict(stories[i % 50]["profile"])
                profile["email"] = f"bench{i}@example.com"
                async with vault.db.write_session() as session:
                    ids.append(
                        await vault.vault.create_customer(
                            session, external_ref=None, profile=profile
                        )
                    )
                    await session.commit()

        t0 = time.perf_counter()
        await asyncio.gather(*[create_worker() for _ in range(concurrency)])
        create_s = time.perf_counter() - t0

        body = vault.vault.validate_chapter(
            "support.ticket",
            "ticket",
            {
                "subject": "Zip on the jacket broke",
                "status": "open",
                "notes": "Customer called twice; replacement offered.",
            },
        )
        jobs = list(range(chapters))

        async def append_worker() -> None:
            while jobs:
                i = jobs.pop()
                async with vault.db.write_session() as session:
                    await vault.vault.add_chapter(
                        session,
                        ids[i % len(ids)],
                        category="support.ticket",
                        kind="ticket",
                        occurred_at=datetime.now(UTC),
                        body=body,
                        author_team="support",
                    )
                    await session.commit()

        t0 = time.perf_counter()
        await asyncio.gather(*[append_worker() for _ in range(concurrency)])
        append_s = time.perf_counter() - t0
    return {
        "backend": backend,
        "customers": customers,
        "customer_creates_per_s": round(customers / create_s, 1),
        "chapters": chapters,
        "chapter_appends_per_s": round(chapters / append_s, 1),
        "concurrency": concurrency,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--chapters", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = [
        asyncio.run(_run(b, args.customers, args.chapters, args.concurrency))
        for b in args.backends.split(",")
    ]
    for row in rows:
        print(row)
    print("written to", write_result("vault_writes", {"runs": rows}))


if __name__ == "__main__":
    main()
