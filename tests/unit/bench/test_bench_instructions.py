"""bench.instructions: it counts instructions per request with callgrind (a real run
under valgrind, small), reads the count callgrind prints, and refuses bad arguments
before it seeds anything."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import bench.common
from bench.instructions import counted, main, per_request, ratios, tree_commit


def test_the_count_is_what_callgrind_collected() -> None:
    stderr = (
        "==4242== Callgrind, a call-graph generating cache profiler\n"
        "==4242== \n"
        "==4242== Events    : Ir\n"
        "==4242== Collected : 1035582347\n"
        "==4242== \n"
        "==4242== I   refs:      1,035,582,347\n"
    )
    assert counted(stderr) == 1_035_582_347
    assert per_request(1_035_582_347, 640) == 1_618_097
    with pytest.raises(RuntimeError, match="no count"):
        counted("==4242== Callgrind\n==4242== brk segment overflow\n")
    with pytest.raises(ValueError):
        per_request(10, 0)


def test_ratios_are_requests_per_instruction_as_make_bench_states_them() -> None:
    got = ratios({"health": 550_000, "bare": 1_490_000, "gated": 1_600_000})
    assert got == {"c_over_a": 0.344, "c_over_b": 0.931}


def test_a_result_names_the_commit_of_each_tree(tmp_path: Path) -> None:
    """A tree's commit, marked dirty when it holds uncommitted changes (a variant
    tried by hand), or None for a directory outside git."""
    assert tree_commit(tmp_path) is None

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "app.py").write_text("x = 1\n")
    git("add", "app.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "one")
    head = git("rev-parse", "--short=12", "HEAD")
    assert tree_commit(tmp_path) == head
    (tmp_path / "app.py").write_text("x = 2\n")
    assert tree_commit(tmp_path) == f"{head}-dirty"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trees", "{tmp}"], "not a source tree"),
        (["--endpoints", "health,login"], "unknown endpoints: login"),
        (["--requests", "0"], "multiple of 32"),
        (["--requests", "100"], "multiple of 32"),
        (["--repeat", "0"], "--repeat >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_seeding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([a.format(tmp=tmp_path) for a in args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_small_run_counts_each_endpoint_under_valgrind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    assert (
        main(
            ["--customers", "8", "--requests", "32", "--repeat", "1", "--endpoints", "health,gated"]
        )
        == 0
    )
    result = json.loads((tmp_path / "instructions.json").read_text())
    (build,) = result["builds"]
    figures = build["instructions_per_request"]
    # The app's work per request: far more than nothing, and the gated read (key,
    # policy, consent, story, masks, audit entry) well above the framework's floor.
    assert 100_000 < figures["health"] < figures["gated"] / 1.5
    assert build["runs"] == {"health": [figures["health"]], "gated": [figures["gated"]]}
    assert build["commit"] == tree_commit(Path(build["tree"]))
    assert "valgrind" in result["valgrind"]


def test_a_small_run_on_postgresql_counts_the_app_beside_its_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --backend postgresql the app runs against a PostgreSQL server this starts,
    each count on its own copy of the seeded database; the result says so."""
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    args = ["--customers", "8", "--requests", "32", "--repeat", "2", "--endpoints", "gated"]
    assert main([*args, "--backend", "postgresql"]) == 0
    result = json.loads((tmp_path / "instructions-postgresql.json").read_text())
    assert result["backend"] == "postgresql"
    (build,) = result["builds"]
    # The gated read's work in the app (key, policy, consent, story, masks, audit
    # batch on the driver): more than twice what the framework alone does per request.
    assert build["instructions_per_request"]["gated"] > 1_000_000
    # Each gated count ran on a fresh copy: both runs read and audited the same way.
    first, second = build["runs"]["gated"]
    assert abs(first - second) < 0.1 * first
    assert not (tmp_path / "instructions.json").exists()
