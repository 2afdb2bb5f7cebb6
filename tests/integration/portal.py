"""Helpers for tests that act as a customer: create one through a team, sign in by mail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from governance.settings import Settings
from tests.conftest import remember_personal
from tests.integration.mailbox import code_for


async def new_customer(
    client: AsyncTestClient[Any], support: dict[str, str], email: str, name: str
) -> str:
    """A customer created by the support team (contract purpose), with a preference chapter."""
    remember_personal(email, name)
    resp = await client.post(
        "/v1/customers?purpose=service.support",
        json={"profile": {"email": email, "name": name}},
        headers=support,
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def sign_in(client: AsyncTestClient[Any], settings: Settings, email: str) -> dict[str, str]:
    """Sign in with the one-time code from the file outbox; returns the auth header."""
    resp = await client.post("/v1/me/login", json={"email": email})
    assert resp.status_code == 202, resp.text
    code = code_for(Path(settings.mail_url.removeprefix("file://")), email)
    resp = await client.post("/v1/me/verify", json={"email": email, "code": code})
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}
