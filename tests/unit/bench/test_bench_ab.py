"""bench.ab: the mean audit batch it reports comes from the server's histogram, and
it refuses a path that is not a source tree before it seeds anything."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bench.ab import batch_counters, main
from bench.run import Server


@contextmanager
def _metrics(page: str) -> Iterator[Server]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
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
        yield Server("storyvault", 1, httpd.server_address[1], None, Path("/dev/null"))  # type: ignore[arg-type]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_batch_counters_read_the_histogram_count_and_sum() -> None:
    page = (
        "# TYPE storyvault_audit_batch_size histogram\n"
        'storyvault_audit_batch_size_bucket{le="32.0"} 12.0\n'
        "storyvault_audit_batch_size_count 12.0\n"
        "storyvault_audit_batch_size_sum 378.0\n"
        "storyvault_audit_batch_seconds_count 12.0\n"
    )
    with _metrics(page) as server:
        assert batch_counters(server) == (12.0, 378.0)
    with _metrics("# nothing committed yet\n") as server:
        assert batch_counters(server) == (0.0, 0.0)


def test_a_path_that_is_not_a_source_tree_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--trees", f"{tmp_path},{tmp_path / 'missing'}"])
    assert exited.value.code == 2
