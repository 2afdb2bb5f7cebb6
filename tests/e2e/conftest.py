"""End-to-end fixtures: the real app served by uvicorn on a loopback port, test data
created over HTTP, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright

from governance.settings import Settings
from tests.conftest import ADMIN_KEY, DEMO_TEAMS, make_settings, remember_personal
from tests.integration.mailbox import code_for
from tests.pgserver import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).parent / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@dataclass
class Portal:
    """The running service and what the tests need to talk to it."""

    base: str
    settings: Settings
    app: Any
    team_keys: dict[str, dict[str, str]]

    @property
    def outbox(self) -> Path:
        return Path(self.settings.mail_url.removeprefix("file://"))

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=10)

    def new_customer(self, name: str) -> tuple[str, str]:
        """A customer with a varied story (created by the teams over the API)."""
        email = f"{name.lower().replace(' ', '.')}.{uuid.uuid4().hex[:6]}@example.org"
        remember_personal(email, name, "+44 20 7946 0321", "12 Quay Street, Bristol")
        with self.api() as api:
            resp = api.post(
                "/v1/customers?purpose=service.support",
                json={
                    "external_ref": f"crm-{uuid.uuid4().hex[:8]}",
                    "profile": {
                        "name": name,
                        "email": email,
                        "phone": "+44 20 7946 0321",
                        "address": "12 Quay Street, Bristol",
                    },
                },
                headers=self.team_keys["support"],
            )
            assert resp.status_code == 201, resp.text
            cid = str(resp.json()["id"])
            chapters = [
                (
                    "commerce.purchase",
                    "purchase",
                    "2024-03-02T10:15:00Z",
                    {
                        "order": "SO-481516",
                        "product": "Trail running shoes",
                        "amount": 129.0,
                        "currency": "EUR",
                    },
                ),
                (
                    "commerce.invoice",
                    "invoice",
                    "2024-03-02T10:16:00Z",
                    {"invoice": "INV-481516", "total": 129.0, "currency": "EUR"},
                ),
                (
                    "support.ticket",
                    "ticket",
                    "2024-04-11T08:30:00Z",
                    {"subject": "Sole came loose after two weeks", "status": "resolved"},
                ),
                (
                    "engagement.interaction",
                    "chat",
                    "2024-04-11T09:00:00Z",
                    {"summary": "Asked about a replacement pair", "topic": "Warranty"},
                ),
                (
                    "preference",
                    "preference",
                    "2024-04-12T12:00:00Z",
                    {"channel": "e-mail", "size": "EU 42"},
                ),
            ]
            for category, kind, when, body in chapters:
                resp = api.post(
                    f"/v1/customers/{cid}/chapters?purpose=service.support",
                    json={"category": category, "kind": kind, "occurred_at": when, "body": body},
                    headers=self.team_keys["sales"],
                )
                assert resp.status_code == 201, resp.text
        return cid, email

    def code_for(self, email: str) -> str:
        return code_for(self.outbox, email)


def _serve(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, Any]:
    from api.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="portal-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive(), "the server stopped during start-up"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, app


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("portal")
    settings = make_settings(tmp, f"sqlite+aiosqlite:///{tmp / 'storyvault.db'}", port=free_port())
    server, thread, app = _serve(settings)
    base = f"http://127.0.0.1:{settings.port}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys: dict[str, dict[str, str]] = {"compliance": admin}
    try:
        with httpx.Client(base_url=base, timeout=10) as api:
            for team in DEMO_TEAMS:
                resp = api.post("/v1/admin/teams", json={"name": team}, headers=admin)
                assert resp.status_code == 201, resp.text
                key = api.post(f"/v1/admin/teams/{team}/keys", json={}, headers=admin).json()
                keys[team] = {"Authorization": f"Bearer {key['key']}"}
        # In a thread of its own: Playwright's sync API keeps a loop on this one.
        with ThreadPoolExecutor(1) as pool:
            version = pool.submit(asyncio.run, _seed_policy(settings)).result()
        _wait_for_policy(app, version)
        yield Portal(base=base, settings=settings, app=app, team_keys=keys)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def _seed_policy(settings: Settings) -> int:
    """The demo starter policy, stored directly (as the `org` fixture does); the
    server's policy watcher picks it up like any instance would."""
    from governance.service import StoryVault

    vault = StoryVault(settings)
    try:
        await vault.seed_demo_policy()
        return int(await vault.policy_store.current_version())
    finally:
        await vault.stop()


def _wait_for_policy(app: Any, wanted: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while app.state.vault.policy.version < wanted:
        assert time.monotonic() < deadline, "the server did not pick up the policy"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), "Chromium is not installed"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    problems: list[str] = []
    # Form pages answer 4xx on purpose (wrong code, missing confirmation); Chromium
    # logs those documents as failed loads. Assets are checked by their responses.
    pg.on(
        "console",
        lambda msg: (
            problems.append(msg.text)
            if msg.type in ("error", "warning")
            and not msg.text.startswith("Failed to load resource")
            else None
        ),
    )
    pg.on("pageerror", lambda exc: problems.append(str(exc)))
    pg.on(
        "response",
        lambda r: (
            problems.append(f"{r.status} {r.url}")
            if r.status >= 400 and r.request.resource_type != "document"
            else None
        ),
    )
    try:
        yield pg
    finally:
        context.close()
    # No script errors and no Content-Security-Policy violations on any page.
    assert problems == [], problems


def shoot(page: Page, name: str) -> None:
    """Save desktop and phone screenshots of the current page."""
    SCREENSHOTS.mkdir(exist_ok=True)
    size = page.viewport_size or DESKTOP
    page.screenshot(path=str(SCREENSHOTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-phone.png"), full_page=True)
    page.set_viewport_size(size)
