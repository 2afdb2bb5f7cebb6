"""Masks: every kind, unicode, short strings, bad dates, JSON bodies."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from policies import Mask, PolicyError, apply_mask, pseudonym

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def test_none_returns_value_unchanged() -> None:
    body = {"a": [1, "x"]}
    assert apply_mask(Mask.NONE, "secret", pseudonym_key=KEY) == "secret"
    assert apply_mask(None, body, pseudonym_key=KEY) == body


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+49 151 1234 5678", "•••••••••••••5678"),
        ("ann@example.com", "•••••••••••.com"),
        ("12345678", "••••5678"),
        ("1234567", "•••••••"),  # shorter than 8: fully masked
        ("Bob", "•••"),
        ("", ""),
    ],
)
def test_partial_keeps_last_four(value: str, expected: str) -> None:
    assert apply_mask(Mask.PARTIAL, value, pseudonym_key=KEY) == expected


def test_partial_unicode_counts_characters_after_nfc() -> None:
    decomposed = "Zoe\u0308 Mu\u0308ller-Stra\u00dfe"  # e + combining diaeresis
    masked = apply_mask("partial", decomposed, pseudonym_key=KEY)
    assert isinstance(masked, str)
    assert masked.endswith("raße")
    assert len(masked) == len("Zoë Müller-Straße")
    assert apply_mask("partial", "日本語の名前です", pseudonym_key=KEY) == "••••名前です"
    assert apply_mask("partial", "🙂🙂🙂", pseudonym_key=KEY) == "•••"


def test_hash_is_keyed_prefixed_and_stable() -> None:
    first = apply_mask(Mask.HASH, "ann@example.com", pseudonym_key=KEY)
    assert isinstance(first, str)
    assert first.startswith("pz_")
    assert len(first) == 3 + 32
    assert first == apply_mask("hash", "ann@example.com", pseudonym_key=KEY)
    assert first != apply_mask("hash", "ann@example.com", pseudonym_key=OTHER_KEY)
    assert first != apply_mask("hash", "bob@example.com", pseudonym_key=KEY)
    # a plain unkeyed SHA-256 would let anyone confirm a guess; ours is not one
    assert hashlib.sha256(b"ann@example.com").hexdigest()[:32] not in first
    assert hmac.compare_digest(first, pseudonym("ann@example.com", key=KEY))
    assert pseudonym("名前", key=KEY).startswith("pz_")


def test_hash_refuses_a_short_key() -> None:
    with pytest.raises(ValueError, match="pseudonym_key"):
        apply_mask(Mask.HASH, "x", pseudonym_key=b"short")


def test_redact_is_none() -> None:
    assert apply_mask(Mask.REDACT, "secret", pseudonym_key=KEY) is None
    assert apply_mask(Mask.REDACT, {"a": "b", "n": 3, "l": [True]}, pseudonym_key=KEY) == {
        "a": None,
        "n": None,
        "l": [None],
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1990-05-17", "1990"),
        ("1990-05-17T10:11:12Z", "1990"),
        ("1990-05-17T10:11:12.123456+02:00", "1990"),
        ("20010203", "2001"),
        (" 1985-01-01 ", "1985"),
        ("0999-12-31", "0999"),
        ("1990-13-01", None),
        ("1990-02-30", None),
        ("not a date", None),
        ("", None),
        ("1990", None),
        ("9" * 10_000, None),
        ("\uff11\uff19\uff19\uff10-05-17", None),  # fullwidth digits,
    ],
)
def test_year_only(value: str, expected: str | None) -> None:
    assert apply_mask(Mask.YEAR_ONLY, value, pseudonym_key=KEY) == expected


def test_year_only_on_numbers_and_booleans_redacts() -> None:
    assert apply_mask("year_only", 1990, pseudonym_key=KEY) is None
    assert apply_mask("year_only", True, pseudonym_key=KEY) is None


def test_json_bodies_mask_every_leaf_and_keep_structure() -> None:
    body = {
        "amount": 1234.5,
        "items": [{"sku": "ABC-12345", "qty": 2}],
        "note": None,
        "paid": True,
    }
    masked = apply_mask(Mask.PARTIAL, body, pseudonym_key=KEY)
    assert masked == {
        "amount": "••••••",  # "1234.5" is shorter than 8
        "items": [{"sku": "•••••2345", "qty": "•"}],
        "note": None,
        "paid": "••••",
    }
    hashed = apply_mask(Mask.HASH, body, pseudonym_key=KEY)
    assert isinstance(hashed, dict)
    assert hashed["amount"] == pseudonym("1234.5", key=KEY)
    assert hashed["note"] is None
    dated = apply_mask(Mask.YEAR_ONLY, {"at": "2020-01-02", "n": 5}, pseudonym_key=KEY)
    assert dated == {"at": "2020", "n": None}
    assert body["items"] == [{"sku": "ABC-12345", "qty": 2}]  # input untouched


def test_unknown_mask_is_a_policy_error() -> None:
    with pytest.raises(PolicyError) as info:
        apply_mask("scramble", "x", pseudonym_key=KEY)
    assert info.value.kind == "invalid"
