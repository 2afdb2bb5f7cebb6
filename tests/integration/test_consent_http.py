"""The consent ledger over HTTP: the customer's choices, receipts, GPC, imports, and the gate.

Every test runs on SQLite and on a real PostgreSQL (``backend``); the two-instance
test runs on PostgreSQL only.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import jwt
import pytest
from litestar.testing import AsyncTestClient
from sqlmodel import col, select

from api.app import create_app
from consent import ConsentEvent, replay, verify_chain
from governance.service import StoryVault
from governance.settings import Settings
from tests.integration.portal import new_customer, sign_in

EMAIL = "Oriane.Consent@example.org"
NAME = "Oriane Consentwell"
MARKETING_PARTS = {"identity.name", "contact.email", "preference"}


async def _customer(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], settings: Settings
) -> tuple[str, dict[str, str]]:
    cid = await new_customer(client, org["support"], EMAIL, NAME)
    return cid, await sign_in(client, settings, EMAIL)


async def _read(
    client: AsyncTestClient[Any], team: dict[str, str], cid: str, purpose: str
) -> dict[str, Any]:
    resp = await client.get(f"/v1/customers/{cid}/story?purpose={purpose}", headers=team)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _reasons(story: dict[str, Any]) -> dict[str, str]:
    return {w["category"]: w["reason"] for w in story["withheld"]}


async def _set(
    client: AsyncTestClient[Any], me: dict[str, str], purpose: str, granted: bool
) -> dict[str, Any]:
    resp = await client.put(f"/v1/me/consents/{purpose}", json={"granted": granted}, headers=me)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def _ledger(direct: StoryVault) -> list[ConsentEvent]:
    async with direct.db.session() as s:
        result = await s.execute(select(ConsentEvent).order_by(col(ConsentEvent.ledger_index)))
        return list(result.scalars())


async def _verify_receipt(client: AsyncTestClient[Any], token: str) -> dict[str, Any]:
    """PyJWT and the published JWKS only: no code of the service's signing path."""
    jwks = (await client.get("/.well-known/jwks.json")).json()
    keys = jwt.PyJWKSet.from_dict(jwks)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["typ"] == "consent-receipt+jwt"
    key = keys[header["kid"]]
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=["EdDSA"])
    return claims


async def test_my_consents_list_every_purpose(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    settings: Settings,
    direct: StoryVault,
) -> None:
    """GET /v1/me/consents lists each catalog purpose with description, basis, state, since."""
    _, me = await _customer(client, org, settings)
    items = (await client.get("/v1/me/consents", headers=me)).json()["items"]
    assert sorted(i["purpose"] for i in items) == sorted(direct.catalog.purposes)
    for item in items:
        purpose = direct.catalog.purposes[item["purpose"]]
        assert item["description"] == purpose.description
        assert item["legal_basis"] == purpose.legal_basis
        assert item["state"] == "none"
        assert item["since"] is None
    await _set(client, me, "personalization", True)
    items = (await client.get("/v1/me/consents", headers=me)).json()["items"]
    mine = next(i for i in items if i["purpose"] == "personalization")
    assert mine["state"] == "granted"
    assert mine["allowed"] is True
    assert mine["since"].endswith("Z") or "+00:00" in mine["since"]


async def test_grant_allows_and_withdrawal_withholds_the_very_next_read(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    settings: Settings,
    direct: StoryVault,
) -> None:
    """No consent → withheld; grant → marketing reads; withdraw → the next read is withheld."""
    cid, me = await _customer(client, org, settings)
    marketing = org["marketing"]
    before = await _read(client, marketing, cid, "marketing.email")
    assert before["profile"] == {}
    assert {c: r for c, r in _reasons(before).items() if c in MARKETING_PARTS} == dict.fromkeys(
        MARKETING_PARTS, "no_consent"
    )

    granted = await _set(client, me, "marketing.email", True)
    assert granted["state"] == "granted"
    assert granted["event"] == "grant"
    claims = await _verify_receipt(client, granted["receipt"])
    assert claims["state"] == "granted"
    assert claims["purpose"] == "marketing.email"
    assert claims["legal_basis"] == "consent"
    assert claims["ledger_index"] == granted["ledger_index"]
    assert claims["audit_leaf_index"] == granted["audit_index"]
    assert claims["sub"] == direct.ring.pseudonym(cid)
    assert claims["notice"]["sha256"] == direct.catalog.purposes["marketing.email"].notice_sha256

    allowed = await _read(client, marketing, cid, "marketing.email")
    assert allowed["profile"] == {"email": EMAIL, "name": NAME}
    assert not set(_reasons(allowed).values()) & {"no_consent", "consent_withdrawn"}

    withdrawn = await _set(client, me, "marketing.email", False)
    assert withdrawn["state"] == "withdrawn"
    assert withdrawn["ledger_index"] == granted["ledger_index"] + 1
    after = await _read(client, marketing, cid, "marketing.email")
    assert after["profile"] == {}
    assert after["chapters"] == []
    reasons = _reasons(after)
    assert all(reasons[c] == "consent_withdrawn" for c in MARKETING_PARTS)


