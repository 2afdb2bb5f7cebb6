"""Bad input gets a clear 4xx problem and changes nothing (invariant 7)."""

from __future__ import annotations

import json
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import text

from governance.service import StoryVault

P = "?purpose=service.support"
SECRET_VALUE = "leaky.secret@example.net"
GOOD_CHAPTER = {
    "category": "support.ticket",
    "kind": "ticket",
    "occurred_at": "2026-01-01T00:00:00Z",
    "body": {"subject": "x"},
}
TABLES = [
    "customers",
    "profile_values",
    "chapters",
    "email_index",
    "data_keys",
    "teams",
    "api_keys",
]


async def _snapshot(vault: StoryVault) -> dict[str, int]:
    async with vault.db.session() as session:
        return {
            t: (await session.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one()
            for t in TABLES
        }


# (name, method, path, body (dict -> JSON, bytes -> raw), headers override, status, code)
CASES: list[tuple[str, str, str, Any, dict[str, str] | None, int, str]] = [
    ("malformed JSON", "POST", f"/v1/customers{P}", b'{"profile": {', None, 400, "bad_request"),
    (
        "wrong type",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"name": 42}},
        None,
        400,
        "validation_error",
    ),
    (
        "unknown field",
        "POST",
        f"/v1/customers{P}",
        {"profile": {}, "extra": 1},
        None,
        400,
        "validation_error",
    ),
    (
        "unknown profile field",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"shoe_size": "42"}},
        None,
        422,
        "unknown_field",
    ),
    (
        "invalid e-mail",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"email": "not-an-address " + SECRET_VALUE}},
        None,
        422,
        "invalid_value",
    ),
    (
        "invalid birthday",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"birthday": "31/02/1990"}},
        None,
        422,
        "invalid_value",
    ),
    (
        "oversized body",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"name": "x" * (2 * 1024 * 1024)}},
        None,
        413,
        "body_too_large",
    ),
    (
        "missing purpose",
        "POST",
        "/v1/customers",
        {"profile": {"name": "A B"}},
        None,
        400,
        "purpose_required",
    ),
    (
        "unknown purpose",
        "POST",
        "/v1/customers?purpose=world.domination",
        {"profile": {"name": "A B"}},
        None,
        400,
        "unknown_purpose",
    ),
    (
        "missing key",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"name": "A B"}},
        {"Authorization": ""},
        401,
        "unauthorized",
    ),
    (
        "unknown key",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"name": "A B"}},
        {"Authorization": "Bearer svk_nope"},
        401,
        "unauthorized",
    ),
    (
        "not bearer",
        "POST",
        f"/v1/customers{P}",
        {"profile": {"name": "A B"}},
        {"Authorization": "Basic abc"},
        401,
        "unauthorized",
    ),
    (
        "bad UUID",
        "POST",
        f"/v1/customers/not-a-uuid/chapters{P}",
        GOOD_CHAPTER,
        None,
        400,
        "invalid_id",
    ),
    (
        "unknown customer",
        "POST",
        f"/v1/customers/00000000-0000-4000-8000-000000000000/chapters{P}",
        GOOD_CHAPTER,
        None,
        404,
        "customer_not_found",
    ),
    (
        "unknown category",
        "POST",
        "/v1/customers/{cid}/chapters" + P,
        {**GOOD_CHAPTER, "category": "astrology"},
        None,
        422,
        "unknown_category",
    ),
    (
        "kind outside category",
        "POST",
        "/v1/customers/{cid}/chapters" + P,
        {**GOOD_CHAPTER, "kind": "invoice"},
        None,
        422,
        "invalid_kind",
    ),
    (
        "bad timestamp",
        "POST",
        "/v1/customers/{cid}/chapters" + P,
        {**GOOD_CHAPTER, "occurred_at": "yesterday"},
        None,
        400,
        "validation_error",
    ),
    (
        "body not object",
        "POST",
        "/v1/customers/{cid}/chapters" + P,
        {**GOOD_CHAPTER, "body": [1, 2]},
        None,
        400,
        "validation_error",
    ),
    (
        "patch unknown field",
        "PATCH",
        "/v1/customers/{cid}/profile" + P,
        {"favourite_colour": "red"},
        None,
        422,
        "unknown_field",
    ),
    (
        "patch wrong type",
        "PATCH",
        "/v1/customers/{cid}/profile" + P,
        {"name": ["x"]},
        None,
        400,
        "validation_error",
    ),
    (
        "bad team name",
        "POST",
        "/v1/admin/teams",
        {"name": "Robert'); DROP TABLE teams;--"},
        None,
        422,
        "invalid_team",
    ),
    (
        "unknown role",
        "POST",
        "/v1/admin/teams",
        {"name": "ops", "roles": ["root"]},
        None,
        422,
        "invalid_role",
    ),
    (
        "key for unknown team",
        "POST",
        "/v1/admin/teams/ghosts/keys",
        {},
        None,
        404,
        "team_not_found",
    ),
    (
        "revoke unknown key",
        "DELETE",
        "/v1/admin/keys/key_unknown",
        None,
        None,
        404,
        "key_not_found",
    ),
    ("wrong method", "PUT", "/v1/customers" + P, {}, None, 405, "method_not_allowed"),
    ("unknown path", "GET", "/v1/nothing-here", None, None, 404, "not_found"),
]


