"""Rights operations: export time and peak memory for 10 and 10,000 chapters, erasure
time for both, and key-rotation rate (data keys re-wrapped per second).

    .venv/bin/python -m bench.rights [--backends sqlite,postgresql]

Peak memory is Python's allocation peak during the operation (tracemalloc), so a
stream that held every chapter would show it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import vault_on, write_result


async def _story(vault: Any, chapters: int, email: str) -> str:
    async with vault.db.write_session() as session:
        cid = await vault.vault.create_customer(
            session, external_ref=None, profile={"name": "Bench Person", "email": email}
        )
        body = vault.vault.validate_chapter(
            "support.ticket", "ticket", {"subject": "Zip broke", "notes": "x" * 300}
        )
        start = datetime(2025, 1, 1, tzinfo=UTC)
        for i in range(chapters):
            await vault.vault.add_chapter(
                session,
                cid,
                category="support.ticket",
                kind="ticket",
                occurred_at=start + timedelta(minutes=i),
                body=body,
                author_team="support",
            )
        await session.commit()
    return cid


async def _run(backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": backend}
    async with vault_on(backend) as (vault, _):
        for n in (10, 10_000):
            cid = await _story(vault, n, f"bench{n}@example.com")
            vault.keys.forget(list(vault.keys._cache or {}))
            tracemalloc.start()
            t0 = time.perf_counter()
            size = 0
            async for chunk in vault.exporter.stream_json(cid):
                size += len(chunk)
            json_s = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            tracemalloc.start()
            t0 = time.perf_counter()
            fh = await vault.exporter.zip_file(cid)
            zip_s = time.perf_counter() - t0
            _, zpeak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            fh.close()
            t0 = time.perf_counter()
            await vault.rights.erase(cid, None)
            erase_s = time.perf_counter() - t0
            out[f"chapters_{n}"] = {
                "export_json_s": round(json_s, 3),
                "export_json_bytes": size,
                "export_json_peak_mib": round(peak / 2**20, 2),
                "export_zip_s": round(zip_s, 3),
                "export_zip_peak_mib": round(zpeak / 2**20, 2),
                "erasure_s": round(erase_s, 4),
            }
            print(backend, n, out[f"chapters_{n}"])
        for i in range(1000):
            async with vault.db.write_session() as session:
                await vault.vault.create_customer(
                    session,
                    external_ref=None,
                    profile={"name": "R", "email": f"r{i}@example.com", "phone": "+1 555 0100"},
                )
                await session.commit()
        keys = len(await _live_keys(vault))
        t0 = time.perf_counter()
        result = await vault.rights.rotate_keys(batch=500)
        rot_s = time.perf_counter() - t0
        out["rotation"] = {
            "data_keys": keys,
            "rewrapped": result["rewrapped"],
            "seconds": round(rot_s, 3),
            "deks_per_s": round(result["rewrapped"] / rot_s, 1),
        }
        print(backend, out["rotation"])
    return out


async def _live_keys(vault: Any) -> list[Any]:
    from sqlalchemy import select

    from governance.models import DATA_KEYS

    async with vault.keystore.session() as session:
        return list(
            (
                await session.execute(select(DATA_KEYS.id).where(DATA_KEYS.destroyed_at.is_(None)))
            ).scalars()
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    runs = []
    for backend in args.backends.split(","):
        runs.append(asyncio.run(_run(backend)))
    print("written to", write_result("rights", {"runs": runs}))


if __name__ == "__main__":
    main()
