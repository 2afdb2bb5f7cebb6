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

import msgspec
import structlog
from sqlalchemy import ARRAY, String, and_, bindparam, column, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import AuditEntry, Batched, EntryKind, Prepared, Withheld
from consent import ConsentState, Ledger, Standing, evaluate
from governance.catalog import Catalog
from governance.db import Database, ReadSteps
from governance.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from governance.keys import KeyRing
from governance.logs import log_decision
from governance.metrics import count_decisions, count_withheld
from governance.models import CATEGORY_STATES, CUSTOMERS, ApiKeyRow, CustomerRow, TeamRow
from governance.teams import PresentedKey, Principal, Teams
from governance.vault import Chapter, LoadedStory, Vault
from policies import Action, DecisionTable, Mask, PolicyEngine, apply_mask

__all__ = ["AuditSink", "Gate", "GateDecision", "StoryView"]

log = structlog.get_logger("storyvault.gate")


class _Lookup:
    """Marker: the consent standing is not known yet; look it up."""


_LOOKUP = _Lookup()

_CONSENT = ConsentState.__table__.c  # type: ignore[attr-defined]

# The customer and their consent standing for the purpose, in one round trip.
_CUSTOMER_AND_CONSENT = Prepared(
    select(
        CUSTOMERS.status,
        CUSTOMERS.restricted,
        CUSTOMERS.story_version,
        _CONSENT.state,
        _CONSENT.since,
        _CONSENT.expires_at,
    )
    .outerjoin(
        ConsentState,
        and_(_CONSENT.subject == CUSTOMERS.subject, _CONSENT.purpose == bindparam("purpose")),
    )
    .where(CUSTOMERS.id == bindparam("customer_id"))
)
# The same with the presented API key's row in front (all None where either is
# missing): a read that brings its key unresolved (``PresentedKey``) authenticates
# in the same round trip. Every table is a left join on one constant row, each
# an indexed lookup of at most one row (a unique digest, primary keys), so the
# statement returns exactly one row. Written flat rather than as a join of two
# subqueries: SQLite would materialize each subquery into a temporary table on
# every read (measured: a third of the statement's time). The team is the teams
# row's name, so a key whose team row is missing reads as no key at all (as the
# inner join of ``KEY_LOOKUP`` has it).
_O = select(literal_column("1").label("one")).subquery("o")
_K = ApiKeyRow.__table__.alias("k")  # type: ignore[attr-defined]
_T = TeamRow.__table__.alias("t")  # type: ignore[attr-defined]
_C = CustomerRow.__table__.alias("c")  # type: ignore[attr-defined]
_S = ConsentState.__table__.alias("s")  # type: ignore[attr-defined]
_KEY_CUSTOMER_AND_CONSENT_COLUMNS = (
    _K.c.id,
    _T.c.name,
    _K.c.revoked_at,
    _T.c.roles,
    _C.c.status,
    _C.c.restricted,
    _C.c.story_version,
    _S.c.state,
    _S.c.since,
    _S.c.expires_at,
)
# On PostgreSQL the lookups of reads that wait at the same time go as one statement
# (``Batched``): the same joins from a row per lookup, each lookup's values taken
# from arrays (``unnest ... WITH ORDINALITY``), its position first.
_Q = (
    func.unnest(
        bindparam("digest", type_=ARRAY(String)),
        bindparam("customer_id", type_=ARRAY(String)),
        bindparam("purpose", type_=ARRAY(String)),
    )
    .table_valued(
        column("digest", String),
        column("customer_id", String),
        column("purpose", String),
        with_ordinality="n",
    )
    .render_derived(name="q")
)


def _key_customer_and_consent(start: Any, digest: Any, customer_id: Any, purpose: Any) -> Any:
    """The lookup's joins from ``start``, with the values looked up for."""
    return (
        start.outerjoin(_K, _K.c.digest == digest)
        .outerjoin(_T, _T.c.name == _K.c.team)
        .outerjoin(_C, _C.c.id == customer_id)
        .outerjoin(_S, and_(_S.c.subject == _C.c.subject, _S.c.purpose == purpose))
    )


