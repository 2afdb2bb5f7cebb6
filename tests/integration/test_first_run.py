"""A new user's first minutes: ``storyvault serve`` (what ``make run`` starts) on a new
database prints demo keys and a command to try, and that command works."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.conftest import make_settings
from tests.integration.procs import Server

TRY = re.compile(r"^Try: curl -H 'Authorization: Bearer (\S+)' '(\S+)'$", re.M)


def test_the_printed_try_command_finds_a_demo_customer(tmp_path: Path) -> None:
    """The hint names the support team's key and a demo customer's e-mail: the lookup
    finds that customer, and the support team can then read their story."""
    fresh = tmp_path / "fresh"
    settings = make_settings(
        tmp_path, f"sqlite+aiosqlite:///{fresh / 'storyvault.db'}", demo_data=True
    )
    server = Server(settings).start()
    try:
        found = TRY.search(server.tail(20_000))
        assert found is not None, server.tail()
        key, url = found.groups()
        assert url.startswith(f"{server.url}/v1/customers?email=")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(timeout=10) as http:
            lookup = http.get(url, headers=headers)
            assert lookup.status_code == 200, lookup.text
            items = lookup.json()["items"]
            assert len(items) == 1, lookup.text
            story = http.get(
                f"{server.url}/v1/customers/{items[0]['id']}/story",
                params={"purpose": "service.support"},
                headers=headers,
            )
    finally:
        server.stop()
    assert story.status_code == 200, story.text
    assert story.json()["profile"], story.text
