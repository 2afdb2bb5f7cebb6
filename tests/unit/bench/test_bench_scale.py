"""``make bench-scale``: the two database sizes take turns round by round, and the
figure is the median of the rounds' ratios, so that a spell of the shared machine
falls on both sizes alike instead of on one of them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench import scale
from bench.scale import paired_ratio
from tests.unit.bench.points import make_point


def test_the_ratio_is_the_median_of_rounds_measured_back_to_back() -> None:
    # The host slows down in the third round and recovers in the fourth: both sizes
    # are slow in it, and the rounds' ratios stay near 0.9.
    small = [make_point("gated", r) for r in (2000, 2100, 1200, 1900, 2050)]
    large = [make_point("gated", r) for r in (1800, 1850, 1110, 1750, 1800)]
    median, each = paired_ratio(small, large)
    assert each == [0.9, 0.881, 0.925, 0.921, 0.878]
    assert median == 0.9
    # The sizes measured apart (first small, last large) would have said otherwise.
    assert large[2].rps / small[0].rps < 0.6


def test_an_even_count_of_rounds_takes_the_lower_middle() -> None:
    small = [make_point("gated", 1000) for _ in range(4)]
    large = [make_point("gated", r) for r in (700, 900, 800, 1000)]
    assert paired_ratio(small, large) == (0.8, [0.7, 0.9, 0.8, 1.0])


def test_rounds_without_a_partner_are_refused() -> None:
    with pytest.raises(ValueError):
        paired_ratio([make_point("gated", 1000)] * 3, [make_point("gated", 900)] * 2)
    with pytest.raises(ValueError):
        paired_ratio([], [])


def test_the_sizes_take_turns_and_neither_always_goes_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    order: list[str] = []
    warmed: list[str] = []
    servers: dict[str, Any] = {"small": "S", "large": "L"}

    def fake_measure(wrk: str, server: str, *a: Any, **kw: Any) -> Any:
        order.append(server)
        return make_point("gated", 1000)

    monkeypatch.setattr(scale, "measure", fake_measure)
    monkeypatch.setattr(scale, "warm_up", lambda wrk, server, *a: warmed.append(server))
    args = argparse.Namespace(rounds=4, duration=1.0, connections=8, warmup=1.0)
    points = scale.gated_rounds("wrk", servers, ["c1", "c2"], "key", tmp_path, args)
    assert warmed == ["S", "L"]  # both warmed before any round
    assert order == ["S", "L", "L", "S", "S", "L", "L", "S"]
    assert {k: len(v) for k, v in points.items()} == {"small": 4, "large": 4}


def test_a_run_without_rounds_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(scale, "ensure_wrk", lambda: pytest.fail("nothing may start"))
    with pytest.raises(SystemExit) as exit_:
        scale.main(["--rounds", "0"])
    assert exit_.value.code == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
