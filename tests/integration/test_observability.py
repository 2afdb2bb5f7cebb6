"""Observability (issue 10, point 6): Prometheus metrics and readiness.

Metrics live in prometheus_client's process-wide registry, so each test compares a
scrape before and after what it does.
"""

from __future__ import annotations

import contextlib
import gc
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from governance.settings import Settings
from tests.conftest import remember_personal
from tests.integration.mailbox import sign_in

P = "?purpose=service.support"


async def scrape(
    client: AsyncTestClient[Any],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _customer(client: AsyncTestClient[Any], support: dict[str, str], email: str) -> str:
    remember_personal(email)
    resp = await client.post(
        f"/v1/customers{P}",
        json={"profile": {"name": "Obi Served", "email": email}},
        headers=support,
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def test_request_and_decision_metrics_move(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]]
) -> None:
    """Requests are counted; each gated read counts its disclosed categories and its
    withheld ones by reason code; writes count allowed categories and denials by reason."""
    support = org["support"]
    cid = await _customer(client, support, "obs.decisions@example.org")
    before = await scrape(client)
    assert (await client.get(f"/v1/customers/{cid}/story{P}", headers=support)).status_code == 200
    # marketing reads for a consent purpose the customer never granted
    resp = await client.get(
        f"/v1/customers/{cid}/story?purpose=marketing.email", headers=org["marketing"]
    )
    assert resp.status_code == 200, resp.text
    withheld = {w["reason"] for w in resp.json()["withheld"]}
    # a write the policy does not allow
    resp = await client.patch(
        f"/v1/customers/{cid}/profile?purpose=sales.outreach",
        json={"name": "X Y"},
        headers=support,
    )
    assert resp.status_code == 403
    after = await scrape(client)
    name = "storyvault_decisions_total"
    assert value(after, name, action="read", reason="disclosed") > value(
        before, name, action="read", reason="disclosed"
    )
    assert value(after, name, action="read", reason="denied_by_policy") > value(
        before, name, action="read", reason="denied_by_policy"
    )  # support's deny rule on insight.*
    for reason in withheld:
        assert value(after, name, action="read", reason=reason) > value(
            before, name, action="read", reason=reason
        ), reason
    write_reasons = {
        labels
        for (metric, labels), v in after.items()
        if metric == name
        and dict(labels)["action"] == "write"
        and dict(labels)["reason"] != "allowed"
        and v > before.get((metric, labels), 0.0)
    }
    assert write_reasons, "the refused write was not counted"
    requests = sum(v for (m, _), v in after.items() if m == "storyvault_requests_total")
    assert requests > sum(v for (m, _), v in before.items() if m == "storyvault_requests_total")


async def test_request_metrics_are_per_route_template_and_carry_no_ids(
    client: AsyncTestClient[Any], support: dict[str, str]
) -> None:
    """Request metrics count by method, route template and status: reads of two
    customers add to one series, a customer not found to its 404 series, and no
    label carries a customer id or the query string (the purpose asked for)."""
    first = await _customer(client, support, "obs.route.one@example.org")
    second = await _customer(client, support, "obs.route.two@example.org")
    missing = str(uuid.uuid4())
    route = "/v1/customers/{customer_id}/story"
    labels = {"app_name": "storyvault", "method": "GET", "path": route}
    before = await scrape(client)
    for cid in (first, second):
        resp = await client.get(f"/v1/customers/{cid}/story{P}", headers=support)
        assert resp.status_code == 200, resp.text
    resp = await client.get(f"/v1/customers/{missing}/story{P}", headers=support)
    assert resp.status_code == 404
    after = await scrape(client)
    name = "storyvault_requests_total"
    ok = dict(labels, status_code="200")
    assert value(after, name, **ok) == value(before, name, **ok) + 2
    gone = dict(labels, status_code="404")
    assert value(after, name, **gone) == value(before, name, **gone) + 1
    timed = "storyvault_request_duration_seconds_count"
    assert value(after, timed, **ok) == value(before, timed, **ok) + 2
    # none of these requests is in progress any more
    assert value(after, "storyvault_requests_in_progress", **labels) == 0
    for _, pairs in after:
        for _, label in pairs:
            assert not any(cid in label for cid in (first, second, missing)), label
            assert "service.support" not in label, label
            assert "?" not in label, label


