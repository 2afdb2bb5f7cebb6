"""Teams' gatekeeper endpoints over the story vault."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, get, patch, post
from litestar.params import Body, JSONBody, Parameter

from api.auth import require_team
from api.deps import VaultDep
from api.schemas import ChapterCreate, Created, CustomerCreate, CustomerList, IdItem
from governance.errors import InvalidInput
from governance.teams import Principal

CustomerId = Annotated[str, Parameter(max_length=64, description="the customer's UUID")]


def parse_customer_id(raw: str) -> str:
    try:
        return str(UUID(raw))
    except ValueError:
        raise InvalidInput("customer id must be a UUID", code="invalid_id") from None


Purpose = Annotated[str | None, Parameter(query="purpose", max_length=120, required=False)]
ProfilePatch = Annotated[
    dict[str, str | None], Body(description="profile fields to set; null removes")
]


class CustomersController(Controller):
    path = "/v1/customers"
    tags = ["customers"]
    guards = [require_team]

    @post("/", operation_id="createCustomer", status_code=201)
    async def create(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        data: JSONBody[CustomerCreate],
        purpose: Purpose = None,
    ) -> Created:
        customer_id = await vault.create_customer(
            request.user, purpose, external_ref=data.external_ref, profile=data.profile
        )
        return Created(id=customer_id)

    @get("/", operation_id="findCustomers")
    async def find(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        email: Annotated[str, Parameter(query="email", min_length=3, max_length=320)],
        purpose: Purpose = None,
    ) -> CustomerList:
        ids = await vault.find_customers(request.user, purpose, email)
        return CustomerList(items=[IdItem(id=i) for i in ids])

    @patch("/{customer_id:str}/profile", operation_id="updateCustomerProfile", status_code=204)
    async def update_profile(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        customer_id: CustomerId,
        data: JSONBody[ProfilePatch],
        purpose: Purpose = None,
    ) -> None:
        await vault.update_profile(request.user, purpose, parse_customer_id(customer_id), data)

    @post("/{customer_id:str}/chapters", operation_id="addChapter", status_code=201)
    async def add_chapter(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        customer_id: CustomerId,
        data: JSONBody[ChapterCreate],
        purpose: Purpose = None,
    ) -> Created:
        chapter_id = await vault.add_chapter(
            request.user,
            purpose,
            parse_customer_id(customer_id),
            category=data.category,
            kind=data.kind,
            occurred_at=data.occurred_at,
            body=data.body,
        )
        return Created(id=chapter_id)
