"""Audit entries and their leaf encoding.

A leaf is the RFC 8785 (JSON Canonicalization Scheme) encoding of this object::

    {"v": 1, "kind": str, "actor": str, "actor_key_id": str|null,
     "subject": str|null, "purpose": str|null, "policy_version": int|null,
     "categories": [str], "withheld": [{"category": str, "reason": str}],
     "consent_index": int|null, "request_id": str|null,
     "detail": {str: str|int|bool|null}, "timestamp": "YYYY-MM-DDTHH:MM:SS.ffffffZ"}

Every field is always present (``null`` when unset), so one entry has exactly one
leaf and an independent verifier can re-derive the bytes. Entries hold pseudonymous
ids only: ``subject`` is the customer pseudonym, ``detail`` holds non-personal ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec
import rfc8785

from audit._errors import InvalidEntry

LEAF_VERSION = 1
"""The ``v`` field of every leaf written by this code."""

DetailValue = str | int | bool | None

_MAX_SAFE_INTEGER = 2**53 - 1
"""RFC 8785 (I-JSON) integers are exact only within ±(2**53 - 1)."""

_JSON = msgspec.json.Encoder(order="sorted")


class EntryKind(StrEnum):
    """What an entry records."""

    DISCLOSURE = "disclosure"
    DENIAL = "denial"
    WRITE = "write"
    CONSENT = "consent"
    POLICY_CHANGE = "policy_change"
    KEY_EVENT = "key_event"
    ADMIN = "admin"
    RIGHTS_REQUEST = "rights_request"
    EXPORT = "export"
    ERASURE = "erasure"
    RECTIFICATION = "rectification"
    RETENTION = "retention"
    REPORT = "report"


class Withheld(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A category that was not disclosed, and the reason code why."""

    category: str
    reason: str


def _now() -> datetime:
    return datetime.now(UTC)


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One audited event. ``actor`` is a team name, ``"customer"`` or ``"system"``."""

    kind: EntryKind
    actor: str
    actor_key_id: str | None = None
    subject: str | None = None
    purpose: str | None = None
    policy_version: int | None = None
    categories: tuple[str, ...] = ()
    withheld: tuple[Withheld, ...] = ()
    consent_index: int | None = None
    request_id: str | None = None
    detail: dict[str, DetailValue] = {}
    timestamp: datetime = msgspec.field(default_factory=_now)


class _Leaf(AuditEntry, frozen=True, kw_only=True, forbid_unknown_fields=True):
    v: int


def format_timestamp(ts: datetime) -> str:
    """RFC 3339 UTC with exactly six fractional digits, the one form a leaf uses."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise InvalidEntry("audit timestamps must be timezone-aware")
    ts = ts.astimezone(UTC)
    if ts.year < 1000:  # strftime's %Y is not zero-padded; isoformat's year is
        return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # The same text as the strftime form above, a few times faster (once per entry).
    return ts.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _check_str(name: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise InvalidEntry(f"audit entry field {name} must be a string")


def _check_int(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidEntry(f"audit entry field {name} must be an integer")
    if abs(value) > _MAX_SAFE_INTEGER:
        raise InvalidEntry(f"audit entry field {name} is beyond the I-JSON integer range")


def _leaf_document(entry: AuditEntry) -> dict[str, Any]:
    # msgspec does not validate on construction, so the leaf encoder is the gate:
    # anything that would not decode back into an AuditEntry is refused here.
    try:
        kind = EntryKind(entry.kind)
    except ValueError:
        raise InvalidEntry("unknown audit entry kind") from None
    _check_str("actor", entry.actor, optional=False)
    for name in ("actor_key_id", "subject", "purpose", "request_id"):
        _check_str(name, getattr(entry, name))
    _check_int("policy_version", entry.policy_version)
    _check_int("consent_index", entry.consent_index)
    for category in entry.categories:
        _check_str("categories", category, optional=False)
    for item in entry.withheld:
        if not isinstance(item, Withheld):
            raise InvalidEntry("audit entry field withheld must hold Withheld items")
        _check_str("withheld.category", item.category, optional=False)
        _check_str("withheld.reason", item.reason, optional=False)
    for key, value in entry.detail.items():
        _check_str("detail key", key, optional=False)
        if isinstance(value, int) and not isinstance(value, bool):
            _check_int(f"detail.{key}", value)
        elif value is not None and not isinstance(value, str | bool):
            raise InvalidEntry("audit entry detail values are strings, integers or booleans")
    return {
        "v": LEAF_VERSION,
        "kind": kind.value,
        "actor": entry.actor,
        "actor_key_id": entry.actor_key_id,
        "subject": entry.subject,
        "purpose": entry.purpose,
        "policy_version": entry.policy_version,
        "categories": list(entry.categories),
        "withheld": [{"category": w.category, "reason": w.reason} for w in entry.withheld],
        "consent_index": entry.consent_index,
        "request_id": entry.request_id,
        "detail": dict(entry.detail),
        "timestamp": format_timestamp(entry.timestamp),
    }


def encode_leaf(entry: AuditEntry) -> bytes:
    """The exact bytes the entry's leaf hash covers (RFC 8785 canonical JSON)."""
    document = _leaf_document(entry)
    # Fast path. msgspec's compact, key-sorted JSON equals RFC 8785's whenever the
    # output is ASCII without a single backslash: then no string needed an escape
    # (both escape only the quote, the backslash and control characters),
    # key order by code point equals UTF-16 order for ASCII keys, and the only
    # numbers are integers, range-checked above. Anything else (a quote, a control
    # character, a non-ASCII letter) goes to the rfc8785 package, ~50x slower.
    fast = _JSON.encode(document)
    if fast.isascii() and b"\\" not in fast:
        return fast
    try:
        return rfc8785.dumps(document)
    except rfc8785.CanonicalizationError as exc:
        # e.g. integers beyond the I-JSON range of ±2**53
        raise InvalidEntry(f"audit entry is not canonicalizable: {type(exc).__name__}") from None


@dataclass(frozen=True, slots=True)
class EncodedEntry:
    """An entry with its leaf bytes, encoded once (e.g. when queued) and appended as is.

    Build it with ``EncodedEntry.of``; ``verify_log`` would flag a hand-made pair whose
    filter columns disagree with its leaf.
    """

    entry: AuditEntry
    leaf: bytes

    @classmethod
    def of(cls, entry: AuditEntry | EncodedEntry) -> EncodedEntry:
        if isinstance(entry, EncodedEntry):
            return entry
        return cls(entry, encode_leaf(entry))


def decode_leaf(leaf: bytes) -> AuditEntry:
    """The entry a leaf encodes; raises InvalidEntry for bytes this code did not write."""
    try:
        parsed = msgspec.json.decode(leaf, type=_Leaf)
    except msgspec.ValidationError as exc:
        raise InvalidEntry(f"not an audit leaf: {exc}") from None
    except msgspec.DecodeError:
        raise InvalidEntry("not an audit leaf: malformed JSON") from None
    if parsed.v != LEAF_VERSION:
        raise InvalidEntry(f"unsupported audit leaf version {parsed.v}")
    fields = {f: getattr(parsed, f) for f in AuditEntry.__struct_fields__}
    return AuditEntry(**fields)
