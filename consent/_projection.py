"""Projection rules: event → state transition, replay, evaluation, SQL audience.

``transition`` is the single definition of how an event changes a pair's
standing; the ledger applies it when appending and ``replay`` folds it over the
log, so the projection table can always be rebuilt and checked from events.
``evaluate`` (Python) and ``allowed_condition`` (SQL) are two spellings of the
same decision and are tested against each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple, cast

from sqlalchemy import ColumnElement, Select, and_, exists, false, not_, or_, select, true
from sqlmodel import col

from ._errors import UniverseRequired
from ._models import ConsentEvent, ConsentState
from ._types import DpvStatus, EventType, LegalBasis, PurposeState, PurposeTerms, Reason

_IMPORTED_STATE = {
    DpvStatus.CONSENT_GIVEN: PurposeState.GRANTED,
    DpvStatus.RENEWED_CONSENT_GIVEN: PurposeState.GRANTED,
    DpvStatus.VALID_FOR_PROCESSING: PurposeState.GRANTED,
    DpvStatus.CONSENT_WITHDRAWN: PurposeState.WITHDRAWN,
    DpvStatus.CONSENT_REFUSED: PurposeState.WITHDRAWN,
    DpvStatus.OBJECTED: PurposeState.OBJECTED,
}

_DIRECT_STATE = {
    EventType.GRANT: PurposeState.GRANTED,
    EventType.WITHDRAW: PurposeState.WITHDRAWN,
    EventType.EXPIRE: PurposeState.EXPIRED,
    EventType.OBJECTION: PurposeState.OBJECTED,
    EventType.GPC_OPT_OUT: PurposeState.GPC_OPTED_OUT,
}


def state_after(event: ConsentEvent) -> PurposeState:
    """The standing an event leaves its pair in (independent of what came before)."""
    if event.event_type == EventType.IMPORTED:
        return _IMPORTED_STATE[DpvStatus(event.status)]
    return _DIRECT_STATE[EventType(event.event_type)]


def transition(current: ConsentState | None, event: ConsentEvent) -> ConsentState:
    """Apply one event to a pair's state; returns the (possibly same) row object."""
    new_state = state_after(event)
    row = current or ConsentState(
        subject=event.subject,
        purpose=event.purpose,
        state=PurposeState.NONE,
        since=event.captured_at,
        last_event_id=event.event_id,
        last_ledger_index=event.ledger_index,
    )
    row.state = new_state
    row.since = event.captured_at
    # Only a grant carries an expiry; any other standing is open-ended.
    row.expires_at = event.expires_at if new_state == PurposeState.GRANTED else None
    row.last_event_id = event.event_id
    row.last_ledger_index = event.ledger_index
    return row


def replay(events: Iterable[ConsentEvent]) -> dict[tuple[str, str], ConsentState]:
    """Fold events (in ledger order) into the state of every (subject, purpose)."""
    states: dict[tuple[str, str], ConsentState] = {}
    for event in sorted(events, key=lambda e: e.ledger_index):
        key = (event.subject, event.purpose)
        states[key] = transition(states.get(key), event)
    return states


class Standing(NamedTuple):
    """What :func:`evaluate` reads of a ``ConsentState`` row, for a caller that selected
    those columns itself (the gated read): building the SQLModel row costs more."""

    state: str
    since: datetime
    expires_at: datetime | None


def _effective_expiry(state: ConsentState | Standing, terms: PurposeTerms) -> datetime | None:
    """The earlier of the stored expiry and ``since + max_age`` under today's terms.

    Shortening a purpose's ``max_age`` in the catalog therefore takes effect on
    existing grants at once (fail closed).
    """
    candidates = [state.expires_at] if state.expires_at is not None else []
    if terms.max_age is not None:
        candidates.append(state.since + terms.max_age)
    return min(candidates) if candidates else None


