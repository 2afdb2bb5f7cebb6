"""A real PostgreSQL server for the test suite: initdb in a temporary directory.

The server refuses to run as root, so as root it runs as the ``postgres``
user (runuser) in a directory that user owns, on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"), Path("/usr/bin")]


def _bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"PostgreSQL binary {name!r} not found (install postgresql-15)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    as_user: list[str]
    durable: bool = False

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        out = subprocess.run(
            [
                _bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                dbname,
                "-v",
                "ON_ERROR_STOP=1",
                "-Atc",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def create_database(self, dbname: str) -> str:
        self.psql(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def pg_dump(self, dbname: str) -> bytes:
        return subprocess.run(
            [_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", dbname],
            check=True,
            capture_output=True,
        ).stdout

    def restart(self) -> None:
        self.stop()
        self.proc = _start(self.root, self.port, self.as_user, durable=self.durable)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start(
    root: Path, port: int, as_user: list[str], *, durable: bool = False
) -> subprocess.Popen[bytes]:
    data = root / "data"
    # Tests trade durability for speed (a crash loses nothing they need); the
    # benchmarks keep PostgreSQL's defaults, so a commit waits for its WAL flush.
    speed = [] if durable else ["-c", "fsync=off", "-c", "full_page_writes=off"]
    proc = subprocess.Popen(
        [
            *as_user,
            _bin("postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(root),
            *speed,
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "ab"),  # noqa: SIM115
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
            ready = subprocess.run(  # noqa: PLW1510  (exit status is the answer)
                [_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
            )
            if ready.returncode == 0:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError("postgres did not become ready in 30 s")


def start_server(*, durable: bool = False) -> PgServer:
    """A PostgreSQL 15 server in a temporary directory on a loopback port; ``durable``
    keeps fsync and full-page writes on (benchmarks), tests run without them."""
    root = Path(tempfile.mkdtemp(prefix="storyvault-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres", group="postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_user,
            _bin("initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = _start(root, port, as_user, durable=durable)
    return PgServer(root=root, port=port, proc=proc, as_user=as_user, durable=durable)


def stop_server(server: PgServer) -> None:
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
