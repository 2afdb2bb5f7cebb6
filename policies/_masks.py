"""Masks applied to disclosed values.

- ``none``: the value unchanged.
- ``partial``: keep the last 4 characters, replace the others by ``•``.  Values
  shorter than 8 characters are fully masked (``•`` per character): keeping 4
  of fewer than 8 would disclose most of the value.
- ``hash``: a keyed pseudonym, ``pz_`` + the first 32 hex digits of
  HMAC-SHA256(key, domain tag + value).  Equal values give equal pseudonyms
  under one key (joins still work); without the key they cannot be reversed
  or confirmed by guessing.
- ``redact``: ``None`` (JSON null).  A redacted value is absent, not a marker
  string a client could mistake for data.
- ``year_only``: the 4-digit year of an ISO 8601 date or datetime; anything
  that does not parse is redacted (``None``).  Never raises.

Values may be JSON: a mask applies to every leaf string, number and boolean
of lists and objects (keys and structure are kept); ``None`` stays ``None``.
A non-string leaf is masked through its JSON text (``42`` → ``"42"``).
"""

from __future__ import annotations

import hmac
import json
import unicodedata
from datetime import date, datetime
from typing import Any, TypeAlias

from policies._errors import InvalidRuleError, echo
from policies._model import Mask

JsonValue: TypeAlias = "str | int | float | bool | list[JsonValue] | dict[str, JsonValue] | None"

MASK_CHAR = "•"
PSEUDONYM_PREFIX = "pz_"
PARTIAL_KEEP = 4
PARTIAL_MIN_LENGTH = 8
_PSEUDONYM_HEX = 32
_MIN_KEY_BYTES = 16
_HASH_DOMAIN = b"storyvault/policies/mask/hash/v1\x00"
_MAX_DATE_LENGTH = 64


def pseudonym(value: str, *, key: bytes) -> str:
    """The keyed pseudonym of ``value`` (see module docstring)."""
    if not isinstance(key, bytes) or len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"pseudonym_key must be at least {_MIN_KEY_BYTES} bytes")
    # hmac.digest with a digest name: OpenSSL's one-shot HMAC, faster than hmac.new.
    digest = hmac.digest(key, _HASH_DOMAIN + value.encode("utf-8"), "sha256")
    return PSEUDONYM_PREFIX + digest.hex()[:_PSEUDONYM_HEX]


def mask_partial(value: str) -> str:
    # NFC first, so a letter and its combining accent count as one character.
    text = unicodedata.normalize("NFC", value)
    if len(text) < PARTIAL_MIN_LENGTH:
        return MASK_CHAR * len(text)
    return MASK_CHAR * (len(text) - PARTIAL_KEEP) + text[-PARTIAL_KEEP:]


def mask_year_only(value: str) -> str | None:
    text = value.strip()
    if not text or len(text) > _MAX_DATE_LENGTH:
        return None
    parsed: date | None
    try:
        parsed = date.fromisoformat(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            parsed = None
    return None if parsed is None else f"{parsed.year:04d}"


def _leaf_text(value: str | int | float | bool) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _mask_leaf(mask: Mask, value: str | int | float | bool, key: bytes) -> JsonValue:
    if mask is Mask.PARTIAL:
        return mask_partial(_leaf_text(value))
    if mask is Mask.HASH:
        return pseudonym(_leaf_text(value), key=key)
    if mask is Mask.YEAR_ONLY:
        # Numbers and booleans are not dates: redacted.
        return mask_year_only(value) if isinstance(value, str) else None
    return None  # Mask.REDACT


def _coerce_mask(mask: Mask | str | None) -> Mask:
    if type(mask) is Mask:
        return mask
    if mask is None:
        return Mask.NONE
    try:
        return Mask(mask)
    except ValueError:
        raise InvalidRuleError(f"field 'mask': unknown mask {echo(mask)}", field="mask") from None


def apply_mask(mask: Mask | str | None, value: Any, *, pseudonym_key: bytes) -> Any:
    """Mask a string or a JSON value (every leaf) as ``mask`` says; see the module docstring.

    ``value`` is a string or a JSON value (anything else becomes ``None`` under a
    mask); the result is a JSON value.  Raises only for an unknown mask name or a
    too-short key, never for a value.
    """
    kind = _coerce_mask(mask)
    if kind is Mask.NONE:
        return value
    if kind is Mask.HASH and (
        not isinstance(pseudonym_key, bytes) or len(pseudonym_key) < _MIN_KEY_BYTES
    ):
        raise ValueError(f"pseudonym_key must be at least {_MIN_KEY_BYTES} bytes")
    return _walk(kind, value, pseudonym_key)


def _walk(mask: Mask, value: object, key: bytes) -> JsonValue:
    if value is None:
        return None
    if isinstance(value, list):
        return [_walk(mask, item, key) for item in value]
    if isinstance(value, dict):
        return {k: _walk(mask, v, key) for k, v in value.items()}
    if isinstance(value, str | int | float | bool):
        return _mask_leaf(mask, value, key)
    return None  # not a JSON value: disclose nothing
