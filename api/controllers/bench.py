"""Benchmark-only routes, registered only when ``STORYVAULT_BENCH_ROUTES=true``.

``GET /bench/bare/{customer_id}`` is the "bare read" of ``make bench``: it fetches
the same stored rows the gated read loads (profile values and chapters) with the
same engine and driver, and returns them as they are stored (ciphertext, base64)
— no authentication, no policy, no consent, no decryption, no audit. It is the
floor the gated read is compared with; it never runs in production.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from litestar import Controller, get
from sqlalchemy import select

from api.deps import VaultDep
from governance.models import CHAPTERS, PROFILE_VALUES

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


_PROFILE = select(
    PROFILE_VALUES.field, PROFILE_VALUES.category, PROFILE_VALUES.dek_id, PROFILE_VALUES.sealed
)
_CHAPTERS = select(
    CHAPTERS.id,
    CHAPTERS.category,
    CHAPTERS.kind,
    CHAPTERS.occurred_at,
    CHAPTERS.author_team,
    CHAPTERS.dek_id,
    CHAPTERS.sealed,
)


class BenchController(Controller):
    path = "/bench"
    tags = ["benchmark"]
    include_in_schema = False

    @get("/bare/{customer_id:str}", operation_id="benchBareRead", exclude_from_auth=True)
    async def bare(self, vault: VaultDep, customer_id: str) -> StoredStory:
        async with vault.db.session() as session:
            prows = (
                await session.execute(_PROFILE.where(PROFILE_VALUES.customer_id == customer_id))
            ).all()
            crows = (
                await session.execute(
                    _CHAPTERS.where(CHAPTERS.customer_id == customer_id).order_by(
                        CHAPTERS.occurred_at, CHAPTERS.id
                    )
                )
            ).all()
        return StoredStory(
            customer_id=customer_id,
            profile=[StoredValue(r.field, r.category, r.dek_id, r.sealed) for r in prows],
            chapters=[
                StoredChapter(
                    c.id, c.category, c.kind, c.occurred_at, c.author_team, c.dek_id, c.sealed
                )
                for c in crows
            ],
        )
