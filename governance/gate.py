"""The gate: the purpose-bound read (and write) path of the product.

For a (team, purpose) the compiled policy table says which categories may be
disclosed and with which mask; the purpose's legal basis, checked per
customer against the consent projection, can withhold them all; the vault
decrypts only what remains; the audit entry of the disclosure is durable
before anything leaves. Any error on the way means nothing is disclosed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from audit import AuditEntry, EntryKind, Withheld
from consent import ConsentState, Ledger, evaluate
from governance.catalog import Catalog
from governance.errors import Forbidden, InvalidInput, NotFound
from governance.keys import KeyRing
from governance.metrics import count_decisions, count_withheld
from governance.models import CUSTOMERS, CustomerRow
from governance.teams import Principal
from governance.vault import Vault
from policies import Action, DecisionTable, Mask, PolicyEngine, apply_mask

__all__ = ["AuditSink", "Gate", "GateDecision", "StoryView"]

log = structlog.get_logger("storyvault.gate")


class _Lookup:
    """Marker: the consent standing is not known yet; look it up."""


_LOOKUP = _Lookup()


class AuditSink(Protocol):
    """Where the gate's entries go; ``append`` returns once the entry is durable."""

    async def append(self, entry: AuditEntry) -> int: ...


@dataclass(slots=True)
class GateDecision:
    """What (team, purpose) may do with one customer's story, and why not the rest."""

    purpose: str
    table: DecisionTable
    granted: dict[str, Mask] = field(default_factory=dict)
    withheld: list[tuple[str, str]] = field(default_factory=list)
    basis_reason: str | None = None


@dataclass(slots=True)
class StoryView:
    customer_id: str
    purpose: str
    profile: dict[str, Any]
    chapters: list[dict[str, Any]]
    withheld: list[dict[str, str]]
    audit_index: int


