"""Compliance reports over a seeded dataset with known counts: records of processing,
consent evidence, the requests register, access statistics and log integrity, as JSON,
CSV and HTML; admin only; every report's hash lands in the audit log."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import update

from consent import Ledger
from governance.catalog import load_catalog
from governance.models import RIGHTS_REQUESTS, RightsRequestRow
from governance.service import StoryVault
from tests.integration.portal import new_customer

ALL_CATEGORIES = sorted(load_catalog().categories)
SCREENSHOTS = Path(__file__).parents[1] / "e2e" / "screenshots"


# --- the seeded dataset ---------------------------------------------------------------


async def _read(
    client: AsyncTestClient[Any], team: dict[str, str], cid: str, purpose: str
) -> dict[str, Any]:
    resp = await client.get(f"/v1/customers/{cid}/story?purpose={purpose}", headers=team)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def seed(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], direct: StoryVault
) -> dict[str, Any]:
    """Three customers, consent events of every kind, six reads (two teams disclosed,
    four denials with four different reasons) and four rights requests. Returns what
    the reports must count."""
    c1 = await new_customer(client, org["support"], "ada.report@example.org", "Ada Reportwell")
    c2 = await new_customer(client, org["support"], "bo.report@example.org", "Bo Reportwell")
    c3 = await new_customer(client, org["support"], "cy.report@example.org", "Cy Reportwell")
    s1, s2, s3 = (direct.ring.pseudonym(c) for c in (c1, c2, c3))

    # Consent: a grant 731 days ago (outside any default window) that expires now.
    now = datetime.now(UTC)
    past = Ledger(direct.purpose_terms(), clock=lambda: now - timedelta(days=731))
    async with direct.db.write_session() as s:
        await past.grant(s, s3, "marketing.email")
        await s.commit()
    async with direct.db.write_session() as s:
        await direct.ledger.record(s, s1, "marketing.email", granted=True)
        await direct.ledger.record(s, s1, "personalization", granted=True)
        await direct.ledger.record(s, s2, "marketing.email", granted=True)
        await direct.ledger.record(s, s2, "marketing.email", granted=False)
        await direct.ledger.record(s, s3, "sales.outreach", granted=False)  # an objection
        assert await direct.ledger.expire(s, s3, "marketing.email") is not None
        await s.commit()
    assert await direct.apply_gpc(c3) == 1  # sharing.partners: one GPC opt-out

    # Reads: what each one disclosed and withheld is taken from the responses.
    reads = [
        ("support", c1, "service.support"),
        ("support", c1, "service.support"),
        ("marketing", c1, "marketing.email"),
        ("marketing", c2, "marketing.email"),  # withdrawn
        ("marketing", c3, "marketing.email"),  # expired
        ("sales", c3, "sales.outreach"),  # objected
        ("product", c2, "personalization"),  # never granted
    ]
    disclosed: Counter[tuple[str, str, str]] = Counter()
    withheld: Counter[str] = Counter()
    per_read: Counter[tuple[str, str, str]] = Counter()
    for team, cid, purpose in reads:
        story = await _read(client, org[team], cid, purpose)
        held = {w["category"]: w["reason"] for w in story["withheld"]}
        withheld.update(held.values())
        granted = [c for c in ALL_CATEGORIES if c not in held]
        per_read[(team, purpose, "disclosures" if granted else "denials")] += 1
        for category in granted:
            disclosed[(team, purpose, category)] += 1

    # Requests: three opened by a team, one erasure completed after ten days.
    opened = []
    for cid, type_ in ((c1, "access"), (c2, "objection"), (c3, "restriction")):
        r = await client.post(
            f"/v1/customers/{cid}/requests",
            json={"type": type_, "channel": "letter"},
            headers=org["support"],
        )
        assert r.status_code == 201, r.text
        opened.append(r.json()["id"])
    r = await client.post(
        f"/v1/admin/requests/{opened[2]}/extend",
        json={"reason": "records held on paper at two sites", "days": 30},
        headers=org["compliance"],
    )
    assert r.status_code in (200, 201), r.text
    erasure = await direct.rights.erase(c2, ["contact.phone"])
    async with direct.db.write_session() as s:
        await s.execute(
            update(RightsRequestRow)
            .where(RIGHTS_REQUESTS.id == opened[0])
            .values(due_at=now - timedelta(days=1))
        )  # overdue
        await s.execute(
            update(RightsRequestRow)
            .where(RIGHTS_REQUESTS.id == opened[1])
            .values(due_at=now + timedelta(days=3))
        )  # due soon
        await s.execute(
            update(RightsRequestRow)
            .where(RIGHTS_REQUESTS.id == erasure.request_id)
            .values(received_at=now - timedelta(days=10))
        )
        await s.commit()
    return {
        "customers": (c1, c2, c3),
        "disclosed": disclosed,
        "withheld": withheld,
        "per_read": per_read,
        "requests": opened,
        "erasure": erasure.request_id,
    }


async def _report(
    client: AsyncTestClient[Any],
    headers: dict[str, str],
    name: str,
    fmt: str = "json",
    **params: Any,
) -> Any:
    resp = await client.get(
        f"/v1/reports/{name}", params={"format": fmt, **params}, headers=headers
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-report-sha256"] == hashlib.sha256(resp.content).hexdigest()
    return resp


# --- the tests ----------------------------------------------------------------------


async def test_reports_match_the_seeded_counts(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], direct: StoryVault
) -> None:
    seeded = await seed(client, org, direct)
    admin = org["compliance"]

    # Records of processing: from the catalog and the policy in force.
    ropa = (await _report(client, admin, "ropa")).json()
    by_purpose = {p["purpose"]: p for p in ropa["purposes"]}
    assert set(by_purpose) == set(direct.catalog.purposes)
    email = by_purpose["marketing.email"]
    assert email["legal_basis"] == "consent"
    assert email["data_use"] == direct.catalog.purposes["marketing.email"].fideslang
    assert email["data_subjects"] == ["customers"]
    assert [c["category"] for c in email["categories"]] == [
        "contact.email",
        "identity.name",
        "preference",
    ]
    assert [r["team"] for r in email["recipients"]] == ["marketing"]
    sharing = {r["team"]: r["categories"] for r in by_purpose["sharing.partners"]["recipients"]}
    assert sharing == {"marketing": {"contact.email": "hash", "identity.name": "none"}}
    support = by_purpose["service.support"]
    assert support["legal_basis"] == "contract"
    assert len(support["categories"]) == 10  # everything but the insights it is denied
    invoice = next(c for c in support["categories"] if c["category"] == "commerce.invoice")
    assert "legal hold" in invoice["retention"]
    assert any("AES-256-GCM" in m for m in ropa["security_measures"])
    assert any("RFC 9162" in m for m in ropa["security_measures"])
    rows = list(csv.DictReader(io.StringIO((await _report(client, admin, "ropa", "csv")).text)))
    assert {(r["purpose"], r["category"]) for r in rows if r["purpose"] == "marketing.email"} == {
        ("marketing.email", c) for c in ("contact.email", "identity.name", "preference")
    }

    # Consent evidence: GROUP BY over the ledger, the 731-day-old grant outside the window.
    consent = (await _report(client, admin, "consent")).json()
    got = {(p["purpose"], p["notice_version"]): p for p in consent["by_purpose"]}
    zero = dict.fromkeys(
        ("grants", "withdrawals", "expiries", "objections", "gpc_opt_outs", "objections_lifted"), 0
    )
    expected = {
        "marketing.email": {**zero, "grants": 2, "withdrawals": 1, "expiries": 1},
        "personalization": {**zero, "grants": 1},
        "sales.outreach": {**zero, "objections": 1},
        "sharing.partners": {**zero, "gpc_opt_outs": 1},
        "analytics.profiling": zero,
    }
    for purpose, counts in expected.items():
        row = got[(purpose, "1")]
        assert {k: row[k] for k in zero} == counts, purpose
    assert sum(d["grants"] for d in consent["by_day"]) == 3
    assert consent["current_standing"]["marketing.email"] == {
        "granted": 1,
        "withdrawn": 1,
        "expired": 1,
    }
    rows = list(csv.DictReader(io.StringIO((await _report(client, admin, "consent", "csv")).text)))
    assert sum(int(r["grants"]) for r in rows) == 3
    assert sum(int(r["gpc_opt_outs"]) for r in rows if r["purpose"] == "sharing.partners") == 1
    older = (
        await _report(
            client, admin, "consent", since=(datetime.now(UTC) - timedelta(days=800)).isoformat()
        )
    ).json()
    assert {p["purpose"]: p["grants"] for p in older["by_purpose"]}["marketing.email"] == 3

    # The requests register.
    requests = (await _report(client, admin, "requests")).json()
    summary = requests["summary"]
    assert {
        k: summary[k] for k in ("open", "due_soon", "overdue", "received", "completed", "extended")
    } == {"open": 3, "due_soon": 1, "overdue": 1, "received": 4, "completed": 1, "extended": 1}
    assert summary["median_days_to_complete"] == pytest.approx(10.0, abs=0.01)
    assert requests["by_type"]["erasure"]["completed"] == 1
    assert requests["by_type"]["access"]["overdue"] == 1
    assert [(e["request_id"], e["reason"]) for e in requests["extensions"]] == [
        (seeded["requests"][2], "records held on paper at two sites")
    ]
    rows = list(csv.DictReader(io.StringIO((await _report(client, admin, "requests", "csv")).text)))
    assert {r["request_id"] for r in rows} == {*seeded["requests"], seeded["erasure"]}
    assert [r["overdue"] for r in rows if r["request_id"] == seeded["requests"][0]] == ["True"]

    # Access: reads by team and purpose, categories from the leaves, denials by reason.
    access = (await _report(client, admin, "access")).json()
    reads = Counter()
    for r in access["reads"]:
        reads[(r["team"], r["purpose"], "disclosures")] += r["disclosures"]
        reads[(r["team"], r["purpose"], "denials")] += r["denials"]
    assert +reads == seeded["per_read"]
    assert access["totals"] == {"disclosures": 3, "denials": 4}
    assert {
        (d["team"], d["purpose"], d["category"]): d["count"] for d in access["disclosures"]
    } == dict(seeded["disclosed"])
    assert access["denials_by_reason"] == {
        "consent_expired": 1,
        "consent_withdrawn": 1,
        "no_consent": 1,
        "objected": 1,
    }
    assert access["withheld_by_reason"] == dict(seeded["withheld"])
    rows = list(csv.DictReader(io.StringIO((await _report(client, admin, "access", "csv")).text)))
    assert sum(int(r["count"]) for r in rows if r["measure"] == "disclosed") == sum(
        seeded["disclosed"].values()
    )
    # A window that ends before the reads sees none of them.
    empty = (await _report(client, admin, "access", until="2020-01-01T00:00:00Z")).json()
    assert empty["totals"] == {"disclosures": 0, "denials": 0}

    # HTML: self-contained pages with their charts as inline SVG.
    for name in ("consent", "requests", "access", "integrity"):
        page = (await _report(client, admin, name, "html")).text
        assert page.startswith("<!DOCTYPE html>")
        assert "<svg" in page
        assert "@media print" in page
        assert "<script" not in page
        assert "http://" not in page.replace("http://www.w3.org", "")
    assert "<table>" in (await _report(client, admin, "ropa", "html")).text


async def test_every_report_hash_is_in_the_audit_log(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]]
) -> None:
    admin = org["compliance"]
    generated = {}
    for name, fmt in (("ropa", "html"), ("consent", "csv"), ("integrity", "json")):
        resp = await _report(client, admin, name, fmt)
        generated[hashlib.sha256(resp.content).hexdigest()] = (
            name,
            fmt,
            int(resp.headers["x-report-audit-index"]),
        )
    for digest, (name, fmt, index) in generated.items():
        entry = (await client.get(f"/v1/audit/entries/{index}", headers=admin)).json()
        assert entry["kind"] == "report"
        assert entry["actor"] == "compliance"
        assert entry["detail"]["report"] == name
        assert entry["detail"]["format"] == fmt
        assert entry["detail"]["sha256"] == digest


async def test_integrity_proves_consistency_with_the_previous_report(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], direct: StoryVault
) -> None:
    admin = org["compliance"]
    await new_customer(client, org["support"], "di.integrity@example.org", "Di Integrity")
    first = (await _report(client, admin, "integrity")).json()
    head = first["tree_head"]
    assert head["signature_valid"] is True
    assert first["log_verification"]["ok"] is True
    assert first["consent_ledger"]["performed"] is True
    assert first["keys"]["current_kek"] == 1
    assert first["keys"]["rotation_status"] == "current"
    await new_customer(client, org["support"], "ed.integrity@example.org", "Ed Integrity")
    second = (
        await _report(
            client,
            admin,
            "integrity",
            from_size=head["tree_size"],
            from_root=head["root_hash"],
            verify="false",
        )
    ).json()
    proof = second["consistency"]
    assert proof["first"] == head["tree_size"]
    assert proof["second"] == second["tree_head"]["tree_size"] > head["tree_size"]
    assert proof["first_root_source"] == "given"
    assert proof["verified"] is True
    assert second["log_verification"] == {"performed": False}
    # An independent check with the audit package's RFC 9162 verifier.
    from audit import verify_consistency

    assert verify_consistency(
        proof["first"],
        proof["second"],
        [bytes.fromhex(h) for h in proof["proof"]],
        bytes.fromhex(head["root_hash"]),
        bytes.fromhex(second["tree_head"]["root_hash"]),
    )
    forged = (
        await _report(
            client,
            admin,
            "integrity",
            from_size=head["tree_size"],
            from_root="00" * 32,
            verify="false",
        )
    ).json()
    assert forged["consistency"]["verified"] is False
    # The first report's own REPORT entry is in the tree the second one covers.
    rows = list(
        csv.DictReader(
            io.StringIO((await _report(client, admin, "integrity", "csv", verify="false")).text)
        )
    )
    assert {"tree_head.tree_size", "keys.current_kek"} <= {r["key"] for r in rows}
    too_far = await client.get("/v1/reports/integrity", params={"from_size": 10**9}, headers=admin)
    assert too_far.status_code == 400
    assert too_far.json()["code"] == "invalid_from_size"


async def test_reports_need_the_admin_role_and_clear_requests(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]]
) -> None:
    for team in ("support", "marketing"):
        resp = await client.get("/v1/reports/ropa", headers=org[team])
        assert resp.status_code == 403
        assert resp.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/v1/reports/ropa")).status_code == 401
    admin = org["compliance"]
    resp = await client.get("/v1/reports/payroll", headers=admin)
    assert resp.status_code == 404
    assert resp.json()["code"] == "unknown_report"
    assert resp.headers["content-type"].startswith("application/problem+json")
    resp = await client.get("/v1/reports/ropa?format=pdf", headers=admin)
    assert resp.status_code == 400
    assert resp.json()["code"] == "invalid_format"
    resp = await client.get(
        "/v1/reports/consent?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", headers=admin
    )
    assert resp.status_code == 400
    assert resp.json()["code"] == "invalid_window"
    assert (
        await client.get("/v1/reports/access?since=yesterday", headers=admin)
    ).status_code == 400
    # Nothing was generated, so nothing was audited as a report.
    entries = (
        await client.get("/v1/audit/entries?team=compliance&limit=1000", headers=admin)
    ).json()["items"]
    assert not [e for e in entries if e["kind"] == "report"]


def test_cli_writes_the_report_and_audits_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from click.testing import CliRunner

    from api.cli import main
    from governance.settings import load_settings

    monkeypatch.setenv("STORYVAULT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STORYVAULT_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'sv.db'}")
    monkeypatch.setenv("STORYVAULT_DEMO_DATA", "false")
    monkeypatch.setenv("STORYVAULT_RETENTION_INTERVAL", "0")
    out = tmp_path / "ropa.csv"
    result = CliRunner().invoke(main, ["report", "ropa", "--format", "csv", "--output", str(out)])
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest in result.output
    assert next(csv.reader(io.StringIO(out.read_text())))[0] == "purpose"
    bad = CliRunner().invoke(main, ["report", "payroll"])
    assert bad.exit_code == 2

    async def logged() -> list[dict[str, Any]]:
        vault = StoryVault(load_settings())
        try:
            page = await vault.audit_log.list_entries(kinds=["report"])
            return [dict(s.entry.detail) for s in page.items]
        finally:
            await vault.stop()

    details = asyncio.run(logged())
    assert [(d["report"], d["sha256"]) for d in details] == [("ropa", digest)]


@pytest.mark.browser
@pytest.mark.parametrize("backend", ["sqlite"], indirect=False)
async def test_html_report_renders_its_chart_in_chromium(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], direct: StoryVault
) -> None:
    from playwright.async_api import async_playwright

    await seed(client, org, direct)
    html = (await _report(client, org["compliance"], "consent", "html")).text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            await page.set_content(html, wait_until="load")
            chart = page.locator("svg.chart").first
            assert await chart.is_visible()
            box = await chart.bounding_box()
            assert box is not None
            assert box["width"] > 400
            assert box["height"] > 150
            # The chart has drawn lines, not an empty frame.
            assert await page.locator("svg.chart").first.locator("path").count() > 20
            await page.screenshot(path=str(SCREENSHOTS / "report-consent.png"), full_page=True)
            await page.emulate_media(media="print")
            assert await chart.is_visible()
            pdf = await page.pdf(format="A4")
            assert pdf.startswith(b"%PDF")
        finally:
            await browser.close()
    assert problems == []
    assert [u for u in requests if not u.startswith(("about:", "data:"))] == []
