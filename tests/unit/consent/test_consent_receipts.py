"""Receipts verify with PyJWT using only the published JWKS (independent of joserfc)."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from consent import (
    RECEIPT_TYPE,
    ConsentEvent,
    InvalidReceipt,
    Ledger,
    PurposeTerms,
    ReceiptSigner,
    jwks,
    verify_receipt,
)

Sessions = async_sessionmaker[AsyncSession]
CONTROLLER = {"id": "https://storyvault.example", "name": "Story Vault Ltd", "contact": "dpo"}


@pytest.fixture
def signer() -> ReceiptSigner:
    return ReceiptSigner(Ed25519PrivateKey.generate(), "receipts-2025-01", CONTROLLER)


def published(signer: ReceiptSigner, *others: tuple[str, Ed25519PrivateKey]) -> dict[str, Any]:
    """The JWKS document as served, round-tripped through JSON."""
    keys = {signer.key_id: signer.public_key}
    keys.update({kid: key.public_key() for kid, key in others})
    document: dict[str, Any] = json.loads(json.dumps(jwks(keys)))
    return document


def pyjwt_verify(token: str, document: dict[str, Any]) -> dict[str, Any]:
    header = pyjwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["typ"] == RECEIPT_TYPE
    key = pyjwt.PyJWKSet.from_dict(document)[header["kid"]]
    claims: dict[str, Any] = pyjwt.decode(token, key.key, algorithms=["EdDSA"])
    return claims


async def _grant(ledger: Ledger, sessions: Sessions) -> ConsentEvent:
    async with sessions() as s:
        return await ledger.grant(s, "cus_r1", "sharing.partners")


def test_jwks_shape(signer: ReceiptSigner) -> None:
    document = published(signer)
    (key,) = document["keys"]
    assert key["kty"] == "OKP"
    assert key["crv"] == "Ed25519"
    assert key["kid"] == "receipts-2025-01"
    assert key["use"] == "sig"
    assert key["alg"] == "EdDSA"
    assert "d" not in key
    assert len(base64.urlsafe_b64decode(key["x"] + "=")) == 32


async def test_receipt_verifies_with_pyjwt_and_jwks_only(
    ledger: Ledger,
    sessions: Sessions,
    signer: ReceiptSigner,
    catalog: dict[str, PurposeTerms],
) -> None:
    event = await _grant(ledger, sessions)
    token = signer.issue(event, catalog["sharing.partners"])
    other = ("older-key", Ed25519PrivateKey.generate())
    claims = pyjwt_verify(token, published(signer, other))

    assert claims["sub"] == claims["pii_principal_id"] == "cus_r1"
    assert claims["iss"] == CONTROLLER["id"]
    assert claims["controller"] == CONTROLLER
    assert claims["version"] == "KI-CR-v1.1.0"
    assert claims["purpose"] == "sharing.partners"
    assert claims["legal_basis"] == "consent"
    assert claims["sale_or_sharing"] is True
    assert claims["state"] == "granted"
    assert claims["status"] == "dpv:ConsentGiven"
    assert claims["notice"] == {
        "id": "notice-sharing.partners",
        "version": "1",
        "sha256": catalog["sharing.partners"].notice_hash,
    }
    assert claims["ledger_index"] == event.ledger_index == 0
    assert claims["event_id"] == str(event.event_id)
    assert claims["ledger_hash"] == event.hash
    assert claims["channel"] == "portal"
    assert claims["iat"] == int(event.recorded_at.timestamp())
    assert claims["expires_at"].endswith("Z")
    assert "audit_leaf_index" not in claims
    assert "evidence" not in claims


async def test_audit_leaf_index_after_append(
    ledger: Ledger, sessions: Sessions, signer: ReceiptSigner, catalog: dict[str, PurposeTerms]
) -> None:
    event = await _grant(ledger, sessions)
    plain = signer.issue(event, catalog["sharing.partners"])
    with_leaf = signer.issue(event, catalog["sharing.partners"], audit_leaf_index=4711)
    claims = pyjwt_verify(with_leaf, published(signer))
    assert claims["audit_leaf_index"] == 4711
    assert claims["jti"] != pyjwt_verify(plain, published(signer))["jti"]
    # Deterministic: re-issuing gives the identical receipt.
    assert signer.issue(event, catalog["sharing.partners"], audit_leaf_index=4711) == with_leaf
    assert verify_receipt(with_leaf, published(signer))["audit_leaf_index"] == 4711


async def test_tampered_receipt_fails(
    ledger: Ledger, sessions: Sessions, signer: ReceiptSigner, catalog: dict[str, PurposeTerms]
) -> None:
    event = await _grant(ledger, sessions)
    token = signer.issue(event, catalog["sharing.partners"])
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["state"] = "withdrawn"
    forged_payload = (
        base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode("ascii")
    )
    forged = f"{header}.{forged_payload}.{signature}"
    document = published(signer)

    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt_verify(forged, document)
    with pytest.raises(InvalidReceipt):
        verify_receipt(forged, document)

    # Same kid, different key: the published key does not verify it.
    impostor = ReceiptSigner(Ed25519PrivateKey.generate(), signer.key_id, CONTROLLER)
    stolen_kid = impostor.issue(event, catalog["sharing.partners"])
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt_verify(stolen_kid, document)
    with pytest.raises(InvalidReceipt):
        verify_receipt(stolen_kid, document)


async def test_every_event_kind_yields_a_receipt(
    ledger: Ledger, sessions: Sessions, signer: ReceiptSigner, catalog: dict[str, PurposeTerms]
) -> None:
    async with sessions() as s:
        events = [
            await ledger.grant(s, "cus_r2", "sharing.partners"),
            *await ledger.record_gpc(s, "cus_r2"),
            await ledger.withdraw(s, "cus_r2", "sales.outreach"),
            await ledger.grant(s, "cus_r2", "sales.outreach"),
            await ledger.import_consent(
                s, "cus_r2", "marketing.email", granted=False, actor="key_7", evidence="letter"
            ),
        ]
    document = published(signer)
    states = [pyjwt_verify(signer.issue(e, catalog[e.purpose]), document)["state"] for e in events]
    assert states == ["granted", "gpc_opted_out", "objected", "granted", "withdrawn"]


def test_issue_rejects_mismatched_terms(
    signer: ReceiptSigner, catalog: dict[str, PurposeTerms]
) -> None:
    event = ConsentEvent.model_construct(purpose="marketing.email")
    with pytest.raises(ValueError, match="purpose"):
        signer.issue(event, catalog["personalization"])
