"""The transparency log: group-commit appends/s, full verification and proof times at scale.

    .venv/bin/python -m bench.audit_log [--appends 20000] [--producers 256]
                                        [--verify-sizes 100000,200000]
                                        [--backends sqlite,postgresql]

1. Appends/s with group commit: ``producers`` concurrent tasks call
   ``AuditWriter.append`` (the gate's path: each returns once its entry is durable)
   on the running StoryVault, ``appends`` entries in all. Reports the batches
   committed and mean batch size.
2. Large logs: for each of ``verify-sizes`` the log is filled with realistic
   disclosure entries in batches of 5000 straight through ``TransparencyLog.append``
   (one signed head per batch), then ``verify_log`` recomputes the whole tree (every
   leaf hash, subtree hash and tree-head signature): time and per-entry cost. Two
   sizes show whether the cost per entry stays flat (it should: one streaming pass).
3. Proof generation at each size: inclusion proofs for random leaves and
   consistency proofs from random earlier sizes, as the HTTP endpoints build them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from audit import AuditEntry, EncodedEntry, EntryKind, Withheld, verify_log
from bench.common import vault_on, write_result

CATEGORIES = ("contact.email", "identity.name", "preference")


def _entry(i: int) -> AuditEntry:
    return AuditEntry(
        kind=EntryKind.DISCLOSURE,
        actor="marketing",
        actor_key_id="key_0123456789abcdef",
        subject=f"sp_{i % 50_000:032x}",
        purpose="marketing.email",
        policy_version=7,
        categories=CATEGORIES,
        withheld=(Withheld(category="insight.sentiment", reason="denied_by_policy"),),
        consent_index=i,
        request_id=f"{i:032x}",
        detail={"operation": "story.read"},
        timestamp=datetime.now(UTC),
    )


def _ms(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "mean_ms": round(statistics.fmean(samples) * 1000, 3),
        "p50_ms": round(samples[len(samples) // 2] * 1000, 3),
        "p99_ms": round(samples[int(len(samples) * 0.99)] * 1000, 3),
    }


async def _run(
    backend: str, appends: int, producers: int, verify_sizes: list[int]
) -> dict[str, Any]:
    async with vault_on(backend) as (vault, _):
        writer, log = vault.audit_writer, vault.audit_log
        # 1. group commit through the running writer
        todo = list(range(appends))
        before = writer.batches_committed

        async def producer() -> None:
            while todo:
                await writer.append(_entry(todo.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*[producer() for _ in range(producers)])
        append_s = time.perf_counter() - t0
        batches = writer.batches_committed - before

        # 2. and 3. for each size: fill, verify everything, time proofs
        large = []
        size = await log.size()
        keys = dict(vault.ring.public_jwks())
        rng = random.Random(9)
        for target in verify_sizes:
            start = size
            t0 = time.perf_counter()
            while size < target:
                n = min(5000, target - size)
                encoded = [EncodedEntry.of(_entry(size + j)) for j in range(n)]
                size = (await log.append(encoded)).tree_head.tree_size
            fill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = await verify_log(vault.db.engine, keys)
            verify_s = time.perf_counter() - t0
            assert report.ok, report.divergence
            assert report.tree_size == size
            inclusion, consistency = [], []
            for _ in range(300):
                t = time.perf_counter()
                await log.inclusion_proof(rng.randrange(size), size)
                inclusion.append(time.perf_counter() - t)
                t = time.perf_counter()
                await log.consistency_proof(rng.randrange(1, size), size)
                consistency.append(time.perf_counter() - t)
            row = {
                "entries": size,
                "fill_entries_per_s": round((size - start) / fill_s, 1) if fill_s else None,
                "verify_s": round(verify_s, 2),
                "verify_us_per_entry": round(verify_s / size * 1e6, 2),
                "nodes_checked": report.nodes_checked,
                "tree_heads_checked": report.tree_heads_checked,
                "inclusion_proof": _ms(inclusion),
                "consistency_proof": _ms(consistency),
            }
            print(backend, row, flush=True)
            large.append(row)
    return {
        "backend": backend,
        "group_commit": {
            "appends": appends,
            "producers": producers,
            "appends_per_s": round(appends / append_s, 1),
            "batches": batches,
            "mean_batch": round(appends / max(batches, 1), 1),
            "batch_window_ms": vault.settings.audit_batch_ms,
        },
        "large_logs": large,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=20_000)
    parser.add_argument("--producers", type=int, default=256)
    parser.add_argument("--verify-sizes", default="100000,200000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        sizes = [int(x) for x in args.verify_sizes.split(",")]
        row = asyncio.run(_run(backend, args.appends, args.producers, sizes))
        print(row, flush=True)
        rows.append(row)
    print("written to", write_result("audit_log", {"runs": rows}))


if __name__ == "__main__":
    main()
