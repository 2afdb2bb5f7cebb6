"""Typed settings read from the environment (see API.md's configuration table).

A wrong value stops the start with one line naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from governance.errors import SettingsError

__all__ = ["Settings", "load_settings"]

_PREFIX = "STORYVAULT_"


def _env(name: str) -> str | None:
    value = os.environ.get(_PREFIX + name)
    return value if value not in (None, "") else None


def _int(name: str, default: int, *, low: int, high: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{_PREFIX}{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{_PREFIX}{name} must be between {low} and {high}, got {value}")
    return value


def _float(name: str, default: float, *, low: float, high: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{_PREFIX}{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{_PREFIX}{name} must be between {low} and {high}, got {value}")
    return value


def _auto_bool(name: str) -> bool | None:
    """true, false, or None for ``auto`` (the default)."""
    raw = _env(name)
    if raw is None or raw.lower() == "auto":
        return None
    try:
        return _bool(name, default=False)
    except SettingsError:
        raise SettingsError(f"{_PREFIX}{name} must be auto, true or false, got {raw!r}") from None


def _bool(name: str, *, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{_PREFIX}{name} must be true or false, got {raw!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment, validated once at start."""

    data_dir: Path
    """Where the embedded database, the key ring and the mail outbox live."""
    database_url: str
    """SQLAlchemy async URL: ``sqlite+aiosqlite:///…`` or ``postgresql+asyncpg://…``."""
    keystore_url: str = ""
    """Database of the data keys, kept apart from the story so erasure reaches backups
    (default: a sibling SQLite file; with PostgreSQL, the same database unless set)."""
    host: str = "127.0.0.1"
    """Listen address."""
    port: int = 8000
    """Listen port."""
    admin_key: str | None = None
    """If set, an admin (compliance) API key with exactly this value exists."""
    mail_url: str = ""
    """``file://DIR`` writes each mail as an ``.eml`` file; ``smtp://host:port`` sends it."""
    catalog_path: Path | None = None
    """An operator's catalog file replacing the shipped default catalog."""
    keyring_json: str | None = field(default=None, repr=False)
    """The key ring supplied by the environment (production); otherwise a file in data_dir."""
    max_body_bytes: int = 1024 * 1024
    """Largest accepted request body; larger ones get 413."""
    dek_cache_size: int = 10_000
    """How many unwrapped data keys stay in memory at most."""
    dek_cache_ttl: float = 300.0
    """Seconds an unwrapped data key may stay in memory."""
    audit_batch_ms: float = 2.0
    """How long the audit writer gathers entries before one group commit (by default
    ``audit_window_ms``)."""
    sqlite_synchronous: str = "FULL"
    """SQLite ``synchronous`` pragma: FULL survives power loss, NORMAL only process crashes."""
    secure_cookies: bool = True
    """Mark portal cookies Secure; turned off automatically on loopback development."""
    bench_routes: bool = False
    """Expose the benchmark-only bare read route (never in production)."""
    demo_data: bool = True
    """Load demo teams, keys and customers when the database is new (``make run``)."""
    workers: int = 1
    """Server worker processes."""
    audit_process: bool | None = None
    """``storyvault serve`` runs the audit group commit in a process of its own, which
    appends the batches of every worker (``governance.auditproc``); None (``auto``):
    when the workers leave a CPU of this machine free for it (``uses_audit_process``)."""
    audit_socket: str | None = None
    """The Unix socket of that process; ``storyvault serve`` sets it for its workers."""
    login_code_ttl: int = 600
    """Seconds a customer one-time code stays valid."""
    session_ttl: int = 3600
    """Seconds a customer session lasts."""
    rate_limit_per_minute: int = 6000
    """Requests per minute per API key or client address before 429."""
    db_pool_size: int = 32
    """Open connections kept per PostgreSQL database and process."""
    story_cache_rows: int = 250_000
    """Story values (profile fields and chapters) the gated read keeps per process, per
    customer and categories read, each story sealed under a key of the process and
    valid while it is unchanged (``governance.vault.StoryCache``): ~290 bytes a
    value; 0: none. Off when the data-key cache is off."""
    insights_k: int = 10
    """Smallest group an aggregate insight may show."""
    retention_interval: float = 3600.0
    """Seconds between background retention sweeps (0 turns the background sweep off)."""

    def uses_audit_process(self, workers: int) -> bool:
        """Whether ``storyvault serve`` with ``workers`` runs the audit process: as set,
        else on SQLite when this process may run on more CPUs than there are
        workers. With none left over it takes its CPU from theirs (measured with 2
        workers on 2 CPUs: docs/benchmarks-history.md, the twentieth round); on
        PostgreSQL the database server's own processes do much of a commit's work,
        and the gated read measured slower with it (docs/benchmarks-history.md, the
        ninth round; again with 2 workers in the twenty-second round:
        docs/benchmarks.md, then benchmarks-history.md).
        Never for an in-memory database, which no other process can reach."""
        if ":memory:" in self.database_url:
            return False
        if self.audit_process is not None:
            return self.audit_process
        return self.is_sqlite and workers < len(os.sched_getaffinity(0))

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def effective_keystore_url(self) -> str:
        if self.keystore_url:
            return self.keystore_url
        if self.is_sqlite and ":///" in self.database_url:
            path = Path(self.database_url.split(":///", 1)[1])
            return f"sqlite+aiosqlite:///{path.with_name(path.stem + '-keys' + path.suffix)}"
        return self.database_url


