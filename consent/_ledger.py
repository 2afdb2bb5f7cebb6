"""The consent ledger: sequenced appends, projection upkeep, lookups, verification.

Sequencing. Many processes may append to one database; the ledger must still be
one gap-free total order with a single hash chain. Every append transaction
first takes the ledger's sequencing lock and only then reads the last index and
hash:

* PostgreSQL: ``pg_advisory_xact_lock(CONSENT_LEDGER_LOCK_KEY)``, released at
  commit/rollback. The key is the ASCII bytes ``SV-CONS1`` as a big-endian
  int64; other packages must use different keys (e.g. the audit log).
* SQLite: the first statement of the transaction is a (no-op) write, which takes
  SQLite's single RESERVED lock before anything is read, so two appenders can
  never read the same last index (the same effect as ``BEGIN IMMEDIATE``).

On PostgreSQL the append transaction must run at READ COMMITTED (the
default): each statement after the lock then sees every append committed
before the lock was granted. Under REPEATABLE READ the snapshot would be taken
before waiting for the lock.

The lock also covers the read-decide-write of the projection row, so rules that
depend on the current state (GPC idempotency, lifting an objection, renewed
consent) see the state as of their own position in the ledger.

Transactions. If the session is not in a transaction, each call opens one and
commits it. If the caller already has a transaction open, the call joins it and
only flushes: the caller commits, and holds the sequencing lock until then, so
it should commit promptly. On SQLite, the caller's transaction must not have
read under a deferred write lock upgrade; the simplest rule is to call the
ledger on a fresh session.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from ._errors import (
    EvidenceRequired,
    InvalidActor,
    InvalidCaptureTime,
    InvalidChannel,
    InvalidSubject,
    LedgerUnavailable,
    NotConsentBased,
    UnknownPurpose,
)
from ._models import GENESIS_HASH, ConsentEvent, ConsentState, chain_hash
from ._projection import audience_query, evaluate, transition
from ._types import (
    CUSTOMER_ACTOR,
    SYSTEM_ACTOR,
    Channel,
    DpvStatus,
    EventType,
    LegalBasis,
    PurposeState,
    PurposeTerms,
    Reason,
)

CONSENT_LEDGER_LOCK_KEY = int.from_bytes(b"SV-CONS1", "big")  # 6005036920261727025
"""PostgreSQL advisory lock key that sequences consent ledger appends."""

_MAX_TEXT = 200
_MAX_EVIDENCE = 2000
_DIRECT_CHANNELS = frozenset({Channel.PORTAL, Channel.API})
_IMPORT_CHANNELS = frozenset({Channel.IMPORT, Channel.API})


@dataclass(frozen=True, slots=True)
class _Draft:
    """What a rule decided to append, before sequencing fills in index and hashes."""

    event_type: EventType
    status: DpvStatus
    channel: Channel
    actor: str
    evidence: str | None = None
    captured_at: datetime | None = None


_Decide = Callable[[ConsentState | None, PurposeTerms], _Draft | None]


def _check_subject(subject: str) -> None:
    # Pseudonyms only: an e-mail or free text here would put personal data into
    # an append-only log that erasure cannot touch.
    if (
        not subject
        or len(subject) > _MAX_TEXT
        or "@" in subject
        or any(ch.isspace() for ch in subject)
    ):
        raise InvalidSubject("subject must be an opaque pseudonym (no e-mail, no spaces)")


def _check_actor(actor: str) -> None:
    if not actor or len(actor) > _MAX_TEXT or "@" in actor:
        raise InvalidActor("actor must be 'customer', 'system' or a team key id")


def _granted_before(state: ConsentState | None) -> bool:
    return state is not None and state.state in (PurposeState.GRANTED, PurposeState.EXPIRED)


class Ledger:
    """Append-only consent ledger over the caller's database session.

    ``purposes`` are the catalog's terms; the ledger holds no other configuration.
    ``clock`` returns timezone-aware UTC now (injectable for tests).
    """

    def __init__(
        self,
        purposes: Iterable[PurposeTerms],
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._purposes: dict[str, PurposeTerms] = {}
        self.set_purposes(purposes)
        self._clock = clock or (lambda: datetime.now(UTC))

    # -- catalog -----------------------------------------------------------------

    def set_purposes(self, purposes: Iterable[PurposeTerms]) -> None:
        """Replace the known purposes (e.g. after the catalog changed)."""
        self._purposes = {terms.name: terms for terms in purposes}

    @property
    def purposes(self) -> Mapping[str, PurposeTerms]:
        return dict(self._purposes)

    def terms(self, purpose: str) -> PurposeTerms:
        try:
            return self._purposes[purpose]
        except KeyError:
            raise UnknownPurpose(f"unknown purpose {purpose!r}") from None

    def now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock must return a timezone-aware datetime")
        return now.astimezone(UTC)

    # -- recording ---------------------------------------------------------------

    async def record(
        self,
        session: AsyncSession,
        subject: str,
        purpose: str,
        *,
        granted: bool,
        channel: Channel = Channel.PORTAL,
        actor: str = CUSTOMER_ACTOR,
        evidence: str | None = None,
    ) -> ConsentEvent:
        """The person's yes/no for a purpose (``PUT /v1/me/consents/{purpose}``)."""
        if granted:
            return await self.grant(
                session, subject, purpose, channel=channel, actor=actor, evidence=evidence
            )
        return await self.withdraw(
            session, subject, purpose, channel=channel, actor=actor, evidence=evidence
        )

    async def grant(
        self,
        session: AsyncSession,
        subject: str,
        purpose: str,
        *,
        channel: Channel = Channel.PORTAL,
        actor: str = CUSTOMER_ACTOR,
        evidence: str | None = None,
    ) -> ConsentEvent:
        """Grant a consent purpose, or lift an objection to a legitimate-interest one.

        Lifting is recorded as a ``grant`` event on the legitimate-interest purpose
        with status ``dpv:ConsentStatusValidForProcessing``; it is only possible
        while an objection (or GPC opt-out) stands, otherwise there is nothing to
        grant and the call fails with ``not_consent_based``.
        """
        channel = self._direct_channel(channel)

        def decide(state: ConsentState | None, terms: PurposeTerms) -> _Draft:
            if terms.legal_basis == LegalBasis.CONSENT:
                status = (
                    DpvStatus.RENEWED_CONSENT_GIVEN
                    if _granted_before(state)
                    else DpvStatus.CONSENT_GIVEN
                )
                return _Draft(EventType.GRANT, status, channel, actor, evidence)
            if (
                terms.legal_basis == LegalBasis.LEGITIMATE_INTEREST
                and state is not None
                and state.state in (PurposeState.OBJECTED, PurposeState.GPC_OPTED_OUT)
            ):
                return _Draft(
                    EventType.GRANT, DpvStatus.VALID_FOR_PROCESSING, channel, actor, evidence
                )
            raise _not_consent_based(terms, "granted")

        return await self._append_one(session, subject, purpose, actor, decide)

    async def withdraw(
        self,
        session: AsyncSession,
        subject: str,
        purpose: str,
        *,
        channel: Channel = Channel.PORTAL,
        actor: str = CUSTOMER_ACTOR,
        evidence: str | None = None,
    ) -> ConsentEvent:
        """Withdraw consent; on a legitimate-interest purpose this records an objection."""
        channel = self._direct_channel(channel)

        def decide(_state: ConsentState | None, terms: PurposeTerms) -> _Draft:
            if terms.legal_basis == LegalBasis.CONSENT:
                return _Draft(
                    EventType.WITHDRAW, DpvStatus.CONSENT_WITHDRAWN, channel, actor, evidence
                )
            if terms.legal_basis == LegalBasis.LEGITIMATE_INTEREST:
                return _Draft(EventType.OBJECTION, DpvStatus.OBJECTED, channel, actor, evidence)
            raise _not_consent_based(terms, "withdrawn")

        return await self._append_one(session, subject, purpose, actor, decide)

    async def record_objection(
        self,
        session: AsyncSession,
        subject: str,
        purpose: str,
        *,
        channel: Channel = Channel.PORTAL,
        actor: str = CUSTOMER_ACTOR,
        evidence: str | None = None,
    ) -> ConsentEvent:
        """Art. 21 objection. Same as :meth:`withdraw` (which also withdraws consent)."""
        return await self.withdraw(
            session, subject, purpose, channel=channel, actor=actor, evidence=evidence
        )

    async def record_gpc(
        self,
        session: AsyncSession,
        subject: str,
        purposes: Iterable[str] | None = None,
    ) -> list[ConsentEvent]:
        """A ``Sec-GPC: 1`` request: opt out of every sale/sharing purpose given.

        ``purposes`` defaults to all known purposes; non-sale purposes are skipped.
        Idempotent: a purpose already in ``gpc_opted_out`` gets no new event, so
        the returned list is empty for a repeated signal. All opt-outs of one call
        are appended in one transaction.
        """
        names = list(self._purposes) if purposes is None else list(purposes)
        selected = [self.terms(name) for name in names]
        selected = [terms for terms in selected if terms.sale_or_sharing]
        selected = [
            terms
            for terms in selected
            if terms.legal_basis in (LegalBasis.CONSENT, LegalBasis.LEGITIMATE_INTEREST)
        ]

        def decide(state: ConsentState | None, _terms: PurposeTerms) -> _Draft | None:
            if state is not None and state.state == PurposeState.GPC_OPTED_OUT:
                return None
            was_granted = state is not None and state.state == PurposeState.GRANTED
            status = DpvStatus.CONSENT_WITHDRAWN if was_granted else DpvStatus.CONSENT_REFUSED
            return _Draft(EventType.GPC_OPT_OUT, status, Channel.GPC, CUSTOMER_ACTOR)

        _check_subject(subject)
        events: list[ConsentEvent] = []
        async with self._sequenced(session):
            for terms in selected:
                event = await self._append_locked(session, subject, terms, decide)
                if event is not None:
                    events.append(event)
        return events

    async def import_consent(
        self,
        session: AsyncSession,
        subject: str,
        purpose: str,
        *,
        granted: bool,
        actor: str,
        evidence: str,
        channel: Channel = Channel.IMPORT,
        captured_at: datetime | None = None,
    ) -> ConsentEvent:
        """Record consent captured elsewhere (paper form, call centre, another system).

        ``actor`` is the importing team's key id and ``evidence`` says what proves
        the capture (both required). ``captured_at`` (default now) is when the
        person acted; expiry counts from it. On a legitimate-interest purpose
        ``granted=False`` imports an objection and ``granted=True`` lifts one.
        """
        if channel not in _IMPORT_CHANNELS:
            raise InvalidChannel("imported consent must use channel 'import' or 'api'")
        if actor in (CUSTOMER_ACTOR, SYSTEM_ACTOR):
            raise EvidenceRequired("imported consent must name the importing team key id")
        if not evidence or not evidence.strip():
            raise EvidenceRequired("imported consent needs evidence text")
        if len(evidence) > _MAX_EVIDENCE:
            raise EvidenceRequired(f"evidence is longer than {_MAX_EVIDENCE} characters")
        if captured_at is not None and captured_at.tzinfo is None:
            raise InvalidCaptureTime("captured_at must be timezone-aware")

        def decide(state: ConsentState | None, terms: PurposeTerms) -> _Draft:
            if terms.legal_basis == LegalBasis.CONSENT:
                if granted:
                    status = (
                        DpvStatus.RENEWED_CONSENT_GIVEN
                        if _granted_before(state)
                        else DpvStatus.CONSENT_GIVEN
                    )
                else:
                    status = DpvStatus.CONSENT_WITHDRAWN
            elif terms.legal_basis == LegalBasis.LEGITIMATE_INTEREST:
                status = DpvStatus.VALID_FOR_PROCESSING if granted else DpvStatus.OBJECTED
            else:
                raise _not_consent_based(terms, "granted" if granted else "withdrawn")
            return _Draft(EventType.IMPORTED, status, channel, actor, evidence, captured_at)

        return await self._append_one(session, subject, purpose, actor, decide)

    async def expire(
        self, session: AsyncSession, subject: str, purpose: str
    ) -> ConsentEvent | None:
        """Write an ``expire`` event if the pair's grant has run out; else None."""

        def decide(state: ConsentState | None, terms: PurposeTerms) -> _Draft | None:
            if state is None or state.state != PurposeState.GRANTED:
                return None
            if evaluate(state, terms, self.now()) != Reason.CONSENT_EXPIRED:
                return None
            return _Draft(EventType.EXPIRE, DpvStatus.CONSENT_EXPIRED, Channel.SYSTEM, SYSTEM_ACTOR)

        _check_subject(subject)
        terms = self.terms(purpose)
        async with self._sequenced(session):
            return await self._append_locked(session, subject, terms, decide)

    async def expire_due(self, session: AsyncSession, *, limit: int = 500) -> list[ConsentEvent]:
        """Sweep: write ``expire`` events for up to ``limit`` grants past their expiry.

        Evaluation never depends on this sweep (an expired grant is refused at
        once); the events make the expiry visible in the ledger and receipts.
        """
        owns = not session.in_transaction()
        now = self.now()
        consent_purposes = [
            name for name, t in self._purposes.items() if t.legal_basis == LegalBasis.CONSENT
        ]
        if not consent_purposes:
            return []
        due = await session.execute(
            select(ConsentState.subject, ConsentState.purpose)
            .where(
                col(ConsentState.purpose).in_(consent_purposes),
                col(ConsentState.state) == PurposeState.GRANTED.value,
                col(ConsentState.expires_at) <= now,
            )
            .order_by(col(ConsentState.subject), col(ConsentState.purpose))
            .limit(limit)
        )
        pairs = list(due.all())
        if owns:
            # The read above opened a transaction only to look; end it so each
            # expiry below is its own short sequenced transaction.
            await session.commit()
        events = []
        for subject, purpose in pairs:
            event = await self.expire(session, subject, purpose)
            if event is not None:
                events.append(event)
        return events

    # -- lookups -----------------------------------------------------------------

    async def state(self, session: AsyncSession, subject: str, purpose: str) -> ConsentState | None:
        """The projection row of one pair (primary-key lookup), or None."""
        result = await session.execute(
            select(ConsentState)
            .where(col(ConsentState.subject) == subject, col(ConsentState.purpose) == purpose)
            .execution_options(populate_existing=True)
        )
        return result.scalar_one_or_none()

    async def states(self, session: AsyncSession, subject: str) -> dict[str, ConsentState]:
        """Every projection row of a subject, by purpose (a primary-key prefix scan)."""
        result = await session.execute(
            select(ConsentState)
            .where(col(ConsentState.subject) == subject)
            .execution_options(populate_existing=True)
        )
        return {row.purpose: row for row in result.scalars()}

    async def check(
        self, session: AsyncSession, subject: str, purpose: str, now: datetime | None = None
    ) -> Reason | None:
        """``evaluate`` for one pair: None when allowed, else the denial reason."""
        terms = self.terms(purpose)
        return evaluate(await self.state(session, subject, purpose), terms, now or self.now())

    async def history(
        self, session: AsyncSession, subject: str, purpose: str | None = None
    ) -> list[ConsentEvent]:
        """A subject's events in ledger order (consent history for export)."""
        query = select(ConsentEvent).where(col(ConsentEvent.subject) == subject)
        if purpose is not None:
            query = query.where(col(ConsentEvent.purpose) == purpose)
        result = await session.execute(query.order_by(col(ConsentEvent.ledger_index)))
        return list(result.scalars())

    async def audience(
        self,
        session: AsyncSession,
        purpose: str,
        *,
        now: datetime | None = None,
        universe: ColumnElement[str] | None = None,
        page_size: int = 1000,
        after: str | None = None,
    ) -> AsyncIterator[list[str]]:
        """Stream subjects for whom ``purpose`` is allowed, page by page (keyset by subject).

        ``universe`` is a column of the caller's table of all subjects; needed for
        purposes that are allowed without a consent row (see ``audience_query``).
        ``now`` is fixed for the whole stream so pages are consistent.
        """
        terms = self.terms(purpose)
        at = now or self.now()
        cursor = after
        while True:
            query = audience_query(
                terms,
                at,
                after=cursor,
                limit=page_size,
                universe=universe,
            )
            page: list[str] = list((await session.execute(query)).scalars())
            if page:
                yield page
            if len(page) < page_size:
                return
            cursor = page[-1]

    # -- internals ---------------------------------------------------------------

    @staticmethod
    def _direct_channel(channel: Channel) -> Channel:
        channel = Channel(channel)
        if channel not in _DIRECT_CHANNELS:
            raise InvalidChannel("grant/withdraw must use channel 'portal' or 'api'")
        return channel

    async def _append_one(
        self,
        session: AsyncSession,
        subject: str,
        purpose: str,
        actor: str,
        decide: _Decide,
    ) -> ConsentEvent:
        _check_subject(subject)
        _check_actor(actor)
        terms = self.terms(purpose)
        async with self._sequenced(session):
            event = await self._append_locked(session, subject, terms, decide)
        if event is None:  # pragma: no cover - these deciders always draft or raise
            raise AssertionError("decider declined a mandatory event")
        return event

    @asynccontextmanager
    async def _sequenced(self, session: AsyncSession) -> AsyncIterator[None]:
        """A transaction holding the ledger's sequencing lock (see module doc)."""
        owns = not session.in_transaction()
        try:
            if owns:
                async with session.begin():
                    await _acquire_sequence(session)
                    yield
            else:
                await _acquire_sequence(session)
                yield
                await session.flush()
        except OperationalError as exc:
            raise LedgerUnavailable("consent ledger could not be sequenced") from exc
        except DBAPIError as exc:
            # PostgreSQL reports lock_timeout / statement_timeout as plain DBAPIErrors
            # (SQLSTATE 55P03, 57014); they mean "try again", not a broken request.
            if _sqlstate(exc) in _RETRYABLE_STATES:
                raise LedgerUnavailable("consent ledger could not be sequenced") from exc
            raise

    async def _append_locked(
        self,
        session: AsyncSession,
        subject: str,
        terms: PurposeTerms,
        decide: _Decide,
    ) -> ConsentEvent | None:
        """Append one event; the caller holds the sequencing lock."""
        result = await session.execute(
            select(ConsentState)
            .where(col(ConsentState.subject) == subject, col(ConsentState.purpose) == terms.name)
            .execution_options(populate_existing=True)
        )
        state = result.scalar_one_or_none()
        draft = decide(state, terms)
        if draft is None:
            return None
        now = self.now()  # taken under the lock: recorded_at follows ledger order
        captured_at = (draft.captured_at or now).astimezone(UTC)
        if captured_at > now:
            raise InvalidCaptureTime("captured_at lies in the future")
        size, prev_hash = await _head(session)
        grants = draft.status in (
            DpvStatus.CONSENT_GIVEN,
            DpvStatus.RENEWED_CONSENT_GIVEN,
        )
        expires_at = captured_at + terms.max_age if grants and terms.max_age else None
        event = ConsentEvent(
            ledger_index=size,
            event_id=uuid.uuid4(),
            subject=subject,
            purpose=terms.name,
            legal_basis=terms.legal_basis.value,
            event_type=draft.event_type.value,
            status=draft.status.value,
            notice_id=terms.notice_id,
            notice_version=terms.notice_version,
            notice_hash=terms.notice_hash,
            channel=draft.channel.value,
            actor=draft.actor,
            evidence=draft.evidence,
            recorded_at=now,
            captured_at=captured_at,
            expires_at=expires_at,
            prev_event_id=state.last_event_id if state is not None else None,
            prev_hash=prev_hash,
            hash="",
        )
        event.hash = chain_hash(prev_hash, event.leaf_bytes())
        session.add(event)
        session.add(transition(state, event))
        await session.flush()
        return event


