"""``python -m bench.pairs``: server configurations measured in pairs on one database,
each pair's (c)/(a) against the baseline's, the order reversed every other pair."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench import pairs
from bench.pairs import parse_config, tally, turn_order
from tests.unit.bench.points import make_point

REPO = Path(__file__).resolve().parents[3]


def test_a_configuration_is_settings_of_the_service_only() -> None:
    assert parse_config("") == {}
    assert parse_config("STORYVAULT_AUDIT_BATCH_MS=1, STORYVAULT_AUDIT_PROCESS=true") == {
        "STORYVAULT_AUDIT_BATCH_MS": "1",
        "STORYVAULT_AUDIT_PROCESS": "true",
    }
    assert parse_config(f"PYTHONPATH={REPO}") == {"PYTHONPATH": str(REPO)}
    for bad in (
        "LD_PRELOAD=/tmp/x.so",  # not a setting of the service
        "STORYVAULT_AUDIT_BATCH_MS",  # no value
        "storyvault_workers=2",
        "STORYVAULT_WORKERS=1,STORYVAULT_WORKERS=2",
        "PYTHONPATH=/nonexistent-tree",
    ):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_the_order_is_reversed_every_other_pair() -> None:
    assert [turn_order(["a", "b", "c"], n) for n in range(3)] == [
        ["a", "b", "c"],
        ["c", "b", "a"],
        ["a", "b", "c"],
    ]


def test_each_pair_counts_ahead_level_or_behind_the_baseline() -> None:
    rows = [
        {"pair": 0, "config": "", "c_over_a": 0.30},
        {"pair": 0, "config": "X=1", "c_over_a": 0.32},
        {"pair": 1, "config": "X=1", "c_over_a": 0.27},
        {"pair": 1, "config": "", "c_over_a": 0.29},
        {"pair": 2, "config": "", "c_over_a": 0.31},
        {"pair": 2, "config": "X=1", "c_over_a": 0.312},
    ]
    assert tally(rows, "") == {"X=1": {"ahead": 1, "level": 1, "behind": 1}}
    with pytest.raises(ValueError):
        tally(rows[1:], "")  # pair 0 lacks the baseline


def test_each_server_gets_its_configuration_and_the_turns_alternate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[dict[str, str]] = []
    measured: list[tuple[str, str]] = []

    class FakeServer:
        def __init__(self, env: dict[str, str]) -> None:
            self.env = env

        def stop(self) -> None:
            pass

    def fake_start(name: str, cmd: list[str], env: dict[str, str], *a: Any) -> FakeServer:
        started.append(env)
        return FakeServer(env)

    def fake_measure(
        wrk: str, server: FakeServer, backend: str, endpoint: str, *a: Any, **kw: Any
    ) -> Any:
        window = server.env.get("STORYVAULT_AUDIT_BATCH_MS", "base")
        measured.append((window, endpoint))
        # /health at 9,000 req/s; the gated read 2,700 on the baseline, 2,880 with X.
        return make_point(
            endpoint, 9000 if endpoint == "health" else 2700 if window == "base" else 2880
        )

    monkeypatch.setattr(pairs, "start_server", fake_start)
    monkeypatch.setattr(pairs, "measure", fake_measure)
    monkeypatch.setattr(pairs, "warm_up", lambda *a: None)
    monkeypatch.setattr(pairs, "free_port", lambda: 1)
    args = argparse.Namespace(
        backend="sqlite",
        url="sqlite+aiosqlite:///x",
        workers=2,
        rounds=2,
        duration=1.0,
        connections=8,
        warmup=1.0,
    )
    scripts = {"health": tmp_path / "h.lua", "gated": tmp_path / "g.lua"}
    rows = []
    for pair in range(2):
        for config in turn_order(["", "STORYVAULT_AUDIT_BATCH_MS=1"], pair):
            row = pairs.one_config(
                config, "wrk", args, scripts, parse_config(config), 10, tmp_path, None
            )
            rows.append({"pair": pair, **row})
    assert [e.get("STORYVAULT_AUDIT_BATCH_MS") for e in started] == [None, "1", "1", None]
    assert all(e["STORYVAULT_WORKERS"] == "2" for e in started)
    assert measured[:4] == [("base", "health"), ("base", "gated")] * 2
    assert [r["c_over_a"] for r in rows] == [0.3, 0.32, 0.32, 0.3]
    assert tally(rows, "") == {"STORYVAULT_AUDIT_BATCH_MS=1": {"ahead": 2, "level": 0, "behind": 0}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", ""], "at least two different --config"),
        (["--config", "", "--config", ""], "at least two different --config"),
        (["--config", "", "--config", "PATH=/bin"], "not a STORYVAULT_* or PYTHONPATH setting"),
        (
            ["--config", "", "--config", "STORYVAULT_X=1", "--pairs", "0"],
            "--pairs must be at least 1",
        ),
    ],
)
def test_a_run_that_cannot_compare_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(pairs, "ensure_wrk", lambda: pytest.fail("nothing may start"))
    with pytest.raises(SystemExit) as exit_:
        pairs.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
