"""Compliance reports over HTTP (admin role): ``GET /v1/reports/{name}``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, get
from litestar.params import Parameter

from api.auth import require_admin
from api.deps import VaultDep
from api.middleware import request_id
from api.schemas import MAX_INT64
from governance.reports import FORMATS, REPORTS, Reports
from governance.teams import Principal

__all__ = ["ReportsController"]


class ReportsController(Controller):
    path = "/v1/reports"
    tags = ["compliance"]
    guards = [require_admin]

    @get(
        "/{name:str}",
        operation_id="getReport",
        summary="A compliance report",
        description=(
            f"Reports: {', '.join(REPORTS)}. Formats: {', '.join(FORMATS)}. The window "
            "[since, until) defaults to the last 90 days (consent, requests, access). "
            "integrity takes from_size (and from_root) of the previous report's tree head "
            "for a consistency proof, and verify=false to skip recomputing a large log. "
            "The SHA-256 of the body is returned in X-Report-SHA256 and written to the "
            "audit log (entry kind 'report', index in X-Report-Audit-Index)."
        ),
    )
    async def report(
        self,
        request: Request[Principal, Any, Any],
        vault: VaultDep,
        name: Annotated[str, Parameter(max_length=40)],
        format: Annotated[str, Parameter(max_length=10)] = "json",
        since: datetime | None = None,
        until: datetime | None = None,
        from_size: Annotated[int | None, Parameter(ge=1, le=MAX_INT64)] = None,
        from_root: Annotated[
            str | None, Parameter(min_length=64, max_length=64, pattern="^[0-9a-fA-F]{64}$")
        ] = None,
        verify: bool = True,
    ) -> Response[bytes]:
        principal = request.user
        Reports.check(name, format)
        report = await Reports(vault).generate(
            name,
            format,
            actor=principal.team,
            actor_key_id=principal.key_id,
            request_id=request_id(),
            since=since,
            until=until,
            from_size=from_size,
            from_root=from_root,
            verify=verify,
        )
        html = format == "html"
        disposition = "inline" if html else "attachment"
        # A self-contained page: its own inline styles and inline SVG, nothing fetched.
        csp = "default-src 'none'; frame-ancestors 'none'" + (
            "; style-src 'unsafe-inline'; img-src data:" if html else ""
        )
        return Response(
            report.body,
            media_type=report.media_type,
            headers={
                "Content-Disposition": f'{disposition}; filename="{report.filename}"',
                "X-Report-SHA256": report.sha256,
                "X-Report-Audit-Index": str(report.audit_index),
                "Cache-Control": "no-store",
                "Content-Security-Policy": csp,
            },
        )
