"""PostgreSQL's audit append in one call that answers with the newest state when refused

``storyvault_audit_append`` (``audit._pg_append``) takes the audit log's lock,
reads the newest tree head in a statement of its own, and writes the batch only if
that head is the one the writer extended; otherwise it writes nothing and returns
that head and its right edge. A writer that shares the log (several workers or
instances) so appends in one round trip, and in two when another's batch came
first, where it read the log's state in a round trip of its own before every batch
and again after every refusal. SQLite: nothing (its writers append under the
database's write lock).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 23:00:00
"""

from __future__ import annotations

from alembic import op

from audit import append_function_ddl, drop_append_function_ddl

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in append_function_ddl(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_append_function_ddl(op.get_bind().dialect.name):
        op.execute(statement)
