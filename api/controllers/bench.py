"""Benchmark-only routes, registered only when ``STORYVAULT_BENCH_ROUTES=true``.

``GET /bench/bare/{customer_id}`` is the "bare read" of ``make bench``: it fetches
the same stored rows the gated read loads (profile values and chapters) with the
same statement, connection and driver, and returns them as they are stored (ciphertext, base64)
— no authentication, no policy, no consent, no decryption, no audit. It is the
floor the gated read is compared with; it never runs in production.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Controller, get

from api.deps import VaultDep
from governance.db import ReadSteps
from governance.vault import story_rows_step

__all__ = ["BenchController"]


class StoredValue(msgspec.Struct):
    field: str
    category: str
    dek_id: str
    sealed: bytes


class StoredChapter(msgspec.Struct):
    id: str
    category: str
    kind: str
    occurred_at: datetime
    author_team: str
    dek_id: str
    sealed: bytes


class StoredStory(msgspec.Struct):
    customer_id: str
    profile: list[StoredValue]
    chapters: list[StoredChapter]


def _rows(customer_id: str) -> ReadSteps[list[Any]]:
    rows: list[Any] = yield story_rows_step(customer_id)
    return rows


class BenchController(Controller):
    path = "/bench"
    tags = ["benchmark"]
    include_in_schema = False

    @get("/bare/{customer_id:str}", operation_id="benchBareRead", exclude_from_auth=True)
    async def bare(self, vault: VaultDep, customer_id: str) -> StoredStory:
        # The gated read's own statement, connection and driver (Database.query).
        rows = await vault.db.query(lambda: _rows(customer_id))
        profile: list[StoredValue] = []
        chapters: list[StoredChapter] = []
        for src, ref, category, kind, occurred_at, author_team, dek_id, sealed in rows:
            if src == 0:
                profile.append(StoredValue(ref, category, dek_id, sealed))
            else:
                chapters.append(
                    StoredChapter(ref, category, kind, occurred_at, author_team, dek_id, sealed)
                )
        return StoredStory(customer_id=customer_id, profile=profile, chapters=chapters)