async def test_receipts_verify_with_the_published_jwks_only(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], settings: Settings
) -> None:
    """Receipts verify with PyJWT and /.well-known/jwks.json; a changed byte fails."""
    _, me = await _customer(client, org, settings)
    receipt = (await _set(client, me, "analytics.profiling", True))["receipt"]
    claims = await _verify_receipt(client, receipt)
    assert claims["event_type"] == "grant"
    assert claims["channel"] == "portal"
    assert claims["status"] == "dpv:ConsentGiven"
    assert claims["expires_at"] is None or claims["expires_at"] > claims["recorded_at"]
    head, body, sig = receipt.split(".")
    forged_body = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(body).replace(b'"granted"', b'"withdrawn"')
    ).decode()
    with pytest.raises(jwt.InvalidSignatureError):
        await _verify_receipt(client, f"{head}.{forged_body}.{sig}")


@pytest.mark.parametrize(
    ("purpose", "basis"), [("service.support", "contract"), ("legal.retention", "legal_obligation")]
)
async def test_non_consent_purposes_answer_422_naming_the_basis(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    settings: Settings,
    direct: StoryVault,
    purpose: str,
    basis: str,
) -> None:
    """Granting or withdrawing a contract / legal-obligation purpose is 422 with the reason;
    an unknown purpose is a 404 problem; neither records anything."""
    _, me = await _customer(client, org, settings)
    for granted in (True, False):
        resp = await client.put(f"/v1/me/consents/{purpose}", json={"granted": granted}, headers=me)
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        problem = resp.json()
        assert problem["code"] == "not_consent_based"
        assert basis in problem["detail"]
        assert "not consent" in problem["detail"]
    resp = await client.put("/v1/me/consents/no.such.purpose", json={"granted": True}, headers=me)
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "unknown_purpose"
    assert await _ledger(direct) == []


async def test_gpc_opts_out_of_sale_and_sharing_once(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    settings: Settings,
    direct: StoryVault,
) -> None:
    """Sec-GPC: 1 records one opt-out per sale/sharing purpose; repeating it records nothing."""
    cid, me = await _customer(client, org, settings)
    await _set(client, me, "sharing.partners", True)
    await _set(client, me, "marketing.email", True)
    before = await _read(client, org["marketing"], cid, "sharing.partners")
    assert before["profile"]["name"] == NAME
    assert before["profile"]["email"] != EMAIL  # the partners' rule masks it (hash)
    sharing = sorted(p.name for p in direct.catalog.purposes.values() if p.sale_or_sharing)
    assert sharing == ["sharing.partners"]
    gpc = {**me, "Sec-GPC": "1"}
    for _ in range(3):
        resp = await client.get("/v1/me/consents", headers=gpc)
        assert resp.status_code == 200
        states = {i["purpose"]: i["state"] for i in resp.json()["items"]}
        assert states["sharing.partners"] == "gpc_opted_out"
        assert states["marketing.email"] == "granted"  # not a sale/sharing purpose
        opt_outs = [e for e in await _ledger(direct) if e.channel == "gpc"]
        assert sorted(e.purpose for e in opt_outs) == sharing
    assert opt_outs[0].event_type == "gpc_opt_out"
    assert opt_outs[0].status == "dpv:ConsentWithdrawn"  # it had been granted
    after = await _read(client, org["marketing"], cid, "sharing.partners")
    assert after["profile"] == {}
    assert set(_reasons(after).values()) <= {"consent_withdrawn", "no_policy"}
    assert "consent_withdrawn" in _reasons(after).values()


async def test_fifty_concurrent_toggles_keep_one_total_order(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    settings: Settings,
    direct: StoryVault,
) -> None:
    """50 toggles at once: a gap-free total order, projection == replay, last receipt == state."""
    cid, me = await _customer(client, org, settings)
    rng = random.Random(11)
    plan = [
        (rng.choice(["marketing.email", "personalization"]), rng.random() < 0.5) for _ in range(50)
    ]
    answers = await asyncio.gather(*(_set(client, me, p, g) for p, g in plan))
    events = await _ledger(direct)
    assert [e.ledger_index for e in events] == list(range(50))
    assert sorted(a["ledger_index"] for a in answers) == list(range(50))
    subject = direct.ring.pseudonym(cid)
    async with direct.db.session() as s:
        assert await verify_chain(s) is None
        history = await direct.ledger.history(s, subject)
        projection = await direct.ledger.states(s, subject)
    assert [e.ledger_index for e in history] == list(range(50))
    replayed = replay(history)
    assert {p: row.snapshot() for p, row in projection.items()} == {
        p: row.snapshot() for (_, p), row in replayed.items()
    }
    final = {
        i["purpose"]: i["state"]
        for i in (await client.get("/v1/me/consents", headers=me)).json()["items"]
    }
    for purpose in ("marketing.email", "personalization"):
        last = max((a for a in answers if a["purpose"] == purpose), key=lambda a: a["ledger_index"])
        claims = await _verify_receipt(client, last["receipt"])
        assert claims["state"] == last["state"] == final[purpose] == projection[purpose].state
        assert claims["ledger_index"] == projection[purpose].last_ledger_index
        # each answer's state is the state right after its own event
        for a in answers:
            if a["purpose"] == purpose:
                assert a["state"] == ("granted" if a["event"] == "grant" else "withdrawn")