def evaluate(
    state: ConsentState | Standing | None, terms: PurposeTerms, now: datetime
) -> Reason | None:
    """Is processing for ``terms`` allowed for this subject now? None, or why not."""
    basis = terms.legal_basis
    if basis in (LegalBasis.CONTRACT, LegalBasis.LEGAL_OBLIGATION):
        return None
    standing = PurposeState(state.state) if state is not None else PurposeState.NONE
    if basis == LegalBasis.LEGITIMATE_INTEREST:
        # A GPC opt-out counts as an objection to a legitimate-interest sale.
        if standing in (PurposeState.OBJECTED, PurposeState.GPC_OPTED_OUT):
            return Reason.OBJECTED
        return None
    # Consent: only an active, unexpired grant counts.
    if state is None or standing == PurposeState.NONE:
        return Reason.NO_CONSENT
    if standing == PurposeState.GRANTED:
        expiry = _effective_expiry(state, terms)
        if expiry is not None and now >= expiry:
            return Reason.CONSENT_EXPIRED
        return None
    if standing == PurposeState.EXPIRED:
        return Reason.CONSENT_EXPIRED
    if standing == PurposeState.OBJECTED:
        # Only reachable if the purpose's basis changed from legitimate interest.
        return Reason.OBJECTED
    return Reason.CONSENT_WITHDRAWN  # withdrawn, gpc_opted_out


def _granted_now(terms: PurposeTerms, now: datetime) -> ColumnElement[bool]:
    """SQL twin of the GRANTED branch of :func:`evaluate` on ``consent_state``."""
    conditions = [
        col(ConsentState.state) == PurposeState.GRANTED.value,
        or_(col(ConsentState.expires_at).is_(None), col(ConsentState.expires_at) > now),
    ]
    if terms.max_age is not None:
        conditions.append(col(ConsentState.since) > now - terms.max_age)
    return and_(*conditions)


def allowed_condition(
    terms: PurposeTerms,
    now: datetime,
    subject: ColumnElement[str],
    *,
    after: str | None = None,
) -> ColumnElement[bool]:
    """A boolean SQL expression: is ``terms`` currently allowed for ``subject``?

    ``subject`` is a column of the caller's table holding subject pseudonyms; the
    expression is a correlated (NOT) EXISTS on the ``consent_state`` primary key,
    so it can filter a customers table of any size. Equivalent to :func:`evaluate`.

    ``after``: the caller only wants subjects after this one (keyset pagination).
    Repeating the bound inside the EXISTS changes no answer, but lets PostgreSQL
    start its merge join at the page instead of scanning the projection from the
    first subject on every page (measured at 1M customers: 0.6 s a page, rising).
    """
    basis = terms.legal_basis
    if basis in (LegalBasis.CONTRACT, LegalBasis.LEGAL_OBLIGATION):
        return true()
    pair = and_(col(ConsentState.subject) == subject, col(ConsentState.purpose) == terms.name)
    if after is not None:
        pair = and_(pair, col(ConsentState.subject) > after)
    if basis == LegalBasis.LEGITIMATE_INTEREST:
        blocked = col(ConsentState.state).in_(
            [PurposeState.OBJECTED.value, PurposeState.GPC_OPTED_OUT.value]
        )
        return not_(exists().where(pair, blocked))
    if basis == LegalBasis.CONSENT:
        return exists().where(pair, _granted_now(terms, now))
    return false()  # pragma: no cover - exhaustive over LegalBasis


def audience_query(
    terms: PurposeTerms,
    now: datetime,
    *,
    after: str | None = None,
    limit: int = 1000,
    universe: ColumnElement[str] | None = None,
) -> Select[str]:
    """One page of subjects for whom ``terms`` is allowed now, ordered by subject.

    Keyset pagination: pass the last subject of a page as ``after``. For a
    consent purpose the projection alone answers (an index range scan on
    ``ix_consent_state_audience``). Purposes allowed by default (legitimate
    interest, contract, legal obligation) include people with no consent row at
    all, so they need ``universe``: the caller's column of every subject
    (e.g. the customers table's pseudonym column).
    """
    if universe is None:
        if terms.legal_basis != LegalBasis.CONSENT:
            raise UniverseRequired(
                f"purpose {terms.name!r} is based on {terms.legal_basis.value}; "
                "its audience needs the set of all subjects"
            )
        subject = cast("ColumnElement[str]", col(ConsentState.subject))
        query = select(subject).where(
            col(ConsentState.purpose) == terms.name, _granted_now(terms, now)
        )
    else:
        subject = universe
        query = select(subject).where(allowed_condition(terms, now, subject, after=after))
    if after is not None:
        query = query.where(subject > after)
    return query.order_by(subject).limit(limit)