def audit_window_ms(scheme: str, workers: int) -> float:
    """The audit group commit's default window (``STORYVAULT_AUDIT_BATCH_MS``).

    0.5 ms on PostgreSQL with one worker, else 2 ms. On PostgreSQL the window counts
    from the first waiting entry's arrival, and the reads whose lookups came back in
    one statement reach it a few tenths of a millisecond apart: with 2 ms the last
    reads of such a wave waited out the window with nothing else to run. Measured
    (docs/benchmarks-history.md, the twentieth round): with 1 worker, 0.5 ms kept the
    machine busier and was ahead in every pair; with 2 workers, which take turns on
    the log, the more and smaller batches cost more than the waits they spare (1 ms
    against 2 measured level in the twenty-second round: docs/benchmarks.md, then
    benchmarks-history.md). On
    SQLite a batch closes as soon as every read that can join it has
    (``audit.AuditWriter``'s early close): there the window only bounds a batch's
    wait at low load."""
    return 0.5 if scheme == "postgresql+asyncpg" and workers == 1 else 2.0


def load_settings() -> Settings:
    """Read and validate the environment; raise SettingsError naming the variable."""
    data_dir = Path(_env("DATA_DIR") or "./var").resolve()
    database_url = _env("DATABASE_URL") or f"sqlite+aiosqlite:///{data_dir / 'storyvault.db'}"
    scheme = database_url.split("://", 1)[0]
    if scheme not in {"sqlite+aiosqlite", "postgresql+asyncpg"}:
        raise SettingsError(
            f"{_PREFIX}DATABASE_URL must start with sqlite+aiosqlite:// or "
            f"postgresql+asyncpg://, got scheme {scheme!r}"
        )
    keystore_url = _env("KEYSTORE_URL") or ""
    if keystore_url and keystore_url.split("://", 1)[0] not in {
        "sqlite+aiosqlite",
        "postgresql+asyncpg",
    }:
        raise SettingsError(
            f"{_PREFIX}KEYSTORE_URL must be a sqlite+aiosqlite or postgresql+asyncpg URL"
        )
    mail_url = _env("MAIL_URL") or f"file://{data_dir / 'outbox'}"
    parsed = urlparse(mail_url)
    if parsed.scheme not in {"file", "smtp"} or (parsed.scheme == "smtp" and not parsed.hostname):
        raise SettingsError(f"{_PREFIX}MAIL_URL must be file://DIR or smtp://host:port")
    catalog = _env("CATALOG")
    catalog_path = Path(catalog) if catalog else None
    if catalog_path is not None and not catalog_path.is_file():
        raise SettingsError(f"{_PREFIX}CATALOG names no readable file: {catalog}")
    host = _env("HOST") or "127.0.0.1"
    sync = (_env("SQLITE_SYNCHRONOUS") or "FULL").upper()
    if sync not in {"FULL", "NORMAL", "EXTRA"}:
        raise SettingsError(f"{_PREFIX}SQLITE_SYNCHRONOUS must be FULL, NORMAL or EXTRA")
    admin_key = _env("ADMIN_KEY")
    if admin_key is not None and len(admin_key) < 16:
        raise SettingsError(f"{_PREFIX}ADMIN_KEY must be at least 16 characters")
    loopback = host in {"127.0.0.1", "localhost", "::1"}
    workers = _int("WORKERS", 1, low=1, high=64)
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        keystore_url=keystore_url,
        host=host,
        port=_int("PORT", 8000, low=1, high=65535),
        admin_key=admin_key,
        mail_url=mail_url,
        catalog_path=catalog_path,
        keyring_json=_env("KEYRING"),
        max_body_bytes=_int("MAX_BODY_BYTES", 1024 * 1024, low=1024, high=64 * 1024 * 1024),
        dek_cache_size=_int("DEK_CACHE_SIZE", 10_000, low=0, high=10_000_000),
        dek_cache_ttl=_float("DEK_CACHE_TTL", 300.0, low=0.0, high=86_400.0),
        audit_batch_ms=_float(
            "AUDIT_BATCH_MS", audit_window_ms(scheme, workers), low=0.0, high=1000.0
        ),
        sqlite_synchronous=sync,
        secure_cookies=_bool("SECURE_COOKIES", default=not loopback),
        bench_routes=_bool("BENCH_ROUTES", default=False),
        demo_data=_bool("DEMO_DATA", default=True),
        workers=workers,
        audit_process=_auto_bool("AUDIT_PROCESS"),
        audit_socket=_env("AUDIT_SOCKET") or None,
        login_code_ttl=_int("LOGIN_CODE_TTL", 600, low=60, high=3600),
        session_ttl=_int("SESSION_TTL", 3600, low=60, high=86_400 * 30),
        rate_limit_per_minute=_int("RATE_LIMIT_PER_MINUTE", 6000, low=1, high=10_000_000),
        db_pool_size=_int("DB_POOL_SIZE", 32, low=1, high=1000),
        story_cache_rows=_int("STORY_CACHE_ROWS", 250_000, low=0, high=100_000_000),
        insights_k=_int("INSIGHTS_K", 10, low=2, high=1000),
        retention_interval=_float("RETENTION_INTERVAL", 3600.0, low=0.0, high=86_400.0 * 7),
    )
