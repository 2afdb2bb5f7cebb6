"""Backups and restores that never resurrect erased data.

``backup`` copies the story database (SQLite: the online backup API, a
consistent snapshot while the service runs; PostgreSQL: ``pg_dump`` in custom
format) into a directory with a ``manifest.json`` (what, when, SHA-256), and,
only when asked, the *key store* into another directory: the key store is what
makes erasure reach old backups (its keys are destroyed on erasure), so its
backups are kept apart and for a short time only (see docs/operations.md).

``restore`` puts a backup back and then re-applies every erasure of the
*erasure journal* recorded since the backup was taken. The journal is a table
of the key store that a restore of the story database does not touch; when the
key store itself is restored (or lives in the story database, as with a single
PostgreSQL database), the live journal is read before and merged back after,
so no restore can undo an erasure. Run restores with the instances stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from governance.db import Database
from governance.errors import GovernanceError
from governance.models import ErasureJournalRow
from governance.settings import Settings

__all__ = [
    "FORMAT",
    "REAPPLY_MARGIN",
    "BackupError",
    "BackupManifest",
    "RestoreOutcome",
    "backup",
    "read_manifest",
    "restore",
]

FORMAT = "storyvault-backup/1"
MANIFEST = "manifest.json"
# Erasures journalled this long before a backup started are re-applied too: an
# erasure in flight while the snapshot was taken may be half in it. Re-applying
# an erasure the database already shows changes nothing.
REAPPLY_MARGIN = timedelta(minutes=5)
PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"), Path("/usr/bin")]


class BackupError(GovernanceError):
    """A backup or restore that cannot go ahead (the message says why)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="backup_failed")


@dataclass(frozen=True, slots=True)
class BackupManifest:
    format: str
    kind: str  # "story" | "keystore"
    backend: str  # "sqlite" | "postgresql"
    file: str
    started_at: str
    completed_at: str
    sha256: str
    size: int

    @property
    def started(self) -> datetime:
        return datetime.fromisoformat(self.started_at)


@dataclass(frozen=True, slots=True)
class RestoreOutcome:
    story: BackupManifest
    keystore: BackupManifest | None
    since: datetime
    journal_kept: int
    counts: dict[str, int]


# --------------------------------------------------------------------------- helpers
def _backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _sqlite_path(url: str) -> Path:
    if ":///" not in url:
        raise BackupError("only a file SQLite database can be backed up")
    path = url.split(":///", 1)[1].split("?", 1)[0]
    if not path or path == ":memory:":
        raise BackupError("only a file SQLite database can be backed up")
    return Path(path)


def _pg_bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found (install postgresql-client-15)")
    return found


def _pg_args(url: str) -> tuple[list[str], dict[str, str]]:
    """libpq connection arguments for a SQLAlchemy URL; the password goes in the
    environment (PGPASSWORD), never on a command line."""
    u = make_url(url)
    args = ["-h", u.host or "127.0.0.1", "-p", str(u.port or 5432)]
    if u.username:
        args += ["-U", u.username]
    args += ["-d", u.database or "postgres"]
    env = {**os.environ}
    if u.password:
        env["PGPASSWORD"] = str(u.password)
    return args, env


def _run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True)  # noqa: S603, PLW1510  (fixed argv)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BackupError(f"{Path(argv[0]).name} failed: {' / '.join(tail)[:500]}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- backup
def _backup_one(url: str, directory: Path, kind: str) -> BackupManifest:
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory} exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    backend = _backend(url)
    started = _now()
    if backend == "sqlite":
        source = _sqlite_path(url)
        if not source.exists():
            raise BackupError(f"no database at {source}")
        name = "storyvault.db" if kind == "story" else "keystore.db"
        target = directory / name
        src = sqlite3.connect(source, timeout=30)  # read-only use; rw so WAL files can open
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # one step: a consistent snapshot, writers wait briefly
            check = dst.execute("PRAGMA integrity_check").fetchone()
            if check is None or check[0] != "ok":
                raise BackupError("the backup copy failed its integrity check")
        finally:
            dst.close()
            src.close()
    else:
        name = "storyvault.pgdump" if kind == "story" else "keystore.pgdump"
        target = directory / name
        args, env = _pg_args(url)
        _run([_pg_bin("pg_dump"), "--format=custom", f"--file={target}", *args], env)
    target.chmod(0o600)
    manifest = BackupManifest(
        format=FORMAT,
        kind=kind,
        backend=backend,
        file=name,
        started_at=started.isoformat(),
        completed_at=_now().isoformat(),
        sha256=_sha256(target),
        size=target.stat().st_size,
    )
    path = directory / MANIFEST
    path.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    path.chmod(0o600)
    return manifest


