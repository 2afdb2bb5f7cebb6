"""``storyvault serve``'s audit process: every worker's audit entries committed in one
place, reads failing closed while it is away, and no process left behind."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.workers import AUDIT_NAME, WORKER_NAME
from governance.settings import Settings
from tests.conftest import remember_personal
from tests.integration.procs import Server, cli

READ = "?purpose=service.support"


def _customer(server: Server, org: dict[str, dict[str, str]]) -> tuple[str, str]:
    """A new customer's id and name, created through the server."""
    name = f"Audited Processer{uuid.uuid4().hex[:4]}"
    email = f"audited.{uuid.uuid4().hex[:8]}@example.org"
    remember_personal(name, email)
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(
            f"{server.url}/v1/customers{READ}",
            json={"profile": {"email": email, "name": name}},
            headers=org["support"],
            timeout=10,
        )
        if r.status_code != 403 or time.monotonic() > deadline:  # policy not compiled yet
            break
        time.sleep(0.2)
    assert r.status_code == 201, r.text
    return r.json()["id"], name


def _read(server: Server, org: dict[str, dict[str, str]], cid: str) -> httpx.Response:
    return httpx.get(
        f"{server.url}/v1/customers/{cid}/story{READ}", headers=org["support"], timeout=30
    )


def _wait(what: str, check: Any, server: Server, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what}: {server.tail()}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reads_on_two_workers_are_audited_in_one_verified_log(
    settings: Settings, org: dict[str, dict[str, str]]
) -> None:
    server = Server(replace(settings, audit_process=True), workers=2).start()
    try:
        assert len(server.children(AUDIT_NAME)) == 1
        _wait("two workers", lambda: len(server.children(WORKER_NAME)) == 2, server)
        cid, name = _customer(server, org)

        def read(_: int) -> tuple[int, str]:
            # A connection each, so that both workers serve some.
            r = _read(server, org, cid)
            assert r.status_code == 200, r.text
            assert r.json()["profile"]["name"] == name
            return r.json()["audit_index"], r.headers["x-request-id"]

        with ThreadPoolExecutor(16) as pool:
            reads = list(pool.map(read, range(64)))
        indexes = [index for index, _ in reads]
        assert len(set(indexes)) == 64
        for index, request_id in reads[::8]:
            entry = httpx.get(
                f"{server.url}/v1/audit/entries/{index}", headers=org["compliance"], timeout=10
            ).json()
            assert entry["request_id"] == request_id
            assert entry["kind"] == "disclosure"
            assert entry["actor"] == "support"
    finally:
        server.stop()
    assert "audit_process.started" in server.tail(50_000)
    cli(settings, "audit", "verify")  # exits non-zero on any divergence


@pytest.mark.parametrize("backend", ["sqlite"])
def test_reads_fail_closed_while_the_audit_process_is_away_then_recover(
    settings: Settings, org: dict[str, dict[str, str]]
) -> None:
    server = Server(replace(settings, audit_process=True)).start()
    try:
        cid, name = _customer(server, org)
        assert _read(server, org, cid).status_code == 200
        [audit] = server.children(AUDIT_NAME)
        os.kill(audit, signal.SIGKILL)
        # The worker's connection to it is gone: the next read discloses nothing.
        refused = _read(server, org, cid)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["code"] == "audit_unavailable"
        assert name not in refused.text
        # The serving process starts another; reads are audited again.
        _wait(
            "a new audit process", lambda: server.children(AUDIT_NAME) not in ([], [audit]), server
        )
        again = _wait(
            "a read after the restart",
            lambda: (r := _read(server, org, cid)).status_code == 200 and r,
            server,
        )
        assert again.json()["profile"]["name"] == name
    finally:
        server.stop()
    assert "serve.audit_process_exited" in server.tail(50_000)
    cli(settings, "audit", "verify")


def _two_workers_and_the_audit_process(server: Server) -> list[int]:
    """Their pids, once all three run (the workers first, the audit process last)."""

    def running() -> list[int]:
        found = server.children(WORKER_NAME) + server.children(AUDIT_NAME)
        return found if len(found) == 3 else []

    pids: list[int] = _wait("the workers and the audit process", running, server)
    return pids


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sigterm_stops_everything_and_a_killed_server_leaves_no_process(
    settings: Settings,
) -> None:
    settings = replace(settings, audit_process=True)
    server = Server(settings, workers=2).start()
    children = _two_workers_and_the_audit_process(server)
    # The workers reach the audit process on a socket only the service's user can use.
    environ = Path(f"/proc/{children[0]}/environ").read_bytes().split(b"\0")
    [path] = [
        v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"STORYVAULT_AUDIT_SOCKET=")
    ]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(Path(path).parent).st_mode) == 0o700
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    for pid in children:
        assert not _alive(pid)
    assert "audit_process.stopped" in server.tail(50_000)
    assert not Path(path).parent.exists()

    # SIGKILL to the serving process alone (not its group): its children follow it
    # instead of holding the port and the database.
    server = Server(settings, workers=2).start()
    try:
        children = _two_workers_and_the_audit_process(server)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        _wait("the children exit", lambda: not any(_alive(p) for p in children), server)
        with socket.socket() as s:
            s.bind(("127.0.0.1", server.port))  # the port is free again
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_without_the_audit_process_each_worker_commits_its_own(
    settings: Settings, org: dict[str, dict[str, str]]
) -> None:
    server = Server(replace(settings, audit_process=False)).start()
    try:
        assert server.children(AUDIT_NAME) == []
        cid, name = _customer(server, org)
        read = _read(server, org, cid)
        assert read.status_code == 200, read.text
        assert read.json()["profile"]["name"] == name
    finally:
        server.stop()
