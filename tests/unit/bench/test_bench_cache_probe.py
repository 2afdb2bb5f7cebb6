"""The benchmark's cache probe: it must tell the workers of a server apart, or say
it cannot, since the warm-up trusts it to know that every worker's caches are warm."""

from __future__ import annotations

from bench.run import cache_misses
from tests.unit.bench.metrics_pages import serving


def _metrics(story_misses: int, key_misses: int) -> str:
    return (
        "# HELP storyvault_story_cache_misses_total x\n"
        f"storyvault_story_cache_misses_total {float(story_misses)}\n"
        "storyvault_story_cache_hits_total 7.0\n"
        f"storyvault_key_cache_misses_total {float(key_misses)}\n"
        "storyvault_key_cache_hits_total 3.0\n"
    )


def test_misses_are_summed_over_every_worker() -> None:
    with serving([_metrics(10, 120), _metrics(4, 48)]) as server:
        assert cache_misses(server) == 10 + 120 + 4 + 48


def test_a_worker_never_seen_makes_the_count_unknown() -> None:
    # Two workers claimed, but both answers are identical: the probe cannot tell
    # whether the second worker answered at all, so it must not report a total.
    with serving([_metrics(0, 0), _metrics(0, 0)]) as server:
        assert cache_misses(server) is None


def test_a_server_without_cache_counters_has_no_count() -> None:
    with serving(["storyvault_requests_total 5.0\n"]) as server:
        assert cache_misses(server) is None
