"""The ``storyvault`` command: serve, database and operations tasks."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from governance.catalog import CatalogError
from governance.demo import demo_stories
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
        support = next(k for k in vault.demo_keys if k.team == "support")
        email = demo_stories(1)[0]["profile"]["email"]  # the first demo customer
        out.print(
            f"Try: curl -H 'Authorization: Bearer {support.secret}' "
            f"'{url}/v1/customers?email={email}&purpose=service.support'"
        )
    options: dict[str, Any] = {
        "app": "api.asgi:app_factory",
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
        "server_header": False,
        "lifespan": "on",
    }
    workers = workers or settings.workers
    # The workers load their settings from the environment: they see the count too
    # (the audit window's default follows it: governance.settings.audit_window_ms).
    os.environ["STORYVAULT_WORKERS"] = str(workers)
    # The audit group commit in a process of its own (governance.auditproc).
    audit = settings.uses_audit_process(workers)
    if workers > 1 or audit:
        # A socket per worker (api.workers): uvicorn's workers share one, and a
        # client's connections opened at once then land on a single worker.
        from api.workers import serve_workers

        try:
            code = serve_workers(workers, options, audit=audit)
        except OSError as exc:
            click.echo(f"storyvault: cannot listen on {url}: {exc}", err=True)
            code = 1
        sys.exit(code)
    uvicorn.run(**options)


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


@main.group("audit")
def audit_group() -> None:
    """Audit log tasks."""


@audit_group.command("verify")
@click.option("--page-size", type=click.IntRange(min=1), default=5000, show_default=True)
def audit_verify(page_size: int) -> None:
    """Recompute the audit log from its leaves, check every stored hash and tree-head
    signature; exit 0 when intact, 1 at the first divergence."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from audit import LogVerification, verify_log

    settings = _settings()

    async def work(vault: StoryVault) -> LogVerification:
        keys = dict(vault.ring.public_jwks())
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("verifying audit log", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            return await verify_log(vault.db.engine, keys, progress=advance, page_size=page_size)

    result = _with_vault(settings, work)
    if result.ok:
        click.echo(
            f"audit log intact: {result.tree_size} entries, {result.nodes_checked} subtree "
            f"hashes and {result.tree_heads_checked} signed tree heads verified"
        )
        return
    d = result.divergence
    assert d is not None
    where = f"leaf index {d.leaf_index}" if d.leaf_index is not None else f"tree size {d.tree_size}"
    click.echo(
        f"audit log NOT intact: first divergence at {where}: {d.what} ({d.detail}); "
        f"{result.entries_checked} entries verified before it"
    )
    sys.exit(1)


@main.group()
def keys() -> None:
    """Key ring tasks."""


@keys.command("rotate")
@click.option("--batch", type=int, default=500, show_default=True, help="data keys per transaction")
def keys_rotate(batch: int) -> None:
    """Add a KEK version, re-wrap every data key online, retire unused KEKs."""
    from rich.progress import BarColumn, Progress, TextColumn

    settings = _settings()

    async def work(vault: StoryVault) -> dict[str, int]:
        await vault.start(migrate=True)
        async with vault.keystore.session() as session:
            from sqlalchemy import func, select

            from governance.models import DATA_KEYS

            total = (
                await session.execute(select(func.count()).where(DATA_KEYS.destroyed_at.is_(None)))
            ).scalar_one()
        with Progress(
            TextColumn("re-wrapping data keys"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            console=console,
        ) as bar:
            task = bar.add_task("rewrap", total=total)
            return await vault.rights.rotate_keys(
                batch=batch,
                progress=lambda done: bar.update(task, completed=done),
                actor="operator",
            )

    result = _with_vault(settings, work)
    click.echo(
        f"KEK version {result['kek_version']} is current; {result['rewrapped']} data keys "
        f"re-wrapped; {result['retired']} old KEK(s) retired"
    )


@main.group()
def retention() -> None:
    """Retention tasks."""


@retention.command("sweep")
def retention_sweep() -> None:
    """Delete what outlived its retention, end expired legal holds, expire old consents."""
    settings = _settings()

    async def work(vault: StoryVault) -> dict[str, int]:
        await vault.start(migrate=True)
        return await vault.rights.sweep()

    counts = _with_vault(settings, work)
    click.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))


