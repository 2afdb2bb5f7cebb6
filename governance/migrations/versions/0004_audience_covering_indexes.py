"""covering indexes for the audience query: its pages read indexes only

The audience of a consent purpose (``GET /v1/purposes/{purpose}/audience``) walks
the customers in pseudonym order beside the purpose's granted consent rows (a
merge join, ``consent.allowed_condition``). With the indexes of 0001 each of the
two index scans fetched every row it passed from the table, for the customer's id
and status and the consent's expiry and age: at 1,000,000 customers (half of them
granting) a page of 10,000 ids touched about 30,000 table pages at random, and
PostgreSQL spent 160-400 ms on it. With the columns the query reads in the indexes
themselves, both scans are index-only (once vacuum has marked the pages visible):
16 ms a page, and the whole audience of 500,000 ids streamed in 1.9 s instead of
8.4 s (docs/benchmarks-history.md, the twenty-first round).

- customers: (subject, status, id) beside the unique constraint on subject;
- consent_state: ix_consent_state_audience gains expires_at and since after its
  (purpose, state, subject), which keeps serving every lookup it served.

Both are plain key columns, not PostgreSQL's INCLUDE, so that SQLite's covering
indexes work the same. Building them holds a write lock on the two tables while
it runs (seconds at a million customers).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 20:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.create_index("ix_customers_audience", ["subject", "status", "id"], unique=False)
    with op.batch_alter_table("consent_state", schema=None) as batch_op:
        batch_op.drop_index("ix_consent_state_audience")
        batch_op.create_index(
            "ix_consent_state_audience",
            ["purpose", "state", "subject", "expires_at", "since"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("consent_state", schema=None) as batch_op:
        batch_op.drop_index("ix_consent_state_audience")
        batch_op.create_index(
            "ix_consent_state_audience", ["purpose", "state", "subject"], unique=False
        )
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_index("ix_customers_audience")