def _not_consent_based(terms: PurposeTerms, verb: str) -> NotConsentBased:
    basis = terms.legal_basis.value
    if terms.legal_basis == LegalBasis.LEGITIMATE_INTEREST:
        detail = "there is no objection to lift"
    else:
        detail = "it cannot be granted or withdrawn"
    return NotConsentBased(
        f"purpose {terms.name!r} is based on {basis}, not consent: it cannot be {verb} ({detail})"
    )


async def _acquire_sequence(session: AsyncSession) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": CONSENT_LEDGER_LOCK_KEY}
        )
    elif dialect == "sqlite":
        # A write as the transaction's first statement takes SQLite's RESERVED
        # lock (waiting up to the busy timeout) before we read the head.
        await session.execute(text("UPDATE consent_state SET state = state WHERE 1 = 0"))


async def _head(session: AsyncSession) -> tuple[int, str]:
    """(size, hash of the last event) of the ledger; (0, genesis) when empty."""
    result = await session.execute(
        select(ConsentEvent.ledger_index, ConsentEvent.hash)
        .order_by(col(ConsentEvent.ledger_index).desc())
        .limit(1)
    )
    row = result.first()
    if row is None:
        return 0, GENESIS_HASH
    return row[0] + 1, row[1]


async def chain_head(session: AsyncSession) -> tuple[int, str]:
    """(size, head hash) of the ledger, e.g. to anchor it in the audit log."""
    return await _head(session)