@main.command("report")
@click.argument("name", type=click.Choice(["ropa", "consent", "requests", "access", "integrity"]))
@click.option(
    "--format", "fmt", type=click.Choice(["json", "csv", "html"]), default="json", show_default=True
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="file to write (default: standard output)",
)
@click.option("--since", type=click.DateTime(), default=None, help="window start (UTC)")
@click.option("--until", type=click.DateTime(), default=None, help="window end (UTC, exclusive)")
@click.option(
    "--from-size",
    type=click.IntRange(min=1),
    default=None,
    help="integrity: tree size of the previous report's tree head",
)
@click.option("--from-root", default=None, help="integrity: root hash of that tree head (hex)")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="integrity: recompute the whole audit log and consent ledger",
)
def report(
    name: str,
    fmt: str,
    output: str | None,
    since: Any,
    until: Any,
    from_size: int | None,
    from_root: str | None,
    verify: bool,
) -> None:
    """Generate a compliance report; its SHA-256 is written to the audit log."""
    from governance.errors import GovernanceError
    from governance.reports import RenderedReport, Reports

    settings = _settings()

    async def work(vault: StoryVault) -> RenderedReport:
        await vault.start(migrate=True)
        return await Reports(vault).generate(
            name,
            fmt,
            actor="operator",
            since=since,
            until=until,
            from_size=from_size,
            from_root=from_root,
            verify=verify,
        )

    try:
        result = _with_vault(settings, work)
    except GovernanceError as exc:
        click.echo(f"storyvault: {exc.message}", err=True)
        sys.exit(2)
    if output is None:
        sys.stdout.buffer.write(result.body)
        sys.stdout.flush()
    else:
        with open(output, "wb") as fh:
            fh.write(result.body)
    click.echo(
        f"{name} report ({fmt}, {len(result.body)} bytes) sha256 {result.sha256}, "
        f"audit index {result.audit_index}",
        err=True,
    )


@main.command("backup")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="new directory for the story database backup and its manifest",
)
@click.option(
    "--keystore-output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="also back up the key store, into this other directory (keep it briefly: "
    "it is what lets erasure reach old backups)",
)
def backup_cmd(output: Path, keystore_output: Path | None) -> None:
    """Back up the story database (SQLite online backup or pg_dump), consistently, while
    the service runs."""
    from governance.backups import BackupError, backup

    settings = _settings()
    try:
        manifests = backup(settings, output, keystore_output=keystore_output)
    except BackupError as exc:
        click.echo(f"storyvault: {exc.message}", err=True)
        sys.exit(1)
    for m, where in zip(manifests, (output, keystore_output), strict=False):
        click.echo(
            f"{m.kind} backup ({m.backend}, {m.size} bytes, sha256 {m.sha256[:16]}...) "
            f"taken at {m.started_at} in {where}"
        )


@main.command("restore")
@click.option(
    "--input",
    "-i",
    "source",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="a directory written by `storyvault backup --output`",
)
@click.option(
    "--keystore-input",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="also restore the key store from a `--keystore-output` directory",
)
def restore_cmd(source: Path, keystore_input: Path | None) -> None:
    """Restore a backup (instances stopped), then re-apply every erasure recorded since
    it was taken: a restore never brings erased data back."""
    from governance.backups import BackupError, restore

    settings = _settings()
    configure_logging()
    try:
        outcome = asyncio.run(restore(settings, source, keystore_source=keystore_input))
    except BackupError as exc:
        click.echo(f"storyvault: {exc.message}", err=True)
        sys.exit(1)
    except (KeyRingError, CatalogError) as exc:
        click.echo(f"storyvault: {exc}", err=True)
        sys.exit(2)
    c = outcome.counts
    click.echo(
        f"restored the {outcome.story.backend} backup taken at {outcome.story.started_at}; "
        f"erasures journalled since {outcome.since.isoformat()}: {c['journalled']}, "
        f"re-applied: {c['reapplied']} ({c['keys_destroyed']} keys destroyed, "
        f"{c['values_deleted']} values deleted); journal rows kept: {outcome.journal_kept}"
    )


@main.group("erasures")
def erasures_group() -> None:
    """The erasure journal."""


@erasures_group.command("reapply")
@click.option(
    "--since",
    type=click.DateTime(),
    default=None,
    help="only erasures journalled at or after this time (UTC; default: all)",
)
def erasures_reapply(since: Any) -> None:
    """Re-apply journalled erasures (after a restore made by other means than
    `storyvault restore`, e.g. point-in-time recovery). Idempotent."""
    from datetime import UTC

    settings = _settings()

    async def work(vault: StoryVault) -> dict[str, int]:
        await vault.start(migrate=True)
        when = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
        return await vault.rights.reapply_erasures(when)

    counts = _with_vault(settings, work)
    click.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))


def run_cli(args: list[str]) -> Any:  # pragma: no cover - convenience for tests
    return main.main(args=args, standalone_mode=False)


if __name__ == "__main__":
    main()
