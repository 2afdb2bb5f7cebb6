"""bench.ab: the mean audit batch it reports comes from the server's histogram, and
it refuses a path that is not a source tree before it seeds anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ab import batch_counters, main
from tests.unit.bench.metrics_pages import serving


def test_batch_counters_read_the_histogram_count_and_sum() -> None:
    page = (
        "# TYPE storyvault_audit_batch_size histogram\n"
        'storyvault_audit_batch_size_bucket{le="32.0"} 12.0\n'
        "storyvault_audit_batch_size_count 12.0\n"
        "storyvault_audit_batch_size_sum 378.0\n"
        "storyvault_audit_batch_seconds_count 12.0\n"
    )
    with serving([page]) as server:
        assert batch_counters(server) == (12.0, 378.0)
    with serving(["# nothing committed yet\n"]) as server:
        assert batch_counters(server) == (0.0, 0.0)


def test_a_path_that_is_not_a_source_tree_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--trees", f"{tmp_path},{tmp_path / 'missing'}"])
    assert exited.value.code == 2
