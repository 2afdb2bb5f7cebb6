"""The privacy portal's security properties at the HTTP level (no browser needed):
CSRF on every state change, cookie flags, CSP, sessions, no personal data in titles."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from api.app import create_app
from governance.settings import Settings
from tests.integration.mailbox import code_for, messages
from tests.integration.portal import new_customer

EMAIL = "Pia.Portal@example.org"
NAME = "Pia Portalsen"
PAGES = ("story", "consents", "access", "export", "erase", "requests")


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def portal_sign_in(client: AsyncTestClient[Any], settings: Settings, email: str) -> str:
    """Sign in through the portal's forms; returns the session's CSRF token."""
    page = await client.get("/portal/sign-in")
    token = csrf_of(page.text)
    resp = await client.post("/portal/sign-in", data={"email": email, "csrf_token": token})
    assert resp.status_code == 200, resp.text
    code = code_for(Path(settings.mail_url.removeprefix("file://")), email)
    resp = await client.post(
        "/portal/verify",
        data={"email": email, "code": code, "csrf_token": token},
        follow_redirects=False,
    )
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == "/portal/story"
    return csrf_of((await client.get("/portal/consents")).text)


async def test_every_post_needs_the_session_csrf_token(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """Consent, erasure and logout without (or with a foreign) CSRF token: 403, no change."""
    await new_customer(client, support, EMAIL, NAME)
    token = await portal_sign_in(client, settings, EMAIL)
    foreign = "0" * 64
    attempts = [
        ("/portal/consents", {"purpose": "marketing.email", "action": "grant"}),
        ("/portal/erase", {"confirm": "yes"}),
        ("/portal/logout", {}),
    ]
    for path, form in attempts:
        for sent in ({}, {"csrf_token": foreign}, {"csrf_token": token[:-1] + "x"}):
            resp = await client.post(path, data={**form, **sent}, follow_redirects=False)
            assert resp.status_code == 403, (path, sent, resp.status_code)
            assert "This form has expired" in resp.text
    page = await client.get("/portal/consents")
    assert page.status_code == 200  # still signed in, story not erased
    assert "Off: not given" in page.text
    assert "On: consent given" not in page.text
    # with the token, the same consent change goes through and shows its receipt
    resp = await client.post(
        "/portal/consents",
        data={"purpose": "marketing.email", "action": "grant", "csrf_token": token},
    )
    assert resp.status_code == 200
    assert 'id="receipt-jws"' in resp.text


async def test_sign_in_forms_need_the_pre_session_token(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """Login CSRF: a sign-in form posted from elsewhere sends no code and signs nobody in."""
    await new_customer(client, support, EMAIL, NAME)
    resp = await client.post("/portal/sign-in", data={"email": EMAIL, "csrf_token": "0" * 64})
    assert resp.status_code == 403
    assert messages(Path(settings.mail_url.removeprefix("file://"))) == []
    resp = await client.post(
        "/portal/verify", data={"email": EMAIL, "code": "12345678", "csrf_token": "0" * 64}
    )
    assert resp.status_code == 403


async def test_session_cookie_flags(
    settings: Settings, support: dict[str, str], client: AsyncTestClient[Any]
) -> None:
    """HttpOnly + SameSite=Strict + Path=/portal always; Secure unless local development."""
    await new_customer(client, support, EMAIL, NAME)
    secure = replace(settings, secure_cookies=True)
    app = create_app(secure, migrate=False)
    async with AsyncTestClient(app=app, base_url="https://portal.example") as other:
        page = await other.get("/portal/sign-in")
        token = csrf_of(page.text)
        pre = page.headers["set-cookie"]
        assert "HttpOnly" in pre
        assert "SameSite=strict" in pre
        assert "Secure" in pre
        await other.post("/portal/sign-in", data={"email": EMAIL, "csrf_token": token})
        code = code_for(Path(settings.mail_url.removeprefix("file://")), EMAIL)
        resp = await other.post(
            "/portal/verify",
            data={"email": EMAIL, "code": code, "csrf_token": token},
            follow_redirects=False,
        )
        assert resp.status_code == 303
        cookie = next(c for c in resp.headers.get_list("set-cookie") if c.startswith("sv_session="))
        for flag in ("HttpOnly", "SameSite=strict", "Secure", "Path=/portal"):
            assert flag in cookie, cookie


async def test_pages_set_csp_and_keep_personal_data_out_of_titles(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    await new_customer(client, support, EMAIL, NAME)
    await portal_sign_in(client, settings, EMAIL)
    for name in PAGES:
        resp = await client.get(f"/portal/{name}")
        assert resp.status_code == 200, (name, resp.text[:300])
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert "form-action 'self'" in csp
        assert resp.headers["cache-control"] == "no-store"
        title = re.search(r"<title>(.*?)</title>", resp.text, re.S)
        assert title
        assert EMAIL.lower() not in title.group(1).lower()
        assert NAME not in title.group(1)
        assert "<script>" not in resp.text
        assert " on" + "click=" not in resp.text
    story = await client.get("/portal/story")
    assert NAME in story.text  # the story itself is shown, in the page body


async def test_no_session_leads_to_sign_in(client: AsyncTestClient[Any]) -> None:
    for name in (*PAGES, "requests/00000000-0000-0000-0000-000000000000"):
        resp = await client.get(f"/portal/{name}", follow_redirects=False)
        assert resp.status_code == 303
        assert resp.headers["location"] == "/portal/sign-in"
    client.cookies.set("sv_session", "svs_forged", path="/portal")
    resp = await client.get("/portal/story", follow_redirects=False)
    assert resp.status_code == 303
    assert "sv_session=" in resp.headers["set-cookie"]  # the stale cookie is cleared
    resp = await client.post("/portal/consents", data={}, follow_redirects=False)
    assert resp.status_code == 303


async def test_logout_ends_the_session(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    await new_customer(client, support, EMAIL, NAME)
    token = await portal_sign_in(client, settings, EMAIL)
    session = client.cookies.get("sv_session", path="/portal")
    resp = await client.post("/portal/logout", data={"csrf_token": token}, follow_redirects=False)
    assert resp.status_code == 303
    assert resp.headers["location"].startswith("/portal/sign-in")
    # the old token is dead even if replayed
    client.cookies.set("sv_session", session or "", path="/portal")
    resp = await client.get("/portal/story", follow_redirects=False)
    assert resp.headers["location"] == "/portal/sign-in"
