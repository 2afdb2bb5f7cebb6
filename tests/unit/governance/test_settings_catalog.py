"""Settings and catalog: a wrong value stops the start with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from governance.catalog import CatalogError, load_catalog
from governance.errors import SettingsError
from governance.keys import KeyRing, KeyRingError
from governance.settings import load_settings


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("STORYVAULT_PORT", "eighty", "STORYVAULT_PORT"),
        ("STORYVAULT_PORT", "70000", "STORYVAULT_PORT"),
        ("STORYVAULT_DATABASE_URL", "mysql://x/y", "STORYVAULT_DATABASE_URL"),
        ("STORYVAULT_MAIL_URL", "ftp://x", "STORYVAULT_MAIL_URL"),
        ("STORYVAULT_ADMIN_KEY", "short", "STORYVAULT_ADMIN_KEY"),
        ("STORYVAULT_CATALOG", "/nonexistent/catalog.toml", "STORYVAULT_CATALOG"),
        ("STORYVAULT_SECURE_COOKIES", "maybe", "STORYVAULT_SECURE_COOKIES"),
        ("STORYVAULT_AUDIT_PROCESS", "sometimes", "STORYVAULT_AUDIT_PROCESS"),
    ],
)
def test_wrong_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, needle: str
) -> None:
    """Each malformed variable is refused with a message naming it."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=needle):
        load_settings()


@pytest.mark.parametrize(
    ("value", "url", "workers", "cpus", "expected"),
    [
        (None, "sqlite+aiosqlite:///x.db", 1, 2, True),  # a CPU left for it
        (None, "sqlite+aiosqlite:///x.db", 2, 2, False),  # it would take theirs
        ("auto", "sqlite+aiosqlite:///x.db", 3, 8, True),
        (None, "postgresql+asyncpg://h/db", 1, 8, False),  # the database's processes commit
        ("true", "postgresql+asyncpg://h/db", 2, 2, True),
        ("true", "sqlite+aiosqlite:///x.db", 2, 2, True),
        ("false", "sqlite+aiosqlite:///x.db", 1, 2, False),
        ("true", "sqlite+aiosqlite:///:memory:", 1, 2, False),  # no other process reaches it
    ],
)
def test_the_audit_process_runs_where_a_cpu_is_left_for_it(
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
    url: str,
    workers: int,
    cpus: int,
    expected: bool,
) -> None:
    if value is not None:
        monkeypatch.setenv("STORYVAULT_AUDIT_PROCESS", value)
    monkeypatch.setenv("STORYVAULT_DATABASE_URL", url)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert load_settings().uses_audit_process(workers) is expected


@pytest.mark.parametrize(
    ("url", "workers", "value", "expected"),
    [
        ("postgresql+asyncpg://h/db", "1", None, 0.5),  # the lone writer's reads in waves
        ("postgresql+asyncpg://h/db", "2", None, 2.0),  # writers taking turns on the log
        ("sqlite+aiosqlite:///x.db", "1", None, 2.0),  # early close decides there
        ("sqlite+aiosqlite:///x.db", "2", None, 2.0),
        ("postgresql+asyncpg://h/db", "1", "3", 3.0),  # as set
        ("sqlite+aiosqlite:///x.db", "2", "0", 0.0),
    ],
)
def test_the_audit_window_defaults_to_what_was_measured_for_the_database(
    monkeypatch: pytest.MonkeyPatch, url: str, workers: str, value: str | None, expected: float
) -> None:
    monkeypatch.setenv("STORYVAULT_DATABASE_URL", url)
    monkeypatch.setenv("STORYVAULT_WORKERS", workers)
    if value is not None:
        monkeypatch.setenv("STORYVAULT_AUDIT_BATCH_MS", value)
    assert load_settings().audit_batch_ms == expected


def test_cli_stops_with_one_line(tmp_path: Path) -> None:
    """`storyvault db upgrade` with a bad variable prints one line and exits 2."""
    env = {**os.environ, "STORYVAULT_PORT": "eighty", "STORYVAULT_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parents[3],
    )
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert "STORYVAULT_PORT" in lines[0]


def test_default_catalog_has_the_contract_names() -> None:
    """The shipped catalog holds API.md's categories and purposes with fideslang keys."""
    catalog = load_catalog()
    assert catalog.category_for_kind("chat") == "engagement.interaction"
    assert catalog.categories["contact.email"].fideslang == "user.contact.email"
    assert catalog.purposes["marketing.email"].fideslang == "marketing.communications.email"
    assert catalog.purposes["sharing.partners"].sale_or_sharing
    assert catalog.categories["commerce.invoice"].legal_hold is not None
    assert {p.legal_basis for p in catalog.purposes.values()} == {
        "consent",
        "legitimate_interest",
        "contract",
        "legal_obligation",
    }


BASE = Path(__file__).parents[3] / "governance" / "default_catalog.toml"


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ('legal_basis = "contract"', 'legal_basis = "vibes"', "unknown legal basis"),
        ('name = "preference"', 'name = "identity.name"', "duplicate category"),
        ('name = "preference"', 'name = "Bad Name!"', "malformed category"),
        ('name = "personalization"', 'name = "service.support"', "duplicate purpose"),
        ('chapter_kinds = ["preference"]', 'chapter_kinds = ["ticket"]', "already belongs"),
        (
            'legal_hold = { purpose = "legal.retention", years = 10 }',
            'legal_hold = { purpose = "marketing.email", years = 10 }',
            "legal obligation",
        ),
    ],
)
def test_broken_catalog_is_refused(tmp_path: Path, old: str, new: str, needle: str) -> None:
    """An operator's catalog with a mistake is refused with a message naming the entry."""
    text = BASE.read_text()
    assert old in text
    path = tmp_path / "catalog.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(CatalogError, match=needle):
        load_catalog(path)


def test_keyring_file_is_owner_only_and_checked(tmp_path: Path) -> None:
    """A new key ring file is mode 600; a readable-by-others file is refused."""
    ring, created = KeyRing.load_or_create(tmp_path, None)
    assert created
    path = tmp_path / "keyring.json"
    assert path.stat().st_mode & 0o777 == 0o600
    again, created = KeyRing.load_or_create(tmp_path, None)
    assert not created
    assert again.blind_index("a@b.org") == ring.blind_index("a@b.org")
    path.chmod(0o644)
    with pytest.raises(KeyRingError, match="chmod 600"):
        KeyRing.load_or_create(tmp_path, None)