async def verify_chain(session: AsyncSession, *, batch_size: int = 1000) -> int | None:
    """Recompute the hash chain; return the first bad ledger index, or None if intact.

    Detects a changed row (its hash no longer matches its content), a deleted
    row (a gap in the indexes: the missing index is returned), and reordered
    rows (the index is part of the hashed content and ``prev_hash`` links fail).
    A truncated tail is invisible to the chain alone; compare ``chain_head``
    with an external anchor (the audit log) for that.
    """
    expected = 0
    prev_hash = GENESIS_HASH
    while True:
        result = await session.execute(
            select(ConsentEvent)
            .where(col(ConsentEvent.ledger_index) >= expected)
            .order_by(col(ConsentEvent.ledger_index))
            .limit(batch_size)
            .execution_options(populate_existing=True)
        )
        rows = list(result.scalars())
        for event in rows:
            if event.ledger_index != expected:
                return expected
            if event.prev_hash != prev_hash or chain_hash(prev_hash, event.leaf_bytes()) != (
                event.hash
            ):
                return expected
            prev_hash = event.hash
            expected += 1
        if len(rows) < batch_size:
            return None


_RETRYABLE_STATES = frozenset({"55P03", "57014"})


def _sqlstate(exc: DBAPIError) -> str | None:
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None
