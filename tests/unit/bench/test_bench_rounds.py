"""``make bench``'s rounds: a server's endpoints take turns round by round, and each
point is its median round, so that one slow spell of the shared machine cannot make
one endpoint's figure (and so a ratio) on its own."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.run import Point, median_round
from tests.unit.bench.points import make_point


def test_the_median_round_is_kept_with_every_round_recorded() -> None:
    rounds = [make_point("gated", 1200), make_point("gated", 1900), make_point("gated", 1750)]
    chosen = median_round(rounds, key=lambda p: p.rps)
    assert chosen.rps == 1750
    assert [r["rps"] for r in chosen.rounds] == [1200, 1900, 1750]  # in time order


def test_a_round_on_one_worker_is_not_the_median_while_even_rounds_exist() -> None:
    rounds = [
        make_point("bare", 2500, shares=[0.99, 0.01]),
        make_point("bare", 4200),
        make_point("bare", 4000),
    ]
    assert median_round(rounds, key=lambda p: p.rps).rps == 4000
    lopsided = [make_point("bare", r, shares=[1.0, 0.0]) for r in (2400, 2600, 2500)]
    assert median_round(lopsided, key=lambda p: p.rps).rps == 2500


def test_endpoints_take_turns_and_half_load_runs_at_half_the_median(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """bench_server measures every endpoint at full load once per round, in turn,
    then every one at half load of its median full-load rate, and returns each
    endpoint's median rounds."""
    calls: list[tuple[str, str, float | None]] = []
    full_rates = {
        "health": itertools.cycle([5000, 5400, 4000]),
        "gated": itertools.cycle([1700, 1200, 1800]),
    }
    tails = {"health": itertools.cycle([2.0, 9.0, 3.0]), "gated": itertools.cycle([2.5, 2.2, 8.0])}

    def measure(
        wrk: str, server: Any, backend: str, endpoint: str, script: Path, **kw: Any
    ) -> Point:
        calls.append((endpoint, kw["load"], kw["target"]))
        if kw["load"] == "full":
            return make_point(endpoint, next(full_rates[endpoint]))
        return make_point(endpoint, kw["target"], load="half", p99=4.0 * next(tails[endpoint]))

    monkeypatch.setattr(run, "measure", measure)
    monkeypatch.setattr(run, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(run, "lua_script", lambda workdir, tag, *a: workdir / tag)
    args = argparse.Namespace(rounds=3, duration=5.0, connections=32)
    server = run.Server(name="storyvault", workers=2, port=0, proc=None, log=tmp_path / "l")  # type: ignore[arg-type]
    endpoints = {"health": "/health", "gated": "/v1/customers/%s/story"}
    points = run.bench_server("wrk", server, "sqlite", endpoints, ["a"], "k", tmp_path, args)
    assert calls == [
        *[("health", "full", None), ("gated", "full", None)] * 3,
        *[("health", "half", 2500.0), ("gated", "half", 850.0)] * 3,
    ]
    summary = [(p.endpoint, p.load, p.rps, round(p.p99_ms / p.p50_ms, 2)) for p in points]
    assert summary == [
        ("health", "full", 5000, 2.5),
        ("health", "half", 2500.0, 3.0),
        ("gated", "full", 1700, 2.5),
        ("gated", "half", 850.0, 2.5),
    ]
