"""API schemas (msgspec Structs): what clients send and receive.

Unknown fields are rejected; ORM rows never leave through these.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

__all__ = [
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
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class CustomerCreate(Strict):
    profile: dict[Annotated[str, msgspec.Meta(max_length=40)], ShortText]
    external_ref: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


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
    description: Annotated[str, msgspec.Meta(max_length=500)] = ""


class TeamRead(msgspec.Struct):
    name: str
    roles: list[str]
    description: str
    created_at: datetime


class KeyCreate(Strict):
    label: Annotated[str, msgspec.Meta(max_length=200)] = ""


class KeyIssued(msgspec.Struct):
    id: str
    team: str
    key: str
    created_at: datetime
