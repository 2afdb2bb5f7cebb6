"""Audit entries and their canonical leaf bytes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import (
    AuditEntry,
    EntryKind,
    InvalidEntry,
    Withheld,
    decode_leaf,
    encode_leaf,
    format_timestamp,
)


def _entry(**changes: Any) -> AuditEntry:
    base = AuditEntry(
        kind=EntryKind.DISCLOSURE,
        actor="marketing",
        actor_key_id="k1",
        subject="cust-1",
        purpose="marketing.email",
        policy_version=4,
        categories=("contact.email",),
        withheld=(Withheld(category="insight.sentiment", reason="no_consent"),),
        consent_index=12,
        request_id="req-1",
        detail={"policy_rule": "r7", "count": 2, "gpc": False, "none": None},
        timestamp=datetime(2025, 3, 1, 12, 0, 0, 5, tzinfo=UTC),
    )
    return msgspec.structs.replace(base, **changes)


def test_leaf_is_rfc8785_canonical_json_with_every_field() -> None:
    leaf = encode_leaf(_entry())
    document = json.loads(leaf)
    assert rfc8785.dumps(document) == leaf
    assert document == {
        "v": 1,
        "kind": "disclosure",
        "actor": "marketing",
        "actor_key_id": "k1",
        "subject": "cust-1",
        "purpose": "marketing.email",
        "policy_version": 4,
        "categories": ["contact.email"],
        "withheld": [{"category": "insight.sentiment", "reason": "no_consent"}],
        "consent_index": 12,
        "request_id": "req-1",
        "detail": {"count": 2, "gpc": False, "none": None, "policy_rule": "r7"},
        "timestamp": "2025-03-01T12:00:00.000005Z",
    }


def test_leaf_round_trips() -> None:
    entry = _entry()
    assert decode_leaf(encode_leaf(entry)) == entry
    minimal = AuditEntry(kind=EntryKind.REPORT, actor="system")
    assert encode_leaf(decode_leaf(encode_leaf(minimal))) == encode_leaf(minimal)


def test_equal_instants_in_other_zones_give_the_same_leaf() -> None:
    utc = _entry()
    plus2 = _entry(timestamp=utc.timestamp.astimezone(timezone(timedelta(hours=2))))
    assert encode_leaf(utc) == encode_leaf(plus2)
    assert format_timestamp(plus2.timestamp) == "2025-03-01T12:00:00.000005Z"


@pytest.mark.parametrize(
    "changes",
    [
        {"timestamp": datetime(2025, 1, 1)},  # naive
        {"kind": "not-a-kind"},
        {"actor": None},
        {"subject": 5},
        {"policy_version": "4"},
        {"consent_index": True},
        {"categories": ("ok", 3)},
        {"withheld": ({"category": "x", "reason": "y"},)},
        {"detail": {"score": 0.5}},
        {"detail": {"nested": {"a": 1}}},
        {"consent_index": 2**60},  # beyond I-JSON
    ],
)
def test_invalid_entries_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidEntry) as raised:
        encode_leaf(_entry(**changes))
    assert raised.value.kind == "invalid"
    assert raised.value.code == "invalid_audit_entry"


@pytest.mark.parametrize(
    "leaf",
    [
        b"not json",
        b"{}",
        b'{"v": 2, "kind": "report", "actor": "system", "timestamp": "2025-01-01T00:00:00Z"}',
        b'{"v": 1, "kind": "report", "actor": "system", "extra": 1}',
    ],
)
def test_foreign_leaves_are_refused(leaf: bytes) -> None:
    with pytest.raises(InvalidEntry):
        decode_leaf(leaf)


_text = st.text(max_size=12)
_ints = st.integers(-(2**53) + 1, 2**53 - 1)


@settings(max_examples=300, deadline=None)
@given(
    actor=_text,
    subject=st.none() | _text,
    categories=st.lists(_text, max_size=3),
    withheld=st.lists(st.tuples(_text, _text), max_size=2),
    detail=st.dictionaries(_text, st.none() | st.booleans() | _ints | _text, max_size=4),
    consent_index=st.none() | _ints,
)
def test_leaves_are_rfc8785_canonical_for_any_text(
    actor: str,
    subject: str | None,
    categories: list[str],
    withheld: list[tuple[str, str]],
    detail: dict[str, Any],
    consent_index: int | None,
) -> None:
    entry = _entry(
        actor=actor,
        subject=subject,
        categories=tuple(categories),
        withheld=tuple(Withheld(category=c, reason=r) for c, r in withheld),
        detail=detail,
        consent_index=consent_index,
    )
    leaf = encode_leaf(entry)
    # Whichever encoding path ran, re-canonicalizing the parsed leaf with the rfc8785 package is a no-op.
    assert rfc8785.dumps(json.loads(leaf)) == leaf
    assert decode_leaf(leaf) == entry