async def test_consent_captured_elsewhere_needs_a_write_rule_and_evidence(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    settings: Settings,
    direct: StoryVault,
) -> None:
    """POST /v1/customers/{id}/consents: 403 without a write rule (a deny rule is none),
    evidence required, then a receipt naming the importing key; the gate honours it."""
    cid, _ = await _customer(client, org, settings)
    url = f"/v1/customers/{cid}/consents"
    body = {"purpose": "analytics.profiling", "granted": True, "evidence": "signed form #4711"}
    resp = await client.post(
        url, json={**body, "purpose": "marketing.email"}, headers=org["marketing"]
    )
    assert resp.status_code == 403, resp.text
    assert resp.json()["code"] == "no_policy"
    deny = {
        "team": "marketing",
        "category": "*",
        "action": "write",
        "purpose": "marketing.email",
        "effect": "deny",
    }
    assert (
        await client.post("/v1/admin/policies", json=deny, headers=org["compliance"])
    ).status_code == 201
    resp = await client.post(
        url, json={**body, "purpose": "marketing.email"}, headers=org["marketing"]
    )
    assert resp.status_code == 403, resp.text
    resp = await client.post(url, json={**body, "purpose": "nope.purpose"}, headers=org["support"])
    assert resp.status_code == 404
    missing = {k: v for k, v in body.items() if k != "evidence"}
    assert (await client.post(url, json=missing, headers=org["support"])).status_code == 400
    blank = await client.post(url, json={**body, "evidence": "   "}, headers=org["support"])
    assert blank.status_code == 422
    assert blank.json()["code"] == "evidence_required"
    assert await _ledger(direct) == []

    chapter = {
        "category": "support.ticket",
        "kind": "ticket",
        "occurred_at": "2026-01-02T10:00:00Z",
        "body": {"subject": "parcel arrived late"},
    }
    resp = await client.post(
        f"/v1/customers/{cid}/chapters?purpose=service.support",
        json=chapter,
        headers=org["support"],
    )
    assert resp.status_code == 201, resp.text
    before = await _read(client, org["product"], cid, "analytics.profiling")
    assert before["chapters"] == []
    assert _reasons(before)["support.ticket"] == "no_consent"

    resp = await client.post(url, json=body, headers=org["support"])
    assert resp.status_code == 201, resp.text
    claims = await _verify_receipt(client, resp.json()["receipt"])
    assert claims["event_type"] == "imported"
    assert claims["channel"] == "import"
    assert claims["state"] == "granted"
    assert claims["actor"].startswith("key_")
    (event,) = await _ledger(direct)
    assert event.evidence == "signed form #4711"
    assert event.actor == claims["actor"]
    after = await _read(client, org["product"], cid, "analytics.profiling")
    assert [c["body"] for c in after["chapters"]] == [{"subject": "parcel arrived late"}]
    teams_view = (await client.get(url, headers=org["support"])).json()["items"]
    assert {i["purpose"]: i["state"] for i in teams_view}["analytics.profiling"] == "granted"


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_withdrawal_on_one_instance_counts_at_once_on_another(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], settings: Settings
) -> None:
    """Two app instances on one PostgreSQL (same URL, same key ring): grant through A,
    withdraw through B, the next read on A is withheld (no instance caches consent state)."""
    assert settings.database_url.startswith("postgresql+asyncpg://")
    cid, me = await _customer(client, org, settings)
    marketing = org["marketing"]
    async with AsyncTestClient(app=create_app(settings), raise_server_exceptions=False) as b:
        await _set(client, me, "marketing.email", True)
        assert (await _read(client, marketing, cid, "marketing.email"))["profile"]
        assert (await _read(b, marketing, cid, "marketing.email"))["profile"]
        await _set(b, me, "marketing.email", False)
        on_a = await _read(client, marketing, cid, "marketing.email")
        assert on_a["profile"] == {}
        assert _reasons(on_a)["contact.email"] == "consent_withdrawn"
        await _set(client, me, "marketing.email", True)
        assert (await _read(b, marketing, cid, "marketing.email"))["profile"]["email"] == EMAIL
