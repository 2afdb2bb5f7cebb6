"""Teams, their roles, and their API keys.

A key's secret is shown once, at creation; only a keyed digest (HMAC with a
key derived from the key ring) is stored, under a public key id. Lookups go
by digest, so a revoked key fails on the very next request on every instance.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from audit import Prepared
from governance.db import ReadSteps
from governance.errors import Conflict, InvalidInput, NotFound
from governance.keys import KeyRing
from governance.models import API_KEYS, TEAMS, ApiKeyRow, TeamRow

__all__ = ["ADMIN_ROLE", "KEY_LOOKUP", "IssuedKey", "PresentedKey", "Principal", "Teams"]

ADMIN_ROLE = "admin"
KEY_LOOKUP = (
    select(API_KEYS.id, API_KEYS.team, API_KEYS.revoked_at, TEAMS.roles)
    .join(TeamRow, TEAMS.name == API_KEYS.team)
    .where(API_KEYS.digest == bindparam("digest"))
)
"""The key of a digest (at most one row): id, team, revoked_at, the team's roles.
``Teams.principal_of`` reads such a row; the gated read looks keys up the same way
in its own statement (``governance.gate``)."""
_KEY_LOOKUP = Prepared(KEY_LOOKUP)
KNOWN_ROLES = frozenset({ADMIN_ROLE})
_TEAM = re.compile(r"^[a-z][a-z0-9_-]{1,63}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated team key."""

    team: str
    key_id: str
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


@dataclass(frozen=True, slots=True)
class PresentedKey:
    """A team API key as presented, not looked up yet: its digest, or None when it
    cannot be a key (empty or too long). A route that reads the database anyway
    resolves it in that same visit (``Teams.principal_of``), so the lookup costs no
    round trip of its own; the gated read does so."""

    digest: str | None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    id: str
    team: str
    secret: str
    created_at: datetime


class Teams:
    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not _TEAM.match(name):
            raise InvalidInput(
                "team name must be 2-64 characters: lowercase letters, digits, '-' or '_'",
                code="invalid_team",
            )
        return name

    async def create_team(
        self, session: AsyncSession, name: str, *, roles: list[str], description: str = ""
    ) -> TeamRow:
        self.check_name(name)
        unknown = set(roles) - KNOWN_ROLES
        if unknown:
            raise InvalidInput(
                f"unknown role(s): {', '.join(sorted(unknown))[:100]}", code="invalid_role"
            )
        if await session.get(TeamRow, name) is not None:
            raise Conflict(f"team '{name}' exists", code="team_exists")
        row = TeamRow(
            name=name,
            roles=",".join(sorted(set(roles))),
            description=description[:500],
            created_at=datetime.now(UTC),
        )
        session.add(row)
        await session.flush()
        return row

    async def list_teams(self, session: AsyncSession) -> list[TeamRow]:
        return list((await session.execute(select(TeamRow).order_by(TEAMS.name))).scalars())

    async def team_names(self, session: AsyncSession) -> set[str]:
        return set((await session.execute(select(TEAMS.name))).scalars())

    async def issue_key(
        self, session: AsyncSession, team: str, *, label: str = "", secret: str | None = None
    ) -> IssuedKey:
        if await session.get(TeamRow, team) is None:
            raise NotFound(f"no team '{team[:64]}'", code="team_not_found")
        key_id = "key_" + secrets.token_hex(8)
        secret = secret or "svk_" + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        session.add(
            ApiKeyRow(
                id=key_id,
                team=team,
                digest=self.ring.token_digest(secret),
                label=label[:200],
                created_at=now,
            )
        )
        await session.flush()
        return IssuedKey(id=key_id, team=team, secret=secret, created_at=now)

    async def ensure_key(
        self, session: AsyncSession, team: str, secret: str, *, key_id: str
    ) -> None:
        """Make ``secret`` a valid key of ``team`` (the STORYVAULT_ADMIN_KEY bootstrap)."""
        digest = self.ring.token_digest(secret)
        existing = await session.get(ApiKeyRow, key_id)
        if existing is not None:
            # The environment is the source of truth: its value replaces the stored one.
            existing.digest, existing.team, existing.revoked_at = digest, team, None
            return
        session.add(
            ApiKeyRow(
                id=key_id,
                team=team,
                digest=digest,
                label="bootstrap (environment)",
                created_at=datetime.now(UTC),
            )
        )

    async def revoke_key(self, session: AsyncSession, key_id: str) -> None:
        result = await session.execute(
            update(ApiKeyRow)
            .where(API_KEYS.id == key_id, API_KEYS.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        if getattr(result, "rowcount", 0) == 0:
            raise NotFound("no such active key", code="key_not_found")

    def authenticate(self, secret: str) -> ReadSteps[Principal | None]:
        """The principal of an API key, or None (unknown or revoked): steps for
        ``Database.query``. It runs on every team request, and no cache stands
        between it and the keys table, so a revocation holds from the next request
        on every instance."""
        return (yield from self.lookup(self.presented(secret)))

    @classmethod
    def lookup(cls, key: PresentedKey) -> ReadSteps[Principal | None]:
        """The principal of a presented key, or None (unknown, revoked, or no key at
        all): steps for ``Database.query``."""
        if key.digest is None:
            return None
        found = yield (_KEY_LOOKUP, {"digest": key.digest})
        return cls.principal_of(*found[0]) if found else None

    def presented(self, secret: str) -> PresentedKey:
        """``secret`` as a ``PresentedKey`` (its digest), for a lookup made later."""
        if not secret or len(secret) > 512:
            return PresentedKey(None)
        return PresentedKey(self.ring.token_digest(secret))

    @staticmethod
    def principal_of(
        key_id: str | None, team: str | None, revoked_at: object, roles: str | None
    ) -> Principal | None:
        """The principal of a ``KEY_LOOKUP`` row; None if there was none (all None)
        or the key is revoked."""
        if key_id is None or team is None or revoked_at is not None:
            return None
        return Principal(
            team=team, key_id=key_id, roles=frozenset(r for r in (roles or "").split(",") if r)
        )
