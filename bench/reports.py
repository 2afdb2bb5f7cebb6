"""Compliance reports at scale: each report's time and peak Python memory over a large
audit log and consent ledger on PostgreSQL (or SQLite).

    .venv/bin/python -m bench.reports [--audit 1000000] [--consent 100000]
                                      [--requests 20000] [--backend postgresql]

Fill: ``--audit`` synthetic audit entries (80 % disclosures, 15 % denials with varied
reasons, 5 % writes; 5 teams x 7 purposes; timestamps spread over the last 90 days)
appended through ``TransparencyLog.append`` in batches of 5000 (the real Merkle tree,
one signed head per batch); ``--consent`` consent events bulk-inserted with a valid
hash chain; ``--requests`` rights requests. Then every report is generated twice per
format: once timed, once under tracemalloc for the peak Python heap (the database
server's memory is not counted). ``integrity`` runs with ``verify=false`` (tree head,
consistency proof, key status) and, separately, with the full ``verify_log`` and
ledger chain recomputation.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert

from audit import AuditEntry, EncodedEntry, EntryKind, Withheld
from bench.common import vault_on, write_result
from consent import GENESIS_HASH, ConsentEvent, chain_hash
from governance.models import RightsRequestRow
from governance.reports import Reports
from governance.service import StoryVault

TEAMS = ("sales", "marketing", "support", "product", "compliance")
PURPOSES = (
    "service.support",
    "sales.outreach",
    "marketing.email",
    "personalization",
    "analytics.profiling",
    "sharing.partners",
    "legal.retention",
)
CATEGORIES = (
    "identity.name",
    "contact.email",
    "contact.phone",
    "preference",
    "commerce.purchase",
    "support.ticket",
)
REASONS = ("no_consent", "consent_withdrawn", "objected", "denied_by_policy", "no_policy")
WINDOW = timedelta(days=90)


def _audit_entry(i: int, rng: random.Random, now: datetime) -> AuditEntry:
    roll = rng.random()
    team = TEAMS[i % len(TEAMS)]
    purpose = PURPOSES[(i // 5) % len(PURPOSES)]
    when = now - WINDOW + WINDOW * (i / 1_000_000 % 1.0)
    if roll < 0.80:
        kind, granted = EntryKind.DISCLOSURE, CATEGORIES[: 1 + i % len(CATEGORIES)]
        withheld = tuple(
            Withheld(category=c, reason="denied_by_policy")
            for c in CATEGORIES[1 + i % len(CATEGORIES) :]
        )
    elif roll < 0.95:
        kind, granted = EntryKind.DENIAL, ()
        reason = REASONS[i % len(REASONS)]
        withheld = tuple(Withheld(category=c, reason=reason) for c in CATEGORIES[:3])
    else:
        kind, granted, withheld = EntryKind.WRITE, ("support.ticket",), ()
    return AuditEntry(
        kind=kind,
        actor=team,
        actor_key_id="key_0123456789abcdef",
        subject=f"sp_{i % 50_000:032x}",
        purpose=purpose,
        policy_version=7,
        categories=tuple(granted),
        withheld=withheld,
        request_id=f"{i:032x}",
        detail={"operation": "story.read"},
        timestamp=when,
    )


async def fill_audit(vault: StoryVault, target: int) -> dict[str, Any]:
    rng = random.Random(7)
    now = datetime.now(UTC)
    size = await vault.audit_log.size()
    t0 = time.perf_counter()
    while size < target:
        n = min(5000, target - size)
        batch = [EncodedEntry.of(_audit_entry(size + j, rng, now)) for j in range(n)]
        size = (await vault.audit_log.append(batch)).tree_head.tree_size
        if size % 100_000 < 5000:
            print(f"  audit entries: {size}", flush=True)
    seconds = time.perf_counter() - t0
    return {"entries": size, "fill_s": round(seconds, 1), "per_s": round(size / seconds, 1)}


async def fill_consent(vault: StoryVault, target: int) -> dict[str, Any]:
    """Synthetic events with a valid hash chain, inserted in bulk (the ledger's own
    append path is per event, under a lock: far too slow for 100k here)."""
    rng = random.Random(11)
    now = datetime.now(UTC)
    terms = {t.name: t for t in vault.purpose_terms()}
    kinds = [
        ("marketing.email", "grant", "dpv:ConsentGiven"),
        ("marketing.email", "withdraw", "dpv:ConsentWithdrawn"),
        ("personalization", "grant", "dpv:ConsentGiven"),
        ("analytics.profiling", "grant", "dpv:RenewedConsentGiven"),
        ("sharing.partners", "gpc_opt_out", "dpv:ConsentRefused"),
        ("sales.outreach", "objection", "eu-gdpr:A21"),
        ("marketing.email", "expire", "dpv:ConsentExpired"),
    ]
    table = ConsentEvent.__table__  # type: ignore[attr-defined]
    prev = GENESIS_HASH
    t0 = time.perf_counter()
    index = 0
    while index < target:
        rows = []
        for _ in range(min(5000, target - index)):
            purpose, event_type, status = kinds[rng.randrange(len(kinds))]
            t = terms[purpose]
            when = now - WINDOW + WINDOW * (index / target)
            event = ConsentEvent(
                ledger_index=index,
                event_id=uuid.UUID(int=rng.getrandbits(128)),
                subject=f"sp_{rng.randrange(20_000):032x}",
                purpose=purpose,
                legal_basis=t.legal_basis.value,
                event_type=event_type,
                status=status,
                notice_id=t.notice_id,
                notice_version=t.notice_version if index % 3 else "0",
                notice_hash=t.notice_hash,
                channel="gpc" if event_type == "gpc_opt_out" else "portal",
                actor="customer",
                recorded_at=when,
                captured_at=when,
                prev_hash=prev,
                hash="",
            )
            event.hash = chain_hash(prev, event.leaf_bytes())
            prev = event.hash
            rows.append({c.name: getattr(event, c.name) for c in table.columns})
            index += 1
        async with vault.db.engine.begin() as conn:
            await conn.execute(insert(table), rows)
    seconds = time.perf_counter() - t0
    return {"events": index, "fill_s": round(seconds, 1)}


async def fill_requests(vault: StoryVault, target: int) -> dict[str, Any]:
    rng = random.Random(13)
    now = datetime.now(UTC)
    table = RightsRequestRow.__table__  # type: ignore[attr-defined]
    rows = []
    for i in range(target):
        received = now - timedelta(days=rng.uniform(0, 120))
        closed = rng.random() < 0.7
        rows.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128))),
                "customer_id": str(uuid.UUID(int=i)),
                "subject": f"sp_{i:032x}",
                "type": ("access", "erasure", "rectification", "objection")[i % 4],
                "status": "completed" if closed else "received",
                "channel": "portal",
                "received_at": received,
                "due_at": received + timedelta(days=30),
                "completed_at": received + timedelta(days=rng.uniform(0, 35)) if closed else None,
                "extended_reason": "complex request" if i % 50 == 0 else None,
                "scope": "",
                "catalog_digest": vault.catalog.digest,
                "policy_version": 0,
            }
        )
    async with vault.db.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(table), rows[start : start + 5000])
    return {"requests": target}


async def _measure(reports: Reports, name: str, fmt: str, **kwargs: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = await reports.generate(name, fmt, actor="bench", **kwargs)
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    await reports.generate(name, fmt, actor="bench", **kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row = {
        "report": name,
        "format": fmt,
        **{k: v for k, v in kwargs.items() if k in ("verify",)},
        "seconds": round(seconds, 3),
        "peak_python_mib": round(peak / 2**20, 2),
        "bytes": len(out.body),
    }
    print("  ", row, flush=True)
    return row


async def run(backend: str, audit: int, consent: int, requests: int) -> dict[str, Any]:
    async with vault_on(backend) as (vault, _):
        print(f"{backend}: filling", flush=True)
        filled = {
            "consent": await fill_consent(vault, consent),
            "requests": await fill_requests(vault, requests),
            "audit": await fill_audit(vault, audit),
        }
        print("  filled", filled, flush=True)
        reports = Reports(vault)
        size = await vault.audit_log.size()
        # matplotlib's first import and font set-up, once per process, not per report
        t0 = time.perf_counter()
        await reports.generate("integrity", "html", actor="bench", verify=False)
        warmup_s = round(time.perf_counter() - t0, 2)
        rows = []
        for name in ("ropa", "consent", "requests", "access"):
            for fmt in ("json", "csv", "html"):
                rows.append(await _measure(reports, name, fmt))
        for fmt in ("json", "html"):
            rows.append(
                await _measure(reports, "integrity", fmt, verify=False, from_size=size // 2)
            )
        rows.append(await _measure(reports, "integrity", "json", verify=True, from_size=size // 2))
        return {
            "backend": backend,
            "filled": filled,
            "first_chart_warmup_s": warmup_s,
            "reports": rows,
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--audit", type=int, default=1_000_000)
    parser.add_argument("--consent", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--backend", default="postgresql")
    args = parser.parse_args()
    result = asyncio.run(run(args.backend, args.audit, args.consent, args.requests))
    print("written to", write_result("reports", result))


if __name__ == "__main__":
    main()
