"""Hostile input and hostile principals (issue 10, point 4; invariants 6 and 7).

One-time-code brute force is covered by tests/integration/test_signin.py
(test_lockout_after_five_wrong_codes, test_parallel_guesses_cannot_exceed_the_attempt_limit):
five wrong codes lock the code, and parallel guesses cannot exceed the limit.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from api.app import create_app
from governance.service import StoryVault
from governance.settings import Settings
from tests.conftest import ADMIN_KEY, remember_personal
from tests.integration.mailbox import sign_in
from tests.pgserver import free_port

P = "?purpose=service.support"
TABLES = ["customers", "profile_values", "chapters", "teams", "api_keys", "consent_event"]


def _outbox(settings: Settings) -> Path:
    return Path(settings.mail_url.removeprefix("file://"))


async def _customer(
    client: AsyncTestClient[Any], support: dict[str, str], email: str, name: str, note: str
) -> str:
    remember_personal(email, name, note)
    resp = await client.post(
        f"/v1/customers{P}", json={"profile": {"email": email, "name": name}}, headers=support
    )
    assert resp.status_code == 201, resp.text
    cid = str(resp.json()["id"])
    resp = await client.post(
        f"/v1/customers/{cid}/chapters{P}",
        json={
            "category": "support.ticket",
            "kind": "ticket",
            "occurred_at": "2026-01-02T03:04:05Z",
            "body": {"subject": note},
        },
        headers=support,
    )
    assert resp.status_code == 201, resp.text
    # a disclosure, so each customer has an access-log entry of their own
    assert (await client.get(f"/v1/customers/{cid}/story{P}", headers=support)).status_code == 200
    return cid


# --- one customer cannot reach another's data ------------------------------------


async def test_a_customer_cannot_reach_another_customers_data(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """Signed in as A, every /v1/me path and every portal page shows A's data only; B's
    request id is a 404 for A (API and portal); nothing of B appears anywhere."""
    a_id = await _customer(client, support, "ana.sec@example.org", "Ana Secure", "A-note-7731")
    b_id = await _customer(client, support, "bo.sec@example.org", "Bo Private", "B-secret-9142")
    b_auth = await sign_in(client, _outbox(settings), "bo.sec@example.org")
    # B opens a rights request (rectification) whose id A will try to read.
    resp = await client.patch("/v1/me/profile", json={"name": "Bo Private"}, headers=b_auth)
    assert resp.status_code == 200, resp.text
    b_request = resp.json()["request_id"]
    a_auth = await sign_in(client, _outbox(settings), "ana.sec@example.org")
    b_markers = [b_id, "Bo Private", "bo.sec@example.org", "B-secret-9142", b_request]

    for path in (
        "/v1/me/story",
        "/v1/me/consents",
        "/v1/me/export",
        "/v1/me/export?format=zip",
        "/v1/me/access-log",
        "/v1/me/requests",
        "/v1/me/insights",
    ):
        resp = await client.get(path, headers=a_auth)
        assert resp.status_code == 200, (path, resp.text[:200])
        body = resp.content.decode("utf-8", "replace")
        for marker in b_markers:
            assert marker not in body, (path, "B's data reached A")
    story = (await client.get("/v1/me/story", headers=a_auth)).json()
    assert story["customer_id"] == a_id
    assert story["chapters"][0]["body"] == {"subject": "A-note-7731"}
    # B's request, by id: not found for A (not 403: A learns nothing about B).
    resp = await client.get(f"/v1/me/requests/{b_request}", headers=a_auth)
    assert resp.status_code == 404
    assert (await client.get(f"/v1/me/requests/{b_request}", headers=b_auth)).status_code == 200
    # No /v1/me path takes a customer id: a team's customer path with a session is refused.
    resp = await client.get(f"/v1/customers/{b_id}/story{P}", headers=a_auth)
    assert resp.status_code in {401, 403}

    # The portal, with A's session cookie: A's pages hold nothing of B.
    cookie = {"Cookie": f"sv_session={a_auth['Authorization'].removeprefix('Bearer ')}"}
    for page in (
        "/portal/story",
        "/portal/consents",
        "/portal/access",
        "/portal/requests",
        "/portal/export/download",
    ):
        resp = await client.get(page, headers=cookie)
        assert resp.status_code == 200, (page, resp.status_code)
        body = resp.content.decode("utf-8", "replace")
        for marker in b_markers:
            assert marker not in body, (page, "B's data reached A's portal")
    assert "A-note-7731" in (await client.get("/portal/story", headers=cookie)).text
    resp = await client.get(f"/portal/requests/{b_request}", headers=cookie)
    assert resp.status_code == 404
    assert b_request not in resp.text


async def test_a_team_key_is_not_a_customer_session(
    client: AsyncTestClient[Any], support: dict[str, str]
) -> None:
    """/v1/me answers only customer sessions: a team key (even the admin's) gets 401."""
    for auth in (support, {"Authorization": f"Bearer {ADMIN_KEY}"}):
        resp = await client.get("/v1/me/story", headers=auth)
        assert resp.status_code == 401
        assert resp.json()["code"] == "unauthorized"


# --- sessions --------------------------------------------------------------------


async def test_session_replay_after_logout_fails(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """After logout the token is dead on every /v1/me path and in the portal, and
    signing in again issues a different token; the old one stays dead."""
    await _customer(client, support, "replay.sec@example.org", "Ray Replay", "R-note-5521")
    auth = await sign_in(client, _outbox(settings), "replay.sec@example.org")
    assert (await client.get("/v1/me/story", headers=auth)).status_code == 200
    assert (await client.post("/v1/me/logout", headers=auth)).status_code == 204
    for path in ("/v1/me/story", "/v1/me/consents", "/v1/me/export", "/v1/me/access-log"):
        resp = await client.get(path, headers=auth)
        assert resp.status_code == 401, path
    resp = await client.put("/v1/me/consents/marketing.email", json={"granted": True}, headers=auth)
    assert resp.status_code == 401
    token = auth["Authorization"].removeprefix("Bearer ")
    portal = await client.get(
        "/portal/story", headers={"Cookie": f"sv_session={token}"}, follow_redirects=False
    )
    assert portal.status_code in {302, 303, 401}
    assert "R-note-5521" not in portal.text
    again = await sign_in(client, _outbox(settings), "replay.sec@example.org")
    assert again != auth
    assert (await client.get("/v1/me/story", headers=again)).status_code == 200
    assert (await client.get("/v1/me/story", headers=auth)).status_code == 401


# --- team keys ---------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
async def test_revoked_key_fails_on_the_next_request_on_every_instance(
    settings: Settings, admin: dict[str, str]
) -> None:
    """Two instances on one PostgreSQL: a key revoked through one is refused by the
    other on its very next request (no instance caches a key's validity)."""
    one, two = create_app(settings), create_app(settings, migrate=False)
    async with (
        AsyncTestClient(app=one, raise_server_exceptions=False) as c1,
        AsyncTestClient(app=two, raise_server_exceptions=False) as c2,
    ):
        issued = (
            await c1.post("/v1/admin/teams/compliance/keys", json={"label": "t"}, headers=admin)
        ).json()
        auth = {"Authorization": f"Bearer {issued['key']}"}
        # The gated read looks its key up in its own round trip (the key is known,
        # and the team has no read rule for the purpose: 403).
        story = "/v1/customers/8a4c1fd6-54c4-4b39-9e43-3a1e0d0b4c11/story?purpose=legal.retention"
        for c in (c1, c2, c1, c2):
            assert (await c.get("/v1/admin/teams", headers=auth)).status_code == 200
            resp = await c.get(story, headers=auth)
            assert (resp.status_code, resp.json()["code"]) == (403, "no_policy")
        resp = await c1.delete(f"/v1/admin/keys/{issued['id']}", headers=admin)
        assert resp.status_code == 204
        for c in (c2, c1):
            for path in ("/v1/admin/teams", story):
                resp = await c.get(path, headers=auth)
                assert resp.status_code == 401, path
                assert resp.json()["code"] == "unauthorized"


async def _admin_operations(client: AsyncTestClient[Any]) -> list[tuple[str, str]]:
    doc = (await client.get("/schema/openapi.json")).json()
    fill = {
        "{team}": "sales",
        "{key_id}": "key_unknown",
        "{rule_id}": "rule_unknown",
        "{rid}": "00000000-0000-4000-8000-000000000000",
        "{index}": "0",
        "{name}": "ropa",
    }
    ops = []
    for path, item in doc["paths"].items():
        if not path.startswith(("/v1/admin", "/v1/audit/entries", "/v1/reports")):
            continue
        for method in item:
            if method in {"get", "post", "put", "patch", "delete"}:
                concrete = path
                for placeholder, value in fill.items():
                    concrete = concrete.replace(placeholder, value)
                assert "{" not in concrete, path
                ops.append((method.upper(), concrete))
    return ops


async def test_admin_endpoints_refuse_team_keys_everywhere(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], direct: StoryVault
) -> None:
    """Every /v1/admin, /v1/audit/entries and /v1/reports operation in the OpenAPI
    document answers 403 to every non-admin team key, and changes nothing."""
    ops = await _admin_operations(client)
    assert len(ops) >= 15, ops
    assert ("GET", "/v1/reports/ropa") in ops
    assert ("GET", "/v1/audit/entries") in ops
    before = await _counts(direct)
    for team in ("sales", "marketing", "support", "product"):
        for method, path in ops:
            resp = await client.request(method, path, json={}, headers=org[team])
            assert resp.status_code == 403, (team, method, path, resp.status_code)
            assert resp.json()["code"] == "forbidden"
    assert await _counts(direct) == before
    # and the admin key does reach them (the refusal is about the role, not the path)
    assert (await client.get("/v1/admin/teams", headers=org["compliance"])).status_code == 200


# --- hostile strings ------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE customers;--",
    "Robert'); DELETE FROM api_keys WHERE ('1'='1",
    '" OR 1=1 --',
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "{{7*7}} ${7*7} %s %n",
    "Zoë Ångström 李小龍 עברית \u202eevil\u202c 🙂",
    "e\u0301\u0308 \ufeff zero\u200bwidth",
    "back\\slash\\x00 and 'quotes' and \"doubles\"",
]
NUL = "nul\x00byte"


