"""Database tables of the policy store (all prefixed ``policy_``).

Rules are data: one row per rule with a stable id.  ``policy_version`` holds a
single row (id 1) whose counter is bumped in the same transaction as every
change to ``policy_rule`` or ``policy_role``; engines compare it to decide when
to reload, so a change without a bump would never reach other instances.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel


class PolicyRuleRow(SQLModel, table=True):
    __tablename__ = "policy_rule"
    # Identical rules would be indistinguishable to casbin (it keeps one line),
    # so the six fields together are unique.
    __table_args__ = (
        UniqueConstraint(
            "team", "category", "action", "purpose", "effect", "mask", name="uq_policy_rule_line"
        ),
    )

    id: str = Field(primary_key=True, max_length=36)
    team: str = Field(max_length=128)
    category: str = Field(max_length=128)
    action: str = Field(max_length=16)
    purpose: str = Field(max_length=128)
    effect: str = Field(max_length=16)
    mask: str = Field(max_length=16)  # "none" when the rule has no mask
    created_at: datetime


class PolicyRoleRow(SQLModel, table=True):
    """g(team, role): ``team`` inherits ``role``'s rules, or carries an abstract role."""

    __tablename__ = "policy_role"

    team: str = Field(primary_key=True, max_length=128)
    role: str = Field(primary_key=True, max_length=128)


class PolicyVersionRow(SQLModel, table=True):
    __tablename__ = "policy_version"

    id: int = Field(default=1, primary_key=True)
    version: int = 0
    changed_at: datetime | None = None


POLICY_TABLES = (
    PolicyRuleRow.__table__,  # type: ignore[attr-defined]
    PolicyRoleRow.__table__,  # type: ignore[attr-defined]
    PolicyVersionRow.__table__,  # type: ignore[attr-defined]
)
