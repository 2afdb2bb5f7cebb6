"""A fake ``/metrics`` endpoint for the benchmark tools' tests."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.run import Server


@contextmanager
def serving(pages: list[str]) -> Iterator[Server]:
    """A server whose every GET answers the next of ``pages`` in turn, as the
    workers of one port answer ``/metrics`` (one page per worker)."""
    turn = itertools.cycle(pages)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = next(turn).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server("storyvault", len(pages), httpd.server_address[1], None, Path("/dev/null"))  # type: ignore[arg-type]
    finally:
        httpd.shutdown()
        httpd.server_close()
