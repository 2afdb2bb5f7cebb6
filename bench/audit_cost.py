"""The cost of the evidence: gated reads per second with durable audit entries (group
commit) against the same reads with audit writes stubbed out, in one run.

    .venv/bin/python -m bench.audit_cost [--backends sqlite,postgresql] [--reads 2000]

In-process through the service (StoryVault.read_story: policy table, consent, decrypt,
masks, audit), 16 concurrent readers over 200 customers with demo stories.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time
from typing import Any

from audit import AuditEntry
from bench.common import vault_on, write_result
from governance.demo import DEMO_TEAMS, demo_stories
from governance.logs import configure_logging
from governance.teams import Principal


class _Stub:
    def __init__(self) -> None:
        self.n = 0

    async def append(self, entry: AuditEntry) -> int:
        self.n += 1
        return self.n


async def _run(backend: str, reads: int) -> dict[str, Any]:
    async with vault_on(backend, dek_cache_size=100_000) as (vault, _):
        async with vault.db.write_session() as session:
            for team in DEMO_TEAMS:
                await vault.teams.create_team(session, team, roles=[])
            await session.commit()
        await vault.refresh_policy_catalog()
        await vault.seed_demo_policy()
        ids = []
        stories = demo_stories(50)
        for i in range(200):
            st = stories[i % 50]
            async with vault.db.write_session() as session:
                cid = await vault.vault.create_customer(
                    session, external_ref=None, profile={**st["profile"], "email": f"a{i}@x.org"}
                )
                for ch in st["chapters"]:
                    body = vault.vault.validate_chapter(ch["category"], ch["kind"], ch["body"])
                    await vault.vault.add_chapter(
                        session,
                        cid,
                        category=ch["category"],
                        kind=ch["kind"],
                        occurred_at=ch["occurred_at"],
                        body=body,
                        author_team="support",
                    )
                await session.commit()
            ids.append(cid)
        principal = Principal(team="support", key_id="bench", roles=frozenset())

        async def drive() -> float:
            pick = itertools.cycle(ids)
            left = reads

            async def reader() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await vault.read_story(principal, next(pick), "service.support")

            t0 = time.perf_counter()
            await asyncio.gather(*[reader() for _ in range(16)])
            return reads / (time.perf_counter() - t0)

        await drive()  # warm caches
        real = vault.gate.audit
        results = {"audited": [], "stubbed": []}
        for _ in range(2):
            vault.gate.audit = real
            results["audited"].append(await drive())
            vault.gate.audit = _Stub()
            results["stubbed"].append(await drive())
        vault.gate.audit = real
    audited = max(results["audited"])
    stubbed = max(results["stubbed"])
    row = {
        "backend": backend,
        "reads": reads,
        "audited_reads_per_s": round(audited, 1),
        "stubbed_reads_per_s": round(stubbed, 1),
        "audited_over_stubbed": round(audited / stubbed, 3),
    }
    print(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--reads", type=int, default=2000)
    args = parser.parse_args()
    configure_logging(level=logging.WARNING)  # one log line per read would dominate
    rows = [asyncio.run(_run(b, args.reads)) for b in args.backends.split(",")]
    print("written to", write_result("audit_cost", {"runs": rows}))


if __name__ == "__main__":
    main()