async def _counts(vault: StoryVault) -> dict[str, int]:
    async with vault.db.session() as session:
        return {
            t: (await session.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one()
            for t in TABLES
        }


async def test_hostile_strings_are_stored_and_returned_inert(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    admin: dict[str, str],
    direct: StoryVault,
    settings: Settings,
) -> None:
    """SQL-injection, script, template, unicode (RTL override, combining marks, BOM,
    emoji) strings in every text field — profile fields, chapter bodies, external_ref,
    consent evidence, team description — are stored and returned exactly, and every
    table is intact. JSON responses never turn them into markup; the portal escapes them."""
    support = org["support"]
    remember_personal(*[h for h in HOSTILE if len(h) >= 6])
    for n, value in enumerate(HOSTILE):
        before = await _counts(direct)
        ref = f"ref-{n}-{value}"[:200]
        resp = await client.post(
            f"/v1/customers{P}",
            json={"external_ref": ref, "profile": {"name": value, "address": value}},
            headers=support,
        )
        assert resp.status_code == 201, (value, resp.text)
        cid = resp.json()["id"]
        resp = await client.post(
            f"/v1/customers/{cid}/chapters{P}",
            json={
                "category": "support.ticket",
                "kind": "ticket",
                "occurred_at": "2026-01-01T00:00:00Z",
                "body": {"subject": value, value: [value, {"nested": value}]},
            },
            headers=support,
        )
        assert resp.status_code == 201, (value, resp.text)
        story = (await client.get(f"/v1/customers/{cid}/story{P}", headers=support)).json()
        assert story["profile"]["name"] == value
        assert story["profile"]["address"] == value
        assert story["chapters"][0]["body"] == {"subject": value, value: [value, {"nested": value}]}
        async with direct.db.session() as session:
            stored = (
                await session.execute(
                    text("SELECT external_ref FROM customers WHERE id = :id"), {"id": cid}
                )
            ).scalar_one()
        assert stored == ref
        after = await _counts(direct)
        assert after["customers"] == before["customers"] + 1
        assert after["teams"] == before["teams"]
        assert after["api_keys"] == before["api_keys"]

    # consent evidence (support has a write rule for analytics.profiling, a consent purpose)
    resp = await client.post(
        f"/v1/customers{P}", json={"profile": {"name": "Evi Dence"}}, headers=support
    )
    cid = resp.json()["id"]
    for value in HOSTILE:
        resp = await client.post(
            f"/v1/customers/{cid}/consents",
            json={"purpose": "analytics.profiling", "granted": True, "evidence": value},
            headers=support,
        )
        assert resp.status_code == 201, (value, resp.text)
    async with direct.db.session() as session:
        evidence = (
            (
                await session.execute(
                    text("SELECT evidence FROM consent_event WHERE evidence IS NOT NULL")
                )
            )
            .scalars()
            .all()
        )
    assert set(HOSTILE) <= set(evidence)

    # team descriptions
    for n, value in enumerate(HOSTILE):
        resp = await client.post(
            "/v1/admin/teams", json={"name": f"team-{n}", "description": value}, headers=admin
        )
        assert resp.status_code == 201, (value, resp.text)
        assert resp.json()["description"] == value
    teams = {
        t["name"]: t["description"]
        for t in (await client.get("/v1/admin/teams", headers=admin)).json()
    }
    for n, value in enumerate(HOSTILE):
        assert teams[f"team-{n}"] == value

    # the portal renders them escaped
    email = "hostile.sec@example.org"
    resp = await client.post(
        f"/v1/customers{P}",
        json={"profile": {"email": email, "name": "<script>alert(1)</script>"}},
        headers=support,
    )
    assert resp.status_code == 201
    auth = await sign_in(client, _outbox(settings), email)
    token = auth["Authorization"].removeprefix("Bearer ")
    page = await client.get("/portal/story", headers={"Cookie": f"sv_session={token}"})
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    # the tables are all there
    counts = await _counts(direct)
    assert counts["customers"] >= len(HOSTILE)


async def test_nul_bytes_are_kept_or_refused_never_a_5xx(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], admin: dict[str, str]
) -> None:
    """A NUL byte is either stored and returned exactly (encrypted fields) or refused
    with a 4xx problem (plaintext columns PostgreSQL cannot hold it in) — never a 5xx."""
    support = org["support"]
    resp = await client.post(f"/v1/customers{P}", json={"profile": {"name": NUL}}, headers=support)
    assert resp.status_code == 201, resp.text
    cid = resp.json()["id"]
    resp = await client.post(
        f"/v1/customers/{cid}/chapters{P}",
        json={
            "category": "support.ticket",
            "kind": "ticket",
            "occurred_at": "2026-01-01T00:00:00Z",
            "body": {"subject": NUL},
        },
        headers=support,
    )
    assert resp.status_code == 201, resp.text
    story = (await client.get(f"/v1/customers/{cid}/story{P}", headers=support)).json()
    assert story["profile"]["name"] == NUL
    assert story["chapters"][0]["body"] == {"subject": NUL}
    plaintext = [
        ("POST", f"/v1/customers{P}", {"external_ref": NUL, "profile": {"name": "X Y"}}, support),
        (
            "POST",
            f"/v1/customers/{cid}/consents",
            {"purpose": "analytics.profiling", "granted": True, "evidence": NUL},
            support,
        ),
        ("POST", "/v1/admin/teams", {"name": "nulteam", "description": NUL}, admin),
    ]
    for method, path, body, auth in plaintext:
        resp = await client.request(method, path, json=body, headers=auth)
        assert resp.status_code < 500, (path, resp.status_code, resp.text[:200])
        if resp.status_code >= 400:
            assert resp.headers["content-type"].startswith("application/problem+json")


