"""Signed consent receipts (compact JWS) and the JWKS that verifies them.

Claims follow the Kantara Consent Receipt v1.1 / ISO/IEC TS 27560 record
structure, in snake_case: who (controller, pii principal pseudonym), what
(purpose, legal basis, notice and its hash), how (channel, actor), when
(iat, consent timestamp, expiry), the resulting state and DPV status, and where
it sits in the ledger (ledger_index, event_id, ledger_hash; optionally the
audit log's leaf index, known only after the caller appended the event there).

Receipts are deterministic for a given (event, audit_leaf_index): ``iat`` is the
event's server time, ``jti`` a UUIDv5 of the event id and leaf index, and
Ed25519 signatures are deterministic, so a receipt can be re-issued identically.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OKPKey

from ._errors import InvalidReceipt
from ._models import ConsentEvent, rfc3339
from ._projection import state_after
from ._types import PurposeTerms

RECEIPT_TYPE = "consent-receipt+jwt"
RECEIPT_ALG = "EdDSA"
RECEIPT_VERSION = "KI-CR-v1.1.0"
_RECEIPT_NAMESPACE = uuid.UUID("0b7c7f52-57a4-4a8e-9a43-3f0c1f3e2d11")


def _public_jwk(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    data = OKPKey.import_key(key).as_dict(private=False)
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": str(data["x"]),
        "kid": kid,
        "use": "sig",
        "alg": RECEIPT_ALG,
    }


def jwks(public_keys: Mapping[str, Ed25519PublicKey]) -> dict[str, list[dict[str, str]]]:
    """A JWKS document (``/.well-known/jwks.json``) for ``{key_id: public_key}``."""
    return {"keys": [_public_jwk(kid, key) for kid, key in public_keys.items()]}


class ReceiptSigner:
    """Issues consent receipts signed with one Ed25519 key."""

    def __init__(
        self, private_key: Ed25519PrivateKey, key_id: str, controller: Mapping[str, Any]
    ) -> None:
        if not key_id:
            raise ValueError("key_id must not be empty")
        self._key = OKPKey.import_key(private_key, {"kid": key_id})
        self._public = private_key.public_key()
        self.key_id = key_id
        self.controller = dict(controller)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return jwks({self.key_id: self._public})

    def claims(
        self,
        event: ConsentEvent,
        terms: PurposeTerms,
        *,
        audit_leaf_index: int | None = None,
    ) -> dict[str, Any]:
        """The receipt's claims (what :meth:`issue` signs)."""
        if terms.name != event.purpose:
            raise ValueError("terms do not describe the event's purpose")
        receipt_id = uuid.uuid5(_RECEIPT_NAMESPACE, f"{event.event_id}/{audit_leaf_index}")
        claims: dict[str, Any] = {
            "jti": str(receipt_id),
            "iat": int(event.recorded_at.timestamp()),
            "version": RECEIPT_VERSION,
            "controller": self.controller,
            "sub": event.subject,
            "pii_principal_id": event.subject,
            "purpose": event.purpose,
            "legal_basis": event.legal_basis,
            "sale_or_sharing": terms.sale_or_sharing,
            "event_type": event.event_type,
            "state": state_after(event).value,
            "status": event.status,
            # The notice as stored on the event: what was shown at the time,
            # even if the catalog has a newer version by now.
            "notice": {
                "id": event.notice_id,
                "version": event.notice_version,
                "sha256": event.notice_hash,
            },
            "ledger_index": event.ledger_index,
            "event_id": str(event.event_id),
            "ledger_hash": event.hash,
            "channel": event.channel,
            "actor": event.actor,
            "consent_timestamp": rfc3339(event.captured_at),
            "recorded_at": rfc3339(event.recorded_at),
            "expires_at": rfc3339(event.expires_at),
        }
        issuer = self.controller.get("id")
        if isinstance(issuer, str):
            claims["iss"] = issuer
        if audit_leaf_index is not None:
            claims["audit_leaf_index"] = audit_leaf_index
        return claims

    def issue(
        self,
        event: ConsentEvent,
        terms: PurposeTerms,
        *,
        audit_leaf_index: int | None = None,
    ) -> str:
        """Compact JWS (EdDSA over Ed25519, ``kid`` and ``typ`` headers) of the receipt."""
        header = {"alg": RECEIPT_ALG, "kid": self.key_id, "typ": RECEIPT_TYPE}
        claims = self.claims(event, terms, audit_leaf_index=audit_leaf_index)
        with warnings.catch_warnings():
            # joserfc flags "EdDSA" as superseded by RFC 9864's "Ed25519"; we keep
            # "EdDSA" because it is what deployed verifiers (PyJWT, jose) accept.
            warnings.simplefilter("ignore")
            token: str = jwt.encode(header, claims, self._key, algorithms=[RECEIPT_ALG])
        return token


def verify_receipt(token: str, key_set: Mapping[str, Any]) -> dict[str, Any]:
    """Verify a receipt against a JWKS document; return its claims.

    Raises ``InvalidReceipt`` for a bad signature, unknown key, wrong type or
    algorithm, or malformed token.
    """
    try:
        keys = KeySet.import_key_set(dict(key_set))  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = jwt.decode(token, keys, algorithms=[RECEIPT_ALG])
    except (JoseError, ValueError, KeyError, TypeError) as exc:
        raise InvalidReceipt("consent receipt does not verify") from exc
    if decoded.header.get("typ") != RECEIPT_TYPE:
        raise InvalidReceipt("not a consent receipt")
    return dict(decoded.claims)
