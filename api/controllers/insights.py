"""Consented insights over HTTP: signals per customer (teams), aggregates (teams) and
what is inferred about me (customers). The definitions live in governance/insights.py."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.params import QueryParameter

from api.auth import require_customer, require_team
from api.controllers.customers import CustomerId, Purpose, parse_customer_id
from api.deps import VaultDep
from api.middleware import request_id
from governance.identity import CustomerPrincipal
from governance.teams import Principal


class SignalOut(msgspec.Struct):
    name: str
    value: dict[str, Any]
    inputs: list[str]
    explanation: str


class WithheldOut(msgspec.Struct, omit_defaults=True):
    reason: str
    category: str | None = None
    signal: str | None = None


class CustomerInsights(msgspec.Struct):
    customer_id: str
    purpose: str
    signals: list[SignalOut]
    withheld: list[WithheldOut]
    audit_index: int


GroupBy = Annotated[
    str | None,
    QueryParameter(
        name="group_by",
        max_length=40,
        required=False,
        description="effort_band, drift_band, sentiment_band or open_tickets",
    ),
]


class InsightsController(Controller):
    path = "/v1"
    tags = ["insights"]
    guards = [require_team]

    @get("/customers/{customer_id:str}/insights", operation_id="customerInsights")
    async def customer_insights(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        customer_id: CustomerId,
        purpose: Purpose = None,
    ) -> CustomerInsights:
        """Signals derived from the parts of the story (team, purpose) may use; the
        profiling ones also need the customer's analytics.profiling consent."""
        out = await vault.customer_insights(
            request.user, parse_customer_id(customer_id), purpose, request_id()
        )
        return CustomerInsights(
            customer_id=out["customer_id"],
            purpose=out["purpose"],
            signals=[SignalOut(**s) for s in out["signals"]],
            withheld=[WithheldOut(**w) for w in out["withheld"]],
            audit_index=out["audit_index"],
        )

    @get("/insights/summary", operation_id="insightsSummary")
    async def summary(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        purpose: Purpose = None,
        group_by: GroupBy = None,
    ) -> dict[str, Any]:
        """Counts and averages per group; groups smaller than k are suppressed; no ids."""
        return await vault.insights_summary(request.user, purpose, group_by, request_id())


class MyInsightsController(Controller):
    path = "/v1/me"
    tags = ["me"]
    guards = [require_customer]

    @get("/insights", operation_id="myInsights")
    async def my_insights(
        self, request: Request[CustomerPrincipal, Any, Any], vault: VaultDep
    ) -> dict[str, Any]:
        """What is inferred about me, with explanations; profiling only with my consent."""
        return await vault.my_insights(request.user, request_id())
