"""Customer sign-in by one-time code: outbox and real SMTP, lockout, no enumeration."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Message
from litestar.testing import AsyncTestClient

from api.app import create_app
from governance.settings import Settings
from tests.conftest import make_settings, remember_personal
from tests.integration.mailbox import code_for, messages
from tests.pgserver import free_port

EMAIL = "Mira.Signin@example.org"


async def _customer(
    client: AsyncTestClient[Any], support: dict[str, str], email: str = EMAIL
) -> str:
    remember_personal(email)
    resp = await client.post(
        "/v1/customers?purpose=service.support",
        json={"profile": {"email": email, "name": "Mira Signin"}},
        headers=support,
    )
    assert resp.status_code == 201
    return str(resp.json()["id"])


async def test_sign_in_with_code_from_outbox_then_logout(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """A customer signs in with the code mailed to the outbox; after logout the token is dead."""
    await _customer(client, support)
    resp = await client.post("/v1/me/login", json={"email": "  mira.signin@EXAMPLE.org "})
    assert resp.status_code == 202
    outbox = Path(settings.mail_url.removeprefix("file://"))
    code = code_for(outbox, "mira.signin@EXAMPLE.org")
    assert len(code) == 8
    resp = await client.post("/v1/me/verify", json={"email": EMAIL, "code": code})
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    assert resp.json()["expires_at"]
    auth = {"Authorization": f"Bearer {token}"}
    # single use
    again = await client.post("/v1/me/verify", json={"email": EMAIL, "code": code})
    assert again.status_code == 401
    assert (await client.post("/v1/me/logout", headers=auth)).status_code == 204
    replay = await client.post("/v1/me/logout", headers=auth)
    assert replay.status_code == 401


async def test_unknown_address_gets_the_same_answer_and_no_mail(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """Login for an unknown address answers exactly like a known one, and sends nothing."""
    await _customer(client, support)
    known = await client.post("/v1/me/login", json={"email": EMAIL})
    unknown = await client.post("/v1/me/login", json={"email": "nobody.here@example.org"})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    outbox = Path(settings.mail_url.removeprefix("file://"))
    assert [m["to"] for m in messages(outbox)] == [EMAIL]
    # wrong codes behave the same too, including the lockout after five
    for email in (EMAIL, "nobody.here@example.org"):
        codes = [
            (
                await client.post("/v1/me/verify", json={"email": email, "code": "00000000"})
            ).status_code
            for _ in range(6)
        ]
        assert codes == [401] * 5 + [429]


async def test_lockout_after_five_wrong_codes(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """After five wrong codes even the right code is refused, with Retry-After."""
    await _customer(client, support)
    await client.post("/v1/me/login", json={"email": EMAIL})
    code = code_for(Path(settings.mail_url.removeprefix("file://")), EMAIL)
    wrong = "1" + code[1:] if code[0] != "1" else "2" + code[1:]
    for _ in range(5):
        assert (
            await client.post("/v1/me/verify", json={"email": EMAIL, "code": wrong})
        ).status_code == 401
    resp = await client.post("/v1/me/verify", json={"email": EMAIL, "code": code})
    assert resp.status_code == 429
    assert resp.json()["code"] == "code_locked"
    assert int(resp.headers["retry-after"]) > 0


async def test_parallel_guesses_cannot_exceed_the_attempt_limit(
    client: AsyncTestClient[Any], support: dict[str, str], settings: Settings
) -> None:
    """Twenty guesses at once still count against the limit of five."""
    await _customer(client, support)
    await client.post("/v1/me/login", json={"email": EMAIL})
    results = await asyncio.gather(
        *[
            client.post("/v1/me/verify", json={"email": EMAIL, "code": f"{i:08d}"})
            for i in range(20)
        ]
    )
    assert sum(r.status_code == 401 for r in results) <= 5
    assert all(r.status_code in (401, 429) for r in results)


async def test_login_rate_limited_per_address(
    client: AsyncTestClient[Any], support: dict[str, str]
) -> None:
    """More than five codes for one address in 15 minutes answers 429 with Retry-After."""
    await _customer(client, support)
    statuses = [
        (await client.post("/v1/me/login", json={"email": EMAIL})).status_code for _ in range(6)
    ]
    assert statuses == [202] * 5 + [429]
    resp = await client.post("/v1/me/login", json={"email": EMAIL})
    assert resp.json()["code"] == "rate_limited"
    assert int(resp.headers["retry-after"]) > 0


async def test_sign_in_through_real_smtp(
    tmp_path: Path, database_url: str, support: dict[str, str]
) -> None:
    """With smtp://host:port the code is delivered to a real SMTP server."""
    handler = _Collect()
    port = free_port()
    smtp = Controller(handler, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        settings = make_settings(tmp_path, database_url, mail_url=f"smtp://127.0.0.1:{port}")
        async with AsyncTestClient(app=create_app(settings)) as client:
            await _customer(client, support)
            assert (await client.post("/v1/me/login", json={"email": EMAIL})).status_code == 202
            for _ in range(50):
                if handler.received:
                    break
                await asyncio.sleep(0.05)
            assert len(handler.received) == 1
            msg = handler.received[0]
            assert msg["To"] == EMAIL
            body = msg.get_payload(decode=True).decode()
            code = next(w for w in body.split() if w.isdigit() and len(w) == 8)
            resp = await client.post("/v1/me/verify", json={"email": EMAIL, "code": code})
            assert resp.status_code == 200
    finally:
        smtp.stop()


class _Collect(Message):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[Any] = []

    def handle_message(self, message: Any) -> None:
        self.received.append(message)
