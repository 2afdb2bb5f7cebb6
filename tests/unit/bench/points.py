"""Benchmark points for the benchmark tools' tests."""

from __future__ import annotations

from bench.run import Point


def make_point(
    endpoint: str,
    rps: float,
    *,
    load: str = "full",
    p99: float = 10.0,
    shares: list[float] | None = None,
) -> Point:
    """A 2-worker SQLite point of Story Vault (p50 4 ms), its load on both workers
    unless ``shares`` says otherwise."""
    return Point(
        backend="sqlite",
        server="storyvault",
        workers=2,
        endpoint=endpoint,
        load=load,
        connections=32,
        target_rps=None,
        rps=rps,
        requests=int(rps * 5),
        errors=0,
        p50_ms=4.0,
        p90_ms=6.0,
        p99_ms=p99,
        mean_ms=5.0,
        max_ms=20.0,
        cpu_ms_per_request=0.6,
        cpu_util=1.6,
        worker_cpu_shares=[0.5, 0.5] if shares is None else shares,
    )