_KEY_CUSTOMER_AND_CONSENT = Batched(
    Prepared(
        select(*_KEY_CUSTOMER_AND_CONSENT_COLUMNS).select_from(
            _key_customer_and_consent(
                _O, bindparam("digest"), bindparam("customer_id"), bindparam("purpose")
            )
        )
    ),
    select(_Q.c.n, *_KEY_CUSTOMER_AND_CONSENT_COLUMNS).select_from(
        _key_customer_and_consent(_Q, _Q.c.digest, _Q.c.customer_id, _Q.c.purpose)
    ),
)
_CATEGORY_STATES = Prepared(
    select(CATEGORY_STATES.category, CATEGORY_STATES.state, CATEGORY_STATES.hold_purpose).where(
        CATEGORY_STATES.customer_id == bindparam("customer_id")
    )
)


def _unknown_key() -> Unauthorized:
    """The 401 of a presented key that is unknown or revoked (the middleware's words)."""
    return Unauthorized("the API key is unknown or revoked")


@dataclass(slots=True)
class _Loaded:
    """What the gated read's one database visit returns."""

    principal: Principal
    status: str
    decision: GateDecision
    story: LoadedStory


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
    chapters: list[Chapter] | msgspec.Raw  # Raw: the cached chapters' JSON, sent as is
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
        if isinstance(consent_state, _Lookup):
            basis_reason = await self.ledger.check(session, subject, purpose)
        else:
            basis_reason = evaluate(consent_state, self.ledger.terms(purpose), self.ledger.now())
        return self._decision(table, purpose, basis_reason, categories)

    def _decision(
        self,
        table: DecisionTable,
        purpose: str,
        basis_reason: str | None,
        categories: Iterable[str] | None = None,
    ) -> GateDecision:
        decision = GateDecision(purpose=purpose, table=table, basis_reason=basis_reason)
        for category in categories if categories is not None else self._all_categories:
            d = table.decide(category)
            if not d.allowed:
                decision.withheld.append((category, d.reason or "no_policy"))
            elif basis_reason is not None:
                decision.withheld.append((category, basis_reason))
            else:
                decision.granted[category] = d.mask
        return decision

    async def apply_category_states(
        self, session: AsyncSession, customer_id: str, decision: GateDecision
    ) -> None:
        """``_apply_category_states`` with the customer's states looked up."""
        states = await self.vault.category_states(session, customer_id)
        self._apply_category_states(
            ((c, state, hold) for c, (state, hold) in states.items()), decision
        )

    @staticmethod
    def _apply_category_states(
        states: Iterable[tuple[str, str, str | None]], decision: GateDecision
    ) -> None:
        """Erased categories are gone for every purpose; held ones serve only their
        legal purpose (reason codes ``erased`` and ``legal_hold_only``)."""
        for category, state, hold_purpose in states:
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

    def _read_table(self, principal: Principal, purpose: str) -> DecisionTable:
        """``policy_table`` for a read; a 403 (no rule) counts every category withheld."""
        try:
            return self.policy_table(principal, purpose, Action.READ)
        except Forbidden:
            count_withheld("read", [(c, "no_policy") for c in self._all_categories])
            raise

    @staticmethod
    def _resolve(key: PresentedKey) -> ReadSteps[Principal]:
        """The principal of ``key`` on its own (steps for ``Database.query``); 401 if
        it is unknown or revoked."""
        principal = yield from Teams.lookup(key)
        if principal is None:
            raise _unknown_key()
        return principal

    async def principal(self, db: Database, credential: Principal | PresentedKey) -> Principal:
        """The principal of ``credential``, looking a ``PresentedKey`` up on its own
        (401 if it is unknown or revoked): for the gated read's answers that come
        before its round trip, such as a 400 for a malformed request."""
        if isinstance(credential, Principal):
            return credential
        return await db.query(lambda: self._resolve(credential))

    def _load(
        self, credential: Principal | PresentedKey, customer_id: str, purpose: str
    ) -> ReadSteps[_Loaded]:
        """The read's whole database visit (``Database.query``): the customer and
        consent standing (with the API key's row when it comes unresolved: 401
        unless it is a valid key, then 403 unless the team has a read rule), the
        category states if any were erased or held, then exactly the granted
        parts of the story (from the story cache, else their sealed rows)."""
        params = {"customer_id": customer_id, "purpose": purpose}
        if isinstance(credential, PresentedKey):
            if credential.digest is None:
                raise _unknown_key()
            found = yield (_KEY_CUSTOMER_AND_CONSENT, {**params, "digest": credential.digest})
            principal = Teams.principal_of(*found[0][:4])
            if principal is None:
                raise _unknown_key()
            table = self._read_table(principal, purpose)
            row = found[0][4:] if found[0][4] is not None else None
        else:
            principal = credential
            table = self._read_table(principal, purpose)
            found = yield (_CUSTOMER_AND_CONSENT, params)
            row = found[0] if found else None
        # An erased customer exists only for the purposes that hold some of their
        # data (invoices under the tax law's legal obligation); for others, 404.
        if row is None or (row[0] == "erased" and purpose not in self._hold_purposes):
            raise NotFound("no such customer", code="customer_not_found")
        status, restricted, version, state, since, expires_at = row
        consent = None if state is None else Standing(state, since, expires_at)
        basis_reason = evaluate(consent, self.ledger.terms(purpose), self.ledger.now())
        decision = self._decision(table, purpose, basis_reason)
        if restricted:
            states = yield (_CATEGORY_STATES, {"customer_id": customer_id})
            self._apply_category_states(states, decision)
        # Everything granted (the common case of a broad purpose): the unfiltered
        # statement, which spares expanding a dozen IN parameters per read.
        granted = decision.granted
        wanted = None if len(granted) == len(self._all_categories) else sorted(granted)
        story = yield from self.vault.cached_story(customer_id, version, wanted)
        return _Loaded(principal=principal, status=status, decision=decision, story=story)

    async def read_story(
        self,
        db: Database,
        credential: Principal | PresentedKey,
        customer_id: str,
        purpose: str | None,
        request_id: str | None,
    ) -> StoryView:
        """The gated read. ``credential`` is the team's principal, or its API key still
        to be looked up (``PresentedKey``), which then happens in the read's own
        round trip. Either way the answer is 401 (key), then 400 (purpose), then
        403 (no read rule), then 404 (customer), as with the key looked up first."""
        if purpose not in self.catalog.purposes:
            await self.principal(db, credential)  # 401 before the 400
        purpose = self.check_purpose(purpose)
        # One visit to the database (no connection is held past it, in particular
        # not while waiting for the audit group commit, which needs one itself).
        loaded = await db.query(lambda: self._load(credential, customer_id, purpose))
        principal = loaded.principal
        decision = loaded.decision
        subject = self.ring.pseudonym(customer_id)
        story = await self.vault.open_loaded(loaded.status, loaded.story)
        profile = {
            name: self._mask(decision.granted[story.profile_categories[name]], value)
            for name, value in story.profile.items()
        }
        granted = decision.granted
        # Chapters from the story cache stay the JSON it holds (the response's own
        # encoding of them) unless a mask applies to one of their categories.
        chapters = story.chapters
        if isinstance(chapters, msgspec.Raw) and any(
            granted[c] != Mask.NONE for c in story.chapter_categories
        ):
            chapters = story.opened_chapters()
        if not isinstance(chapters, msgspec.Raw):
            chapters = [
                ch
                if granted[ch.category] == Mask.NONE
                else msgspec.structs.replace(ch, body=self._mask(granted[ch.category], ch.body))
                for ch in chapters
            ]
        withheld = [{"category": c, "reason": r} for c, r in decision.withheld]
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
        log_decision(
            log,
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
