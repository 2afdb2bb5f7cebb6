"""customers.story_version, bumped by triggers on every change to a story's stored rows

The gated read keeps the stories it opened in a bounded per-instance cache
(``governance.vault.StoryCache``; until 2026-12-06 the sealed rows it loaded) and
uses them only while the customer's ``story_version`` is the one it read them
under. The read fetches that version
with the customer row it needs anyway, so every instance sees every change from
its next read on. Triggers, not application code, do the bump: no write path
(a bulk import, an operator's SQL, a restore's replay) can forget it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 17:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = ("profile_values", "chapters")

# PostgreSQL: statement-level triggers over the transition tables, so a bulk
# statement bumps each customer it touched once (one UPDATE per statement).
_PG_FUNCTIONS = {
    "insert": "SELECT customer_id FROM new_rows",
    "delete": "SELECT customer_id FROM old_rows",
    "update": "SELECT customer_id FROM new_rows UNION SELECT customer_id FROM old_rows",
}
_PG_REFERENCING = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
    "update": "REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows",
}

# SQLite: row-level triggers (it has no statement-level ones).
_SQLITE_BUMP = {
    "insert": "WHERE id = NEW.customer_id",
    "delete": "WHERE id = OLD.customer_id",
    "update": "WHERE id IN (OLD.customer_id, NEW.customer_id)",
}


def upgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("story_version", sa.BigInteger(), nullable=False, server_default="0")
        )
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for event, source in _PG_FUNCTIONS.items():
            op.execute(
                f"""
                CREATE FUNCTION storyvault_story_changed_{event}() RETURNS trigger
                LANGUAGE plpgsql AS $$
                BEGIN
                    UPDATE customers SET story_version = story_version + 1
                    WHERE id IN ({source});
                    RETURN NULL;
                END $$
                """
            )
        for table in _TABLES:
            for event, referencing in _PG_REFERENCING.items():
                op.execute(
                    f"CREATE TRIGGER {table}_story_changed_{event} AFTER {event.upper()} "
                    f"ON {table} {referencing} FOR EACH STATEMENT "
                    f"EXECUTE FUNCTION storyvault_story_changed_{event}()"
                )
    else:
        for table in _TABLES:
            for event, where in _SQLITE_BUMP.items():
                op.execute(
                    f"CREATE TRIGGER {table}_story_changed_{event} AFTER {event.upper()} "
                    f"ON {table} FOR EACH ROW BEGIN "
                    f"UPDATE customers SET story_version = story_version + 1 {where}; END"
                )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in _TABLES:
        for event in _SQLITE_BUMP:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_story_changed_{event}" + (
                f" ON {table}" if dialect == "postgresql" else ""
            ))
    if dialect == "postgresql":
        for event in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS storyvault_story_changed_{event}()")
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_column("story_version")