# --- oversized requests ---------------------------------------------------------------


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[str]:
    """`storyvault serve` (uvicorn) in a subprocess on a free loopback port."""
    port = free_port()
    env = {
        **os.environ,
        "STORYVAULT_DATA_DIR": str(tmp_path / "data"),
        "STORYVAULT_PORT": str(port),
        "STORYVAULT_HOST": "127.0.0.1",
        "STORYVAULT_DEMO_DATA": "false",
        "STORYVAULT_ADMIN_KEY": ADMIN_KEY,
        "STORYVAULT_SQLITE_SYNCHRONOUS": "NORMAL",
        "STORYVAULT_RETENTION_INTERVAL": "0",
    }
    cli = Path(sys.executable).with_name("storyvault")
    proc = subprocess.Popen(
        [str(cli), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _request(
    where: str, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = where.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_oversized_headers_and_bodies_are_refused_by_the_real_server(real_server: str) -> None:
    """Through uvicorn: a 100 KB header and 200 headers are refused with a 4xx before
    the app runs; a body over the 1 MiB limit is a 413 problem; the server then still
    answers normally."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    status, _, _ = _request(real_server, "GET", "/v1/admin/teams", admin)
    assert status == 200
    status, _, _ = _request(real_server, "GET", "/health", {"X-Big": "a" * 100_000})
    assert 400 <= status < 500, status
    many = {f"X-H{i}": "b" * 400 for i in range(200)}
    status, _, _ = _request(real_server, "GET", "/health", many)
    assert 400 <= status < 500, status
    body = b'{"profile": {"name": "' + b"x" * (2 * 1024 * 1024) + b'"}}'
    status, headers, content = _request(
        real_server,
        "POST",
        f"/v1/customers{P}",
        {**admin, "Content-Type": "application/json"},
        body,
    )
    assert status == 413, status
    assert headers["content-type"].startswith("application/problem+json")
    assert b"body_too_large" in content
    status, _, _ = _request(real_server, "GET", "/health", {})
    assert status == 200


# --- rate limits ------------------------------------------------------------------------


@pytest.fixture
async def limited(settings: Settings) -> Any:
    from dataclasses import replace

    app = create_app(replace(settings, rate_limit_per_minute=5))
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as c:
        yield c


async def test_rate_limit_per_key_answers_429_with_retry_after(
    limited: AsyncTestClient[Any], admin: dict[str, str]
) -> None:
    """Past the limit a key gets 429 problem+json with Retry-After; another key (and
    the operations endpoints) are not affected."""
    issued = (await limited.post("/v1/admin/teams/compliance/keys", json={}, headers=admin)).json()
    other = {"Authorization": f"Bearer {issued['key']}"}
    statuses = [(await limited.get("/v1/admin/teams", headers=admin)).status_code for _ in range(4)]
    assert statuses == [200] * 4  # 5 in all with the key issue
    resp = await limited.get("/v1/admin/teams", headers=admin)
    assert resp.status_code == 429
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "rate_limited"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert (await limited.get("/v1/admin/teams", headers=other)).status_code == 200
    for _ in range(10):
        assert (await limited.get("/health")).status_code == 200
        assert (await limited.get("/ready")).status_code == 200
        assert (await limited.get("/metrics")).status_code == 200


async def test_rate_limit_per_client_address_answers_429_with_retry_after(
    limited: AsyncTestClient[Any],
) -> None:
    """Requests without a credential count against the client address."""
    statuses = [(await limited.get("/.well-known/jwks.json")).status_code for _ in range(5)]
    assert statuses == [200] * 5
    resp = await limited.post("/v1/me/login", json={"email": "nobody@example.org"})
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    assert (await limited.get("/v1/audit/tree-head")).status_code == 429


# --- security headers --------------------------------------------------------------------


async def test_security_headers_on_every_response(
    client: AsyncTestClient[Any], support: dict[str, str], admin: dict[str, str]
) -> None:
    """API responses (success and problem), pages (portal, API docs, HTML reports) and
    operations endpoints all carry the security headers; API responses are no-store and
    have a CSP that allows nothing; the portal has a CSP of its own."""
    api = [
        ("GET", "/health", None, None),
        ("GET", "/ready", None, None),
        ("GET", "/v1/admin/teams", admin, None),
        ("GET", "/v1/admin/teams", None, None),  # 401 problem
        ("GET", f"/v1/customers/00000000-0000-4000-8000-000000000000/story{P}", support, None),
        ("POST", f"/v1/customers{P}", support, {"profile": {"shoe": "1"}}),  # 422
        ("GET", "/v1/nothing", None, None),  # 404 from the router
        ("GET", "/.well-known/jwks.json", None, None),
    ]
    pages = [
        ("GET", "/portal/", None, None),
        ("GET", "/portal/sign-in", None, None),
        ("GET", "/schema", None, None),
        ("GET", "/v1/reports/ropa?format=html", admin, None),
    ]
    for method, path, auth, body in api + pages:
        resp = await client.request(method, path, headers=auth or {}, json=body)
        h = resp.headers
        assert h.get("x-content-type-options") == "nosniff", path
        assert h.get("referrer-policy") == "no-referrer", path
        assert h.get("x-frame-options") == "DENY", path
        assert h.get("content-security-policy"), path
        if (method, path, auth, body) in api:
            assert h.get("cache-control") == "no-store", path
            assert "default-src 'none'" in h["content-security-policy"], path
    portal = await client.get("/portal/sign-in")
    assert "script-src" in portal.headers["content-security-policy"] or (
        "default-src 'self'" in portal.headers["content-security-policy"]
    )
    assert "'unsafe-inline'" not in portal.headers["content-security-policy"].split("style-src")[0]
