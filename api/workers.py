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
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import structlog
from uvicorn.config import STARTUP_FAILURE  # a worker that failed to start: not restarted

__all__ = ["serve_workers"]

log = structlog.get_logger("storyvault.workers")

_STOP_TIMEOUT = 30.0


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


def _worker(options: dict[str, Any]) -> None:
    """One worker process (spawned): its own socket on the port, then uvicorn."""
    import uvicorn

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


def serve_workers(workers: int, options: dict[str, Any]) -> int:
    """Run ``workers`` uvicorn servers of ``options`` (``uvicorn.Config``'s keyword
    arguments, with ``host`` and ``port``) until SIGINT or SIGTERM; the exit code.
    ``OSError`` if the port cannot be bound (taken, or not an address of this host)."""
    host, port = options["host"], options["port"]
    port_socket(host, port, share=False).close()  # is the port free?
    holder = port_socket(host, port, share=True)
    spawn = multiprocessing.get_context("spawn")

    def start() -> BaseProcess:
        process = spawn.Process(target=_worker, args=(options,), name="storyvault-worker")
        process.start()
        return process

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    code = 0
    processes = [start() for _ in range(workers)]
    log.info("serve.workers_started", workers=workers, pids=[p.pid for p in processes])
    try:
        while not stop.wait(0.5):
            for i, process in enumerate(processes):
                if process.is_alive():
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("serve.worker_failed_to_start", pid=process.pid)
                    code = STARTUP_FAILURE
                    stop.set()
                    break
                log.warning("serve.worker_exited", pid=process.pid, exit_code=process.exitcode)
                processes[i] = start()
    finally:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        holder.close()
    return code