async def test_audit_batch_metrics_move(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]]
) -> None:
    """Each group commit of the audit writer records its size and its latency."""
    support = org["support"]
    cid = await _customer(client, support, "obs.audit@example.org")
    before = await scrape(client)
    for _ in range(3):
        resp = await client.get(f"/v1/customers/{cid}/story{P}", headers=support)
        assert resp.status_code == 200
    after = await scrape(client)
    for name in ("storyvault_audit_batch_size", "storyvault_audit_batch_seconds"):
        assert value(after, f"{name}_count") >= value(before, f"{name}_count") + 1, name
        assert value(after, f"{name}_sum") > value(before, f"{name}_sum"), name
    # at least three entries went through the batches
    grown = value(after, "storyvault_audit_batch_size_sum") - value(
        before, "storyvault_audit_batch_size_sum"
    )
    assert grown >= 3
    assert value(after, "storyvault_audit_batch_size_bucket", le="512.0") >= value(
        after, "storyvault_audit_batch_size_count"
    )


async def test_consent_event_metrics_move(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """Consent events are counted by event type (grant, withdrawal, GPC opt-out)."""
    email = "obs.consent@example.org"
    await _customer(client, support, email)
    auth = await sign_in(client, Path(settings.mail_url.removeprefix("file://")), email)
    before = await scrape(client)
    events = []
    for granted in (True, False):
        resp = await client.put(
            "/v1/me/consents/marketing.email", json={"granted": granted}, headers=auth
        )
        assert resp.status_code == 200, resp.text
        events.append(resp.json()["event"])
    # Sec-GPC: 1 opts out of the sale/sharing purposes
    assert (
        await client.get("/v1/me/consents", headers={**auth, "Sec-GPC": "1"})
    ).status_code == 200
    after = await scrape(client)
    name = "storyvault_consent_events_total"
    for event in events:
        assert value(after, name, event_type=event) > value(before, name, event_type=event), event
    total_after = sum(v for (m, _), v in after.items() if m == name)
    total_before = sum(v for (m, _), v in before.items() if m == name)
    assert total_after >= total_before + 3  # grant, withdrawal, and at least one GPC event


async def test_key_cache_metrics_move(
    client: AsyncTestClient[Any], support: dict[str, str]
) -> None:
    """The data-key cache reports misses (first read of a customer) and hits (next reads)."""
    cid = await _customer(client, support, "obs.keys@example.org")
    gc.collect()  # vaults of earlier tests leave the sums now, not during this test
    vault = client.app.state.vault
    vault.keys.forget(list(getattr(vault.keys, "_cache", None) or []))
    before = await scrape(client)
    for _ in range(3):
        assert (
            await client.get(f"/v1/customers/{cid}/story{P}", headers=support)
        ).status_code == 200
    after = await scrape(client)
    hits = "storyvault_key_cache_hits_total"
    misses = "storyvault_key_cache_misses_total"
    assert value(after, hits) > value(before, hits)
    assert value(after, misses) > value(before, misses)
    assert value(after, hits) >= vault.keys.hits
    # the same story read again comes from the story cache (the story did not change)
    story_hits = "storyvault_story_cache_hits_total"
    assert value(after, story_hits) >= value(before, story_hits) + 2
    assert value(after, "storyvault_story_cache_misses_total") >= 1


async def test_ready_reports_every_part(client: AsyncTestClient[Any]) -> None:
    """When all is well /ready names what it checked."""
    resp = await client.get("/ready")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ready"
    for part in ("database", "keystore", "keys", "audit_writer"):
        assert body[part] == "ok"


async def test_ready_fails_when_the_audit_writer_is_stopped(
    client: AsyncTestClient[Any], support: dict[str, str]
) -> None:
    """A stopped audit writer means no gated read can be answered: /ready says 503, and
    reads fail closed with 503 too; /health still answers (the process is alive)."""
    cid = await _customer(client, support, "obs.ready@example.org")
    vault = client.app.state.vault
    client.blocking_portal.call(vault.audit_writer.stop)
    assert not vault.audit_writer.running
    resp = await client.get("/ready")
    assert resp.status_code == 503
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "not_ready"
    assert resp.json()["component"] == "audit_unavailable"
    assert (await client.get("/health")).status_code == 200
    resp = await client.get(f"/v1/customers/{cid}/story{P}", headers=support)
    assert resp.status_code == 503
    assert "Obi Served" not in resp.text
    client.blocking_portal.call(vault.audit_writer.start)
    assert (await client.get("/ready")).status_code == 200


@pytest.mark.parametrize(
    ("part", "component"),
    [("database", "database_unavailable"), ("keyring", "keyring_unavailable")],
)
async def test_ready_fails_when_the_database_or_key_ring_is_unusable(
    client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch, part: str, component: str
) -> None:
    """An unreachable database or a key ring whose current KEK cannot wrap: 503."""
    vault = client.app.state.vault

    def broken(*_: Any, **__: Any) -> Any:
        raise OSError("unusable")

    if part == "database":
        monkeypatch.setattr(vault.db, "session", broken)
    else:
        monkeypatch.setattr(vault.ring, "wrap", broken)
    resp = await client.get("/ready")
    assert resp.status_code == 503
    assert resp.json()["component"] == component
    monkeypatch.undo()
    assert (await client.get("/ready")).status_code == 200


def _request_lines(since: int) -> list[dict[str, Any]]:
    from tests.conftest import _LOG

    lines = []
    for line in _LOG.getvalue()[since:].splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "http.request":
                lines.append(event)
    return lines


async def test_request_log_line_records_the_status_the_client_got(
    client: AsyncTestClient[Any], support: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request line per request with the status actually sent and the request id
    the client got, also when a middleware (authentication) refused the request or
    failed, or the router found no route: not only when a handler answered."""
    from tests.conftest import _LOG

    cid = await _customer(client, support, "obs.logline@example.org")
    story = f"/v1/customers/{cid}/story{P}"
    since = len(_LOG.getvalue())
    responses = [
        await client.get(story, headers=support),
        await client.get(story),
        await client.get(story, headers={"Authorization": "Bearer svk_nope"}),
        await client.get(f"/v1/customers/{uuid.uuid4()}/story{P}", headers=support),
        await client.get("/v1/no-such-thing", headers=support),
    ]
    vault = client.app.state.vault

    def unreachable(*_: Any, **__: Any) -> Any:
        raise ConnectionRefusedError("the database is unreachable")

    # (The gated read looks its key up itself; a consents read does so in the
    # authentication middleware.)
    monkeypatch.setattr(vault, "authenticate_team", unreachable)
    responses.append(await client.get(f"/v1/customers/{cid}/consents", headers=support))
    monkeypatch.undo()
    assert [r.status_code for r in responses] == [200, 401, 401, 404, 404, 503]
    lines = _request_lines(since)
    template = "/v1/customers/{customer_id}/story"
    routes = [template] * 4 + ["unmatched", "/v1/customers/{customer_id}/consents"]
    assert [(e["route"], e["status"]) for e in lines] == [
        (route, r.status_code) for route, r in zip(routes, responses, strict=True)
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids)
    assert len(set(ids)) == len(ids)
    assert [e.get("request_id") for e in lines] == ids
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"


async def test_a_gated_read_logs_its_decision_on_its_request_line(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], direct: Any
) -> None:
    """One line per gated read: the request's own line carries the decision (team,
    customer pseudonym, purpose, categories disclosed and withheld with reasons,
    policy version, the audit entry's index), with no second line for it. A read
    that is refused, or the next request, carries no decision; a read outside any
    request (a job, a direct call) logs the decision on a line of its own."""
    from tests.conftest import _LOG

    support, marketing = org["support"], org["marketing"]
    cid = await _customer(client, support, "obs.decision.line@example.org")
    story = f"/v1/customers/{cid}/story"
    since = len(_LOG.getvalue())
    read = await client.get(f"{story}{P}", headers=support)
    assert read.status_code == 200, read.text
    refused = await client.get(f"{story}?purpose=marketing.email", headers=marketing)
    assert refused.status_code == 200  # no consent: everything withheld, still audited
    bad = await client.get(f"{story}?purpose=nope", headers=support)
    assert bad.status_code == 400
    health = await client.get("/health")
    lines = _request_lines(since)
    assert [e["status"] for e in lines] == [200, 200, 400, 200]
    first, second, third, fourth = lines
    body = read.json()
    vault = client.app.state.vault
    assert first["decision"] == "gate.read"
    assert first["request_id"] == read.headers["x-request-id"]
    assert (first["team"], first["purpose"]) == ("support", "service.support")
    assert first["subject"] == vault.ring.pseudonym(cid)
    assert first["audit_index"] == body["audit_index"]
    assert first["disclosed"] == [  # support's read rules for service.support (demo policy)
        "commerce.invoice",
        "commerce.purchase",
        "contact.address",
        "contact.email",
        "contact.phone",
        "demographic.birthday",
        "engagement.interaction",
        "identity.name",
        "preference",
        "support.ticket",
    ]
    assert first["withheld"] == [f"{w['category']}:{w['reason']}" for w in body["withheld"]]
    assert second["decision"] == "gate.read"
    assert second["disclosed"] == []
    assert second["audit_index"] == refused.json()["audit_index"]
    assert second["withheld"] == [
        f"{w['category']}:{w['reason']}" for w in refused.json()["withheld"]
    ]
    assert "decision" not in third
    assert "decision" not in fourth
    assert health.status_code == 200
    # No line of its own for a decision made while serving a request.
    assert '"event":"gate.read"' not in _LOG.getvalue()[since:]

    since = len(_LOG.getvalue())
    await direct.start(migrate=False)
    key = direct.presented_key(support["Authorization"].removeprefix("Bearer "))
    view = await direct.read_story(key, cid, "service.support", None)
    own = [
        json.loads(line)
        for line in _LOG.getvalue()[since:].splitlines()
        if '"event":"gate.read"' in line
    ]
    assert [(e["team"], e["audit_index"]) for e in own] == [("support", view.audit_index)]


def test_every_worker_process_logs_json_lines(settings: Settings) -> None:
    """With several worker processes (``STORYVAULT_WORKERS``), each worker logs the
    same JSON lines as a single process, through the same scrubbing processors: a
    worker starts from a fresh interpreter and must configure its logging itself."""
    import httpx

    from tests.integration.procs import Server

    server = Server(settings, workers=2).start()
    try:
        statuses = []
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for n in range(40):  # the connections land on both workers
                headers = {"Authorization": "Bearer svk_nope"} if n % 2 else {}
                r = http.get(f"/v1/customers/{uuid.uuid4()}/story{P}", headers=headers)
                statuses.append(r.status_code)
                http.get("/ready")
    finally:
        server.stop()
    assert set(statuses) == {401}
    assert server.log is not None
    text = server.log.read_text()
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("Story Vault on "):  # the banner
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line that is not JSON: {line[:200]!r}")
    for event in events:
        assert event["level"], event
        assert event["timestamp"].endswith("Z"), event
    # The serving command's bootstrap, then each worker's own start.
    assert [e["event"] for e in events].count("storyvault.started") == 3
    workers = {e["event"] for e in events if e["event"].startswith("Started server process")}
    assert len(workers) == 2, [e["event"] for e in events]
    requests = [e for e in events if e["event"] == "http.request"]
    assert all(e["request_id"] and e["route"] for e in requests)
    stories = [e for e in requests if e["route"] == "/v1/customers/{customer_id}/story"]
    assert [e["status"] for e in stories] == statuses
    assert "svk_nope" not in text
