"""Tables of the governance core.

In plaintext only ids, categories, kinds, timestamps, key ids and the blind
index; every personal value lives in a ``sealed`` column (see governance.keys).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    LargeBinary,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.sql.base import ReadOnlyColumnCollection
from sqlmodel import Field, SQLModel

__all__ = [
    "API_KEYS",
    "CATEGORY_STATES",
    "CHAPTERS",
    "CUSTOMERS",
    "CUSTOMER_SESSIONS",
    "DATA_KEYS",
    "EMAIL_INDEX",
    "LOGIN_CODES",
    "PROFILE_VALUES",
    "RIGHTS_REQUESTS",
    "TEAMS",
    "ApiKeyRow",
    "AppMetaRow",
    "CategoryStateRow",
    "ChapterRow",
    "CustomerRow",
    "CustomerSessionRow",
    "DataKeyRow",
    "EmailIndexRow",
    "LoginCodeRow",
    "ProfileValueRow",
    "RightsRequestRow",
    "TeamRow",
    "columns",
]


def _ts(*, nullable: bool = False, index: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


class CustomerRow(SQLModel, table=True):
    __tablename__ = "customers"
    # The audience query walks customers in pseudonym order and reads their id and
    # status: from this index alone (migration 0004).
    __table_args__ = (Index("ix_customers_audience", "subject", "status", "id"),)

    id: str = Field(primary_key=True, max_length=36)
    # The keyed pseudonym used in the ledger and the audit log (see KeyRing.pseudonym).
    subject: str = Field(max_length=64, unique=True)
    external_ref: str | None = Field(default=None, max_length=200, index=True)
    status: str = Field(default="active", max_length=16)
    # True once any category was erased or put under hold: only then does a read
    # consult category_states (keeps the common read one query shorter).
    restricted: bool = Field(default=False)
    # Bumped by database triggers on every change to the customer's profile values
    # or chapters (migration 0003): the gated read's story cache is valid while it is.
    story_version: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    erased_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class DataKeyRow(SQLModel, table=True):
    """A customer's data key for one category scope, wrapped by a KEK version.

    Destroying a key (erasure, retention) clears ``wrapped`` and sets
    ``destroyed_at``: every value sealed under it is unreadable from then on,
    in this database and in every copy of it.
    """

    __tablename__ = "data_keys"
    __table_args__ = (Index("ix_data_keys_customer_scope", "customer_id", "scope"),)

    id: str = Field(primary_key=True, max_length=36)
    customer_id: str = Field(max_length=36)
    scope: str = Field(max_length=120)
    kek_version: int
    wrapped: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    created_at: datetime = Field(sa_column=_ts())
    destroyed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class ProfileValueRow(SQLModel, table=True):
    __tablename__ = "profile_values"

    customer_id: str = Field(primary_key=True, max_length=36)
    field: str = Field(primary_key=True, max_length=40)
    category: str = Field(max_length=120)
    dek_id: str = Field(max_length=36)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    updated_at: datetime = Field(sa_column=_ts())


class ChapterRow(SQLModel, table=True):
    __tablename__ = "chapters"
    __table_args__ = (Index("ix_chapters_customer_time", "customer_id", "occurred_at"),)

    id: str = Field(primary_key=True, max_length=36)
    customer_id: str = Field(max_length=36)
    category: str = Field(max_length=120)
    kind: str = Field(max_length=40)
    occurred_at: datetime = Field(sa_column=_ts())
    author_team: str = Field(max_length=64)
    dek_id: str = Field(max_length=36)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(sa_column=_ts())


class EmailIndexRow(SQLModel, table=True):
    """Keyed blind index of a customer's e-mail: lookups without plaintext."""

    __tablename__ = "email_index"

    blind_index: str = Field(primary_key=True, max_length=64)
    customer_id: str = Field(primary_key=True, max_length=36, index=True)


class TeamRow(SQLModel, table=True):
    __tablename__ = "teams"

    name: str = Field(primary_key=True, max_length=64)
    roles: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=500)
    created_at: datetime = Field(sa_column=_ts())


