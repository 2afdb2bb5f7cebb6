"""Customers' self-service endpoints (``/v1/me``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, post
from litestar.params import JSONBody

from api.auth import require_customer
from api.deps import VaultDep
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