async def test_bad_input_gets_problem_and_changes_nothing(
    client: AsyncTestClient[Any],
    admin: dict[str, str],
    support: dict[str, str],
    direct: StoryVault,
) -> None:
    """Each malformed request of the table gets its documented 4xx problem and leaves the
    database as it was (one app for the whole table: the cases share nothing but it)."""
    resp = await client.post(
        f"/v1/customers{P}", json={"profile": {"name": "Base Customer"}}, headers=support
    )
    assert resp.status_code == 201, resp.text
    cid = resp.json()["id"]
    for name, method, path, body, headers, status, code in CASES:
        before = await _snapshot(direct)
        who = admin if path.startswith("/v1/admin") else support
        hdrs = {**who, **(headers or {})}
        hdrs = {k: v for k, v in hdrs.items() if v}
        kwargs: dict[str, Any] = {"headers": hdrs}
        if isinstance(body, bytes):
            kwargs["content"] = body
            hdrs["content-type"] = "application/json"
        elif body is not None:
            kwargs["content"] = json.dumps(body).encode()
            hdrs["content-type"] = "application/json"
        resp = await client.request(method, path.replace("{cid}", cid), **kwargs)
        assert resp.status_code == status, (name, resp.text[:300])
        assert resp.headers["content-type"].startswith("application/problem+json"), name
        problem = resp.json()
        assert problem["code"] == code, name
        assert problem["status"] == status, name
        assert problem["type"] == f"urn:storyvault:problem:{code}", name
        assert SECRET_VALUE not in resp.text, name
        assert await _snapshot(direct) == before, name


async def test_revoked_key_fails_on_next_request(
    client: AsyncTestClient[Any], admin: dict[str, str]
) -> None:
    """A revoked key is refused on the very next request."""
    issued = (
        await client.post("/v1/admin/teams/compliance/keys", json={"label": "temp"}, headers=admin)
    ).json()
    auth = {"Authorization": f"Bearer {issued['key']}"}
    assert (await client.get("/v1/admin/teams", headers=auth)).status_code == 200
    assert (await client.delete(f"/v1/admin/keys/{issued['id']}", headers=admin)).status_code == 204
    resp = await client.get("/v1/admin/teams", headers=auth)
    assert resp.status_code == 401
    assert resp.json()["code"] == "unauthorized"


async def test_admin_endpoints_refuse_team_keys(
    client: AsyncTestClient[Any], admin: dict[str, str]
) -> None:
    """A key of a team without the admin role cannot use admin endpoints."""
    assert (
        await client.post("/v1/admin/teams", json={"name": "sales"}, headers=admin)
    ).status_code == 201
    key = (await client.post("/v1/admin/teams/sales/keys", json={}, headers=admin)).json()["key"]
    resp = await client.post(
        "/v1/admin/teams", json={"name": "rogue"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status_code == 403
    assert resp.json()["code"] == "forbidden"


async def test_operations_endpoints(client: AsyncTestClient[Any]) -> None:
    """Health, readiness, metrics and the OpenAPI document answer without credentials."""
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).json()["status"] == "ready"
    await client.get("/health")
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert "storyvault_requests_total" in metrics.text
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/v1/customers" in schema["paths"]
    resp = await client.get("/health")
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-request-id"]
