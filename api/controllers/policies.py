"""Compliance: policy rules and explanations (admin role)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import JSONBody, Parameter

from api.auth import require_admin
from api.deps import VaultDep
from api.middleware import request_id
from governance.teams import Principal
from policies import RuleSpec

Short = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]


class RuleCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    team: Short
    category: Short
    action: Short = "read"
    purpose: Short
    effect: Short = "allow"
    mask: Annotated[str, msgspec.Meta(max_length=20)] | None = None


class RuleRead(msgspec.Struct):
    id: str
    team: str
    category: str
    action: str
    purpose: str
    effect: str
    mask: str | None


class RuleList(msgspec.Struct):
    items: list[RuleRead]
    version: int


def _read(rule: Any) -> RuleRead:
    return RuleRead(**rule.as_dict())


class PoliciesController(Controller):
    path = "/v1/admin/policies"
    tags = ["admin"]
    guards = [require_admin]

    @get("/", operation_id="listPolicies")
    async def list_rules(self, vault: VaultDep) -> RuleList:
        rules = await vault.list_policies()
        return RuleList(items=[_read(r) for r in rules], version=vault.policy.version)

    @post("/", operation_id="addPolicy", status_code=201)
    async def add_rule(
        self, request: Request[Principal, Any, Any], vault: VaultDep, data: JSONBody[RuleCreate]
    ) -> RuleRead:
        rule = await vault.add_policy(
            request.user,
            RuleSpec(
                team=data.team,
                category=data.category,
                action=data.action,
                purpose=data.purpose,
                effect=data.effect,
                mask=data.mask,
            ),
            request_id(),
        )
        return _read(rule)

    @delete("/{rule_id:str}", operation_id="removePolicy", status_code=204)
    async def remove_rule(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        rule_id: Annotated[str, Parameter(max_length=64)],
    ) -> None:
        await vault.remove_policy(request.user, rule_id, request_id())

    @get("/explain", operation_id="explainPolicy")
    async def explain(
        self,
        vault: VaultDep,
        team: Annotated[str, Parameter(max_length=64)],
        category: Annotated[str, Parameter(max_length=120)],
        purpose: Annotated[str, Parameter(max_length=120)],
        action: Annotated[str, Parameter(max_length=10)] = "read",
    ) -> dict[str, Any]:
        explanation = await vault.explain_policy(team, category, action, purpose)
        return explanation.as_dict()
