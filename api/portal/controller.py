"""The privacy portal: server-rendered pages over the governance core.

* Sign-in by e-mail and one-time code; the session token then lives in the
  ``sv_session`` cookie (HttpOnly, SameSite=Strict, Secure unless the settings
  say local development) scoped to ``/portal``.
* Every POST carries a CSRF token in a hidden field: an HMAC of the session id
  (or, before sign-in, of a random pre-session cookie) under a key derived from
  the key ring. A missing or wrong token changes nothing.
* Pages set their own Content-Security-Policy (no inline script or style) and
  ``Cache-Control: no-store``; no personal value appears in a URL or a title.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import CacheControlHeader, Cookie, ResponseHeader
from litestar.di import Provide
from litestar.params import Parameter, QueryParameter
from litestar.response import Redirect, Stream, Template
from litestar.router import Router
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from api.deps import VaultDep
from api.middleware import request_id
from api.portal import present
from governance.errors import GovernanceError, InvalidInput, Unauthorized
from governance.identity import CustomerPrincipal, RateLimited
from governance.service import StoryVault

__all__ = [
    "CSP",
    "SESSION_COOKIE",
    "PortalController",
    "portal_static_router",
    "portal_template_config",
]

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
SESSION_COOKIE = "sv_session"
PRE_COOKIE = "sv_pre"
COOKIE_PATH = "/portal"
CSRF_FIELD = "csrf_token"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
PAGE_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CSP),
    ResponseHeader(name="Cache-Control", value="no-store"),
]

AnyRequest = Request[Any, Any, Any]


def portal_template_config() -> TemplateConfig[Any]:
    from litestar.plugins.jinja import JinjaTemplateEngine

    def configure(engine: JinjaTemplateEngine) -> None:
        engine.engine.filters["when"] = present.format_when
        engine.engine.filters["day"] = present.format_day

    return TemplateConfig(
        directory=TEMPLATES, engine=JinjaTemplateEngine, engine_callback=configure
    )


def portal_static_router() -> Router:
    return create_static_files_router(
        path="/portal/static",
        directories=[STATIC],
        name="portal-static",
        cache_control=CacheControlHeader(max_age=3600),
        include_in_schema=False,
    )


# --- sessions and CSRF ------------------------------------------------------------


class SignInRequired(Exception):
    """No valid portal session: the handler answers with a redirect to sign-in."""


class StoryErased(Exception):
    """The session's story was erased: only the requests pages remain."""


ERASED_MAY_SEE = ("/portal/requests", "/portal/logout")
REQUEST_TYPES = {
    "access": "Access to my data",
    "erasure": "Erase my story",
    "rectification": "Correct my data",
    "objection": "Objection",
    "restriction": "Restrict processing",
}
REQUEST_STATUS = {
    "received": "Received",
    "in_progress": "In progress",
    "completed": "Completed",
    "refused": "Refused",
}


def _csrf(vault: StoryVault, binding: str) -> str:
    key = vault.ring.derived("portal-csrf/v1")
    return hmac.new(key, binding.encode(), hashlib.sha256).hexdigest()


def session_csrf(vault: StoryVault, customer: CustomerPrincipal) -> str:
    return _csrf(vault, "session:" + customer.session_id)


def _cookie(vault: StoryVault, key: str, value: str, max_age: int) -> Cookie:
    return Cookie(
        key=key,
        value=value,
        path=COOKIE_PATH,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=vault.settings.secure_cookies,
    )


def _expired(vault: StoryVault, key: str) -> Cookie:
    return _cookie(vault, key, "", 0)


def gpc_signal(request: AnyRequest) -> bool:
    return request.headers.get("sec-gpc", "").strip() == "1"


async def provide_customer(request: AnyRequest, vault: VaultDep) -> CustomerPrincipal:
    token = request.cookies.get(SESSION_COOKIE)
    customer = await vault.authenticate_customer(token) if token else None
    if customer is None:
        raise SignInRequired
    if customer.erased and not request.url.path.startswith(ERASED_MAY_SEE):
        # After erasure the session may only follow its requests (and sign out).
        raise StoryErased
    if gpc_signal(request):
        # Global Privacy Control: the same opt-out the API records (idempotent).
        await vault.apply_gpc(customer.customer_id)
    return customer


