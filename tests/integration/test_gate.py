"""The gatekeeper over HTTP (issue 3), on SQLite and on a real PostgreSQL.

Five teams, seven purposes, the demo starter policy (governance/demo_policy.toml):
each team sees exactly what policy and the customer's consent allow, masked as
policy says; every refusal is a clear 4xx with a reason code and changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.serialization import encode_json
from litestar.testing import AsyncTestClient
from sqlalchemy import ClauseElement, Executable, delete, func, select, text
from sqlalchemy.ext.compiler import compiles

from api.app import create_app
from api.controllers.customers import StoryRead
from consent import Channel, ConsentState
from governance.models import CUSTOMERS, ChapterRow, CustomerRow
from governance.operations import audience_page
from governance.service import StoryVault
from policies import RuleSpec
from tests.conftest import (
    ADMIN_KEY,
    log_every_statement,
    make_settings,
    remember_personal,
    wait_for_policy,
)
from tests.pgserver import PgServer

Headers = dict[str, str]
CHAPTERS_TABLE = ChapterRow.__table__  # type: ignore[attr-defined]
Org = dict[str, Headers]

ALL = frozenset(
    {
        "identity.name",
        "contact.email",
        "contact.phone",
        "contact.address",
        "demographic.birthday",
        "commerce.purchase",
        "commerce.invoice",
        "support.ticket",
        "engagement.interaction",
        "preference",
        "insight.sentiment",
        "insight.motivation",
    }
)
PROFILE = {
    "name": "Wilhelmina Gatekeeper",
    "email": "wilhelmina.gatekeeper@example.org",
    "phone": "+44 20 7946 0321",
    "address": "4 Orchard Mews, Bramblefield",
    "birthday": "1979-11-23",
}
FIELD_CATEGORY = {
    "name": "identity.name",
    "email": "contact.email",
    "phone": "contact.phone",
    "address": "contact.address",
    "birthday": "demographic.birthday",
}
CHAPTERS: list[tuple[str, str, dict[str, Any]]] = [  # one per chapter category: 12 in all
    ("commerce.purchase", "purchase", {"item": "Canvas tent 3p", "amount": 349.0}),
    ("commerce.invoice", "invoice", {"number": "INV-88123", "total": 349.0}),
    ("support.ticket", "ticket", {"subject": "Tent pole snapped in the wind"}),
    ("engagement.interaction", "chat", {"summary": "Asked about pole replacements"}),
    ("preference", "preference", {"channel": "email", "topics": ["camping"]}),
    ("insight.sentiment", "sentiment", {"score": -0.4, "note": "frustrated about delays"}),
    ("insight.motivation", "motivation", {"note": "plans a family trip to the fjords"}),
]
# The demo policy, read side: (team, purpose) -> {category: mask} disclosed, and
# the categories withheld because a deny rule matched (all others: no rule).
EXPECTED: dict[tuple[str, str], tuple[dict[str, str | None], frozenset[str]]] = {
    ("support", "service.support"): (
        {
            "identity.name": None,
            "contact.email": None,  # contact.* wildcard
            "contact.phone": None,
            "contact.address": None,
            "demographic.birthday": "year_only",
            "commerce.purchase": None,  # commerce.* wildcard
            "commerce.invoice": None,
            "support.ticket": None,
            "engagement.interaction": None,
            "preference": None,
        },
        frozenset({"insight.sentiment", "insight.motivation"}),  # insight.* deny
    ),
    ("sales", "sales.outreach"): (
        {
            "identity.name": None,
            "contact.email": None,
            "contact.phone": "partial",
            "commerce.purchase": None,
            "insight.motivation": None,
        },
        frozenset(),
    ),
    ("marketing", "marketing.email"): (
        {"identity.name": None, "contact.email": None, "preference": None},
        frozenset({"insight.sentiment", "insight.motivation"}),
    ),
    ("marketing", "sharing.partners"): (
        {"identity.name": None, "contact.email": "hash"},
        frozenset(),
    ),
    ("product", "personalization"): (
        {"preference": None, "commerce.purchase": None, "demographic.birthday": "year_only"},
        frozenset(),
    ),
    ("product", "analytics.profiling"): (
        {
            "insight.sentiment": None,  # insight.* wildcard allow
            "insight.motivation": None,
            "support.ticket": None,
            "engagement.interaction": None,
            "commerce.purchase": None,
        },
        frozenset(),
    ),
    ("compliance", "legal.retention"): (
        {"commerce.invoice": None, "identity.name": None},
        frozenset(),
    ),
}
CONSENT_PURPOSES = ("marketing.email", "personalization", "analytics.profiling", "sharing.partners")


# --- helpers ------------------------------------------------------------------------


async def create_customer(client: AsyncTestClient[Any], org: Org, **profile: str) -> str:
    """A customer created by support under the contract (support's write rules)."""
    remember_personal(*(v for v in profile.values() if len(v) >= 6))
    resp = await client.post(
        "/v1/customers?purpose=service.support",
        json={"external_ref": "crm-gate", "profile": profile},
        headers=org["support"],
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def full_story(client: AsyncTestClient[Any], org: Org) -> str:
    """A customer with all five profile fields and one chapter of every other category
    (written by sales, whose policy has ``*`` write for service.support)."""
    cid = await create_customer(client, org, **PROFILE)
    for category, kind, body in CHAPTERS:
        remember_personal(*(v for v in body.values() if isinstance(v, str) and len(v) > 6))
        resp = await client.post(
            f"/v1/customers/{cid}/chapters?purpose=service.support",
            json={
                "category": category,
                "kind": kind,
                "occurred_at": "2025-06-01T12:00:00Z",
                "body": body,
            },
            headers=org["sales"],
        )
        assert resp.status_code == 201, resp.text
    return cid


async def consent(direct: StoryVault, cid: str, purpose: str, granted: bool) -> None:
    """The customer acts in the portal: grant, withdraw, or (legitimate interest) object."""
    await direct._record_consent(
        cid,
        purpose,
        granted=granted,
        channel=Channel.PORTAL,
        actor="customer",
        actor_key_id=None,
        evidence=None,
        imported=False,
        request_id=None,
    )


async def read(
    client: AsyncTestClient[Any], headers: Headers, cid: str, purpose: str | None
) -> Any:
    params = {} if purpose is None else {"purpose": purpose}
    return await client.get(f"/v1/customers/{cid}/story", params=params, headers=headers)


def disclosed(body: dict[str, Any]) -> set[str]:
    return {FIELD_CATEGORY[f] for f in body["profile"]} | {c["category"] for c in body["chapters"]}


def withheld(body: dict[str, Any]) -> dict[str, str]:
    return {w["category"]: w["reason"] for w in body["withheld"]}


def assert_problem(resp: Any, status: int, code: str, reason: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["code"] == code, body
    assert body["status"] == status
    if reason is not None:
        assert body["reason"] == reason, body


async def customer_count(direct: StoryVault) -> int:
    async with direct.db.session() as session:
        return int((await session.execute(select(func.count(CUSTOMERS.id)))).scalar_one())


# --- the scenario ---------------------------------------------------------------------


async def test_each_team_sees_exactly_its_granted_parts(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """Five teams x seven purposes over one 12-category story: the disclosed parts are
    exactly the policy's allow cells, masks applied, deny wins over a wildcard allow,
    and everything else is listed as withheld with its reason."""
    cid = await full_story(client, org)
    for purpose in CONSENT_PURPOSES:
        await consent(direct, cid, purpose, True)

    for (team, purpose), (allowed, denied) in EXPECTED.items():
        resp = await read(client, org[team], cid, purpose)
        assert resp.status_code == 200, (team, purpose, resp.text)
        body = resp.json()
        assert body["customer_id"] == cid
        assert body["purpose"] == purpose
        assert disclosed(body) == set(allowed), (team, purpose)
        expected_withheld = {
            c: "denied_by_policy" if c in denied else "no_policy" for c in ALL - set(allowed)
        }
        assert withheld(body) == expected_withheld, (team, purpose)
        assert isinstance(body["audit_index"], int)
        # Values: unmasked parts are the stored values, masked parts never are.
        for field, value in body["profile"].items():
            mask = allowed[FIELD_CATEGORY[field]]
            if mask is None:
                assert value == PROFILE[field], (team, purpose, field)
            else:
                assert value != PROFILE[field]
        for chapter in body["chapters"]:
            original = next(b for c, _, b in CHAPTERS if c == chapter["category"])
            assert chapter["body"] == original
            assert chapter["author_team"] == "sales"

    support = (await read(client, org["support"], cid, "service.support")).json()
    assert support["profile"]["birthday"] == "1979"  # year_only
    sales = (await read(client, org["sales"], cid, "sales.outreach")).json()
    assert sales["profile"]["phone"] == "•" * (len(PROFILE["phone"]) - 4) + "0321"  # partial
    partners = (await read(client, org["marketing"], cid, "sharing.partners")).json()
    hashed = partners["profile"]["email"]
    assert re.fullmatch(r"pz_[0-9a-f]{32}", hashed)  # hash: keyed pseudonym
    assert partners["profile"]["name"] == PROFILE["name"]
    product = (await read(client, org["product"], cid, "personalization")).json()
    assert product["profile"] == {"birthday": "1979"}

    # The pseudonym is stable (joins work) and differs for another address.
    other = await create_customer(client, org, name="Other Person", email="other.one@example.org")
    await consent(direct, other, "sharing.partners", True)
    again = (await read(client, org["marketing"], cid, "sharing.partners")).json()
    assert again["profile"]["email"] == hashed
    theirs = (await read(client, org["marketing"], other, "sharing.partners")).json()
    assert re.fullmatch(r"pz_[0-9a-f]{32}", theirs["profile"]["email"])
    assert theirs["profile"]["email"] != hashed


async def test_legal_basis_withholds_per_customer(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """Consent purposes: no_consent until a grant, disclosed after it, consent_withdrawn
    after a withdrawal; legitimate interest: disclosed until the customer objects."""
    cid = await full_story(client, org)
    marketing_parts = set(EXPECTED[("marketing", "marketing.email")][0])

    body = (await read(client, org["marketing"], cid, "marketing.email")).json()
    assert body["profile"] == {}
    assert body["chapters"] == []
    reasons = withheld(body)
    assert {c for c, r in reasons.items() if r == "no_consent"} == marketing_parts
    assert reasons["insight.sentiment"] == "denied_by_policy"  # policy first, then basis

    await consent(direct, cid, "marketing.email", True)
    body = (await read(client, org["marketing"], cid, "marketing.email")).json()
    assert disclosed(body) == marketing_parts
    assert "no_consent" not in withheld(body).values()

    await consent(direct, cid, "marketing.email", False)
    body = (await read(client, org["marketing"], cid, "marketing.email")).json()
    assert disclosed(body) == set()
    assert {c for c, r in withheld(body).items() if r == "consent_withdrawn"} == marketing_parts

    # Consent captured elsewhere, imported over HTTP by a team with a write rule for it.
    body = (await read(client, org["product"], cid, "analytics.profiling")).json()
    assert disclosed(body) == set()
    resp = await client.post(
        f"/v1/customers/{cid}/consents",
        json={"purpose": "analytics.profiling", "granted": True, "evidence": "signed form 17"},
        headers=org["support"],
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "granted"
    body = (await read(client, org["product"], cid, "analytics.profiling")).json()
    assert disclosed(body) == set(EXPECTED[("product", "analytics.profiling")][0])
    # A team without a write rule for the purpose cannot import consent for it.
    resp = await client.post(
        f"/v1/customers/{cid}/consents",
        json={"purpose": "marketing.email", "granted": True, "evidence": "form"},
        headers=org["marketing"],
    )
    assert_problem(resp, 403, "no_policy", "no_policy")

    # Legitimate interest: allowed without consent, withheld after an objection.
    sales_parts = set(EXPECTED[("sales", "sales.outreach")][0])
    body = (await read(client, org["sales"], cid, "sales.outreach")).json()
    assert disclosed(body) == sales_parts
    await consent(direct, cid, "sales.outreach", False)  # Art. 21 objection
    body = (await read(client, org["sales"], cid, "sales.outreach")).json()
    assert disclosed(body) == set()
    assert {c for c, r in withheld(body).items() if r == "objected"} == sales_parts
    # Contract: consent plays no part.
    body = (await read(client, org["support"], cid, "service.support")).json()
    assert disclosed(body) == set(EXPECTED[("support", "service.support")][0])


async def test_bad_reads_are_clear_problems(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """Missing/unknown purpose 400, no rule 403 no_policy, unknown customer 404;
    nothing disclosed in any of them."""
    cid = await create_customer(client, org, name="Bertram Badread", email="bertram@example.org")
    sales = org["sales"]
    assert_problem(await read(client, sales, cid, None), 400, "purpose_required")
    assert_problem(await read(client, sales, cid, ""), 400, "purpose_required")
    assert_problem(
        await read(client, sales, cid, "world.domination"),
        400,
        "unknown_purpose",
        "unknown_purpose",
    )
    # sales has read rules for sales.outreach only (its service.support rules are writes)
    for purpose in ("marketing.email", "service.support", "legal.retention"):
        resp = await read(client, sales, cid, purpose)
        assert_problem(resp, 403, "no_policy", "no_policy")
        assert "Bertram" not in resp.text
    assert_problem(
        await read(client, sales, "8a4c1fd6-54c4-4b39-9e43-3a1e0d0b4c11", "sales.outreach"),
        404,
        "customer_not_found",
    )
    assert_problem(await read(client, sales, "not-a-uuid", "sales.outreach"), 400, "invalid_id")
    # the other gated endpoints ask the same questions
    resp = await client.get(
        "/v1/customers",
        params={"email": "bertram@example.org", "purpose": "marketing.email"},
        headers=org["product"],
    )
    assert_problem(resp, 403, "no_policy", "no_policy")
    resp = await client.get(
        "/v1/customers",
        params={"email": "bertram@example.org", "purpose": "personalization"},
        headers=org["product"],  # product has personalization rules, none for contact.email
    )
    assert_problem(resp, 403, "no_policy", "no_policy")
    resp = await client.get(
        "/v1/customers", params={"email": "bertram@example.org"}, headers=org["sales"]
    )
    assert_problem(resp, 400, "purpose_required")
    resp = await client.get(f"/v1/customers/{cid}/story?purpose=sales.outreach")
    assert resp.status_code == 401


async def audit_size(direct: StoryVault) -> int:
    async with direct.db.session() as session:
        return int((await session.execute(text("SELECT count(*) FROM audit_entries"))).scalar_one())


async def test_the_gated_read_refuses_bad_keys_before_anything_else(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, admin: Headers
) -> None:
    """The gated read looks its API key up in its own round trip: an unknown,
    revoked or malformed key is 401 (with WWW-Authenticate) whatever else is wrong
    with the request, discloses nothing and writes no audit entry; a revoked key
    fails on the very next read."""
    cid = await full_story(client, org)
    issued = (
        await client.post("/v1/admin/teams/support/keys", json={"label": "t"}, headers=admin)
    ).json()
    key = {"Authorization": f"Bearer {issued['key']}"}
    ok = await read(client, key, cid, "service.support")
    assert ok.status_code == 200, ok.text
    assert ok.json()["profile"]["name"] == PROFILE["name"]
    before = await audit_size(direct)
    unknown = {"Authorization": "Bearer svk_" + "x" * 43}
    too_long = {"Authorization": "Bearer " + "k" * 600}
    for headers in (unknown, too_long, org["support"] | {"Authorization": "Basic abc"}, {}):
        for target, purpose in (
            (cid, "service.support"),  # everything else right
            (cid, None),  # and a missing purpose (400 with a valid key)
            (cid, "world.domination"),  # an unknown purpose (400)
            ("8a4c1fd6-54c4-4b39-9e43-3a1e0d0b4c11", "service.support"),  # no customer (404)
            ("not-a-uuid", "service.support"),  # a malformed id (400)
        ):
            resp = await read(client, headers, target, purpose)
            assert_problem(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == 'Bearer realm="storyvault"'
            assert "Wilhelmina" not in resp.text
    # The same requests with the valid key get their own answers.
    assert_problem(await read(client, key, cid, None), 400, "purpose_required")
    assert_problem(await read(client, key, cid, "world.domination"), 400, "unknown_purpose")
    assert_problem(await read(client, key, "not-a-uuid", "service.support"), 400, "invalid_id")
    assert_problem(
        await read(client, key, "8a4c1fd6-54c4-4b39-9e43-3a1e0d0b4c11", "service.support"),
        404,
        "customer_not_found",
    )
    assert_problem(await read(client, key, cid, "sales.outreach"), 403, "no_policy", "no_policy")
    assert await audit_size(direct) == before
    # Revoked: refused on the very next read, for every purpose and customer.
    assert (await client.delete(f"/v1/admin/keys/{issued['id']}", headers=admin)).status_code == 204
    for target, purpose in ((cid, "service.support"), (cid, "world.domination"), (cid, None)):
        resp = await read(client, key, target, purpose)
        assert_problem(resp, 401, "unauthorized")
        assert "Wilhelmina" not in resp.text
    assert await audit_size(direct) == before
    # Another key of the same team still reads, and its entry names that key.
    ok = await read(client, org["support"], cid, "service.support")
    assert ok.status_code == 200
    entry = (
        await client.get(f"/v1/audit/entries/{ok.json()['audit_index']}", headers=admin)
    ).json()
    assert entry["actor"] == "support"
    assert entry["actor_key_id"] not in {None, issued["id"]}


async def test_writes_denied_by_write_rules_store_nothing(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """Creates, profile changes and chapters need write rules for every category written
    (deny overrides the wildcard ``*``), and the purpose's legal basis; a refused write
    is a 403 with its reason and stores nothing."""
    cid = await create_customer(client, org, name="Winifred Writer", email="winifred@example.org")
    # sales writes `*` for service.support; a deny on insight.* must override it
    async with direct.db.session() as session:
        catalog = direct._policy_catalog(await direct.teams.team_names(session))
    await direct.policy_store.add_rule(
        RuleSpec(
            team="sales",
            category="insight.*",
            action="write",
            purpose="service.support",
            effect="deny",
        ),
        catalog,
    )
    await wait_for_policy(client, await direct.policy_store.current_version())
    customers = await customer_count(direct)

    def chapter(category: str, kind: str) -> dict[str, Any]:
        return {
            "category": category,
            "kind": kind,
            "occurred_at": "2025-07-01T09:00:00Z",
            "body": {"note": "should never be stored"},
        }

    refused: list[tuple[Headers, str, str, Any, str]] = [
        # (team, method, url, json, reason)
        (
            org["sales"],
            "post",
            f"/v1/customers/{cid}/chapters?purpose=service.support",
            chapter("insight.sentiment", "sentiment"),
            "denied_by_policy",
        ),
        (
            org["support"],
            "post",
            f"/v1/customers/{cid}/chapters?purpose=service.support",
            chapter("insight.motivation", "motivation"),
            "no_policy",
        ),
        (
            org["support"],  # a write rule exists, but the customer has not consented
            "post",
            f"/v1/customers/{cid}/chapters?purpose=analytics.profiling",
            chapter("insight.sentiment", "sentiment"),
            "no_consent",
        ),
        (
            org["support"],
            "patch",
            f"/v1/customers/{cid}/profile?purpose=sales.outreach",
            {"name": "Changed Name"},
            "no_policy",
        ),
        (
            org["marketing"],
            "post",
            "/v1/customers?purpose=marketing.email",
            {"profile": {"name": "Never Stored"}},
            "no_policy",
        ),
        (
            org["product"],  # product has read rules for personalization, no write rules
            "post",
            "/v1/customers?purpose=personalization",
            {"profile": {"name": "Never Stored"}},
            "no_policy",
        ),
    ]
    for headers, method, url, payload, reason in refused:
        resp = await getattr(client, method)(url, json=payload, headers=headers)
        assert_problem(resp, 403, reason, reason)
    resp = await client.patch(
        f"/v1/customers/{cid}/profile", json={"name": "Changed Name"}, headers=org["support"]
    )
    assert_problem(resp, 400, "purpose_required")

    assert await customer_count(direct) == customers
    async with direct.db.session() as session:
        story = await direct.vault.read_story(session, cid)
    assert story.chapters == []
    assert story.profile["name"] == "Winifred Writer"

    # and the allowed writes go through
    resp = await client.post(
        f"/v1/customers/{cid}/chapters?purpose=service.support",
        json=chapter("support.ticket", "ticket"),
        headers=org["support"],
    )
    assert resp.status_code == 201, resp.text
    resp = await client.patch(
        f"/v1/customers/{cid}/profile?purpose=service.support",
        json={"phone": "+1 555 0100 2233"},
        headers=org["support"],
    )
    assert resp.status_code == 204, resp.text


async def test_explain_names_decision_rule_and_reason(
    client: AsyncTestClient[Any], org: Org
) -> None:
    async def explain(**params: str) -> Any:
        return await client.get(
            "/v1/admin/policies/explain", params=params, headers=org["compliance"]
        )

    body = (
        await explain(team="support", category="insight.sentiment", purpose="service.support")
    ).json()
    assert body["decision"] == "deny"
    assert body["allowed"] is False
    assert body["reason"] == "denied_by_policy"
    assert body["rule"]["category"] == "insight.*"
    assert body["rule"]["effect"] == "deny"

    body = (
        await explain(team="support", category="contact.phone", purpose="service.support")
    ).json()
    assert body["decision"] == "allow"
    assert body["reason"] is None
    assert body["mask"] == "none"
    assert body["rule"]["category"] == "contact.*"

    body = (await explain(team="sales", category="contact.phone", purpose="sales.outreach")).json()
    assert body["decision"] == "allow"
    assert body["mask"] == "partial"
    assert body["rule"]["category"] == "contact.phone"
    assert body["rule"]["mask"] == "partial"

    body = (
        await explain(
            team="sales", category="insight.sentiment", action="write", purpose="service.support"
        )
    ).json()
    assert body["decision"] == "allow"
    assert body["rule"]["category"] == "*"

    body = (
        await explain(team="product", category="identity.name", purpose="personalization")
    ).json()
    assert body["decision"] == "none"
    assert body["reason"] == "no_policy"
    assert body["rule"] is None

    for params, code in (
        (
            {"team": "nobody", "category": "identity.name", "purpose": "personalization"},
            "unknown_team",
        ),
        (
            {"team": "sales", "category": "nothing.here", "purpose": "personalization"},
            "unknown_category",
        ),
        ({"team": "sales", "category": "identity.name", "purpose": "nope"}, "unknown_purpose"),
        ({"team": "sales", "category": "contact.*", "purpose": "personalization"}, None),
    ):
        resp = await explain(**params)
        assert 400 <= resp.status_code < 500, (params, resp.text)
        if code is not None:
            assert resp.json()["code"] == code
    resp = await client.get(
        "/v1/admin/policies/explain",
        params={"team": "sales", "category": "identity.name", "purpose": "personalization"},
        headers=org["sales"],
    )
    assert resp.status_code == 403  # admin role needed


async def test_audience_pages_exactly_the_allowed_customers(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """Paginated audience = exactly the customers whose legal basis allows the purpose."""
    ids = [
        await create_customer(client, org, name=f"Audience Member {i}", email=f"aud{i}@example.org")
        for i in range(7)
    ]
    granted = set(ids[:4])
    for cid in granted:
        await consent(direct, cid, "marketing.email", True)
    await consent(direct, ids[0], "marketing.email", False)  # withdrawn again
    await consent(direct, ids[5], "sales.outreach", False)  # objected
    await consent(direct, ids[6], "personalization", True)  # another purpose

    async def audience(team: str, purpose: str, limit: int) -> list[str]:
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(20):
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            resp = await client.get(
                f"/v1/purposes/{purpose}/audience", params=params, headers=org[team]
            )
            assert resp.status_code == 200, resp.text
            page = resp.json()
            assert page["purpose"] == purpose
            assert len(page["items"]) <= limit
            seen.extend(item["id"] for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return seen
        raise AssertionError("pagination did not end")

    for limit in (1, 2, 1000):
        got = await audience("marketing", "marketing.email", limit)
        assert len(got) == len(set(got))
        assert set(got) == granted - {ids[0]}
    assert set(await audience("sales", "sales.outreach", 2)) == set(ids) - {ids[5]}
    assert set(await audience("support", "service.support", 3)) == set(ids)
    assert set(await audience("product", "personalization", 2)) == {ids[6]}
    assert await audience("marketing", "sharing.partners", 5) == []

    resp = await client.get("/v1/purposes/personalization/audience", headers=org["sales"])
    assert_problem(resp, 403, "no_policy", "no_policy")
    resp = await client.get("/v1/purposes/world.domination/audience", headers=org["sales"])
    assert_problem(resp, 400, "unknown_purpose")
    resp = await client.get(
        "/v1/purposes/sales.outreach/audience", params={"limit": 0}, headers=org["sales"]
    )
    assert resp.status_code == 400


async def test_bad_rules_change_nothing(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """Rules naming unknown names, deny with a mask, malformed bodies: 4xx problem,
    the rule count and the policy version stay as they were."""
    admin = org["compliance"]

    async def state() -> tuple[int, int, int]:
        body = (await client.get("/v1/admin/policies", headers=admin)).json()
        return len(body["items"]), body["version"], await direct.policy_store.current_version()

    before = await state()
    good = {"team": "product", "category": "identity.name", "purpose": "personalization"}
    bad: list[tuple[Any, int, str | None]] = [
        ({**good, "team": "nobody"}, 422, "unknown_team"),
        ({**good, "category": "identity.nickname"}, 422, "unknown_category"),
        ({**good, "category": "contact.email.*"}, 422, None),
        ({**good, "purpose": "world.domination"}, 422, "unknown_purpose"),
        ({**good, "mask": "rot13"}, 422, None),
        ({**good, "effect": "deny", "mask": "hash"}, 422, None),
        ({**good, "effect": "maybe"}, 422, None),
        ({**good, "action": "delete"}, 422, None),
        ({**good, "team": "sales, admin"}, 422, None),
        ({**good, "extra": "field"}, 400, None),
        ({"team": "product", "category": "identity.name"}, 400, None),
        ({**good, "team": ""}, 400, None),
        ({**good, "category": "x" * 500}, 400, None),
        ([good], 400, None),
    ]
    for payload, status, code in bad:
        resp = await client.post("/v1/admin/policies", json=payload, headers=admin)
        assert 400 <= resp.status_code < 500, (payload, resp.text)
        assert resp.status_code == status, (payload, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")
        if code is not None:
            assert resp.json()["code"] == code, resp.text
    for raw in (b"{", b"not json", b""):
        resp = await client.post(
            "/v1/admin/policies",
            content=raw,
            headers={**admin, "Content-Type": "application/json"},
        )
        assert resp.status_code == 400, resp.text
    # an identical rule already exists: 409
    dup = {
        "team": "sales",
        "category": "contact.phone",
        "purpose": "sales.outreach",
        "mask": "partial",
    }
    resp = await client.post("/v1/admin/policies", json=dup, headers=admin)
    assert_problem(resp, 409, "duplicate_rule")
    # removing what does not exist
    for rule_id in ("8a4c1fd6-54c4-4b39-9e43-3a1e0d0b4c11", "not-a-rule"):
        resp = await client.delete(f"/v1/admin/policies/{rule_id}", headers=admin)
        assert_problem(resp, 404, "rule_not_found")
    # only admins manage rules
    resp = await client.post("/v1/admin/policies", json=good, headers=org["product"])
    assert resp.status_code == 403
    assert await state() == before

    # A good rule takes effect at once on this instance, and its removal too.
    cid = await create_customer(client, org, name="Rosalind Rulechange")
    await consent(direct, cid, "personalization", True)
    assert disclosed((await read(client, org["product"], cid, "personalization")).json()) == set()
    resp = await client.post("/v1/admin/policies", json=good, headers=admin)
    assert resp.status_code == 201, resp.text
    rule_id = resp.json()["id"]
    count, version, stored = await state()
    assert (count, version, stored) == (before[0] + 1, before[1] + 1, before[2] + 1)
    body = (await read(client, org["product"], cid, "personalization")).json()
    assert body["profile"] == {"name": "Rosalind Rulechange"}
    resp = await client.delete(f"/v1/admin/policies/{rule_id}", headers=admin)
    assert resp.status_code == 204
    assert disclosed((await read(client, org["product"], cid, "personalization")).json()) == set()
    assert (await state())[0] == before[0]


# --- no casbin on the request path ---------------------------------------------------------


ENFORCE_METHODS = ("enforce", "enforce_ex", "batch_enforce")
ROUNDS = 8  # x 7 (team, purpose) reads, plus 403s, lookups, writes, explain


async def test_no_enforce_call_on_the_request_path(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every casbin enforcer (the class, hence the snapshot's enforcer and any per-team
    enforcer, and the snapshot's instance itself) counts its calls: many gated reads,
    writes, lookups, audiences and explanations make none."""
    cid = await full_story(client, org)
    await consent(direct, cid, "marketing.email", True)
    engine = client.app.state.vault.policy
    calls: list[str] = []

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(*args, **kwargs)

        return wrapper

    from casbin.core_enforcer import CoreEnforcer

    for name in ENFORCE_METHODS:
        monkeypatch.setattr(CoreEnforcer, name, counting(name, getattr(CoreEnforcer, name)))
    snapshot = engine.snapshot
    enforcers = [engine.enforcer] + [  # every enforcer the snapshot holds
        getattr(snapshot, f.name)
        for f in dataclasses.fields(snapshot)
        if isinstance(getattr(snapshot, f.name), CoreEnforcer)
    ]
    assert enforcers[1] is engine.enforcer
    for enforcer in {id(e): e for e in enforcers}.values():
        for name in ENFORCE_METHODS:
            monkeypatch.setattr(
                enforcer, name, counting(f"instance.{name}", getattr(enforcer, name))
            )
    # The counters work: a direct call is counted (instance and class).
    assert engine.enforcer.enforce("support", "contact.email", "read", "service.support")
    assert set(calls) == {"instance.enforce", "enforce", "instance.enforce_ex", "enforce_ex"}
    calls.clear()
    version = engine.version

    reads = 0
    for _ in range(ROUNDS):
        for team, purpose in EXPECTED:
            resp = await read(client, org[team], cid, purpose)
            assert resp.status_code == 200, resp.text
            reads += 1
        assert_problem(await read(client, org["sales"], cid, "personalization"), 403, "no_policy")
    resp = await client.get(
        "/v1/customers",
        params={"email": PROFILE["email"], "purpose": "sales.outreach"},
        headers=org["sales"],
    )
    assert resp.json() == {"items": [{"id": cid}]}
    resp = await client.get("/v1/purposes/marketing.email/audience", headers=org["marketing"])
    assert resp.status_code == 200
    resp = await client.post(
        f"/v1/customers/{cid}/chapters?purpose=service.support",
        json={
            "category": "support.ticket",
            "kind": "ticket",
            "occurred_at": "2025-08-01T09:00:00Z",
            "body": {"subject": "follow-up"},
        },
        headers=org["support"],
    )
    assert resp.status_code == 201
    resp = await client.get(
        "/v1/admin/policies/explain",
        params={"team": "sales", "category": "contact.phone", "purpose": "sales.outreach"},
        headers=org["compliance"],
    )
    assert resp.status_code == 200
    assert reads == ROUNDS * len(EXPECTED)
    assert engine.version == version  # no recompile happened in between
    assert calls == [], f"{len(calls)} casbin calls on the request path: {sorted(set(calls))}"


# --- two instances on one PostgreSQL ----------------------------------------------------------


async def test_policy_change_reaches_another_instance_within_a_second(
    pg: PgServer, tmp_path: Path
) -> None:
    """Two app instances on one PostgreSQL and one key ring: a rule added or removed
    through one is in force on the other within a second (LISTEN/NOTIFY)."""
    url = pg.create_database("t_two_instances")
    settings = make_settings(tmp_path, url)  # same data dir: the same key ring
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    app_a = create_app(settings)
    async with AsyncTestClient(app=app_a, raise_server_exceptions=False) as a:
        app_b = create_app(settings)
        async with AsyncTestClient(app=app_b, raise_server_exceptions=False) as b:
            vault_b = b.app.state.vault
            assert vault_b.ring.to_json() == a.app.state.vault.ring.to_json()
            watcher = vault_b.policy_watcher
            # LISTEN is active (polled: the app runs on the test client's own loop and thread)
            deadline = time.monotonic() + 10
            while not watcher.connected.is_set():
                assert time.monotonic() < deadline, "instance B never started listening"
                await asyncio.sleep(0.02)

            assert (
                await a.post("/v1/admin/teams", json={"name": "sales"}, headers=admin)
            ).status_code == 201
            key = (await a.post("/v1/admin/teams/sales/keys", json={}, headers=admin)).json()
            sales = {"Authorization": f"Bearer {key['key']}"}

            async def add(client: AsyncTestClient[Any], **rule: str) -> str:
                resp = await client.post("/v1/admin/policies", json=rule, headers=admin)
                assert resp.status_code == 201, resp.text
                return str(resp.json()["id"])

            await add(a, team="sales", category="*", action="write", purpose="service.support")
            await add(a, team="sales", category="identity.name", purpose="sales.outreach")
            await wait_for_policy(b, a.app.state.vault.policy.version)
            resp = await b.post(
                "/v1/customers?purpose=service.support",
                json={"profile": {"name": "Tobias Twoinstance", "email": "tobias@example.org"}},
                headers=sales,
            )
            assert resp.status_code == 201, resp.text
            cid = resp.json()["id"]
            remember_personal("Tobias Twoinstance", "tobias@example.org")

            async def parts_on(client: AsyncTestClient[Any]) -> set[str]:
                resp = await read(client, sales, cid, "sales.outreach")
                assert resp.status_code == 200, resp.text
                return set(resp.json()["profile"])

            async def until(client: AsyncTestClient[Any], want: set[str]) -> float:
                start = time.monotonic()
                while (got := await parts_on(client)) != want:
                    assert time.monotonic() - start < 1.0, f"after 1 s still {got}, want {want}"
                    await asyncio.sleep(0.01)
                return time.monotonic() - start

            assert await parts_on(b) == {"name"}
            # A -> B: an allow rule
            rule_id = await add(a, team="sales", category="contact.email", purpose="sales.outreach")
            assert await parts_on(a) == {"name", "email"}  # at once on A
            await until(b, {"name", "email"})
            # A -> B: a deny rule overrides
            deny = await add(
                a, team="sales", category="identity.*", purpose="sales.outreach", effect="deny"
            )
            await until(b, {"email"})
            # B -> A: removals
            resp = await b.delete(f"/v1/admin/policies/{deny}", headers=admin)
            assert resp.status_code == 204
            await until(a, {"name", "email"})
            resp = await b.delete(f"/v1/admin/policies/{rule_id}", headers=admin)
            assert resp.status_code == 204
            await until(a, {"name"})
            assert a.app.state.vault.policy.version == vault_b.policy.version


# --- the story cache across instances ------------------------------------------------


async def test_reads_made_at_once_each_get_their_own_answer(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, backend: str
) -> None:
    """Reads that look up their key, customer and consent standing at the same time
    each get exactly the answer they get alone: on PostgreSQL those lookups go to the
    server together, as one statement; a read cancelled while it waits takes no
    other read with it, and a lookup PostgreSQL refuses fails only its own read."""
    granted = await full_story(client, org)
    withdrawn = await full_story(client, org)
    await consent(direct, granted, "marketing.email", True)
    await consent(direct, withdrawn, "marketing.email", True)
    await consent(direct, withdrawn, "marketing.email", False)
    await direct.start(migrate=False)  # its policy, and audit writer, as a server's

    def key(team: str) -> Any:
        return direct.presented_key(org[team]["Authorization"].removeprefix("Bearer "))

    cases = [
        (key("marketing"), granted, "marketing.email"),
        (key("marketing"), withdrawn, "marketing.email"),
        (key("support"), granted, "service.support"),
        (key("sales"), withdrawn, "sales.outreach"),
        (key("support"), str(uuid.UUID(int=7)), "service.support"),  # no such customer
        (direct.presented_key("svk_" + "0" * 40), granted, "service.support"),  # no such key
    ]

    async def answer(credential: Any, cid: str, purpose: str) -> Any:
        try:
            view = await direct.read_story(credential, cid, purpose)
        except Exception as exc:
            return (type(exc).__name__, getattr(exc, "code", None))
        return (
            sorted(view.profile.items()),
            sorted((w["category"], w["reason"]) for w in view.withheld),
        )

    alone = [await answer(*case) for case in cases]
    assert len({repr(a) for a in alone}) == len(cases)  # every case answers differently
    assert alone[1][0] == []
    assert {r for _, r in alone[1][1]} >= {"consent_withdrawn"}
    assert alone[4] == ("NotFound", "customer_not_found")
    assert alone[5][0] == "Unauthorized"

    logged = await log_every_statement(direct.db) if backend == "postgresql" else []
    reads = [asyncio.create_task(answer(*cases[i % len(cases)])) for i in range(61)]
    await asyncio.sleep(0)  # every read now waits for its lookup
    reads[60].cancel()
    together = await asyncio.gather(*reads, return_exceptions=True)
    assert isinstance(together[60], asyncio.CancelledError)
    assert together[:60] == [alone[i % len(cases)] for i in range(60)]
    if backend == "postgresql":
        lookups = [q for q in logged if "api_keys" in q]
        assert len(lookups) == 1, lookups  # one statement for 61 reads
        assert "unnest" in lookups[0]

    # A customer id no read over HTTP could send (the API takes UUIDs only):
    # PostgreSQL refuses its NUL byte, SQLite finds no such customer.
    reads = [asyncio.create_task(answer(*cases[i % len(cases)])) for i in range(30)]
    refused = asyncio.create_task(answer(key("support"), "nul\x00byte", "service.support"))
    together = await asyncio.gather(*reads, refused)
    assert together[:30] == [alone[i % len(cases)] for i in range(30)]
    refused_as = (
        ("DataError", "9h9h") if backend == "postgresql" else ("NotFound", "customer_not_found")
    )
    assert together[30] == refused_as  # 9h9h: SQLAlchemy's code of a DataError


async def test_story_cache_follows_every_change_on_every_instance(
    client: AsyncTestClient[Any],
    org: Org,
    settings: Any,
    direct: StoryVault,
) -> None:
    """Instance B serves repeated reads from its story cache, and still shows each change
    made through instance A (a chapter, a profile field) and one made in the database
    by hand (a deleted chapter) from its very next read."""
    cid = await full_story(client, org)
    support = org["support"]
    app_b = create_app(settings, migrate=False)
    async with AsyncTestClient(app=app_b, raise_server_exceptions=False) as b:
        cache = b.app.state.vault.vault.story_cache
        assert cache is not None

        async def story_on_b() -> dict[str, Any]:
            resp = await read(b, support, cid, "service.support")
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

        first = await story_on_b()
        hits = cache.hits
        again = await story_on_b()
        assert cache.hits == hits + 1  # served from B's cache
        assert {k: v for k, v in again.items() if k != "audit_index"} == {
            k: v for k, v in first.items() if k != "audit_index"
        }

        # A adds a chapter: B shows it on its next read.
        remember_personal("Replacement pole never arrived")
        resp = await client.post(
            f"/v1/customers/{cid}/chapters?purpose=service.support",
            json={
                "category": "support.ticket",
                "kind": "ticket",
                "occurred_at": "2025-07-01T09:00:00Z",
                "body": {"subject": "Replacement pole never arrived"},
            },
            headers=org["sales"],
        )
        assert resp.status_code == 201, resp.text
        new_chapter = resp.json()["id"]
        after_add = await story_on_b()
        assert new_chapter in {c["id"] for c in after_add["chapters"]}
        assert len(after_add["chapters"]) == len(first["chapters"]) + 1

        # A rectifies a profile field: B shows the new value.
        remember_personal("Wilhelmina Rectified")
        resp = await client.patch(
            f"/v1/customers/{cid}/profile?purpose=service.support",
            json={"name": "Wilhelmina Rectified"},
            headers=support,
        )
        assert resp.status_code == 204, resp.text
        assert (await story_on_b())["profile"]["name"] == "Wilhelmina Rectified"

        # An operator deletes a chapter with SQL: the trigger counts it too.
        async with direct.db.engine.begin() as conn:
            await conn.execute(delete(CHAPTERS_TABLE).where(CHAPTERS_TABLE.c.id == new_chapter))
        after_delete = await story_on_b()
        assert new_chapter not in {c["id"] for c in after_delete["chapters"]}
        assert len(after_delete["chapters"]) == len(first["chapters"])


async def test_cached_chapters_are_masked_and_sent_as_an_uncached_read_sends_them(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """A read served from the story cache answers byte for byte as the read that
    filled it (chapters included, which a hit sends as the JSON the cache holds),
    and a mask on a chapter category still applies to a cached story: the view
    that reads ``support.ticket`` redacted never shows the cached, unmasked body."""
    cid = await full_story(client, org)
    cache = client.app.state.vault.vault.story_cache
    assert cache is not None

    def without_index(resp: Any) -> bytes:
        assert resp.status_code == 200, resp.text
        index = resp.json()["audit_index"]
        return bytes(resp.content.replace(f'"audit_index":{index}'.encode(), b""))

    misses = cache.misses
    first = await read(client, org["support"], cid, "service.support")
    hits = cache.hits
    second = await read(client, org["support"], cid, "service.support")
    assert (cache.misses, cache.hits) == (misses + 1, hits + 1)
    assert without_index(second) == without_index(first)
    ticket = next(c for c in second.json()["chapters"] if c["category"] == "support.ticket")
    assert ticket["body"] == {"subject": "Tent pole snapped in the wind"}

    # The same categories for another purpose, one of them masked: a view of its own
    # (the granted set is the cache key), then the mask on every read of it.
    async with direct.db.session() as session:
        catalog = direct._policy_catalog(await direct.teams.team_names(session))
    for category, mask in (("identity.name", None), ("support.ticket", "redact")):
        await direct.policy_store.add_rule(
            RuleSpec(
                team="compliance",
                category=category,
                action="read",
                purpose="service.support",
                mask=mask,
            ),
            catalog,
        )
    await wait_for_policy(client, await direct.policy_store.current_version())
    hits = cache.hits
    for _ in range(2):
        resp = await read(client, org["compliance"], cid, "service.support")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert [c["body"] for c in body["chapters"]] == [{"subject": None}]
        assert body["profile"] == {"name": PROFILE["name"]}
    assert cache.hits == hits + 1  # the second read came from the cache, masked


async def test_a_story_is_the_documented_json_with_the_api_headers(
    client: AsyncTestClient[Any], org: Org
) -> None:
    """The gated read answers with its own light reply (api.controllers.customers.
    JSONReply), filled and from the story cache alike: exactly the bytes Litestar's
    encoder writes for the documented ``StoryRead``, its length, and the headers
    every API reply carries."""
    cid = await full_story(client, org)
    for _ in range(2):  # the miss that fills the story cache, then the hit
        resp = await read(client, org["support"], cid, "service.support")
        assert resp.status_code == 200, resp.text
        h = resp.headers
        assert h["content-type"] == "application/json"
        assert int(h["content-length"]) == len(resp.content)
        assert re.fullmatch(r"[0-9a-f]{32}", h["x-request-id"])
        assert h["cache-control"] == "no-store"
        assert h["x-content-type-options"] == "nosniff"
        assert h["content-security-policy"].startswith("default-src 'none'")
        story = msgspec.json.decode(resp.content, type=StoryRead, strict=True)
        assert encode_json(story) == resp.content
        assert story.customer_id == cid
        assert story.profile
        assert story.chapters
    doc = (await client.get("/schema/openapi.json")).json()
    reply = doc["paths"]["/v1/customers/{customer_id}/story"]["get"]["responses"]["200"]
    assert reply["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StoryRead"
    }
    assert set(doc["components"]["schemas"]["StoryRead"]["properties"]) == set(
        StoryRead.__struct_fields__
    )


async def test_a_cached_story_loses_the_values_of_a_key_destroyed_elsewhere(
    client: AsyncTestClient[Any],
    org: Org,
    settings: Any,
    direct: StoryVault,
) -> None:
    """Instance B serves a story from its story cache. Another instance destroys the
    data key of one category in the key store (the chapter's ciphertext stays until
    the purge, as after an erasure, so the story's version does not change). Once B's
    copy of that key has expired, B's next read, still from its story cache, no longer
    shows the chapter: the cache holds opened values, and the read asks the key store
    whether their keys still exist."""
    cid = await full_story(client, org)
    support = org["support"]
    app_b = create_app(settings, migrate=False)
    async with AsyncTestClient(app=app_b, raise_server_exceptions=False) as b:
        sv_b = b.app.state.vault
        cache = sv_b.vault.story_cache
        assert cache is not None

        async def categories_on_b() -> set[str]:
            resp = await read(b, support, cid, "service.support")
            assert resp.status_code == 200, resp.text
            return disclosed(resp.json())

        before = await categories_on_b()
        assert "support.ticket" in before
        hits = cache.hits
        assert await categories_on_b() == before
        assert cache.hits == hits + 1

        destroyed = await direct.keys.destroy(cid, ["support.ticket"])
        assert len(destroyed) == 1
        # B's copy of the key expires (its TTL, here at once): the white-box step.
        sv_b.keys._cache.pop(destroyed[0])
        after = await categories_on_b()
        assert after == before - {"support.ticket"}
        assert cache.hits == hits + 2  # still the cached story, without that chapter
        assert await categories_on_b() == after


async def test_no_story_cache_without_a_data_key_cache(settings: Any) -> None:
    """The story cache holds opened values and forgets them within the data-key cache's
    TTL; an operator who turns that cache off (size or TTL 0) turns it off too."""
    with_cache = StoryVault(settings)
    try:
        assert with_cache.vault.story_cache is not None
    finally:
        await with_cache.stop()
    for off in ({"dek_cache_size": 0}, {"dek_cache_ttl": 0.0}):
        vault = StoryVault(dataclasses.replace(settings, **off))
        try:
            assert vault.vault.story_cache is None, off
        finally:
            await vault.stop()


async def test_destroying_keys_drops_the_cached_stories_they_opened(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """An instance that destroys a customer's data keys (erasure) forgets at once every
    cached story holding values opened with them, not just when its key is replaced."""
    cid = await full_story(client, org)
    other = await full_story(client, org)
    vault = direct.vault
    cache = vault.story_cache
    assert cache is not None
    for customer in (cid, other):
        loaded = await direct.db.query(lambda c=customer: vault.cached_story(c, 1, None))
        story = await vault.open_loaded("active", loaded)
        assert story.chapters
    assert len(cache) == 2
    await direct.keys.destroy(cid, ["support.ticket"])
    assert len(cache) == 1
    assert cache.get(cid, None, 1) is None
    assert cache.get(other, None, 1) is not None


async def test_a_read_caches_a_customers_data_keys_for_one_lifetime_within_the_ttl(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault
) -> None:
    """The keys one read loads from the key store stay cached for one lifetime: the
    TTL less a random part of up to a fifth of it. So they expire together (the
    next read loads them in one query), no key outlives the TTL, and the keys of
    customers read at about the same moment (a warm-up) do not all expire at once."""
    customers = [await full_story(client, org) for _ in range(3)]
    cache = direct.keys._cache
    assert cache is not None
    assert len(cache) == 0  # this instance has read nothing yet
    before = time.monotonic()
    per_customer: list[set[float]] = []
    for cid in customers:
        held = set(cache)
        loaded = await direct.db.query(lambda c=cid: direct.vault.cached_story(c, 1, None))
        story = await direct.vault.open_loaded("active", loaded)
        assert story.chapters
        new = set(cache) - held
        assert len(new) >= 5  # a key per category written
        per_customer.append({cache._entries[k][0] for k in new})
    after = time.monotonic()
    assert all(len(expiries) == 1 for expiries in per_customer)
    expiries = [e for (e,) in per_customer]
    assert len(set(expiries)) == 3
    assert all(before + 0.8 * cache.ttl <= e <= after + cache.ttl for e in expiries)


class _Explain(Executable, ClauseElement):
    """``EXPLAIN`` of a statement, compiled by the connection's dialect."""

    inherit_cache = False

    def __init__(self, statement: Any, prefix: str) -> None:
        self.statement = statement
        self.prefix = prefix


@compiles(_Explain)
def _compile_explain(element: _Explain, compiler: Any, **kw: Any) -> str:
    return f"{element.prefix} {compiler.process(element.statement, **kw)}"


def _scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a PostgreSQL JSON plan that reads a relation."""
    found = [plan] if "Relation Name" in plan else []
    for child in plan.get("Plans", []):
        found += _scans(child)
    return found


async def test_audience_pages_read_indexes_only(direct: StoryVault, database_url: str) -> None:
    """A page of an audience reads the customers' ids and the consents' expiry from
    indexes, not from the tables: at a million customers the table reads made a
    page cost 160-400 ms on PostgreSQL, the index-only page 16 ms."""
    now = direct.ledger.now()
    n = 3000
    # Pseudonyms in no relation to the order rows were written in, as keyed hashes are.
    subject = {i: "sp_" + hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(1, n + 1)}
    customers = [
        {
            "id": str(uuid.UUID(int=i)),
            "subject": subject[i],
            "status": "active" if i % 10 else "erased",
            "restricted": False,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(1, n + 1)
    ]
    states = [
        {
            "subject": subject[i],
            "purpose": "marketing.email",
            "state": "granted" if i % 3 else "withdrawn",
            "since": now,
            "expires_at": None,
            "last_event_id": uuid.UUID(int=i),
            "last_ledger_index": i,
        }
        for i in range(1, n + 1, 2)
    ]
    async with direct.db.engine.begin() as conn:
        await conn.execute(CustomerRow.__table__.insert(), customers)  # type: ignore[attr-defined]
        await conn.execute(ConsentState.__table__.insert(), states)  # type: ignore[attr-defined]
    # Active customers with a standing grant: odd i (a consent row), not every third
    # (withdrawn), not every tenth (erased).
    expected = sorted(subject[i] for i in range(1, n + 1) if i % 2 and i % 3 and i % 10)
    after = expected[len(expected) // 2]
    query = audience_page(direct.ledger.terms("marketing.email"), now, after, 100)
    if database_url.startswith("postgresql"):
        async with direct.db.engine.connect() as opened:
            conn = await opened.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE customers, consent_state"))
        async with direct.db.engine.begin() as conn:
            # Whether the indexes cover the page, not the planner's choice for
            # tables this small: plans that read the tables are ruled out.
            await conn.execute(text("SET LOCAL enable_seqscan = off"))
            await conn.execute(text("SET LOCAL enable_bitmapscan = off"))
            explain = _Explain(query, "EXPLAIN (ANALYZE, FORMAT JSON)")
            plan = (await conn.execute(explain)).scalar_one()
            rows = (await conn.execute(query)).all()
        scans = _scans(plan[0]["Plan"])
        assert {s["Relation Name"] for s in scans} == {"customers", "consent_state"}
        for scan in scans:
            assert scan["Node Type"] == "Index Only Scan", scan
            assert scan["Heap Fetches"] == 0, scan
    else:
        async with direct.db.engine.connect() as conn:
            details = [r[-1] for r in await conn.execute(_Explain(query, "EXPLAIN QUERY PLAN"))]
            rows = (await conn.execute(query)).all()
        # SQLite looks each consent up by its primary key: the customers' side is
        # the one that walks the table.
        assert any("customers USING COVERING INDEX ix_customers_audience" in d for d in details), (
            details
        )
    # And the page is the right one: the next 100 allowed, active customers in order.
    assert [r[1] for r in rows] == [s for s in expected if s > after][:100]
