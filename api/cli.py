"""The ``storyvault`` command: serve, database and operations tasks."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from governance.catalog import CatalogError
from governance.errors import SettingsError
from governance.keys import KeyRingError
from governance.logs import configure_logging
from governance.service import StoryVault
from governance.settings import Settings, load_settings

T = TypeVar("T")
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        click.echo(f"storyvault: configuration error: {exc}", err=True)
        sys.exit(2)


def _with_vault(settings: Settings, work: Callable[[StoryVault], Awaitable[T]]) -> T:
    async def run() -> T:
        vault = StoryVault(settings)
        try:
            return await work(vault)
        finally:
            await vault.stop()

    try:
        return asyncio.run(run())
    except (KeyRingError, CatalogError) as exc:
        click.echo(f"storyvault: {exc}", err=True)
        sys.exit(2)


@click.group()
def main() -> None:
    """Story Vault: consent and data governance for CRM customer stories."""


@main.command()
@click.option(
    "--workers", type=int, default=None, help="worker processes (default STORYVAULT_WORKERS)"
)
def serve(workers: int | None) -> None:
    """Migrate, bootstrap (demo data on a new database) and serve HTTP."""
    import uvicorn

    settings = _settings()
    configure_logging()

    async def bootstrap(vault: StoryVault) -> StoryVault:
        await vault.start()
        return vault

    vault = _with_vault(settings, bootstrap)
    url = f"http://{settings.host}:{settings.port}"
    out = Console(soft_wrap=True, width=200)
    out.print(f"[bold]Story Vault[/] on {url}  (API docs: {url}/schema, portal: {url}/portal/)")
    if vault.demo_keys:
        table = Table(title="Demo team API keys (shown once; use as 'Authorization: Bearer <key>')")
        table.add_column("team")
        table.add_column("key id")
        table.add_column("key", no_wrap=True, overflow="ignore")
        for key in vault.demo_keys:
            table.add_row(key.team, key.id, key.secret)
        out.print(table)
        out.print(
            f"Try: curl -H 'Authorization: Bearer {vault.demo_keys[2].secret}' "
            f"'{url}/v1/customers?email=ana.alvarez0@example.com&purpose=service.support'"
        )
    uvicorn.run(
        "api.asgi:app_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers or settings.workers,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
    )


@main.group()
def db() -> None:
    """Database tasks."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations."""
    settings = _settings()

    async def work(vault: StoryVault) -> None:
        await vault.db.upgrade()

    _with_vault(settings, work)
    click.echo("database is up to date")


def run_cli(args: list[str]) -> Any:  # pragma: no cover - convenience for tests
    return main.main(args=args, standalone_mode=False)
