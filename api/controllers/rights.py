"""Data-subject rights over HTTP: export, erasure, rectification, the requests register,
key rotation and the export schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, patch, post
from litestar.params import JSONBody, Parameter, QueryParameter
from litestar.response import Stream

from api.auth import require_admin, require_customer, require_team
from api.controllers.customers import CustomerId, parse_customer_id
from api.deps import VaultDep
from api.middleware import request_id
from api.schemas import NO_NUL
from governance.export import export_schema
from governance.identity import CustomerPrincipal
from governance.models import RightsRequestRow
from governance.teams import Principal


class ErasureRequest(msgspec.Struct, forbid_unknown_fields=True):
    categories: list[Annotated[str, msgspec.Meta(max_length=120)]] | None = None


class RequestOpen(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Annotated[str, msgspec.Meta(max_length=20)]
    channel: Annotated[str, msgspec.Meta(max_length=20)] = "email"


class Extension(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500, pattern=NO_NUL)]
    days: Annotated[int, msgspec.Meta(ge=1, le=60)] = 60


class RightsRequestRead(msgspec.Struct):
    id: str
    type: str
    status: str
    channel: str
    received_at: datetime
    due_at: datetime
    completed_at: datetime | None
    extended_reason: str | None
    refused_reason: str | None
    certificate: str | None
    overdue: bool


def request_read(row: RightsRequestRow) -> RightsRequestRead:

    due = row.due_at if row.due_at.tzinfo else row.due_at.replace(tzinfo=UTC)
    return RightsRequestRead(
        id=row.id,
        type=row.type,
        status=row.status,
        channel=row.channel,
        received_at=row.received_at,
        due_at=row.due_at,
        completed_at=row.completed_at,
        extended_reason=row.extended_reason,
        refused_reason=row.refused_reason,
        certificate=row.certificate,
        overdue=row.completed_at is None and due < datetime.now(UTC),
    )


class MyRightsController(Controller):
    path = "/v1/me"
    tags = ["me"]
    guards = [require_customer]

    @get("/export", operation_id="myExport")
    async def export(
        self,
        request: Request[CustomerPrincipal, Any, Any],
        vault: VaultDep,
        format: Annotated[Literal["json", "zip"], QueryParameter(name="format")] = "json",
    ) -> Stream:
        customer = request.user
        rid = request_id()
        if format == "zip":
            fh = await vault.exporter.zip_file(customer.customer_id, request_id=rid)

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    while block := fh.read(65536):
                        yield block
                finally:
                    fh.close()

            return Stream(
                chunks(),
                media_type="application/zip",
                headers={"Content-Disposition": 'attachment; filename="my-story.zip"'},
            )
        stream = vault.exporter.stream_json(customer.customer_id, request_id=rid)
        first = await anext(stream)  # errors (e.g. erased) surface before the 200 is sent

        async def rest() -> AsyncIterator[bytes]:
            yield first
            async for chunk in stream:
                yield chunk

        return Stream(
            rest(),
            media_type="application/json",
            headers={"Content-Disposition": 'attachment; filename="my-story.json"'},
        )

    @post("/erasure", operation_id="myErasure", status_code=202)
    async def erasure(
        self,
        request: Request[CustomerPrincipal, Any, Any],
        vault: VaultDep,
        data: JSONBody[ErasureRequest],
    ) -> dict[str, Any]:
        outcome = await vault.rights.erase(
            request.user.customer_id, data.categories, request_id=request_id()
        )
        return {
            "request_id": outcome.request_id,
            "status": "completed",
            "categories_erased": outcome.erased,
            "categories_held": outcome.held,
            "certificate": outcome.certificate,
            "audit_index": outcome.audit_index,
        }

    @patch("/profile", operation_id="myRectification")
    async def rectify(
        self,
        request: Request[CustomerPrincipal, Any, Any],
        vault: VaultDep,
        data: JSONBody[dict[str, str | None]],
    ) -> dict[str, str]:
        rid = await vault.rectify(request.user, data, request_id())
        return {"request_id": rid, "status": "completed"}

    @get("/requests", operation_id="myRequests")
    async def requests(
        self, request: Request[CustomerPrincipal, Any, Any], vault: VaultDep
    ) -> dict[str, list[RightsRequestRead]]:
        rows = await vault.rights.list_requests(request.user.customer_id)
        return {"items": [request_read(r) for r in rows]}

    @get("/requests/{rid:str}", operation_id="myRequest")
    async def one_request(
        self,
        request: Request[CustomerPrincipal, Any, Any],
        vault: VaultDep,
        rid: Annotated[str, Parameter(max_length=64)],
    ) -> RightsRequestRead:
        return request_read(await vault.rights.get_request(rid, request.user.customer_id))


class TeamRequestsController(Controller):
    path = "/v1/customers"
    tags = ["rights"]
    guards = [require_team]

    @post("/{customer_id:str}/requests", operation_id="openRequest", status_code=201)
    async def open_request(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        customer_id: CustomerId,
        data: JSONBody[RequestOpen],
    ) -> RightsRequestRead:
        cid = parse_customer_id(customer_id)
        async with vault.db.write_session() as session, session.begin():
            await vault.vault.require_active(session, cid)
            row = await vault.rights.open_request(
                session,
                cid,
                data.type,
                channel=data.channel,
                actor=request.user.team,
                actor_key_id=request.user.key_id,
                request_id=request_id(),
            )
        return request_read(row)


class AdminRightsController(Controller):
    path = "/v1/admin"
    tags = ["admin"]
    guards = [require_admin]

    @get("/requests", operation_id="listRequests")
    async def list_requests(self, vault: VaultDep) -> dict[str, list[RightsRequestRead]]:
        return {"items": [request_read(r) for r in await vault.rights.list_requests(None)]}

    @post("/requests/{rid:str}/extend", operation_id="extendRequest", status_code=200)
    async def extend(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        rid: Annotated[str, Parameter(max_length=64)],
        data: JSONBody[Extension],
    ) -> RightsRequestRead:
        row = await vault.rights.extend(
            rid, reason=data.reason, days=data.days, actor=request.user.team
        )
        return request_read(row)

    @post("/keys/rotate", operation_id="rotateKeys", status_code=200)
    async def rotate(
        self, request: Request[Principal, Any, Any], vault: VaultDep
    ) -> dict[str, int]:
        return await vault.rights.rotate_keys(actor=request.user.team)

    @post("/retention/sweep", operation_id="retentionSweep", status_code=200)
    async def sweep(self, vault: VaultDep) -> dict[str, int]:
        return await vault.rights.sweep()


@get("/v1/schemas/export.json", operation_id="exportSchema", tags=["rights"])
async def export_schema_doc() -> dict[str, Any]:
    return export_schema()
