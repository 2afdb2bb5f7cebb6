"""Real ``storyvault`` processes for backup, fault and cluster tests: the CLI and
``storyvault serve`` on a free loopback port, with the environment of a Settings."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from governance.settings import Settings

STORYVAULT = str(Path(sys.executable).parent / "storyvault")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment under which a process sees ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYVAULT_")}
    env.update(
        STORYVAULT_DATA_DIR=str(settings.data_dir),
        STORYVAULT_DATABASE_URL=settings.database_url,
        STORYVAULT_KEYSTORE_URL=settings.keystore_url,
        STORYVAULT_MAIL_URL=settings.mail_url,
        STORYVAULT_DEMO_DATA="true" if settings.demo_data else "false",
        STORYVAULT_SQLITE_SYNCHRONOUS=settings.sqlite_synchronous,
        STORYVAULT_RETENTION_INTERVAL=str(int(settings.retention_interval)),
        STORYVAULT_SECURE_COOKIES="false",
        PYTHONUNBUFFERED="1",
    )
    if settings.admin_key:
        env["STORYVAULT_ADMIN_KEY"] = settings.admin_key
    if settings.audit_process is not None:
        env["STORYVAULT_AUDIT_PROCESS"] = "true" if settings.audit_process else "false"
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``storyvault ARGS`` as a separate process; on failure show its output."""
    done = subprocess.run(  # noqa: PLW1510  (the caller checks)
        [STORYVAULT, *args],
        env=env_of(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, f"storyvault {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


@dataclass
class Server:
    """``storyvault serve`` as a child process (own process group, so kill -9 is real)."""

    settings: Settings
    port: int = field(default_factory=free_port)
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    workers: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 60.0) -> Server:
        self.log = self.log or self.settings.data_dir.parent / f"serve-{self.port}.log"
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [STORYVAULT, "serve"],
            env=env_of(
                self.settings,
                STORYVAULT_HOST="127.0.0.1",
                STORYVAULT_PORT=str(self.port),
                STORYVAULT_WORKERS=str(self.workers),
            ),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"serve not ready in {ready_timeout} s: {self.tail()}")

    def children(self, name: str) -> list[int]:
        """The serving command's child processes named ``name`` (/proc/PID/comm):
        ``api.workers.WORKER_NAME`` or ``AUDIT_NAME``."""
        assert self.proc is not None
        pid = self.proc.pid
        found = []
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == name:
                    found.append(int(child))
        return found

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log else ""

    def kill9(self) -> None:
        """SIGKILL to the whole process group: no shutdown hook, no flush, no commit."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill9()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