def backup(
    settings: Settings, output: Path, *, keystore_output: Path | None = None
) -> list[BackupManifest]:
    """Back up the story database into ``output`` (a new directory) and, if asked, the
    key store into ``keystore_output`` (a different one: other retention and access)."""
    keystore_url = settings.effective_keystore_url
    if keystore_output is not None:
        if keystore_url == settings.database_url:
            raise BackupError(
                "the key store is the story database here (no STORYVAULT_KEYSTORE_URL): "
                "it is in the story backup already"
            )
        if keystore_output.resolve() == output.resolve():
            raise BackupError("keep the key store backup apart from the story backup")
    done = [_backup_one(settings.database_url, output, "story")]
    if keystore_output is not None:
        done.append(_backup_one(keystore_url, keystore_output, "keystore"))
    return done


# --------------------------------------------------------------------------- restore
def read_manifest(directory: Path, kind: str | None = None) -> BackupManifest:
    """The manifest of a backup directory, with its file's checksum verified."""
    try:
        raw = json.loads((directory / MANIFEST).read_text())
        manifest = BackupManifest(**raw)
    except (OSError, ValueError, TypeError) as exc:
        what = type(exc).__name__
        raise BackupError(f"{directory} is not a Story Vault backup ({what})") from None
    if manifest.format != FORMAT:
        raise BackupError(f"unknown backup format {manifest.format!r}")
    if kind is not None and manifest.kind != kind:
        raise BackupError(f"{directory} is a {manifest.kind} backup, not a {kind} backup")
    if _sha256(directory / manifest.file) != manifest.sha256:
        raise BackupError(f"{directory / manifest.file} does not match its manifest checksum")
    return manifest


def _restore_one(url: str, directory: Path, manifest: BackupManifest) -> None:
    if manifest.backend != _backend(url):
        raise BackupError(f"a {manifest.backend} backup cannot be restored into {_backend(url)}")
    source = directory / manifest.file
    if manifest.backend == "sqlite":
        target = _sqlite_path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        dst = sqlite3.connect(target, timeout=30)
        try:
            src.backup(dst)  # page by page into the live file (WAL included), atomically
        finally:
            dst.close()
            src.close()
        return
    args, env = _pg_args(url)
    _run(
        [
            _pg_bin("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            "--exit-on-error",
            *args,
            str(source),
        ],
        env,
    )
    # pg_restore brings no planner statistics: until autovacuum analyzes the restored
    # tables, statements are planned for tables of unknown size (and prepared ones keep
    # that plan). ANALYZE now, as PostgreSQL's documentation advises after a restore.
    _run([_pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "ANALYZE", *args], env)


async def _journal(url: str, settings: Settings) -> list[dict[str, Any]]:
    """Every row of the live erasure journal (migrating the key store if needed)."""
    store = Database(url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        await store.upgrade()
        async with store.session() as session:
            rows = (await session.execute(select(ErasureJournalRow))).scalars()
            return [row.model_dump() for row in rows]
    finally:
        await store.dispose()


async def _merge_journal(store: Database, rows: list[dict[str, Any]]) -> int:
    """Put back journal rows a restore took away; returns how many."""
    async with store.write_session() as session:
        present = set((await session.execute(select(ErasureJournalRow.id))).scalars())  # type: ignore[call-overload]
        missing = [row for row in rows if row["id"] not in present]
        for row in missing:
            session.add(ErasureJournalRow(**row))
        await session.commit()
    return len(missing)


async def restore(
    settings: Settings, source: Path, *, keystore_source: Path | None = None
) -> RestoreOutcome:
    """Restore a story backup (and optionally a key-store backup), then re-apply every
    erasure journalled since the older of the two was taken (less REAPPLY_MARGIN)."""
    from governance.service import StoryVault

    story = read_manifest(source, "story")
    keystore = read_manifest(keystore_source, "keystore") if keystore_source else None
    keystore_url = settings.effective_keystore_url
    if keystore is not None and keystore_url == settings.database_url:
        raise BackupError("the key store is the story database here: restore the story backup")
    # 1. the live journal, before anything is overwritten
    journal = await _journal(keystore_url, settings)
    # 2. the databases
    _restore_one(settings.database_url, source, story)
    if keystore_source is not None and keystore is not None:
        _restore_one(keystore_url, keystore_source, keystore)
    taken = min(m.started for m in (story, keystore) if m is not None)
    since = taken - REAPPLY_MARGIN
    # 3. the journal back (where the restore reached it), then the erasures again
    vault = StoryVault(replace(settings, demo_data=False, retention_interval=0))
    try:
        await vault.start(migrate=True)
        kept = await _merge_journal(vault.keystore, journal)
        counts = await vault.rights.reapply_erasures(since)
    finally:
        await vault.stop()
    return RestoreOutcome(
        story=story, keystore=keystore, since=since, journal_kept=kept, counts=counts
    )