class Gate:
    def __init__(
        self,
        catalog: Catalog,
        policy: PolicyEngine,
        ledger: Ledger,
        vault: Vault,
        ring: KeyRing,
        audit: AuditSink,
    ) -> None:
        self.catalog = catalog
        self.policy = policy
        self.ledger = ledger
        self.vault = vault
        self.ring = ring
        self.audit = audit
        self._mask_key = ring.derived("mask-pseudonym/v1")
        self._all_categories = tuple(sorted(catalog.categories))
        self._hold_purposes = frozenset(h.purpose for h in catalog.held_categories().values())

    def check_purpose(self, purpose: str | None) -> str:
        if not purpose:
            raise InvalidInput("the 'purpose' query parameter is required", code="purpose_required")
        if purpose not in self.catalog.purposes:
            raise InvalidInput(
                f"unknown purpose '{purpose[:80]}'",
                code="unknown_purpose",
                reason="unknown_purpose",
            )
        return purpose

    def policy_table(self, principal: Principal, purpose: str, action: Action) -> DecisionTable:
        table = self.policy.table(principal.team, purpose, action)
        if not table.has_any_rule:
            raise Forbidden(
                f"team '{principal.team}' has no {action.value} rule for purpose '{purpose}'",
                code="no_policy",
                reason="no_policy",
            )
        return table

    async def decide(
        self,
        session: AsyncSession,
        principal: Principal,
        subject: str,
        purpose: str,
        action: Action = Action.READ,
        categories: Iterable[str] | None = None,
        consent_state: ConsentState | _Lookup | None = _LOOKUP,
    ) -> GateDecision:
        """Policy table, then the purpose's legal basis for this customer (no caching of it:
        a withdrawal counts from the very next request, on every instance)."""
        table = self.policy_table(principal, purpose, action)
        decision = GateDecision(purpose=purpose, table=table)
        if isinstance(consent_state, _Lookup):
            decision.basis_reason = await self.ledger.check(session, subject, purpose)
        else:
            decision.basis_reason = evaluate(
                consent_state, self.ledger.terms(purpose), self.ledger.now()
            )
        for category in categories if categories is not None else self._all_categories:
            d = table.decide(category)
            if not d.allowed:
                decision.withheld.append((category, d.reason or "no_policy"))
            elif decision.basis_reason is not None:
                decision.withheld.append((category, decision.basis_reason))
            else:
                decision.granted[category] = d.mask
        return decision

    async def _apply_category_states(
        self, session: AsyncSession, customer_id: str, decision: GateDecision
    ) -> None:
        """Erased categories are gone for every purpose; held ones serve only their
        legal purpose (reason codes ``erased`` and ``legal_hold_only``)."""
        states = await self.vault.category_states(session, customer_id)
        for category, (state, hold_purpose) in states.items():
            if state == "erased":
                reason = "erased"
            elif hold_purpose != decision.purpose:
                reason = "legal_hold_only"
            else:
                continue
            if category in decision.granted:
                del decision.granted[category]
            decision.withheld = [(c, r) for c, r in decision.withheld if c != category]
            decision.withheld.append((category, reason))
        decision.withheld.sort()

    def _mask(self, mask: Mask, value: Any) -> Any:
        if mask == Mask.NONE:
            return value
        return apply_mask(mask, value, pseudonym_key=self._mask_key)

    async def read_story(
        self,
        session: AsyncSession,
        principal: Principal,
        customer_id: str,
        purpose: str,
        request_id: str | None,
    ) -> StoryView:
        purpose = self.check_purpose(purpose)
        try:
            self.policy_table(principal, purpose, Action.READ)  # no rule: 403 before any lookup
        except Forbidden:
            count_withheld("read", [(c, "no_policy") for c in self._all_categories])
            raise
        # The customer and their consent standing for this purpose in one round trip.
        row = (
            await session.execute(
                select(CustomerRow, ConsentState)
                .outerjoin(
                    ConsentState,
                    and_(
                        col(ConsentState.subject) == CUSTOMERS.subject,
                        col(ConsentState.purpose) == purpose,
                    ),
                )
                .where(CUSTOMERS.id == customer_id)
            )
        ).first()
        customer = None if row is None else row[0]
        # An erased customer exists only for the purposes that hold some of their
        # data (invoices under the tax law's legal obligation); for others, 404.
        if customer is None or (customer.status == "erased" and purpose not in self._hold_purposes):
            raise NotFound("no such customer", code="customer_not_found")
        subject = self.ring.pseudonym(customer_id)
        assert row is not None
        decision = await self.decide(session, principal, subject, purpose, consent_state=row[1])
        if customer.restricted:
            await self._apply_category_states(session, customer_id, decision)
        story = await self.vault.read_story(
            session, customer_id, decision.granted, customer=customer
        )
        profile = {
            name: self._mask(decision.granted[story.profile_categories[name]], value)
            for name, value in story.profile.items()
        }
        chapters = [
            {
                "id": ch.id,
                "category": ch.category,
                "kind": ch.kind,
                "occurred_at": ch.occurred_at,
                "author_team": ch.author_team,
                "body": self._mask(decision.granted[ch.category], ch.body),
            }
            for ch in story.chapters
        ]
        withheld = [{"category": c, "reason": r} for c, r in decision.withheld]
        # The reads are done: give the connection back to the pool before waiting
        # for the group commit, which needs a connection from the same pool. Held
        # here, as many waiting reads as the pool has connections starve the audit
        # writer and every read times out (found by `make bench`).
        await session.close()
        # Data leaves only after its audit entry is durable: the append returns
        # once the group commit holding it has committed. If it fails, the
        # exception propagates and the caller answers 503 with nothing disclosed.
        index = await self.audit.append(
            AuditEntry(
                kind=EntryKind.DISCLOSURE if decision.granted else EntryKind.DENIAL,
                actor=principal.team,
                actor_key_id=principal.key_id,
                subject=subject,
                purpose=purpose,
                policy_version=decision.table.version,
                categories=tuple(sorted(decision.granted)),
                withheld=tuple(Withheld(category=c, reason=r) for c, r in decision.withheld),
                request_id=request_id,
                detail={"operation": "story.read"},
            )
        )
        count_decisions("read", "disclosed", len(decision.granted))
        count_withheld("read", decision.withheld)
        log.info(
            "gate.read",
            team=principal.team,
            subject=subject,
            purpose=purpose,
            disclosed=sorted(decision.granted),
            withheld=[f"{c}:{r}" for c, r in decision.withheld],
            policy_version=decision.table.version,
            audit_index=index,
        )
        return StoryView(
            customer_id=customer_id,
            purpose=purpose,
            profile=profile,
            chapters=chapters,
            withheld=withheld,
            audit_index=index,
        )

    async def check_write(
        self,
        session: AsyncSession | None,
        principal: Principal,
        purpose: str,
        categories: Iterable[str],
        subject: str | None,
    ) -> DecisionTable:
        """Every category written must be allowed by a write rule (and, for an existing
        customer, by the purpose's legal basis); otherwise 403 with the reason."""
        purpose = self.check_purpose(purpose)
        try:
            table = self.policy_table(principal, purpose, Action.WRITE)
        except Forbidden:
            count_withheld("write", [(c, "no_policy") for c in set(categories)])
            raise
        for category in sorted(set(categories)):
            d = table.decide(category)
            if not d.allowed:
                count_withheld("write", [(category, d.reason or "no_policy")])
                log.info(
                    "gate.write_denied",
                    team=principal.team,
                    purpose=purpose,
                    category=category,
                    reason=d.reason,
                )
                raise Forbidden(
                    f"team '{principal.team}' may not write '{category}' for '{purpose}'",
                    code=d.reason or "no_policy",
                    reason=d.reason or "no_policy",
                )
        if subject is not None and session is not None:
            reason = await self.ledger.check(session, subject, purpose)
            if reason is not None:
                count_withheld("write", [(c, str(reason)) for c in set(categories)])
                raise Forbidden(
                    f"the legal basis of '{purpose}' is not met for this customer",
                    code=reason,
                    reason=reason,
                )
        count_decisions("write", "allowed", len(set(categories)))
        return table
