"""Policy administration, consent flows, audit access and the audience query.

Split from service.py to keep each module to one concern; these are methods
of StoryVault (mixed in), sharing its collaborators.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Select, select

from audit import AuditEntry, EntryKind, EntryPage
from consent import (
    Channel,
    ConsentEvent,
    ConsentState,
    PurposeTerms,
    UnknownPurpose,
    allowed_condition,
    evaluate,
)
from governance.errors import Forbidden, InvalidInput, NotFound
from governance.identity import CustomerPrincipal
from governance.metrics import CONSENT_EVENTS
from governance.models import CUSTOMERS
from governance.teams import Principal
from policies import Action, Explanation, Rule, RuleSpec

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from audit import TransparencyLog
    from consent import Ledger, ReceiptSigner
    from governance.catalog import Catalog
    from governance.db import Database
    from governance.gate import Gate
    from governance.keys import KeyRing
    from governance.teams import Teams
    from governance.vault import Vault
    from policies import PolicyCatalog, PolicyEngine, PolicyStore

__all__ = ["ConsentOutcome", "Operations", "PurposeConsent"]

log = structlog.get_logger("storyvault")


def audience_page(terms: PurposeTerms, now: datetime, after: str | None, limit: int) -> Select[Any]:
    """One page of the audience of ``terms``: (customer id, pseudonym) of active
    customers whose legal basis allows it at ``now``, after the pseudonym ``after``,
    in pseudonym order. On PostgreSQL a merge join of two index-only scans, which
    read no table rows (the covering indexes of migration 0004); on SQLite the walk
    over the customers reads its index only."""
    subject_col = CUSTOMERS.subject
    query = (
        select(CUSTOMERS.id, subject_col)
        .where(
            CUSTOMERS.status == "active",
            allowed_condition(terms, now, subject_col, after=after or None),
        )
        .order_by(subject_col)
        .limit(limit)
    )
    if after:
        query = query.where(subject_col > after)
    return query


@dataclass(frozen=True, slots=True)
class ConsentOutcome:
    receipt: str
    ledger_index: int
    audit_index: int
    state: str
    event: ConsentEvent


@dataclass(frozen=True, slots=True)
class PurposeConsent:
    purpose: str
    description: str
    legal_basis: str
    sale_or_sharing: bool
    state: str
    since: datetime | None
    expires_at: datetime | None
    allowed: bool
    reason: str | None
    notice_version: str
    notice_sha256: str


class Operations:
    """Mixed into StoryVault; these are the collaborators it provides."""

    catalog: Catalog
    db: Database
    ring: KeyRing
    ledger: Ledger
    receipts: ReceiptSigner
    audit_log: TransparencyLog
    policy: PolicyEngine
    policy_store: PolicyStore
    gate: Gate
    teams: Teams
    vault: Vault

    # Provided by StoryVault; declared here so the mixin type-checks on its own.
    def require_admin(self, principal: Principal) -> None:
        raise NotImplementedError

    def check_purpose(self, purpose: str | None) -> str:
        raise NotImplementedError

    def _policy_catalog(self, teams: set[str]) -> PolicyCatalog:
        raise NotImplementedError

    async def audit_in(self, session: AsyncSession, entry: AuditEntry) -> int:
        raise NotImplementedError

    async def audit_writer_append(self, entry: AuditEntry) -> int:
        raise NotImplementedError

    # --- policies --------------------------------------------------------------
    async def list_policies(self) -> list[Rule]:
        return await self.policy_store.list_rules()

    async def add_policy(
        self, principal: Principal, spec: RuleSpec, request_id: str | None = None
    ) -> Rule:
        async def change(session: AsyncSession) -> Rule:
            teams = await self.teams.team_names(session)
            return await self.policy_store.add_rule(
                spec, self._policy_catalog(teams), session=session
            )

        return await self._change_policy(principal, "policy.add", change, request_id)

    async def remove_policy(
        self, principal: Principal, rule_id: str, request_id: str | None = None
    ) -> Rule:
        async def change(session: AsyncSession) -> Rule:
            return await self.policy_store.remove_rule(rule_id, session=session)

        return await self._change_policy(principal, "policy.remove", change, request_id)

    async def _change_policy(
        self,
        principal: Principal,
        operation: str,
        change: Callable[[AsyncSession], Awaitable[Rule]],
        request_id: str | None,
    ) -> Rule:
        """A policy change and its audit entry commit together; then this instance
        recompiles at once (the others through their watchers)."""
        self.require_admin(principal)
        async with self.db.write_session() as session, session.begin():
            rule = await change(session)
            await self.audit_in(
                session,
                AuditEntry(
                    kind=EntryKind.POLICY_CHANGE,
                    actor=principal.team,
                    actor_key_id=principal.key_id,
                    purpose=rule.purpose,
                    categories=(rule.category,),
                    request_id=request_id,
                    detail={
                        "operation": operation,
                        "rule_id": rule.id,
                        "rule": " ".join(rule.line()),
                    },
                ),
            )
        await self.policy.reload()
        log.info(operation, team=principal.team, rule_id=rule.id, version=self.policy.version)
        return rule

    async def explain_policy(
        self, team: str, category: str, action: str, purpose: str
    ) -> Explanation:
        await self.policy.reload()
        return self.policy.explain(team, category, action, purpose)

    # --- consent ---------------------------------------------------------------
    def _terms(self, purpose: str) -> Any:
        try:
            return self.ledger.terms(purpose)
        except UnknownPurpose:
            raise NotFound(f"unknown purpose '{purpose[:80]}'", code="unknown_purpose") from None

    async def consents_of(self, customer_id: str) -> list[PurposeConsent]:
        subject = self.ring.pseudonym(customer_id)
        async with self.db.session() as session:
            await self.vault.require_active(session, customer_id)
            states = await self.ledger.states(session, subject)
        now = self.ledger.now()
        out = []
        for purpose in self.catalog.purposes.values():
            state: ConsentState | None = states.get(purpose.name)
            reason = evaluate(state, self.ledger.terms(purpose.name), now)
            out.append(
                PurposeConsent(
                    purpose=purpose.name,
                    description=purpose.description,
                    legal_basis=purpose.legal_basis,
                    sale_or_sharing=purpose.sale_or_sharing,
                    state=state.state if state else "none",
                    since=state.since if state else None,
                    expires_at=state.expires_at if state else None,
                    allowed=reason is None,
                    reason=reason.value if reason else None,
                    notice_version=purpose.notice_version,
                    notice_sha256=purpose.notice_sha256,
                )
            )
        return out

    async def _record_consent(
        self,
        customer_id: str,
        purpose: str,
        *,
        granted: bool,
        channel: Channel,
        actor: str,
        actor_key_id: str | None,
        evidence: str | None,
        imported: bool,
        request_id: str | None,
    ) -> ConsentOutcome:
        terms = self._terms(purpose)
        subject = self.ring.pseudonym(customer_id)
        async with self.db.write_session() as session, session.begin():
            await self.vault.require_active(session, customer_id)
            if imported:
                event = await self.ledger.import_consent(
                    session,
                    subject,
                    purpose,
                    granted=granted,
                    actor=actor,
                    evidence=evidence or "",
                    channel=channel,
                )
            else:
                event = await self.ledger.record(
                    session,
                    subject,
                    purpose,
                    granted=granted,
                    channel=channel,
                    actor=actor,
                    evidence=evidence,
                )
            audit_index = await self.audit_in(
                session,
                AuditEntry(
                    kind=EntryKind.CONSENT,
                    actor=actor if actor_key_id else "customer",
                    actor_key_id=actor_key_id,
                    subject=subject,
                    purpose=purpose,
                    consent_index=event.ledger_index,
                    request_id=request_id,
                    detail={
                        "event": str(event.event_type),
                        "event_id": str(event.event_id),
                        "channel": str(event.channel),
                    },
                ),
            )
            state = await self.ledger.state(session, subject, purpose)
        CONSENT_EVENTS.labels(event_type=str(event.event_type)).inc()
        receipt = self.receipts.issue(event, terms, audit_leaf_index=audit_index)
        log.info(
            "consent.recorded",
            subject=subject,
            purpose=purpose,
            event_type=str(event.event_type),
            ledger_index=event.ledger_index,
        )
        return ConsentOutcome(
            receipt=receipt,
            ledger_index=event.ledger_index,
            audit_index=audit_index,
            state=state.state if state else "none",
            event=event,
        )

    async def set_my_consent(
        self,
        customer: CustomerPrincipal,
        purpose: str,
        *,
        granted: bool,
        request_id: str | None = None,
    ) -> ConsentOutcome:
        return await self._record_consent(
            customer.customer_id,
            purpose,
            granted=granted,
            channel=Channel.PORTAL,
            actor="customer",
            actor_key_id=None,
            evidence=None,
            imported=False,
            request_id=request_id,
        )

    async def import_consent(
        self,
        principal: Principal,
        customer_id: str,
        purpose: str,
        *,
        granted: bool,
        channel: str,
        evidence: str,
        request_id: str | None = None,
    ) -> ConsentOutcome:
        self._terms(purpose)
        # A write rule that allows something: a deny-only rule set grants no write.
        if not self.policy.table(principal.team, purpose, Action.WRITE).allowed:
            raise Forbidden(
                f"team '{principal.team}' has no write rule for purpose '{purpose}'",
                code="no_policy",
                reason="no_policy",
            )
        try:
            ch = Channel(channel)
        except ValueError:
            raise InvalidInput(
                "channel must be one of: api, import", code="invalid_channel"
            ) from None
        return await self._record_consent(
            customer_id,
            purpose,
            granted=granted,
            channel=ch,
            actor=principal.key_id,
            actor_key_id=principal.key_id,
            evidence=evidence,
            imported=True,
            request_id=request_id,
        )

    async def apply_gpc(self, customer_id: str) -> int:
        """Sec-GPC: 1 opts out of every sale/sharing purpose, once (idempotent)."""
        sharing = [p.name for p in self.catalog.purposes.values() if p.sale_or_sharing]
        if not sharing:
            return 0
        subject = self.ring.pseudonym(customer_id)
        async with self.db.session() as session:
            states = await self.ledger.states(session, subject)
        if all(states.get(p) is not None and states[p].state == "gpc_opted_out" for p in sharing):
            return 0
        async with self.db.write_session() as session, session.begin():
            events = await self.ledger.record_gpc(session, subject, sharing)
            for event in events:
                await self.audit_in(
                    session,
                    AuditEntry(
                        kind=EntryKind.CONSENT,
                        actor="customer",
                        subject=subject,
                        purpose=event.purpose,
                        consent_index=event.ledger_index,
                        detail={
                            "event": str(event.event_type),
                            "event_id": str(event.event_id),
                            "channel": "gpc",
                        },
                    ),
                )
        for event in events:
            CONSENT_EVENTS.labels(event_type=str(event.event_type)).inc()
        if events:
            log.info("consent.gpc", subject=subject, purposes=[e.purpose for e in events])
        return len(events)

    # --- audience ----------------------------------------------------------------
    async def audience(
        self, principal: Principal, purpose: str, *, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        """One page of customer ids whose legal basis allows ``purpose`` now, in the
        database (keyset pagination by pseudonym, so it scales to millions)."""
        purpose = self.check_purpose(purpose)
        self.gate.policy_table(principal, purpose, Action.READ)
        query = audience_page(self.ledger.terms(purpose), self.ledger.now(), after, limit)
        # Plain tuples on a read connection (autocommit on PostgreSQL): no ORM
        # session, no Row objects for a page of up to 10,000 ids.
        rows = await self.db.read(lambda conn: conn.execute(query).all(), bulk=True)
        cursor = rows[-1][1] if len(rows) == limit else None
        return [r[0] for r in rows], cursor

    # --- the customer's own story ------------------------------------------------
    async def my_story(self, customer: CustomerPrincipal, request_id: str | None) -> dict[str, Any]:
        """The whole story, decrypted, for its subject (GDPR Art. 15); audited too."""
        async with self.db.session() as session:
            story = await self.vault.read_story(session, customer.customer_id)
        categories = set(story.profile_categories.values()) | {c.category for c in story.chapters}
        await self.audit_writer_append(
            AuditEntry(
                kind=EntryKind.DISCLOSURE,
                actor="customer",
                subject=self.ring.pseudonym(customer.customer_id),
                purpose="data_subject.access",
                categories=tuple(sorted(categories)),
                request_id=request_id,
                detail={"operation": "me.story"},
            )
        )
        return {
            "customer_id": story.customer_id,
            "profile": story.profile,
            "chapters": [
                {
                    "id": c.id,
                    "category": c.category,
                    "kind": c.kind,
                    "occurred_at": c.occurred_at,
                    "author_team": c.author_team,
                    "body": c.body,
                }
                for c in story.chapters
            ],
        }

    # --- audit access ------------------------------------------------------------
    async def access_log(self, customer_id: str, *, cursor: int | None, limit: int) -> EntryPage:
        return await self.audit_log.list_entries(
            subject=self.ring.pseudonym(customer_id),
            kinds=[EntryKind.DISCLOSURE],
            cursor=cursor,
            limit=limit,
            descending=True,
        )
