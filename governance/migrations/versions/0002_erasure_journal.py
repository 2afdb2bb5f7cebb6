"""erasure journal (kept in the key store; survives restores of the story database)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasure_journal",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("customer_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("categories", sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=False),
        sa.Column("held", sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=False),
        sa.Column("full", sa.Boolean(), nullable=False),
        sa.Column("channel", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("erasure_journal", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_erasure_journal_customer_id"), ["customer_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_erasure_journal_erased_at"), ["erased_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("erasure_journal", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_erasure_journal_erased_at"))
        batch_op.drop_index(batch_op.f("ix_erasure_journal_customer_id"))
    op.drop_table("erasure_journal")
