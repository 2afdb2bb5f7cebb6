"""Several worker processes on one port, each with a listening socket of its own.

uvicorn's own ``--workers`` hands every worker the same listening socket, and
whichever worker wakes first accepts every connection then waiting. A client
that opens its pool of keep-alive connections at once (a team's service, a load
generator) so lands on one worker while the others idle: ``make bench``'s 32
connections reached one worker of two in most attempts. Here each worker binds a
socket of its own with ``SO_REUSEPORT``, and the kernel spreads new connections
over the workers' sockets by a hash of their addresses.

``SO_REUSEPORT`` would also let a second server started on the same port (by the
same user) share it silently; so the port is first bound without it, which fails
as usual if anything holds the port already. The parent then keeps a bound (not
listening) socket on the port while it runs, restarts a worker that exits, and
stops them all on SIGINT or SIGTERM.

With ``audit=True`` it first starts the audit log's own process
(``governance.auditproc``) on a Unix socket in a private directory, waits until it
accepts batches, and points the workers at it (``STORYVAULT_AUDIT_SOCKET``). It
restarts that process too when it exits (the workers' reads fail closed until it is
back), and stops it after the workers, so that what they sent is committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from uvicorn.config import STARTUP_FAILURE  # a worker that failed to start: not restarted

__all__ = ["AUDIT_NAME", "WORKER_NAME", "serve_workers"]

WORKER_NAME = "svault-worker"
"""A worker process's name (/proc/PID/comm)."""
AUDIT_NAME = "svault-audit"
"""The audit process's name (/proc/PID/comm)."""

log = structlog.get_logger("storyvault.workers")

_STOP_TIMEOUT = 30.0

_PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a process gets when its parent dies."""


def port_socket(host: str, port: int, *, share: bool) -> socket.socket:
    """A TCP socket bound to ``host:port``, with ``SO_REUSEPORT`` if ``share``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _child_process(name: str) -> None:
    """Name this process in ``ps``, ``top`` and /proc/PID/comm (15 bytes at most), and
    have the kernel send it SIGTERM should the serving process die without stopping
    it (killed), instead of leaving it to hold the port and the database."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the request
        sys.exit(0)


def _worker(options: dict[str, Any]) -> None:
    """One worker process (spawned): its own socket on the port, then uvicorn."""
    import uvicorn

    _child_process(WORKER_NAME)

    config = uvicorn.Config(**options)
    server = uvicorn.Server(config)
    try:
        sock = port_socket(config.host, config.port, share=True)
    except OSError:
        log.exception("serve.worker_bind_failed")
        sys.exit(STARTUP_FAILURE)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _audit_process(path: str, ready: Any) -> None:
    """The audit log's process (spawned): ``governance.auditproc`` on ``path``."""
    import uvloop

    _child_process(AUDIT_NAME)

    from governance.auditproc import serve_audit_log
    from governance.logs import configure_logging
    from governance.settings import load_settings

    configure_logging()
    uvloop.run(serve_audit_log(load_settings(), path, ready=ready.set))


def _stop(processes: list[BaseProcess]) -> None:
    """SIGTERM ``processes``, wait for them, SIGKILL any still running at the deadline."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


class _Supervisor:
    """The workers (and the audit process) of one ``serve_workers`` call."""

    def __init__(self, options: dict[str, Any], audit_path: str | None) -> None:
        self._options = options
        self._audit_path = audit_path
        self._spawn = multiprocessing.get_context("spawn")
        self.stop = threading.Event()
        self.audit: BaseProcess | None = None
        self.workers: list[BaseProcess] = []

    def start_audit(self) -> bool:
        """Start the audit process and wait until it accepts batches; False if it failed."""
        ready = self._spawn.Event()
        process = self._spawn.Process(
            target=_audit_process, args=(self._audit_path, ready), name="storyvault-audit"
        )
        process.start()
        while not ready.wait(0.1):
            if not process.is_alive() or self.stop.is_set():
                log.error("serve.audit_process_failed_to_start", exit_code=process.exitcode)
                _stop([process])
                self.audit = None
                return False
        self.audit = process
        return True

    def start_worker(self) -> BaseProcess:
        process = self._spawn.Process(
            target=_worker, args=(self._options,), name="storyvault-worker"
        )
        process.start()
        return process

    def watch(self) -> int:
        """Restart what exits until ``stop``; the exit code."""
        while not self.stop.wait(0.5):
            if self.audit is not None and not self.audit.is_alive():
                log.warning("serve.audit_process_exited", exit_code=self.audit.exitcode)
                if not self.start_audit():
                    return STARTUP_FAILURE
            for i, process in enumerate(self.workers):
                if process.is_alive():
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("serve.worker_failed_to_start", pid=process.pid)
                    return STARTUP_FAILURE
                log.warning("serve.worker_exited", pid=process.pid, exit_code=process.exitcode)
                self.workers[i] = self.start_worker()
        return 0


def serve_workers(workers: int, options: dict[str, Any], *, audit: bool = False) -> int:
    """Run ``workers`` uvicorn servers of ``options`` (``uvicorn.Config``'s keyword
    arguments, with ``host`` and ``port``) until SIGINT or SIGTERM; the exit code.
    ``OSError`` if the port cannot be bound (taken, or not an address of this host).
    With ``audit``, the audit log's own process serves the workers' batches."""
    host, port = options["host"], options["port"]
    port_socket(host, port, share=False).close()  # is the port free?
    holder = port_socket(host, port, share=True)
    socket_dir = tempfile.mkdtemp(prefix="storyvault-audit-") if audit else None  # mode 0700
    audit_path = os.path.join(socket_dir, "log.sock") if socket_dir else None
    supervisor = _Supervisor(options, audit_path)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        supervisor.stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        if audit_path is not None:
            if not supervisor.start_audit():
                return STARTUP_FAILURE
            os.environ["STORYVAULT_AUDIT_SOCKET"] = audit_path  # inherited by the workers
        supervisor.workers = [supervisor.start_worker() for _ in range(workers)]
        log.info(
            "serve.workers_started",
            workers=workers,
            pids=[p.pid for p in supervisor.workers],
            audit_pid=supervisor.audit.pid if supervisor.audit else None,
        )
        return supervisor.watch()
    finally:
        _stop(supervisor.workers)
        if supervisor.audit is not None:
            _stop([supervisor.audit])  # after the workers: what they sent is committed
        holder.close()
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
