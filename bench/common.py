"""Shared set-up for benchmarks: a StoryVault on SQLite or on a PostgreSQL the bench starts."""

from __future__ import annotations

import json
import platform
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from governance.service import StoryVault
from governance.settings import Settings
from tests.pgserver import PgServer, start_server, stop_server

RESULTS = Path(__file__).with_name("results")


def base_settings(data_dir: Path, url: str, **overrides: Any) -> Settings:
    return replace(
        Settings(data_dir=data_dir, database_url=url, demo_data=False, admin_key=None),
        **overrides,
    )


@asynccontextmanager
async def vault_on(
    backend: str, **overrides: Any
) -> AsyncIterator[tuple[StoryVault, PgServer | None]]:
    tmp = Path(tempfile.mkdtemp(prefix=f"sv-bench-{backend}-"))
    server = None
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    else:
        server = start_server()
        url = server.create_database("bench")
    vault = StoryVault(base_settings(tmp, url, **overrides))
    await vault.start()
    try:
        yield vault, server
    finally:
        await vault.stop()
        if server is not None:
            stop_server(server)


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=str))
    return path
