"""Customers' self-service endpoints (``/v1/me``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post, put
from litestar.params import JSONBody, Parameter

from api.auth import require_customer
from api.controllers.customers import consent_json, receipt_json
from api.deps import VaultDep
from api.middleware import request_id
from api.schemas import MAX_INT64
from governance.identity import CustomerPrincipal


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=320)]


class VerifyRequest(msgspec.Struct, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=320)]
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]


class Accepted(msgspec.Struct):
    status: str


class SessionIssued(msgspec.Struct):
    token: str
    expires_at: datetime


def client_address(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else "unknown"


class SignInController(Controller):
    path = "/v1/me"
    tags = ["me"]

    @post("/login", operation_id="customerLogin", status_code=202)
    async def login(
        self, request: Request[Any, Any, Any], vault: VaultDep, data: JSONBody[LoginRequest]
    ) -> Accepted:
        await vault.login(data.email, client_address(request))
        return Accepted(status="if the address belongs to a customer, a code is on its way")

    @post("/verify", operation_id="customerVerify", status_code=200)
    async def verify(self, vault: VaultDep, data: JSONBody[VerifyRequest]) -> SessionIssued:
        token, expires = await vault.verify_login(data.email, data.code)
        return SessionIssued(token=token, expires_at=expires)


class SessionController(Controller):
    path = "/v1/me"
    tags = ["me"]
    guards = [require_customer]

    @post("/logout", operation_id="customerLogout", status_code=204)
    async def logout(self, request: Request[CustomerPrincipal, Any, Any], vault: VaultDep) -> None:
        await vault.logout(request.user)


class ConsentChoice(msgspec.Struct, forbid_unknown_fields=True):
    granted: bool


class MeController(Controller):
    path = "/v1/me"
    tags = ["me"]
    guards = [require_customer]

    @get("/story", operation_id="myStory")
    async def story(
        self, request: Request[CustomerPrincipal, Any, Any], vault: VaultDep
    ) -> dict[str, Any]:
        return await vault.my_story(request.user, request_id())

    @get("/consents", operation_id="myConsents")
    async def consents(
        self, request: Request[CustomerPrincipal, Any, Any], vault: VaultDep
    ) -> dict[str, Any]:
        items = await vault.consents_of(request.user.customer_id)
        return {"items": [consent_json(c) for c in items]}

    @put("/consents/{purpose:str}", operation_id="setMyConsent")
    async def set_consent(
        self,
        request: Request[CustomerPrincipal, Any, Any],
        vault: VaultDep,
        purpose: Annotated[str, Parameter(max_length=120)],
        data: JSONBody[ConsentChoice],
    ) -> dict[str, Any]:
        outcome = await vault.set_my_consent(
            request.user, purpose, granted=data.granted, request_id=request_id()
        )
        return receipt_json(outcome)

    @get("/access-log", operation_id="myAccessLog")
    async def access_log(
        self,
        request: Request[CustomerPrincipal, Any, Any],
        vault: VaultDep,
        cursor: Annotated[int | None, Parameter(ge=0, le=MAX_INT64)] = None,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        page = await vault.access_log(request.user.customer_id, cursor=cursor, limit=limit)
        items = [
            {
                "index": s.leaf_index,
                "team": s.entry.actor,
                "purpose": s.entry.purpose,
                "categories": list(s.entry.categories),
                "withheld": [
                    {"category": w.category, "reason": w.reason} for w in s.entry.withheld
                ],
                "at": s.entry.timestamp,
                "proof": f"/v1/audit/proofs/inclusion?leaf_index={s.leaf_index}",
            }
            for s in page.items
            if s.entry.actor != "customer"
        ]
        return {"items": items, "next_cursor": page.next_cursor}
