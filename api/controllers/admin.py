"""Compliance endpoints: teams and keys (admin role)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.params import JSONBody, Parameter

from api.auth import require_admin
from api.deps import VaultDep
from api.schemas import KeyCreate, KeyIssued, TeamCreate, TeamRead


def _utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; the API's times are RFC 3339 UTC (found by schemathesis)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class TeamsController(Controller):
    path = "/v1/admin"
    tags = ["admin"]
    guards = [require_admin]

    @get("/teams", operation_id="listTeams")
    async def list_teams(self, vault: VaultDep) -> list[TeamRead]:
        async with vault.db.session() as session:
            rows = await vault.teams.list_teams(session)
        return [
            TeamRead(
                name=r.name,
                roles=[x for x in r.roles.split(",") if x],
                description=r.description,
                created_at=_utc(r.created_at),
            )
            for r in rows
        ]

    @post("/teams", operation_id="createTeam", status_code=201)
    async def create_team(self, vault: VaultDep, data: JSONBody[TeamCreate]) -> TeamRead:
        row = await vault.create_team(data.name, roles=data.roles, description=data.description)
        return TeamRead(
            name=row.name,
            roles=[x for x in row.roles.split(",") if x],
            description=row.description,
            created_at=_utc(row.created_at),
        )

    @post("/teams/{team:str}/keys", operation_id="issueKey", status_code=201)
    async def issue_key(
        self,
        vault: VaultDep,
        team: Annotated[str, Parameter(max_length=64)],
        data: JSONBody[KeyCreate | None] = None,
    ) -> KeyIssued:
        issued = await vault.issue_key(team, label=data.label if data else "")
        return KeyIssued(
            id=issued.id, team=issued.team, key=issued.secret, created_at=_utc(issued.created_at)
        )

    @delete("/keys/{key_id:str}", operation_id="revokeKey", status_code=204)
    async def revoke_key(
        self, vault: VaultDep, key_id: Annotated[str, Parameter(max_length=64)]
    ) -> None:
        await vault.revoke_key(key_id)
