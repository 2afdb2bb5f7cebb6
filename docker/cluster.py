"""A production-shaped Story Vault cluster on this machine: ``make run-cluster``.

One PostgreSQL 15 server, two stateless ``storyvault serve`` instances sharing
one key ring, and nginx in front of them, all on loopback addresses::

    nginx        127.0.0.1:BASE      (upstream of both instances, keepalive)
    instance 1   127.0.0.1:BASE+1    (migrates, bootstraps demo data, creates the key ring)
    instance 2   127.0.0.1:BASE+2    (same database, same key ring via STORYVAULT_KEYRING)
    PostgreSQL   127.0.0.1:<free>    (data in DATA_DIR/pg, password auth)

Everything lives under one directory (``$STORYVAULT_DATA_DIR/cluster``, default
``./var/cluster``)::

    pg/            PostgreSQL cluster (owned by the ``postgres`` user when run as root)
    app1/ app2/    each instance's data dir (app1/keyring.json is the shared key ring)
    nginx/         generated nginx.conf, pid file, temp directories
    logs/          postgres.log, app1.log, app2.log, nginx-access.log, nginx-error.log

Run again and it reuses the database and the key ring. Stdlib only; as a
library (integration tests)::

    # docker/ is not a package: load this file by path (importlib.util.spec_from_file_location)
    from cluster import start_cluster          # with docker/ on sys.path
    cluster = start_cluster(tmp_path, base_port=18000)
    try:
        cluster.nginx_url          # "http://127.0.0.1:18000"
        cluster.urls               # ["http://127.0.0.1:18001", "http://127.0.0.1:18002"]
        cluster.pg.psql("SELECT count(*) FROM customers")
        cluster.keyring_json       # the shared key ring
    finally:
        cluster.stop()             # nginx, instances, PostgreSQL; idempotent
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Cluster", "Instance", "Postgres", "render_nginx_conf", "start_cluster"]

HOST = "127.0.0.1"
DATABASE = "storyvault"
PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"), Path("/usr/bin")]
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers
def _pg_bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"PostgreSQL binary {name!r} not found (apt-get install postgresql-15)")
    return found


def _nginx_bin() -> str | None:
    return shutil.which("nginx") or next(
        (str(p) for p in (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx")) if p.exists()),
        None,
    )


def _storyvault_cmd() -> list[str]:
    beside = Path(sys.executable).parent / "storyvault"
    for candidate in (beside, REPO / ".venv" / "bin" / "storyvault"):
        if candidate.exists():
            return [str(candidate), "serve"]
    found = shutil.which("storyvault")
    if found is None:
        raise RuntimeError("the storyvault command is not installed (run `make run` once)")
    return [found, "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int, timeout: float, pid: int | None = None
) -> None:
    """Send ``sig`` (to ``pid`` if given, else the child), wait, then kill its process group."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid if pid is not None else proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Anything the child left behind in its own process group goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310  (loopback URL we built)
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# --------------------------------------------------------------------------- PostgreSQL
@dataclass
class Postgres:
    """A local PostgreSQL 15 server (initdb'd once, reused on later starts)."""

    root: Path
    port: int
    password: str
    as_user: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def dsn(self) -> str:
        """libpq URL of the superuser (for psql, pg_dump)."""
        return f"postgresql://postgres:{self.password}@{HOST}:{self.port}/postgres"

    def url(self, dbname: str = DATABASE) -> str:
        """SQLAlchemy async URL for Story Vault."""
        return f"postgresql+asyncpg://postgres:{self.password}@{HOST}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = DATABASE) -> str:
        """Run one SQL command; return psql's unaligned, tuples-only output."""
        out = subprocess.run(  # noqa: S603  (fixed argv)
            [
                *(_pg_bin("psql"), "-h", HOST, "-p", str(self.port), "-U", "postgres"),
                *("-d", dbname, "-v", "ON_ERROR_STOP=1", "-Atc", sql),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PGPASSWORD": self.password},
        )
        return out.stdout

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(  # noqa: S603  (fixed argv)
            [
                *self.as_user,
                *(_pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port)),
                *("-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories="),
                *("-c", "max_connections=200", "-c", "shared_buffers=128MB"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = subprocess.run(  # noqa: S603, PLW1510  (fixed argv; exit status is the answer)
                [_pg_bin("pg_isready"), "-h", HOST, "-p", str(self.port), "-q"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{_tail(log)}")
            time.sleep(0.2)
        raise RuntimeError(f"postgres did not become ready in 60 s:\n{_tail(log)}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), then wait."""
        pid: int | None = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        _stop_process(self.proc, signal.SIGINT, 30, pid=pid)


def _init_postgres(root: Path) -> Postgres:
    """initdb ``root/data`` once (password auth on loopback), or reuse it."""
    as_user: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as `postgres` in a directory it owns.
        shutil.chown(root, user="postgres", group="postgres")
        root.chmod(0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
        probe = subprocess.run([*as_user, "test", "-w", str(root)], check=False)  # noqa: S603
        if probe.returncode != 0:
            blocked = next(
                (p for p in reversed(root.parents) if not os.stat(p).st_mode & 0o001), root.parent
            )
            raise RuntimeError(
                f"the postgres user cannot reach {root}: {blocked} is not searchable by other "
                f"users (chmod o+x {blocked}, or choose another STORYVAULT_DATA_DIR)"
            )
    pw_file = root / "password"
    if not pw_file.exists():
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
        if as_user:
            shutil.chown(pw_file, user="postgres", group="postgres")
    password = pw_file.read_text().strip()
    pg = Postgres(root=root, port=free_port(), password=password, as_user=as_user)
    if not (pg.data / "PG_VERSION").exists():
        subprocess.run(  # noqa: S603  (fixed argv)
            [
                *as_user,
                *(_pg_bin("initdb"), "-D", str(pg.data), "-U", "postgres", "-E", "UTF8"),
                *("--auth-host=scram-sha-256", "--auth-local=peer", f"--pwfile={pw_file}"),
            ],
            check=True,
            capture_output=True,
        )
    return pg


# --------------------------------------------------------------------------- nginx
def render_nginx_conf(
    listen: str,
    upstreams: list[str],
    *,
    prefix: Path | None = None,
    logs: Path | None = None,
    user: str | None = None,
) -> str:
    """The nginx config of the cluster (docker/nginx.conf is the same shape).

    ``prefix``/``logs`` put pid, temp and log files inside the data dir; without
    them logs go to stdout/stderr (containers).
    """
    servers = "\n".join(f"        server {u} max_fails=3 fail_timeout=5s;" for u in upstreams)
    access = f"{logs}/nginx-access.log" if logs else "/dev/stdout"
    error = f"{logs}/nginx-error.log" if logs else "/dev/stderr"
    files = ""
    if prefix is not None:
        files = "\n".join(
            f"    {kind}_temp_path {prefix}/temp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        files += "\n"
    head = f"user {user};\n" if user else ""
    pid = f"pid {prefix}/nginx.pid;\n" if prefix is not None else ""
    return f"""# Generated by docker/cluster.py; docker/nginx.conf is the container twin.
{head}{pid}daemon off;
worker_processes 2;
# Error lines may quote the request line with its query string (which can hold an
# e-mail address), so only critical errors are logged; the access log shows 5xx.
error_log {error} crit;

events {{
    worker_connections 1024;
}}

http {{
    # No query strings, no client addresses: method, path, status, timing only.
    log_format storyvault '$time_iso8601 $request_method $uri $status '
                          '$request_time $upstream_addr $upstream_status';
    access_log {access} storyvault;
{files}
    default_type application/octet-stream;
    server_tokens off;
    sendfile on;
    keepalive_timeout 65s;

    # Matches STORYVAULT_MAX_BODY_BYTES (1 MiB); bodies stay in memory.
    client_max_body_size 1m;
    client_body_buffer_size 1m;
    proxy_max_temp_file_size 0;

    upstream storyvault {{
{servers}
        keepalive 32;
    }}

    server {{
        listen {listen};

        location / {{
            proxy_pass http://storyvault;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
            # Retry another instance only when none answered (never a non-idempotent request).
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""


# --------------------------------------------------------------------------- cluster
@dataclass
class Instance:
    """One ``storyvault serve`` process."""

    name: str
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    """stdout and stderr (JSON log lines; the start banner with demo keys)."""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        _stop_process(self.proc, signal.SIGTERM, 20)


@dataclass
class Cluster:
    """A running cluster: ``urls`` (instances), ``nginx_url``, ``pg``; ``stop()``."""

    data_dir: Path
    pg: Postgres
    instances: list[Instance] = field(default_factory=list)
    nginx: subprocess.Popen[bytes] | None = None
    nginx_url: str = ""
    keyring_json: str = ""
    database_url: str = ""

    @property
    def urls(self) -> list[str]:
        """Base URLs of the instances, in start order."""
        return [i.url for i in self.instances]

    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        procs = {i.name: i.proc for i in self.instances}
        if self.nginx is not None:
            procs["nginx"] = self.nginx
        if self.pg.proc is not None:
            procs["postgres"] = self.pg.proc
        return procs

    def stop(self) -> None:
        """Stop nginx, then the instances (newest first), then PostgreSQL. Idempotent."""
        if self.nginx is not None:
            _stop_process(self.nginx, signal.SIGQUIT, 10)  # graceful: finish open requests
        for instance in reversed(self.instances):
            instance.stop()
        self.pg.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start_instance(
    name: str, port: int, data_dir: Path, logs: Path, env: dict[str, str]
) -> Instance:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    proc = subprocess.Popen(  # noqa: S603  (fixed argv)
        _storyvault_cmd(),
        cwd=REPO,
        env={
            **env,
            "STORYVAULT_HOST": HOST,
            "STORYVAULT_PORT": str(port),
            "STORYVAULT_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
        },
        stdin=subprocess.DEVNULL,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Instance(name=name, port=port, data_dir=data_dir, proc=proc, log=log)


def _wait_ready(instance: Instance, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _http_ok(f"{instance.url}/ready"):
            return
        if instance.proc.poll() is not None:
            raise RuntimeError(
                f"{instance.name} exited with {instance.proc.returncode}:\n{_tail(instance.log)}"
            )
        time.sleep(0.3)
    raise RuntimeError(f"{instance.name} not ready after {timeout:.0f} s:\n{_tail(instance.log)}")


def start_cluster(
    data_dir: Path | str,
    base_port: int = 8000,
    *,
    instances: int = 2,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 180.0,
) -> Cluster:
    """Start PostgreSQL, ``instances`` Story Vault instances and nginx under ``data_dir``.

    nginx listens on ``base_port``, instance *n* on ``base_port + n``; PostgreSQL on
    a free port. ``env`` adds or overrides variables for the instances (e.g.
    ``STORYVAULT_ADMIN_KEY``, ``STORYVAULT_DEMO_DATA``). Returns once every
    instance answers ``/ready`` and nginx answers ``/health``; on any failure,
    whatever was started is stopped and RuntimeError says why.
    """
    root = Path(data_dir).resolve()
    logs, ngx = root / "logs", root / "nginx"
    nginx = _nginx_bin()
    if nginx is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    ports = [base_port + n for n in range(instances + 1)]
    busy = [p for p in ports if _port_in_use(p)]
    if busy:
        raise RuntimeError(f"port(s) {busy} on {HOST} already in use; choose another base port")
    logs.mkdir(parents=True, exist_ok=True)
    (ngx / "temp").mkdir(parents=True, exist_ok=True)

    cluster = Cluster(data_dir=root, pg=_init_postgres(root / "pg"))
    try:
        cluster.pg.start(logs / "postgres.log")
        exists = "SELECT 1 FROM pg_database WHERE datname = 'storyvault'"
        if not cluster.pg.psql(exists, "postgres").strip():
            cluster.pg.psql(f'CREATE DATABASE "{DATABASE}"', "postgres")
        cluster.database_url = cluster.pg.url(DATABASE)

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("STORYVAULT_")}
        passthrough = {k: v for k, v in os.environ.items() if k.startswith("STORYVAULT_")}
        for k in ("STORYVAULT_DATA_DIR", "STORYVAULT_PORT", "STORYVAULT_HOST"):
            passthrough.pop(k, None)
        app_env = {
            **base_env,
            **passthrough,
            **(env or {}),
            "STORYVAULT_DATABASE_URL": cluster.database_url,
        }

        # Instance 1 migrates, bootstraps and (without STORYVAULT_KEYRING) creates the ring.
        for n in range(1, instances + 1):
            name = f"app{n}"
            instance = _start_instance(name, base_port + n, root / name, logs, app_env)
            cluster.instances.append(instance)
            _wait_ready(instance, ready_timeout)
            if n == 1:
                ring = (
                    app_env.get("STORYVAULT_KEYRING") or (root / name / "keyring.json").read_text()
                )
                cluster.keyring_json = ring
                app_env = {**app_env, "STORYVAULT_KEYRING": ring}

        user = None
        if os.geteuid() == 0:
            user = next((u for u in ("www-data", "nobody") if _user_exists(u)), None)
        conf = ngx / "nginx.conf"
        conf.write_text(
            render_nginx_conf(
                f"{HOST}:{base_port}",
                [f"{HOST}:{i.port}" for i in cluster.instances],
                prefix=ngx,
                logs=logs,
                user=user,
            )
        )
        cluster.nginx = subprocess.Popen(  # noqa: S603  (fixed argv)
            [nginx, "-p", str(ngx), "-c", str(conf), "-e", str(logs / "nginx-error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(logs / "nginx-error.log").open("ab"),
            start_new_session=True,
        )
        cluster.nginx_url = f"http://{HOST}:{base_port}"
        _wait_nginx(cluster.nginx, cluster.nginx_url, logs / "nginx-error.log")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_nginx(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while not _http_ok(f"{url}/health"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not start:\n{_tail(log)}")
        time.sleep(0.2)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# --------------------------------------------------------------------------- CLI
def _ensure_nginx() -> None:
    if _nginx_bin() is not None:
        return
    if os.geteuid() != 0:
        sys.exit("run-cluster: nginx is not installed; run: sudo apt-get install -y nginx")
    print("run-cluster: installing nginx (apt-get install -y nginx) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)  # noqa: S607
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"],  # noqa: S607
        check=True,
        env=env,
    )


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    default_dir = Path(os.environ.get("STORYVAULT_DATA_DIR") or "./var") / "cluster"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_dir, help="%(default)s")
    parser.add_argument("--base-port", type=int, default=8000, help="nginx port; instances +1, +2")
    parser.add_argument("--instances", type=int, default=2)
    args = parser.parse_args(argv)

    _ensure_nginx()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    first_log = args.data_dir.resolve() / "logs" / "app1.log"
    offset = first_log.stat().st_size if first_log.exists() else 0
    print(f"run-cluster: starting in {args.data_dir.resolve()} ...", flush=True)
    try:
        cluster = start_cluster(args.data_dir, args.base_port, instances=args.instances)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"run-cluster: {exc}", file=sys.stderr)
        return 1
    try:
        first = cluster.instances[0]
        with first.log.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        # The banner (URL, demo keys) is the non-JSON part of instance 1's output.
        banner = [line for line in text.splitlines() if line and not line.startswith("{")]
        print("\n".join(banner).replace(first.url, cluster.nginx_url))
        if "API keys" not in text:
            print("(database already bootstrapped: demo keys were shown on its first start)")
        print()
        print(f"Story Vault cluster on {cluster.nginx_url}  (nginx)")
        for i in cluster.instances:
            print(f"  {i.name}: {i.url}  data {i.data_dir}  log {i.log}")
        print(f"  postgres: {HOST}:{cluster.pg.port}  (password in {cluster.pg.root}/password)")
        print(f"  logs: {cluster.data_dir / 'logs'}")
        print("Ctrl-C stops everything.", flush=True)
        while True:
            for name, proc in cluster.processes().items():
                if proc.poll() is not None:
                    print(f"run-cluster: {name} exited ({proc.returncode}); stopping", flush=True)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nrun-cluster: stopping ...", flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop()
        print("run-cluster: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
