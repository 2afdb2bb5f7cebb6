"""PolicyStore: rules and role assignments as rows, with a version counter.

Invariants:
- Every change (rule added/removed, roles set) bumps ``policy_version`` in the
  same transaction, and on PostgreSQL sends ``pg_notify(channel, version)`` in
  that transaction too, so listeners hear of a change exactly when it commits.
- The bump is the first write of a change: on PostgreSQL it takes the row lock
  that serializes concurrent policy writers, on SQLite the database write lock,
  so the checks that read existing rows (duplicates, role depth) see the latest
  committed state.
- Field validation happens before any statement runs: an invalid rule changes
  nothing, not even the version.

Methods take an optional ``session``: given one, they work inside the caller's
transaction (so a policy change and its audit entry commit together) and never
commit; on a PolicyError the caller must roll back.  Without one, each call is
its own transaction.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, delete, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from policies._errors import DuplicateRuleError, InvalidRoleError, RuleNotFoundError
from policies._model import (
    Action,
    Effect,
    Mask,
    PolicyCatalog,
    Rule,
    RuleSpec,
    check_role_depth,
    validate_role_name,
    validate_rule,
    validate_team,
)
from policies._tables import PolicyRoleRow, PolicyRuleRow, PolicyVersionRow

POLICY_CHANNEL = "storyvault_policy"

_RULE: Table = PolicyRuleRow.__table__  # type: ignore[attr-defined]
_ROLE: Table = PolicyRoleRow.__table__  # type: ignore[attr-defined]
_VERSION: Table = PolicyVersionRow.__table__  # type: ignore[attr-defined]

_VERSION_ROW_ID = 1
_MAX_ROLES_PER_TEAM = 32
_CONSISTENT_READ_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class PolicyState:
    """Rules and roles exactly as they were at ``version``."""

    version: int
    rules: tuple[Rule, ...]
    roles: tuple[tuple[str, str], ...]


def _rule_from_row(row: Any) -> Rule:
    return Rule(
        id=row.id,
        team=row.team,
        category=row.category,
        action=Action(row.action),
        purpose=row.purpose,
        effect=Effect(row.effect),
        mask=Mask(row.mask),
    )


def _version_upsert(dialect: str, now: datetime) -> Any:
    """``INSERT .. ON CONFLICT DO UPDATE .. RETURNING version``: one atomic statement."""
    values = {"id": _VERSION_ROW_ID, "version": 1, "changed_at": now}
    bump = {"version": _VERSION.c.version + 1, "changed_at": now}
    if dialect == "postgresql":
        pg = postgresql.insert(_VERSION).values(**values)
        return pg.on_conflict_do_update(index_elements=[_VERSION.c.id], set_=bump).returning(
            _VERSION.c.version
        )
    if dialect == "sqlite":
        lite = sqlite.insert(_VERSION).values(**values)
        return lite.on_conflict_do_update(index_elements=[_VERSION.c.id], set_=bump).returning(
            _VERSION.c.version
        )
    return None


class PolicyStore:
    """Async access to the ``policy_*`` tables of one database."""

    def __init__(self, engine: AsyncEngine, *, channel: str = POLICY_CHANNEL) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._channel = channel

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def channel(self) -> str:
        return self._channel

    async def create_tables(self) -> None:
        """Create the policy tables if missing (tests, embedded use; prod uses migrations)."""
        async with self._engine.begin() as conn:
            await conn.run_sync(
                lambda sync_conn: PolicyRuleRow.metadata.create_all(
                    sync_conn, tables=[_RULE, _ROLE, _VERSION]
                )
            )

    @asynccontextmanager
    async def _tx(self, session: AsyncSession | None) -> AsyncIterator[AsyncSession]:
        if session is not None:
            yield session
            return
        async with self._sessions() as own, own.begin():
            yield own

    # -- version ---------------------------------------------------------------

    async def _bump_version(self, session: AsyncSession) -> int:
        now = datetime.now(UTC)
        dialect = session.get_bind().dialect.name
        stmt = _version_upsert(dialect, now)
        if stmt is not None:
            version = int((await session.execute(stmt)).scalar_one())
        else:  # pragma: no cover - other dialects are not supported targets
            result = await session.execute(
                update(_VERSION)
                .where(_VERSION.c.id == _VERSION_ROW_ID)
                .values(version=_VERSION.c.version + 1, changed_at=now)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                await session.execute(
                    insert(_VERSION).values(id=_VERSION_ROW_ID, version=1, changed_at=now)
                )
            version = await self.current_version(session=session)
        if dialect == "postgresql":
            # Delivered to listeners when (and only if) this transaction commits.
            await session.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": self._channel, "payload": str(version)},
            )
        return version

    async def current_version(self, *, session: AsyncSession | None = None) -> int:
        """The policy version; 0 before the first change."""
        async with self._tx(session) as s:
            value = (
                await s.execute(select(_VERSION.c.version).where(_VERSION.c.id == _VERSION_ROW_ID))
            ).scalar_one_or_none()
        return 0 if value is None else int(value)

    # -- rules -----------------------------------------------------------------

    async def add_rule(
        self, spec: RuleSpec, catalog: PolicyCatalog, *, session: AsyncSession | None = None
    ) -> Rule:
        """Validate and store a rule; raises PolicyError (nothing stored) when invalid."""
        rule = validate_rule(spec, catalog, rule_id=str(uuid.uuid4()))
        async with self._tx(session) as s:
            await self._bump_version(s)
            line = rule.line()
            existing = (
                await s.execute(
                    select(_RULE.c.id).where(
                        _RULE.c.team == line[0],
                        _RULE.c.category == line[1],
                        _RULE.c.action == line[2],
                        _RULE.c.purpose == line[3],
                        _RULE.c.effect == line[4],
                        _RULE.c.mask == line[5],
                    )
                )
            ).scalar_one_or_none()
            if existing is not None:
                raise DuplicateRuleError(f"an identical rule exists: {existing}")
            try:
                await s.execute(
                    insert(_RULE).values(
                        id=rule.id,
                        team=rule.team,
                        category=rule.category,
                        action=rule.action.value,
                        purpose=rule.purpose,
                        effect=rule.effect.value,
                        mask=rule.mask.value,
                        created_at=datetime.now(UTC),
                    )
                )
            except IntegrityError as exc:  # a concurrent writer won the race
                raise DuplicateRuleError("an identical rule exists") from exc
        return rule

    async def remove_rule(self, rule_id: str, *, session: AsyncSession | None = None) -> Rule:
        """Delete a rule by id and return it; RuleNotFoundError if there is none."""
        try:
            key = str(uuid.UUID(rule_id)) if isinstance(rule_id, str) else None
        except ValueError:
            key = None
        if key is None:
            raise RuleNotFoundError("no rule with this id", field="id")
        async with self._tx(session) as s:
            await self._bump_version(s)
            row = (await s.execute(select(_RULE).where(_RULE.c.id == key))).one_or_none()
            if row is None:
                # Raising rolls the bump back (own transaction) or the caller does.
                raise RuleNotFoundError("no rule with this id", field="id")
            await s.execute(delete(_RULE).where(_RULE.c.id == key))
        return _rule_from_row(row)

    async def get_rule(self, rule_id: str, *, session: AsyncSession | None = None) -> Rule:
        async with self._tx(session) as s:
            row = (await s.execute(select(_RULE).where(_RULE.c.id == rule_id))).one_or_none()
        if row is None:
            raise RuleNotFoundError("no rule with this id", field="id")
        return _rule_from_row(row)

    async def list_rules(self, *, session: AsyncSession | None = None) -> list[Rule]:
        """All rules, oldest first (ties broken by id, so the order is stable)."""
        async with self._tx(session) as s:
            rows = (await s.execute(select(_RULE).order_by(_RULE.c.created_at, _RULE.c.id))).all()
        return [_rule_from_row(row) for row in rows]

    # -- roles -----------------------------------------------------------------

    async def set_roles(
        self,
        team: str,
        roles: Iterable[str],
        catalog: PolicyCatalog,
        *,
        session: AsyncSession | None = None,
    ) -> frozenset[str]:
        """Replace ``team``'s roles: other teams it inherits from, or names like ``admin``."""
        team = validate_team(team, catalog)
        if isinstance(roles, str):
            raise InvalidRoleError("field 'roles' must be a list of names", field="roles")
        wanted: set[str] = set()
        for role in roles:
            wanted.add(validate_role_name(role, catalog))
            if len(wanted) > _MAX_ROLES_PER_TEAM:
                raise InvalidRoleError(
                    f"field 'roles': at most {_MAX_ROLES_PER_TEAM} roles per team", field="roles"
                )
        if team in wanted:
            raise InvalidRoleError("field 'roles': a team cannot be its own role", field="roles")
        async with self._tx(session) as s:
            await self._bump_version(s)
            links = await self._links(s)
            links[team] = set(wanted)
            check_role_depth(links)
            await s.execute(delete(_ROLE).where(_ROLE.c.team == team))
            if wanted:
                await s.execute(
                    insert(_ROLE), [{"team": team, "role": role} for role in sorted(wanted)]
                )
        return frozenset(wanted)

    async def _links(self, session: AsyncSession) -> dict[str, set[str]]:
        links: dict[str, set[str]] = {}
        for team, role in (await session.execute(select(_ROLE.c.team, _ROLE.c.role))).all():
            links.setdefault(team, set()).add(role)
        return links

    async def list_roles(self, *, session: AsyncSession | None = None) -> dict[str, frozenset[str]]:
        """Direct role assignments per team (teams without roles are absent)."""
        async with self._tx(session) as s:
            links = await self._links(s)
        return {team: frozenset(roles) for team, roles in links.items()}

    # -- consistent snapshot -----------------------------------------------------

    async def load(self) -> PolicyState:
        """Rules and roles as of one version.

        Reads the version, the rows, then the version again and retries if a
        change committed in between: correct on any isolation level (SQLite's
        driver does not open a read transaction for plain SELECTs).
        """
        for attempt in range(_CONSISTENT_READ_ATTEMPTS):
            async with self._sessions() as s:
                before = await self.current_version(session=s)
                rules = await self.list_rules(session=s)
                roles = await self._links(s)
                await s.rollback()  # end any read transaction so the re-read sees new commits
                after = await self.current_version(session=s)
            if before == after:
                return PolicyState(
                    version=before,
                    rules=tuple(rules),
                    roles=tuple(sorted((t, r) for t, rs in roles.items() for r in rs)),
                )
            await asyncio.sleep(0.01 * (attempt + 1))
        raise RuntimeError("policy kept changing while being read")  # pragma: no cover
