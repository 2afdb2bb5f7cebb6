"""Consented insights (issue 11), on SQLite and on a real PostgreSQL.

Signals are derived inside the vault from what policy and consent allow, audited,
shown to the customer too; profiling stops at once on objection; aggregates
suppress small groups and never carry ids. Stories are seeded with known answers
(see the signal definitions in governance/insights.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
from litestar.testing import AsyncTestClient

from consent import Channel
from governance.export import export_schema
from governance.insights import ALL_INPUTS, SIGNALS, compute_signals
from governance.service import StoryVault
from governance.settings import Settings
from tests.conftest import remember_personal
from tests.integration.portal import sign_in

Headers = dict[str, str]
Org = dict[str, Headers]
DAY = timedelta(days=1)
FAULT = "Zip on the jacket broke"
Story = list[tuple[str, str, timedelta, dict[str, Any]]]


async def seed(
    direct: StoryVault,
    chapters: Story,
    *,
    email: str | None = None,
    profiling: bool = False,
) -> str:
    """A customer with ``chapters`` (category, kind, age, body), written in one transaction,
    and, if asked, the analytics.profiling consent."""
    now = datetime.now(UTC)
    profile = {"name": "Insight Person"}
    if email:
        profile["email"] = email
        remember_personal(email)
    async with direct.db.write_session() as session:
        cid = await direct.vault.create_customer(session, external_ref=None, profile=profile)
        for category, kind, age, body in chapters:
            await direct.vault.add_chapter(
                session,
                cid,
                category=category,
                kind=kind,
                occurred_at=now - age,
                body=direct.vault.validate_chapter(category, kind, body),
                author_team="support",
            )
        await session.commit()
    if profiling:
        await consent(direct, cid, "analytics.profiling", granted=True)
    return cid


async def consent(direct: StoryVault, cid: str, purpose: str, *, granted: bool) -> None:
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


# A frustrating week: three contacts about the same fault (a ticket, a chat, a call),
# sentiment falling into a run of three negative scores.
FRUSTRATED: Story = [
    ("commerce.purchase", "purchase", 40 * DAY, {"product": "Rain jacket", "amount": 189.0}),
    ("support.ticket", "ticket", 3 * DAY, {"subject": FAULT, "status": "open"}),
    (
        "engagement.interaction",
        "chat",
        2 * DAY,
        {"summary": "asked again", "topic": "zip on the  jacket broke"},
    ),
    (
        "engagement.interaction",
        "call",
        DAY + timedelta(hours=3),
        {"summary": "angry call", "topic": FAULT.upper()},
    ),
    ("insight.sentiment", "sentiment", 80 * DAY, {"score": 0.5, "note": "happy with the jacket"}),
    ("insight.sentiment", "sentiment", 60 * DAY, {"score": 0.3, "note": "fine"}),
    ("insight.sentiment", "sentiment", 3 * DAY, {"score": -0.2, "note": "annoyed"}),
    ("insight.sentiment", "sentiment", 2 * DAY, {"score": -0.5, "note": "frustrated"}),
    ("insight.sentiment", "sentiment", DAY + timedelta(hours=3), {"score": -0.6, "note": "angry"}),
]
# A calm customer: one resolved ticket weeks ago, an unrelated chat, steady sentiment.
CALM: Story = [
    ("commerce.purchase", "purchase", 10 * DAY, {"product": "Headlamp", "amount": 39.9}),
    (
        "support.ticket",
        "ticket",
        20 * DAY,
        {"subject": "Wrong size delivered", "status": "resolved"},
    ),
    (
        "engagement.interaction",
        "email",
        20 * DAY - timedelta(hours=1),
        {"summary": "thanks", "topic": "exchange done"},
    ),
    ("insight.sentiment", "sentiment", 50 * DAY, {"score": 0.4, "note": "ok"}),
    ("insight.sentiment", "sentiment", 20 * DAY, {"score": 0.5, "note": "pleased"}),
]


async def insights(client: AsyncTestClient[Any], headers: Headers, cid: str, purpose: str) -> Any:
    return await client.get(
        f"/v1/customers/{cid}/insights", params={"purpose": purpose}, headers=headers
    )


def by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in body["signals"]}


def withheld_signals(body: dict[str, Any]) -> dict[str, str]:
    return {w["signal"]: w["reason"] for w in body["withheld"] if "signal" in w}


def withheld_categories(body: dict[str, Any]) -> dict[str, str]:
    return {w["category"]: w["reason"] for w in body["withheld"] if "category" in w}


async def test_known_answers_repeat_effort_and_shift(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, admin: Headers
) -> None:
    frustrated = await seed(direct, FRUSTRATED, profiling=True)
    calm = await seed(direct, CALM, profiling=True)

    resp = await insights(client, org["product"], frustrated, "analytics.profiling")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["customer_id"] == frustrated
    assert body["purpose"] == "analytics.profiling"
    assert [s["name"] for s in body["signals"]] == [
        "continuity",
        "sentiment_trend",
        "effort",
        "drift_risk",
    ]
    assert body["withheld"] == []
    s = by_name(body)
    assert s["continuity"]["value"] == {
        "contacts_7d": 3,
        "contacts_30d": 3,
        "repeat_contacts_30d": 2,
        "max_contacts_one_topic_30d": 3,
        "repeat_flag": True,
        "days_since_last_contact": 1,
    }
    assert s["continuity"]["inputs"] == ["support.ticket", "engagement.interaction"]
    assert "repeat contact" in s["continuity"]["explanation"]
    effort = s["effort"]["value"]
    assert effort["points"] == {"repeat_contacts": 20, "channel_switches": 10, "open_tickets": 10}
    assert effort["score"] == 40
    assert effort["band"] == "medium"
    assert effort["channels_30d"] == ["call", "chat"]
    assert effort["open_tickets"] == 1
    trend = s["sentiment_trend"]["value"]
    assert trend["latest"] == -0.6
    assert trend["scores_90d"] == 5
    assert abs(trend["change_90d"] - (-0.6 - (0.5 + 0.3 - 0.2 - 0.5) / 4)) < 1e-3
    assert trend["negative_run"] == 3
    assert trend["shift_flag"] is True
    assert trend["band"] == "negative"
    assert s["sentiment_trend"]["inputs"] == ["insight.sentiment"]
    drift = s["drift_risk"]["value"]
    assert drift["factors"] == {
        "recency": round(1 / 180, 3),
        "frequency": round(1 - 4 / 6, 3),
        "sentiment": 1.0,  # the fall (0.625) exceeds 0.6
        "open_issues": round(1 / 3, 3),
    }
    assert abs(sum(drift["contributions"].values()) - drift["score"]) <= 0.6
    assert drift["band"] == "medium"
    for name in ("recency", "frequency", "sentiment", "open issues"):
        assert name in s["drift_risk"]["explanation"]

    calm_body = (await insights(client, org["product"], calm, "analytics.profiling")).json()
    c = by_name(calm_body)
    assert c["continuity"]["value"]["repeat_flag"] is False
    assert c["continuity"]["value"]["contacts_7d"] == 0
    assert c["continuity"]["value"]["contacts_30d"] == 2
    assert c["effort"]["value"]["score"] == 0 < effort["score"]
    assert c["sentiment_trend"]["value"]["shift_flag"] is False
    assert c["drift_risk"]["value"]["score"] < drift["score"]

    # the audit entry names the signals and the categories they came from
    entry = (await client.get(f"/v1/audit/entries/{body['audit_index']}", headers=admin)).json()
    assert entry["kind"] == "disclosure"
    assert entry["actor"] == "product"
    assert entry["purpose"] == "analytics.profiling"
    assert entry["detail"]["operation"] == "insights.read"
    assert entry["detail"]["signals"] == "continuity,sentiment_trend,effort,drift_risk"
    assert entry["categories"] == sorted(
        ["support.ticket", "engagement.interaction", "insight.sentiment", "commerce.purchase"]
    )
    assert entry["subject"] == direct.ring.pseudonym(frustrated)
    assert FAULT not in json.dumps(entry)


async def test_teams_without_policy_or_consent_get_reasons_and_no_signal(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, admin: Headers
) -> None:
    cid = await seed(direct, FRUSTRATED)  # no analytics.profiling consent
    await consent(direct, cid, "marketing.email", granted=True)

    # marketing may read for marketing.email, but nothing signals are made of
    body = (await insights(client, org["marketing"], cid, "marketing.email")).json()
    assert body["signals"] == []
    assert withheld_categories(body) == {
        "commerce.purchase": "no_policy",
        "engagement.interaction": "no_policy",
        "insight.sentiment": "denied_by_policy",
        "support.ticket": "no_policy",
    }
    assert withheld_signals(body) == {
        "continuity": "no_policy",
        "effort": "no_policy",
        "sentiment_trend": "denied_by_policy",
        "drift_risk": "denied_by_policy",
    }
    entry = (await client.get(f"/v1/audit/entries/{body['audit_index']}", headers=admin)).json()
    assert entry["kind"] == "denial"
    assert entry["categories"] == []
    assert entry["detail"]["signals"] == ""

    # product's profiling purpose needs consent the customer never gave
    body = (await insights(client, org["product"], cid, "analytics.profiling")).json()
    assert body["signals"] == []
    assert set(withheld_signals(body).values()) == {"no_consent"}
    assert set(withheld_categories(body).values()) == {"no_consent"}

    # support under the contract: continuity and effort, decrypted from exactly their inputs;
    # the profiling signals are denied by policy (insight.* deny)
    app_vault = client.app.state.vault
    asked: list[list[str]] = []
    original = app_vault.load_inputs

    async def spy(session: Any, ids: list[str], categories: Any, now: datetime) -> Any:
        asked.append(sorted(categories))
        return await original(session, ids, categories, now)

    app_vault.load_inputs = spy
    try:
        body = (await insights(client, org["support"], cid, "service.support")).json()
    finally:
        del app_vault.load_inputs
    assert [s["name"] for s in body["signals"]] == ["continuity", "effort"]
    assert asked == [["engagement.interaction", "support.ticket"]]
    assert withheld_signals(body) == {
        "sentiment_trend": "denied_by_policy",
        "drift_risk": "denied_by_policy",
    }
    assert withheld_categories(body) == {"insight.sentiment": "denied_by_policy"}

    # a team with no read rule at all for the purpose: 403, nothing computed
    resp = await insights(client, org["sales"], cid, "service.support")
    assert resp.status_code == 403, resp.text
    assert resp.json()["code"] == "no_policy"
    # bad input: 4xx problems
    assert (await insights(client, org["support"], cid, "no.such")).status_code == 400
    assert (
        await insights(client, org["support"], "not-a-uuid", "service.support")
    ).status_code == 400
    missing = await insights(
        client, org["support"], "00000000-0000-4000-8000-000000000000", "service.support"
    )
    assert missing.status_code == 404
    resp = await client.get(f"/v1/customers/{cid}/insights", headers=org["support"])
    assert resp.status_code == 400
    assert resp.json()["code"] == "purpose_required"


async def test_objection_stops_profiling_at_once_for_everyone(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, admin: Headers, settings: Settings
) -> None:
    email = "olivia.objects@example.org"
    cid = await seed(direct, FRUSTRATED, email=email, profiling=True)
    me = await sign_in(client, settings, email)
    # sales may use tickets, interactions and sentiment for outreach (legitimate interest):
    # the profiling signals still need the customer's analytics.profiling consent
    for category in ("support.ticket", "engagement.interaction", "insight.sentiment"):
        resp = await client.post(
            "/v1/admin/policies",
            json={
                "team": "sales",
                "category": category,
                "action": "read",
                "purpose": "sales.outreach",
            },
            headers=admin,
        )
        assert resp.status_code == 201, resp.text

    before = (await insights(client, org["sales"], cid, "sales.outreach")).json()
    assert set(by_name(before)) == {"continuity", "sentiment_trend", "effort", "drift_risk"}
    assert (
        len(by_name((await insights(client, org["product"], cid, "analytics.profiling")).json()))
        == 4
    )
    mine = (await client.get("/v1/me/insights", headers=me)).json()
    assert mine["profiling"]["allowed"] is True
    assert len(mine["signals"]) == 4

    resp = await client.put(
        "/v1/me/consents/analytics.profiling", json={"granted": False}, headers=me
    )
    assert resp.status_code == 200, resp.text

    after = (await insights(client, org["sales"], cid, "sales.outreach")).json()
    assert [s["name"] for s in after["signals"]] == ["continuity", "effort"]
    assert withheld_signals(after) == {
        "sentiment_trend": "consent_withdrawn",
        "drift_risk": "consent_withdrawn",
    }
    product = (await insights(client, org["product"], cid, "analytics.profiling")).json()
    assert product["signals"] == []
    assert set(withheld_signals(product).values()) == {"consent_withdrawn"}
    mine = (await client.get("/v1/me/insights", headers=me)).json()
    assert mine["profiling"]["allowed"] is False
    assert mine["profiling"]["reason"] == "consent_withdrawn"
    assert [s["name"] for s in mine["signals"]] == ["continuity", "effort"]
    assert {w["signal"]: w["reason"] for w in mine["withheld"]} == {
        "sentiment_trend": "consent_withdrawn",
        "drift_risk": "consent_withdrawn",
    }
    assert all("object" in w["explanation"] for w in mine["withheld"])


async def test_customer_view_matches_team_view_and_export(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, admin: Headers, settings: Settings
) -> None:
    email = "theo.sameview@example.org"
    cid = await seed(direct, FRUSTRATED + CALM, email=email, profiling=True)
    me = await sign_in(client, settings, email)

    team = (await insights(client, org["product"], cid, "analytics.profiling")).json()
    resp = await client.get("/v1/me/insights", headers=me)
    assert resp.status_code == 200, resp.text
    mine = resp.json()
    assert mine["customer_id"] == cid
    assert mine["withheld"] == []
    assert "PUT /v1/me/consents/analytics.profiling" in mine["profiling"]["explanation"]
    assert mine["signals"] == team["signals"]  # same values, inputs and explanations
    support = (await insights(client, org["support"], cid, "service.support")).json()
    for signal in support["signals"]:
        assert signal == by_name(mine)[signal["name"]]

    # a team cannot use the customer's endpoint, nor the customer the team's
    assert (await client.get("/v1/me/insights", headers=org["product"])).status_code in (401, 403)
    assert (await insights(client, me, cid, "analytics.profiling")).status_code in (401, 403)

    # the export carries the same signals, and validates against the published schema
    resp = await client.get("/v1/me/export", params={"format": "json"}, headers=me)
    assert resp.status_code == 200, resp.text
    export = json.loads(resp.content)
    jsonschema.validate(export, export_schema())
    exported = {i["name"]: i for i in export["insights"]}
    assert set(exported) == {"continuity", "sentiment_trend", "effort", "drift_risk"}
    for signal in mine["signals"]:
        assert exported[signal["name"]]["computed"] is True
        assert exported[signal["name"]]["value"] == signal["value"]
    # the customer's own reads are audited, as access by the data subject
    page = (
        await client.get("/v1/audit/entries", params={"customer_id": cid}, headers=admin)
    ).json()
    ops = [e["detail"].get("operation") for e in page["items"]]
    assert "me.insights" in ops
    assert "insights.read" in ops


async def test_summary_suppresses_small_groups_and_never_returns_ids(
    client: AsyncTestClient[Any], org: Org, direct: StoryVault, admin: Headers
) -> None:
    low = [await seed(direct, CALM, profiling=True) for _ in range(12)]
    # three open tickets each about a different fault: 30 effort points, band medium
    busy_story: Story = [
        (
            "support.ticket",
            "ticket",
            (i + 1) * DAY,
            {"subject": f"Fault number {i}", "status": "open"},
        )
        for i in range(3)
    ]
    busy = [await seed(direct, busy_story) for _ in range(3)]

    resp = await client.get(
        "/v1/insights/summary",
        params={"purpose": "service.support", "group_by": "effort_band"},
        headers=org["support"],
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["k"] == 10
    assert body["truncated"] is False
    assert body["signals"] == ["continuity", "effort"]
    assert [(g["group"], g["count"]) for g in body["groups"]] == [("low", 12)]
    assert body["suppressed_groups"] == 1
    assert body["customers_included"] == 12
    averages = body["groups"][0]["averages"]
    assert averages["effort"] == 0.0
    assert averages["contacts_30d"] == 2.0
    assert "drift_risk" not in averages
    assert "sentiment_latest" not in averages
    text = resp.text
    assert not any(cid in text for cid in low + busy)
    assert "medium" not in text  # not even the name of the suppressed group

    resp = await client.get(
        "/v1/insights/summary",
        params={"purpose": "service.support", "group_by": "open_tickets"},
        headers=org["support"],
    )
    assert [(g["group"], g["count"]) for g in resp.json()["groups"]] == [("0", 12)]

    # product, for analytics.profiling: only customers who consented count (the 12)
    resp = await client.get(
        "/v1/insights/summary",
        params={"purpose": "analytics.profiling", "group_by": "drift_band"},
        headers=org["product"],
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["suppressed_groups"] == 0
    assert sum(g["count"] for g in body["groups"]) == 12
    assert all(g["averages"]["drift_risk"] is not None for g in body["groups"])

    # the summary is audited, without a subject
    entry = (await client.get(f"/v1/audit/entries/{body['audit_index']}", headers=admin)).json()
    assert entry["detail"]["operation"] == "insights.summary"
    assert entry["subject"] is None
    assert entry["detail"]["group_by"] == "drift_band"

    # bad input and denied derivations
    for params, status, code in [
        ({"purpose": "service.support", "group_by": "customer_id"}, 400, "invalid_query"),
        ({"purpose": "service.support"}, 400, "invalid_query"),
        ({"group_by": "effort_band"}, 400, "purpose_required"),
        ({"purpose": "service.support", "group_by": "drift_band"}, 403, "denied_by_policy"),
    ]:
        resp = await client.get("/v1/insights/summary", params=params, headers=org["support"])
        assert resp.status_code == status, (params, resp.text)
        assert resp.json()["code"] == code
    resp = await client.get(
        "/v1/insights/summary",
        params={"purpose": "marketing.email", "group_by": "effort_band"},
        headers=org["marketing"],
    )
    assert resp.status_code == 403
    assert resp.json()["code"] == "no_policy"


async def test_minimised_decryption_gives_the_same_signals(direct: StoryVault) -> None:
    """load_inputs decrypts only the bodies a signal reads; the signals equal those
    computed over the fully decrypted story (including a latest score older than 90 days)."""
    await direct.start()
    old_only: Story = [
        ("insight.sentiment", "sentiment", 200 * DAY, {"score": 0.2, "note": "fine"}),
        ("insight.sentiment", "sentiment", 120 * DAY, {"score": -0.7, "note": "upset"}),
        ("engagement.interaction", "visit", 100 * DAY, {"summary": "shop", "topic": "fitting"}),
        ("support.ticket", "ticket", 300 * DAY, {"subject": "Old fault", "status": "open"}),
    ]
    for story in (FRUSTRATED + CALM, old_only, []):
        cid = await seed(direct, story)
        now = datetime.now(UTC)
        async with direct.db.session() as session:
            full = await direct.vault.read_story(session, cid, ALL_INPUTS)
            loaded = await direct.load_inputs(session, [cid], ALL_INPUTS, now)
        decrypted = sum(1 for ch in loaded.get(cid, []) if ch.body)
        assert compute_signals(loaded.get(cid, []), now, list(SIGNALS)) == compute_signals(
            full.chapters, now, list(SIGNALS)
        )
        if story is old_only:
            assert decrypted == 2  # the open ticket and the latest score, nothing else
            signals = {s.name: s for s in compute_signals(loaded[cid], now, list(SIGNALS))}
            assert signals["sentiment_trend"].value["latest"] == -0.7
            assert signals["effort"].value["open_tickets"] == 1
