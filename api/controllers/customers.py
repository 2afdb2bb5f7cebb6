"""Teams' gatekeeper endpoints over the story vault."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, get, patch, post
from litestar.params import Body, Parameter

from api.auth import require_team
from api.schemas import ChapterCreate, Created, CustomerCreate, CustomerList, IdItem
from governance.service import StoryVault
from governance.teams import Principal

Purpose = Annotated[str | None, Parameter(query="purpose", max_length=120, required=False)]
ProfilePatch = Annotated[dict[str, str | None], Body(description="profile fields to set; null removes")]


class CustomersController(Controller):
    path = "/v1/customers"
    tags = ["customers"]
    guards = [require_team]

    @post("/", operation_id="createCustomer", status_code=201)
    async def create(
        self, request: Request[Principal, Any, Any], vault: StoryVault, data: CustomerCreate,
        purpose: Purpose = None,
    ) -> Created:
        customer_id = await vault.create_customer(
            request.user, purpose, external_ref=data.external_ref, profile=data.profile
        )
        return Created(id=customer_id)

    @get("/", operation_id="findCustomers")
    async def find(
        self, request: Request[Principal, Any, Any], vault: StoryVault,
        email: Annotated[str, Parameter(query="email", min_length=3, max_length=320)],
        purpose: Purpose = None,
    ) -> CustomerList:
        ids = await vault.find_customers(request.user, purpose, email)
        return CustomerList(items=[IdItem(id=i) for i in ids])

    @patch("/{customer_id:uuid}/profile", operation_id="updateCustomerProfile", status_code=204)
    async def update_profile(
        self, request: Request[Principal, Any, Any], vault: StoryVault, customer_id: UUID,
        data: ProfilePatch, purpose: Purpose = None,
    ) -> None:
        await vault.update_profile(request.user, purpose, str(customer_id), data)

    @post("/{customer_id:uuid}/chapters", operation_id="addChapter", status_code=201)
    async def add_chapter(
        self, request: Request[Principal, Any, Any], vault: StoryVault, customer_id: UUID,
        data: ChapterCreate, purpose: Purpose = None,
    ) -> Created:
        chapter_id = await vault.add_chapter(
            request.user, purpose, str(customer_id), category=data.category, kind=data.kind,
            occurred_at=data.occurred_at, body=data.body,
        )
        return Created(id=chapter_id)