class ApiKeyRow(SQLModel, table=True):
    """A team API key: only a keyed digest of the secret is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("digest"),)

    id: str = Field(primary_key=True, max_length=40)
    team: str = Field(max_length=64, index=True)
    digest: str = Field(max_length=64)
    label: str = Field(default="", max_length=200)
    created_at: datetime = Field(sa_column=_ts())
    revoked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class AppMetaRow(SQLModel, table=True):
    __tablename__ = "app_meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=2000)


def columns(model: type[SQLModel]) -> ReadOnlyColumnCollection[str, Column[Any]]:
    """The typed Core columns of a table model, for queries on the hot path."""
    table = model.__table__  # type: ignore[attr-defined]  # set by SQLModel for table=True
    assert isinstance(table, Table)
    cols: ReadOnlyColumnCollection[str, Column[Any]] = table.c
    return cols


CUSTOMERS = columns(CustomerRow)
DATA_KEYS = columns(DataKeyRow)
PROFILE_VALUES = columns(ProfileValueRow)
CHAPTERS = columns(ChapterRow)
EMAIL_INDEX = columns(EmailIndexRow)
TEAMS = columns(TeamRow)
API_KEYS = columns(ApiKeyRow)


class LoginCodeRow(SQLModel, table=True):
    """A one-time sign-in code: stored as a keyed digest, bound to the address's blind index.

    Rows exist for unknown addresses too (with no customer and no mail sent), so
    attempts, lockout and rate limits behave the same and reveal nothing.
    """

    __tablename__ = "login_codes"
    __table_args__ = (Index("ix_login_codes_index_time", "blind_index", "created_at"),)

    id: str = Field(primary_key=True, max_length=36)
    blind_index: str = Field(max_length=64)
    client_digest: str = Field(max_length=64, index=True)
    customer_id: str | None = Field(default=None, max_length=36)
    code_digest: str = Field(max_length=64)
    attempts: int = 0
    created_at: datetime = Field(sa_column=_ts())
    expires_at: datetime = Field(sa_column=_ts())
    used_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class CustomerSessionRow(SQLModel, table=True):
    """A customer session: an opaque token stored as a keyed digest."""

    __tablename__ = "customer_sessions"

    id: str = Field(primary_key=True, max_length=36)
    digest: str = Field(max_length=64, unique=True)
    customer_id: str = Field(max_length=36, index=True)
    created_at: datetime = Field(sa_column=_ts())
    expires_at: datetime = Field(sa_column=_ts())
    revoked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


LOGIN_CODES = columns(LoginCodeRow)
CUSTOMER_SESSIONS = columns(CustomerSessionRow)


class CategoryStateRow(SQLModel, table=True):
    """A category of one customer's story that was erased, or is kept under legal hold."""

    __tablename__ = "category_states"

    customer_id: str = Field(primary_key=True, max_length=36)
    category: str = Field(primary_key=True, max_length=120)
    state: str = Field(max_length=16)  # erased | held
    hold_purpose: str | None = Field(default=None, max_length=120)
    hold_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    since: datetime = Field(sa_column=_ts())


class RightsRequestRow(SQLModel, table=True):
    """The register of data-subject requests (GDPR Art. 12(3) deadlines)."""

    __tablename__ = "rights_requests"
    __table_args__ = (Index("ix_rights_requests_customer", "customer_id", "received_at"),)

    id: str = Field(primary_key=True, max_length=36)
    customer_id: str = Field(max_length=36)
    subject: str = Field(max_length=64)
    type: str = Field(max_length=20)
    status: str = Field(max_length=16)
    channel: str = Field(max_length=20)
    received_at: datetime = Field(sa_column=_ts(index=True))
    due_at: datetime = Field(sa_column=_ts())
    completed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    extended_reason: str | None = Field(default=None, max_length=500)
    refused_reason: str | None = Field(default=None, max_length=500)
    scope: str = Field(default="", max_length=2000)
    catalog_digest: str = Field(max_length=64)
    policy_version: int
    certificate: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    audit_index: int | None = None


CATEGORY_STATES = columns(CategoryStateRow)
RIGHTS_REQUESTS = columns(RightsRequestRow)


class ErasureJournalRow(SQLModel, table=True):
    """One erasure, recorded in the *key store* (never restored with the story database):
    after a restore, every erasure the backup predates is applied again
    (governance.backups, Rights.reapply_erasures). Ids and categories only."""

    __tablename__ = "erasure_journal"

    id: str = Field(primary_key=True, max_length=36)  # the rights request id
    customer_id: str = Field(max_length=36, index=True)
    categories: str = Field(max_length=4000)  # JSON list of the erased categories
    held: str = Field(default="[]", max_length=4000)  # JSON list of {category, legal_ground, until}
    full: bool = Field(default=False)
    channel: str = Field(max_length=20)
    request_id: str | None = Field(default=None, max_length=64)  # the HTTP request id
    erased_at: datetime = Field(sa_column=_ts(index=True))


ERASURE_JOURNAL = columns(ErasureJournalRow)
__all__ += ["ERASURE_JOURNAL", "ErasureJournalRow"]
