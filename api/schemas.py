"""API schemas (msgspec Structs): what clients send and receive.

Unknown fields are rejected; ORM rows never leave through these.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

__all__ = [
    "MAX_INT64",
    "NO_NUL",
    "ChapterCreate",
    "Created",
    "CustomerCreate",
    "CustomerList",
    "IdItem",
    "KeyCreate",
    "KeyIssued",
    "TeamCreate",
    "TeamRead",
]

ShortText = Annotated[str, msgspec.Meta(max_length=1000)]
# Indexes, cursors and sizes are stored as 64-bit integers: a larger one is a 400,
# not a database overflow (found by schemathesis: GET /v1/audit/entries/<2**94> was a 500).
MAX_INT64 = 2**63 - 1
# Text stored in plaintext columns may not hold NUL: PostgreSQL text cannot, so it
# would be a 500 there (found by tests/integration/test_security.py).
NO_NUL = "^[^\x00]*$"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class CustomerCreate(Strict):
    profile: dict[Annotated[str, msgspec.Meta(max_length=40)], ShortText]
    external_ref: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)] | None
    ) = None


class Created(msgspec.Struct):
    id: str


class IdItem(msgspec.Struct):
    id: str


class CustomerList(msgspec.Struct):
    items: list[IdItem]


class ChapterCreate(Strict):
    category: Name
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=40)]
    occurred_at: datetime
    body: dict[str, Any]


class TeamCreate(Strict):
    name: Annotated[str, msgspec.Meta(min_length=2, max_length=64)]
    roles: list[Annotated[str, msgspec.Meta(max_length=40)]] = msgspec.field(default_factory=list)
    description: Annotated[str, msgspec.Meta(max_length=500, pattern=NO_NUL)] = ""


class TeamRead(msgspec.Struct):
    name: str
    roles: list[str]
    description: str
    created_at: datetime


class KeyCreate(Strict):
    label: Annotated[str, msgspec.Meta(max_length=200, pattern=NO_NUL)] = ""


class KeyIssued(msgspec.Struct):
    id: str
    team: str
    key: str
    created_at: datetime