def _to_sign_in(request: AnyRequest, _: SignInRequired) -> Response[Any]:
    resp: Response[Any] = Redirect("/portal/sign-in", status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        vault: StoryVault = request.app.state.vault
        resp.set_cookie(_expired(vault, SESSION_COOKIE))
    return resp


def _to_requests(_: AnyRequest, __: StoryErased) -> Response[Any]:
    return Redirect("/portal/requests", status_code=303)


def _problem_page(request: AnyRequest, exc: GovernanceError) -> Response[Any]:
    status = {
        "not_found": 404,
        "forbidden": 403,
        "conflict": 409,
        "too_many": 429,
        "unauthorized": 401,
        "unavailable": 503,
    }.get(exc.kind, 422)
    return Template(
        "error.html",
        context={"title": "Something went wrong", "message": exc.message, "signed_in": False},
        status_code=status,
        headers={h.name: str(h.value) for h in PAGE_HEADERS},
    )


class CsrfFailed(Exception):
    """A POST without the right CSRF token."""


def _csrf_page(_: AnyRequest, __: CsrfFailed) -> Response[Any]:
    return Template(
        "error.html",
        context={
            "title": "This form has expired",
            "message": "For your safety we did not act on it. Go back, reload the page "
            "and try again.",
            "signed_in": False,
        },
        status_code=403,
        headers={h.name: str(h.value) for h in PAGE_HEADERS},
    )


async def _checked_form(request: AnyRequest, expected: str) -> Mapping[str, str]:
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfFailed
    return {k: v for k, v in form.items() if isinstance(v, str)}


# --- the pages ----------------------------------------------------------------------


class PortalController(Controller):
    path = "/portal"
    include_in_schema = False
    response_headers = PAGE_HEADERS
    dependencies = {"customer": Provide(provide_customer)}
    exception_handlers = {
        SignInRequired: _to_sign_in,
        StoryErased: _to_requests,
        CsrfFailed: _csrf_page,
        GovernanceError: _problem_page,
    }

    # helpers ----------------------------------------------------------------------
    @staticmethod
    def page(
        vault: StoryVault,
        customer: CustomerPrincipal,
        request: AnyRequest,
        template: str,
        title: str,
        active: str,
        status_code: int = 200,
        **context: Any,
    ) -> Template:
        return Template(
            template,
            context={
                "title": title,
                "active": active,
                "signed_in": True,
                "csrf": session_csrf(vault, customer),
                "gpc": gpc_signal(request),
                "erased": customer.erased,
                **context,
            },
            status_code=status_code,
        )

    @staticmethod
    def sign_in_page(
        vault: StoryVault,
        request: AnyRequest,
        template: str,
        status_code: int = 200,
        **context: Any,
    ) -> Template:
        pre = request.cookies.get(PRE_COOKIE) or ""
        cookies = []
        if len(pre) < 32:
            pre = secrets.token_urlsafe(32)
            cookies.append(_cookie(vault, PRE_COOKIE, pre, 3600))
        return Template(
            template,
            context={
                "title": "Sign in",
                "active": "",
                "signed_in": False,
                "csrf": _csrf(vault, "pre:" + pre),
                **context,
            },
            cookies=cookies,
            status_code=status_code,
        )

    # sign-in ----------------------------------------------------------------------
    @get("/", name="portal-home")
    async def home(self, request: AnyRequest, vault: VaultDep) -> Response[Any]:
        token = request.cookies.get(SESSION_COOKIE)
        if token and await vault.authenticate_customer(token):
            return Redirect("/portal/story", status_code=303)
        return Redirect("/portal/sign-in", status_code=303)

    @get("/sign-in", name="portal-sign-in")
    async def sign_in_form(
        self, request: AnyRequest, vault: VaultDep, bye: bool = False
    ) -> Template:
        return self.sign_in_page(vault, request, "sign_in.html", signed_out=bye)

    async def _pre_form(self, request: AnyRequest, vault: StoryVault) -> Mapping[str, str]:
        pre = request.cookies.get(PRE_COOKIE) or ""
        if len(pre) < 32:
            raise CsrfFailed
        return await _checked_form(request, _csrf(vault, "pre:" + pre))

    @post("/sign-in", name="portal-send-code", status_code=200)
    async def send_code(self, request: AnyRequest, vault: VaultDep) -> Template:
        form = await self._pre_form(request, vault)
        email = form.get("email", "").strip()
        client = request.client.host if request.client else "unknown"
        try:
            await vault.login(email, client)
        except InvalidInput:
            return self.sign_in_page(
                vault,
                request,
                "sign_in.html",
                status_code=422,
                error="Enter your e-mail address, like name@example.com.",
                email=email,
            )
        except RateLimited:
            return self.sign_in_page(
                vault,
                request,
                "sign_in.html",
                status_code=429,
                error="Too many sign-in requests for now. Please wait a few minutes and try again.",
                email=email,
            )
        return self.sign_in_page(vault, request, "code.html", email=email)

    @post("/verify", name="portal-verify", status_code=200)
    async def verify(self, request: AnyRequest, vault: VaultDep) -> Response[Any]:
        form = await self._pre_form(request, vault)
        email = form.get("email", "").strip()
        code = "".join(form.get("code", "").split())
        failure: tuple[int, str] | None = None
        if not email or not code or len(code) > 16 or len(email) > 320:
            failure = (401, "That code is wrong, has expired or was already used.")
        else:
            try:
                token, expires = await vault.verify_login(email, code)
            except RateLimited:
                failure = (429, "Too many wrong codes. Request a new code in a few minutes.")
            except Unauthorized:
                failure = (401, "That code is wrong, has expired or was already used.")
        if failure is not None:
            return self.sign_in_page(
                vault,
                request,
                "code.html",
                status_code=failure[0],
                email=email,
                error=failure[1],
            )
        max_age = max(60, int((expires - datetime.now(UTC)).total_seconds()))
        return Redirect(
            "/portal/story",
            status_code=303,
            cookies=[
                _cookie(vault, SESSION_COOKIE, token, max_age),
                _expired(vault, PRE_COOKIE),
            ],
        )

    @post("/logout", name="portal-logout", status_code=303)
    async def logout(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Response[Any]:
        await _checked_form(request, session_csrf(vault, customer))
        await vault.logout(customer)
        return Redirect(
            "/portal/sign-in",
            status_code=303,
            query_params={"bye": "1"},
            cookies=[_expired(vault, SESSION_COOKIE)],
        )

    # my story ------------------------------------------------------------------------
    @get("/story", name="portal-story")
    async def story(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Template:
        story = await vault.my_story(customer, request_id())
        catalog = vault.catalog
        order = {name: i for i, name in enumerate(catalog.profile_fields)}
        fields = sorted(story["profile"].items(), key=lambda kv: order.get(kv[0], len(order)))
        profile = [
            {
                "label": present.field_label(field),
                "value": value,
                "category": present.category_label(catalog, catalog.profile_fields[field].category)
                if field in catalog.profile_fields
                else "",
            }
            for field, value in fields
        ]
        return self.page(
            vault,
            customer,
            request,
            "story.html",
            "My story",
            "story",
            profile=profile,
            groups=present.story_groups(catalog, story["chapters"]),
        )

    # consents ------------------------------------------------------------------------
    async def _consents(
        self,
        request: AnyRequest,
        vault: StoryVault,
        customer: CustomerPrincipal,
        *,
        receipt: dict[str, Any] | None = None,
        error: str | None = None,
        status_code: int = 200,
    ) -> Template:
        items = await vault.consents_of(customer.customer_id)
        gpc = gpc_signal(request)
        rows = present.consent_rows(vault.catalog, items, gpc=gpc)
        sharing = [
            present.purpose_label(vault.catalog, r.purpose) for r in rows if r.sale_or_sharing
        ]
        return self.page(
            vault,
            customer,
            request,
            "consents.html",
            "My consents",
            "consents",
            status_code=status_code,
            rows=rows,
            receipt=receipt,
            error=error,
            sharing=sharing,
        )

    @get("/consents", name="portal-consents")
    async def consents(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Template:
        return await self._consents(request, vault, customer)

    @post("/consents", name="portal-set-consent", status_code=200)
    async def set_consent(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Template:
        form = await _checked_form(request, session_csrf(vault, customer))
        purpose = form.get("purpose", "")
        action = form.get("action", "")
        if purpose not in vault.catalog.purposes or action not in ("grant", "withdraw"):
            return await self._consents(
                request,
                vault,
                customer,
                error="That choice is not available. Nothing was changed.",
                status_code=422,
            )
        granted = action == "grant"
        if granted and gpc_signal(request) and vault.catalog.purposes[purpose].sale_or_sharing:
            return await self._consents(
                request,
                vault,
                customer,
                error="Your browser's Global Privacy Control signal opts you out of sharing. "
                "Turn the signal off in your browser if you want to give this consent.",
                status_code=409,
            )
        try:
            outcome = await vault.set_my_consent(
                customer, purpose, granted=granted, request_id=request_id()
            )
        except GovernanceError as exc:
            return await self._consents(
                request, vault, customer, error=exc.message, status_code=409
            )
        receipt = {
            "jws": outcome.receipt,
            "purpose": present.purpose_label(vault.catalog, purpose),
            "granted": granted,
            "basis": vault.catalog.purposes[purpose].legal_basis,
            "event": str(outcome.event.event_type),
            "ledger_index": outcome.ledger_index,
            "audit_index": outcome.audit_index,
            "at": present.format_when(outcome.event.recorded_at),
            "href": "data:application/jose;charset=utf-8," + quote(outcome.receipt, safe=""),
            "filename": f"consent-receipt-{outcome.ledger_index}.jws",
        }
        return await self._consents(request, vault, customer, receipt=receipt)

    # who read my story -----------------------------------------------------------------
    @get("/access", name="portal-access")
    async def access(
        self,
        request: AnyRequest,
        vault: VaultDep,
        customer: CustomerPrincipal,
        cursor: int | None = Parameter(default=None, ge=0, le=2**62),
    ) -> Template:
        page = await vault.access_log(customer.customer_id, cursor=cursor, limit=50)
        catalog = vault.catalog
        reads = [
            {
                "team": present.humanize(s.entry.actor),
                "purpose": present.purpose_label(catalog, s.entry.purpose),
                "purpose_code": s.entry.purpose or "",
                "parts": [present.category_label(catalog, c) for c in s.entry.categories],
                "withheld": [present.category_label(catalog, w.category) for w in s.entry.withheld],
                "when": present.format_when(s.entry.timestamp),
                "index": s.leaf_index,
            }
            for s in page.items
            if s.entry.actor not in ("customer", "system")
        ]
        return self.page(
            vault,
            customer,
            request,
            "access.html",
            "Who read my story",
            "access",
            reads=reads,
            next_cursor=page.next_cursor,
            first_page=cursor is None,
        )

    # take my data ----------------------------------------------------------------------
    @get("/export", name="portal-export")
    async def export(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Template:
        return self.page(vault, customer, request, "export.html", "Take my data", "export")

    @get("/export/download", name="portal-export-download")
    async def export_download(
        self,
        vault: VaultDep,
        customer: CustomerPrincipal,
        format: Annotated[str, QueryParameter(name="format", pattern="^(json|zip)$")] = "json",
    ) -> Stream:
        """The same export as ``GET /v1/me/export``, authenticated by the portal cookie."""
        rid = request_id()
        headers = {"Cache-Control": "no-store"}
        if format == "zip":
            fh = await vault.exporter.zip_file(customer.customer_id, request_id=rid)

            async def blocks() -> AsyncIterator[bytes]:
                try:
                    while block := fh.read(65536):
                        yield block
                finally:
                    fh.close()

            return Stream(
                blocks(),
                media_type="application/zip",
                headers={**headers, "Content-Disposition": 'attachment; filename="my-story.zip"'},
            )
        stream = vault.exporter.stream_json(customer.customer_id, request_id=rid)
        first = await anext(stream)  # errors surface before the 200 is sent

        async def chunks() -> AsyncIterator[bytes]:
            yield first
            async for chunk in stream:
                yield chunk

        return Stream(
            chunks(),
            media_type="application/json",
            headers={**headers, "Content-Disposition": 'attachment; filename="my-story.json"'},
        )

    # erase my story --------------------------------------------------------------------
    async def _erasure_plan(
        self, vault: StoryVault, customer: CustomerPrincipal
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """What an erasure would remove and what the law keeps (and until when)."""
        story = await vault.my_story(customer, request_id())
        catalog = vault.catalog
        holds = catalog.held_categories()
        counts: dict[str, int] = {}
        latest: dict[str, str] = {}
        for ch in story["chapters"]:
            counts[ch["category"]] = counts.get(ch["category"], 0) + 1
            when = str(ch["occurred_at"])
            latest[ch["category"]] = max(latest.get(ch["category"], ""), when)
        for field in story["profile"]:
            if field in catalog.profile_fields:
                field_cat = catalog.profile_fields[field].category
                counts[field_cat] = counts.get(field_cat, 0) + 1
        erased, kept = [], []
        for name in catalog.categories:
            hold = holds.get(name)
            item = {"label": present.category_label(catalog, name), "count": counts.get(name, 0)}
            if hold is not None and name in latest:
                last = datetime.fromisoformat(latest[name].replace("Z", "+00:00"))
                try:
                    until = last.replace(year=last.year + hold.years)
                except ValueError:
                    until = last.replace(year=last.year + hold.years, day=28)
                kept.append(
                    {
                        **item,
                        "years": hold.years,
                        "ground": present.purpose_label(catalog, hold.purpose),
                        "until": present.format_day(until),
                    }
                )
            else:
                erased.append(item)
        return erased, kept

    @get("/erase", name="portal-erase")
    async def erase_form(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Template:
        erased, kept = await self._erasure_plan(vault, customer)
        return self.page(
            vault,
            customer,
            request,
            "erase.html",
            "Erase my story",
            "erase",
            to_erase=erased,
            kept=kept,
        )

    @post("/erase", name="portal-erase-confirm", status_code=200)
    async def erase(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Response[Any]:
        form = await _checked_form(request, session_csrf(vault, customer))
        if form.get("confirm") != "yes":
            erased, kept = await self._erasure_plan(vault, customer)
            return self.page(
                vault,
                customer,
                request,
                "erase.html",
                "Erase my story",
                "erase",
                status_code=422,
                to_erase=erased,
                kept=kept,
                error="Tick the box to confirm that you want your story erased. "
                "Nothing was erased.",
            )
        outcome = await vault.rights.erase(
            customer.customer_id, None, channel="portal", request_id=request_id()
        )
        return Redirect(f"/portal/requests/{outcome.request_id}", status_code=303)

    # my requests -----------------------------------------------------------------------
    @staticmethod
    def _request_view(vault: StoryVault, row: Any) -> dict[str, Any]:
        catalog = vault.catalog
        cert = row.certificate
        claims: dict[str, Any] = {}
        if cert:
            try:
                payload = cert.split(".")[1]
                claims = json.loads(_b64url(payload))
            except (IndexError, ValueError):
                claims = {}
        due = row.due_at if row.due_at.tzinfo else row.due_at.replace(tzinfo=UTC)
        return {
            "id": row.id,
            "type": REQUEST_TYPES.get(row.type, present.humanize(row.type)),
            "status": REQUEST_STATUS.get(row.status, present.humanize(row.status)),
            "status_code": row.status,
            "received": present.format_when(row.received_at),
            "due": present.format_day(row.due_at),
            "completed": present.format_when(row.completed_at),
            "overdue": row.completed_at is None and due < datetime.now(UTC),
            "extended_reason": row.extended_reason,
            "refused_reason": row.refused_reason,
            "certificate": cert,
            "certificate_href": "data:application/jose;charset=utf-8," + quote(cert, safe="")
            if cert
            else None,
            "erased": [
                present.category_label(catalog, c) for c in claims.get("categories_erased", [])
            ],
            "held": [
                {
                    "label": present.category_label(catalog, h.get("category", "")),
                    "ground": present.purpose_label(catalog, h.get("legal_ground")),
                    "until": present.format_day(h.get("until")),
                }
                for h in claims.get("categories_held", [])
                if isinstance(h, dict)
            ],
            "keys_destroyed": len(claims.get("keys_destroyed", [])),
        }

    @get("/requests", name="portal-requests")
    async def requests(
        self, request: AnyRequest, vault: VaultDep, customer: CustomerPrincipal
    ) -> Template:
        rows = await vault.rights.list_requests(customer.customer_id)
        return self.page(
            vault,
            customer,
            request,
            "requests.html",
            "My requests",
            "requests",
            items=[self._request_view(vault, r) for r in rows],
        )

    @get("/requests/{rid:str}", name="portal-request")
    async def one_request(
        self,
        request: AnyRequest,
        vault: VaultDep,
        customer: CustomerPrincipal,
        rid: str = Parameter(max_length=64),
    ) -> Template:
        row = await vault.rights.get_request(rid, customer.customer_id)
        return self.page(
            vault,
            customer,
            request,
            "request.html",
            "My request",
            "requests",
            r=self._request_view(vault, row),
        )


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
