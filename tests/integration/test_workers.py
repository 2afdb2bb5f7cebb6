"""``storyvault serve`` with several worker processes (``STORYVAULT_WORKERS``): each
worker listens on a socket of its own, so a client's connections opened at once
spread over the workers instead of landing on whichever woke first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from api.workers import WORKER_NAME
from governance.settings import Settings
from tests.integration.procs import REPO, STORYVAULT, Server, env_of

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])


def _workers(server: Server) -> list[int]:
    """The worker processes (not the audit process or multiprocessing's helpers)."""
    return server.children(WORKER_NAME)


def _tcp_connections(pid: int) -> set[int]:
    """The inodes of the TCP sockets ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _listening(server: Server, timeout: float = 30.0) -> list[int]:
    """The workers, once each listens on the port (the first answers before the
    other has started)."""
    port = f":{server.port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = {
            int(fields[9])
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if port in line and (fields := line.split())[3] == "0A"
        }
        workers = _workers(server)
        if len(workers) == 2 and all(_tcp_connections(p) & listening for p in workers):
            return workers
        time.sleep(0.1)
    raise AssertionError(f"the workers do not both listen: {server.tail()}")


def _ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready: {server.tail()}")


def test_connections_opened_at_once_reach_every_worker(settings: Settings) -> None:
    """32 keep-alive connections opened together (a team's connection pool, or
    ``make bench``'s load generator) are served by both workers: each holds some."""
    server = Server(settings, workers=2).start()
    try:
        workers = _listening(server)
        before = {pid: _tcp_connections(pid) for pid in workers}
        conns = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(32)]
        try:
            for conn in conns:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            for conn in conns:
                assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            held = [len(_tcp_connections(pid) - before[pid]) for pid in workers]
        finally:
            for conn in conns:
                conn.close()
    finally:
        server.stop()
    assert sum(held) == 32
    # A hash of each connection's addresses picks its worker: all 32 on one
    # worker, as with one shared socket, has odds of 2 in 2^32.
    assert min(held) >= 4, held


def test_a_worker_that_dies_is_replaced_and_sigterm_stops_them_all(settings: Settings) -> None:
    server = Server(settings, workers=2).start()
    try:
        first = _listening(server)
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _workers(server)
            if len(now) == 2 and first[0] not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2, now
        assert first[1] in now, now
        _ready(server)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        for pid in now:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
    finally:
        server.stop()
    assert "serve.worker_exited" in server.tail(20_000)


def test_a_port_in_use_is_refused_not_shared(settings: Settings) -> None:
    """A second server on a port another already serves fails with a clear message:
    the workers' SO_REUSEPORT does not let it share the port silently."""
    server = Server(settings, workers=2).start()
    try:
        done = subprocess.run(  # noqa: PLW1510
            [STORYVAULT, "serve"],
            env=env_of(
                settings,
                STORYVAULT_HOST="127.0.0.1",
                STORYVAULT_PORT=str(server.port),
                STORYVAULT_WORKERS="2",
            ),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1
        assert f"cannot listen on {server.url}" in done.stderr
        assert "Address already in use" in done.stderr
        _ready(server)
    finally:
        server.stop()


def test_workers_started_with_a_count_on_the_command_line_see_that_count(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`storyvault serve --workers 2` with STORYVAULT_WORKERS=1: each worker loads
    its settings from the environment, and defaults that follow the worker count
    (the audit window on PostgreSQL: 0.5 ms for one worker, 2 ms for several) must
    see 2, not the environment's 1."""
    from click.testing import CliRunner

    import api.workers
    from api.cli import main
    from governance.settings import load_settings

    seen: list[Settings] = []

    def serve_workers(workers: int, options: dict[str, object], *, audit: bool) -> int:
        seen.append(load_settings())  # what a spawned worker loads
        return 0

    monkeypatch.setattr(api.workers, "serve_workers", serve_workers)
    # Through monkeypatch, so that what serve sets is undone after the test too.
    env = env_of(settings, STORYVAULT_DEMO_DATA="false", STORYVAULT_WORKERS="1")
    for name in [k for k in os.environ if k.startswith("STORYVAULT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["serve", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert [s.workers for s in seen] == [2]
