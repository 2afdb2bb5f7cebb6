"""Ledger tables: the append-only event log and its current-state projection.

Invariants:

* ``consent_event`` is append-only. ``ledger_index`` is a gap-free total order
  starting at 0, assigned under the sequencing lock (see ``_ledger``). Every row
  stores ``prev_hash`` (the previous row's ``hash``, 32 zero bytes for index 0)
  and ``hash = SHA-256(prev_hash_bytes || leaf_bytes)`` where ``leaf_bytes`` is
  the RFC 8785 canonical JSON of the row's content fields. Changing, deleting
  or reordering a row therefore breaks the chain (``verify_chain``).
* ``consent_state`` is a projection: for every (subject, purpose) it equals the
  fold of that pair's events in ledger order (``replay``). It is written in the
  same transaction as the event.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import rfc8785
from sqlalchemy import DateTime, Dialect, Index, Table, TypeDecorator
from sqlalchemy import event as sa_event
from sqlmodel import Field, SQLModel

GENESIS_HASH = "00" * 32
"""``prev_hash`` of ledger index 0."""

LEAF_SCHEMA = "storyvault.consent.event/1"
"""Domain tag inside every leaf so a transparency log can tell leaf kinds apart."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect.

    SQLite stores naive text; we store UTC there and re-attach UTC on load, so the
    canonical leaf bytes computed from a loaded row equal those computed before
    the insert. Naive datetimes are rejected rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; consent times must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def rfc3339(value: datetime | None) -> str | None:
    """UTC, microsecond precision, ``Z`` suffix: one spelling per instant."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ConsentEvent(SQLModel, table=True):
    """One immutable entry of the consent ledger."""

    __tablename__ = "consent_event"
    __table_args__ = (
        Index("ix_consent_event_subject_purpose", "subject", "purpose", "ledger_index"),
    )

    ledger_index: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    event_id: uuid.UUID = Field(unique=True)
    subject: str = Field(max_length=200)
    purpose: str = Field(max_length=200)
    legal_basis: str = Field(max_length=32)
    event_type: str = Field(max_length=32)
    status: str = Field(max_length=64)
    notice_id: str = Field(max_length=200)
    notice_version: str = Field(max_length=64)
    notice_hash: str = Field(max_length=64)
    channel: str = Field(max_length=16)
    actor: str = Field(max_length=200)
    evidence: str | None = Field(default=None, max_length=2000)
    recorded_at: datetime = Field(sa_type=UTCDateTime)
    """Server time of the append (taken under the sequencing lock)."""
    captured_at: datetime = Field(sa_type=UTCDateTime)
    """When the person acted; equals ``recorded_at`` except for imports."""
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    prev_event_id: uuid.UUID | None = Field(default=None)
    """Previous event of the same (subject, purpose), None for the first."""
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)

    def leaf_fields(self) -> dict[str, Any]:
        """The content the hash chain (and a transparency log leaf) commits to."""
        return {
            "schema": LEAF_SCHEMA,
            "ledger_index": self.ledger_index,
            "event_id": str(self.event_id),
            "subject": self.subject,
            "purpose": self.purpose,
            "legal_basis": self.legal_basis,
            "event_type": self.event_type,
            "status": self.status,
            "notice": {
                "id": self.notice_id,
                "version": self.notice_version,
                "sha256": self.notice_hash,
            },
            "channel": self.channel,
            "actor": self.actor,
            "evidence": self.evidence,
            "recorded_at": rfc3339(self.recorded_at),
            "captured_at": rfc3339(self.captured_at),
            "expires_at": rfc3339(self.expires_at),
            "prev_event_id": None if self.prev_event_id is None else str(self.prev_event_id),
        }

    def leaf_bytes(self) -> bytes:
        """RFC 8785 canonical JSON of :meth:`leaf_fields` (a Merkle leaf for the audit log)."""
        return leaf_bytes(self)

    def compute_hash(self) -> str:
        return chain_hash(self.prev_hash, self.leaf_bytes())


def leaf_bytes(event: ConsentEvent) -> bytes:
    """Canonical bytes of one event: RFC 8785 JSON, stable across dialects and runs."""
    data: bytes = rfc8785.dumps(event.leaf_fields())
    return data


def chain_hash(prev_hash: str, leaf: bytes) -> str:
    """``SHA-256(prev_hash || leaf)`` over the raw 32 hash bytes, hex encoded."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + leaf).hexdigest()


class ConsentState(SQLModel, table=True):
    """Current standing of one (subject, purpose): the projection of the ledger."""

    __tablename__ = "consent_state"
    __table_args__ = (
        # The audience query: one range scan per purpose, ordered by subject, that
        # reads the expiry and age it checks from the index too (migration 0004).
        Index("ix_consent_state_audience", "purpose", "state", "subject", "expires_at", "since"),
    )

    subject: str = Field(primary_key=True, max_length=200)
    purpose: str = Field(primary_key=True, max_length=200)
    state: str = Field(max_length=16)
    since: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_event_id: uuid.UUID
    last_ledger_index: int

    def snapshot(self) -> tuple[Any, ...]:
        """Comparable value of the row (used to check projection == replay)."""
        return (
            self.subject,
            self.purpose,
            str(self.state),
            self.since,
            self.expires_at,
            self.last_event_id,
            self.last_ledger_index,
        )


CONSENT_TABLES: tuple[Table, ...] = (
    SQLModel.metadata.tables["consent_event"],
    SQLModel.metadata.tables["consent_state"],
)
"""The tables this package owns, for ``metadata.create_all(tables=...)``."""


def append_only_ddl(dialect_name: str) -> list[str]:
    """Statements that make ``consent_event`` reject UPDATE/DELETE in the database.

    Defence in depth next to the hash chain: they stop accidents and ordinary
    code paths; someone with DDL rights can drop them, which ``verify_chain``
    still catches. Attached to ``create_all`` below; a migration should run the
    same statements.
    """
    if dialect_name == "sqlite":
        return [
            "CREATE TRIGGER IF NOT EXISTS consent_event_no_update BEFORE UPDATE ON consent_event "
            "BEGIN SELECT RAISE(ABORT, 'consent_event is append-only'); END",
            "CREATE TRIGGER IF NOT EXISTS consent_event_no_delete BEFORE DELETE ON consent_event "
            "BEGIN SELECT RAISE(ABORT, 'consent_event is append-only'); END",
        ]
    if dialect_name == "postgresql":
        return [
            "CREATE OR REPLACE FUNCTION consent_event_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $fn$ BEGIN "
            "RAISE EXCEPTION 'consent_event is append-only'; END $fn$",
            "CREATE OR REPLACE TRIGGER consent_event_no_change BEFORE UPDATE OR DELETE "
            "ON consent_event FOR EACH ROW EXECUTE FUNCTION consent_event_append_only()",
            "CREATE OR REPLACE TRIGGER consent_event_no_truncate BEFORE TRUNCATE "
            "ON consent_event FOR EACH STATEMENT EXECUTE FUNCTION consent_event_append_only()",
        ]
    return []


def _install_append_only(target: Any, connection: Any, **_: Any) -> None:
    for statement in append_only_ddl(connection.dialect.name):
        connection.exec_driver_sql(statement)


sa_event.listen(CONSENT_TABLES[0], "after_create", _install_append_only)
