"""The benchmark's cache probe: it must tell the workers of a server apart, or say
it cannot, since the warm-up trusts it to know that every worker's caches are warm."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.run import Server, cache_misses


def _metrics(story_misses: int, key_misses: int) -> str:
    return (
        "# HELP storyvault_story_cache_misses_total x\n"
        f"storyvault_story_cache_misses_total {float(story_misses)}\n"
        "storyvault_story_cache_hits_total 7.0\n"
        f"storyvault_key_cache_misses_total {float(key_misses)}\n"
        "storyvault_key_cache_hits_total 3.0\n"
    )


@contextmanager
def _workers(pages: list[str]) -> Iterator[Server]:
    """A /metrics endpoint answered by ``pages`` in turn, as workers behind one port."""
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


def test_misses_are_summed_over_every_worker() -> None:
    with _workers([_metrics(10, 120), _metrics(4, 48)]) as server:
        assert cache_misses(server) == 10 + 120 + 4 + 48


def test_a_worker_never_seen_makes_the_count_unknown() -> None:
    # Two workers claimed, but both answers are identical: the probe cannot tell
    # whether the second worker answered at all, so it must not report a total.
    with _workers([_metrics(0, 0), _metrics(0, 0)]) as server:
        assert cache_misses(server) is None


def test_a_server_without_cache_counters_has_no_count() -> None:
    with _workers(["storyvault_requests_total 5.0\n"]) as server:
        assert cache_misses(server) is None
