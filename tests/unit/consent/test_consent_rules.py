"""Recording rules: legal bases, objections, GPC, imports, expiry, evaluation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from consent import (
    Channel,
    ConsentError,
    ConsentState,
    DpvStatus,
    EventType,
    EvidenceRequired,
    InvalidChannel,
    InvalidSubject,
    Ledger,
    LedgerUnavailable,
    LegalBasis,
    NotConsentBased,
    PurposeState,
    PurposeTerms,
    Reason,
    UnknownPurpose,
    evaluate,
    replay,
    verify_chain,
)

Sessions = async_sessionmaker[AsyncSession]
SUBJECT = "cus_7f3a9c"
NOW = datetime(2025, 6, 1, tzinfo=UTC)


async def test_grant_then_withdraw_updates_state_and_chain(
    ledger: Ledger, sessions: Sessions
) -> None:
    async with sessions() as s:
        granted = await ledger.grant(s, SUBJECT, "marketing.email")
    async with sessions() as s:
        withdrawn = await ledger.withdraw(s, SUBJECT, "marketing.email")
        state = await ledger.state(s, SUBJECT, "marketing.email")

    assert (granted.ledger_index, withdrawn.ledger_index) == (0, 1)
    assert granted.event_type == EventType.GRANT
    assert granted.status == DpvStatus.CONSENT_GIVEN
    assert granted.expires_at == granted.captured_at + timedelta(days=365)
    assert granted.notice_hash == ledger.terms("marketing.email").notice_hash
    assert withdrawn.prev_event_id == granted.event_id
    assert withdrawn.prev_hash == granted.hash
    assert withdrawn.status == DpvStatus.CONSENT_WITHDRAWN
    assert state is not None
    assert state.state == PurposeState.WITHDRAWN
    assert state.last_event_id == withdrawn.event_id
    assert state.expires_at is None
    assert (
        evaluate(state, ledger.terms("marketing.email"), ledger.now()) == Reason.CONSENT_WITHDRAWN
    )


async def test_regrant_is_renewed_consent(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s:
        await ledger.grant(s, SUBJECT, "personalization")
        again = await ledger.grant(s, SUBJECT, "personalization")
    assert again.status == DpvStatus.RENEWED_CONSENT_GIVEN


@pytest.mark.parametrize("purpose", ["service.support", "legal.retention"])
@pytest.mark.parametrize("granted", [True, False])
async def test_contract_and_legal_obligation_cannot_be_toggled(
    ledger: Ledger, sessions: Sessions, purpose: str, granted: bool
) -> None:
    async with sessions() as s:
        with pytest.raises(NotConsentBased) as caught:
            await ledger.record(s, SUBJECT, purpose, granted=granted)
        assert await ledger.history(s, SUBJECT) == []
    err = caught.value
    assert (err.code, err.kind) == ("not_consent_based", "invalid")
    assert ledger.terms(purpose).legal_basis.value in str(err)
    assert SUBJECT not in str(err)


async def test_unknown_purpose_is_not_found(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s:
        with pytest.raises(UnknownPurpose) as caught:
            await ledger.grant(s, SUBJECT, "astrology")
    assert (caught.value.code, caught.value.kind) == ("unknown_purpose", "not_found")
    assert isinstance(caught.value, ConsentError)


@pytest.mark.parametrize("subject", ["", "alice@example.com", "two words", "x" * 201])
async def test_subject_must_be_a_pseudonym(
    ledger: Ledger, sessions: Sessions, subject: str
) -> None:
    async with sessions() as s:
        with pytest.raises(InvalidSubject) as caught:
            await ledger.grant(s, subject, "marketing.email")
    assert "@" not in str(caught.value)


async def test_objection_on_legitimate_interest_and_lifting_it(
    ledger: Ledger, sessions: Sessions
) -> None:
    terms = ledger.terms("sales.outreach")
    async with sessions() as s:
        assert await ledger.check(s, SUBJECT, "sales.outreach") is None
        # Nothing to lift while no objection stands.
        with pytest.raises(NotConsentBased, match="legitimate_interest"):
            await ledger.grant(s, SUBJECT, "sales.outreach")
        objection = await ledger.withdraw(s, SUBJECT, "sales.outreach")
        assert objection.event_type == EventType.OBJECTION
        assert objection.status == DpvStatus.OBJECTED
        assert objection.legal_basis == LegalBasis.LEGITIMATE_INTEREST
        assert await ledger.check(s, SUBJECT, "sales.outreach") == Reason.OBJECTED

        lifted = await ledger.grant(s, SUBJECT, "sales.outreach")
        assert lifted.event_type == EventType.GRANT
        assert lifted.status == DpvStatus.VALID_FOR_PROCESSING
        assert lifted.expires_at is None
        state = await ledger.state(s, SUBJECT, "sales.outreach")
    assert state is not None
    assert state.state == PurposeState.GRANTED
    assert evaluate(state, terms, ledger.now()) is None


async def test_record_objection_alias(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s:
        event = await ledger.record_objection(s, SUBJECT, "sales.outreach")
    assert event.event_type == EventType.OBJECTION


async def test_grant_expires_without_an_expire_event(
    ledger: Ledger, sessions: Sessions, clock: Any
) -> None:
    async with sessions() as s:
        await ledger.grant(s, SUBJECT, "analytics.profiling")  # max_age 30 days
        assert await ledger.check(s, SUBJECT, "analytics.profiling") is None
        clock.advance(timedelta(days=30))
        assert await ledger.check(s, SUBJECT, "analytics.profiling") == Reason.CONSENT_EXPIRED
        state = await ledger.state(s, SUBJECT, "analytics.profiling")
        assert state is not None
        assert state.state == PurposeState.GRANTED  # no sweep ran, still refused
        await s.commit()

    async with sessions() as s:
        events = await ledger.expire_due(s)
    assert [(e.event_type, e.status) for e in events] == [
        (EventType.EXPIRE, DpvStatus.CONSENT_EXPIRED)
    ]
    async with sessions() as s:
        state = await ledger.state(s, SUBJECT, "analytics.profiling")
        assert state is not None
        assert state.state == PurposeState.EXPIRED
        assert await ledger.check(s, SUBJECT, "analytics.profiling") == Reason.CONSENT_EXPIRED
        # Second sweep and a direct expire find nothing more to do.
        assert await ledger.expire_due(s) == []
        assert await ledger.expire(s, SUBJECT, "analytics.profiling") is None
        await s.commit()
        renewed = await ledger.grant(s, SUBJECT, "analytics.profiling")
    assert renewed.status == DpvStatus.RENEWED_CONSENT_GIVEN


def test_shortened_max_age_applies_to_existing_grants(catalog: dict[str, PurposeTerms]) -> None:
    terms = catalog["personalization"]  # no max_age
    now = NOW
    state = ConsentState(
        subject=SUBJECT,
        purpose=terms.name,
        state=PurposeState.GRANTED,
        since=now - timedelta(days=40),
        last_event_id=uuid4(),
        last_ledger_index=0,
    )
    assert evaluate(state, terms, now) is None
    shorter = PurposeTerms(
        name=terms.name,
        legal_basis=terms.legal_basis,
        notice_id=terms.notice_id,
        notice_version="2",
        notice_text=terms.notice_text,
        max_age=timedelta(days=30),
    )
    assert evaluate(state, shorter, now) == Reason.CONSENT_EXPIRED


def test_evaluate_basics(catalog: dict[str, PurposeTerms]) -> None:
    now = NOW
    assert evaluate(None, catalog["marketing.email"], now) == Reason.NO_CONSENT
    assert evaluate(None, catalog["sales.outreach"], now) is None
    assert evaluate(None, catalog["service.support"], now) is None
    assert evaluate(None, catalog["legal.retention"], now) is None


async def test_gpc_opts_out_of_sale_purposes_once(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s:
        await ledger.grant(s, SUBJECT, "sharing.partners")
        await ledger.grant(s, SUBJECT, "marketing.email")
    async with sessions() as s:
        first = await ledger.record_gpc(s, SUBJECT)
    async with sessions() as s:
        second = await ledger.record_gpc(s, SUBJECT, ["sharing.partners", "marketing.email"])
        states = await ledger.states(s, SUBJECT)
        other = await ledger.record_gpc(s, "cus_other")

    assert [(e.purpose, e.event_type, e.channel, e.status) for e in first] == [
        ("sharing.partners", EventType.GPC_OPT_OUT, Channel.GPC, DpvStatus.CONSENT_WITHDRAWN)
    ]
    assert second == []
    assert states["sharing.partners"].state == PurposeState.GPC_OPTED_OUT
    assert states["marketing.email"].state == PurposeState.GRANTED  # not a sale purpose
    terms = ledger.terms("sharing.partners")
    assert evaluate(states["sharing.partners"], terms, ledger.now()) == Reason.CONSENT_WITHDRAWN
    # Never granted: the GPC signal is a refusal.
    assert [e.status for e in other] == [DpvStatus.CONSENT_REFUSED]


async def test_gpc_blocks_a_legitimate_interest_sale_purpose(
    catalog: dict[str, PurposeTerms], sessions: Sessions
) -> None:
    li_sale = PurposeTerms(
        name="sharing.affiliates",
        legal_basis=LegalBasis.LEGITIMATE_INTEREST,
        sale_or_sharing=True,
        notice_id="n",
        notice_version="1",
        notice_text="affiliates",
    )
    ledger = Ledger([*catalog.values(), li_sale])
    async with sessions() as s:
        events = await ledger.record_gpc(s, SUBJECT)
        assert [e.purpose for e in events] == ["sharing.partners", "sharing.affiliates"]
        assert await ledger.check(s, SUBJECT, "sharing.affiliates") == Reason.OBJECTED
        await s.commit()
        lifted = await ledger.grant(s, SUBJECT, "sharing.affiliates")
        assert lifted.status == DpvStatus.VALID_FOR_PROCESSING
        assert await ledger.check(s, SUBJECT, "sharing.affiliates") is None


async def test_import_requires_actor_and_evidence(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s:
        with pytest.raises(EvidenceRequired):
            await ledger.import_consent(
                s, SUBJECT, "marketing.email", granted=True, actor="key_9", evidence="  "
            )
        with pytest.raises(EvidenceRequired):
            await ledger.import_consent(
                s, SUBJECT, "marketing.email", granted=True, actor="customer", evidence="form"
            )
        with pytest.raises(InvalidChannel):
            await ledger.import_consent(
                s,
                SUBJECT,
                "marketing.email",
                granted=True,
                actor="key_9",
                evidence="form",
                channel=Channel.PORTAL,
            )
        with pytest.raises(NotConsentBased):
            await ledger.import_consent(
                s, SUBJECT, "service.support", granted=True, actor="key_9", evidence="form"
            )
        assert await ledger.history(s, SUBJECT) == []


async def test_import_records_capture_time_and_evidence(ledger: Ledger, sessions: Sessions) -> None:
    captured = ledger.now() - timedelta(days=10)
    async with sessions() as s:
        event = await ledger.import_consent(
            s,
            SUBJECT,
            "marketing.email",
            granted=True,
            actor="key_marketing_1",
            evidence="paper form #1042, scanned",
            captured_at=captured,
        )
        objection = await ledger.import_consent(
            s,
            SUBJECT,
            "sales.outreach",
            granted=False,
            actor="key_sales_2",
            evidence="phone call, ticket 88",
            channel=Channel.API,
        )
        states = await ledger.states(s, SUBJECT)
    assert event.event_type == EventType.IMPORTED
    assert event.channel == Channel.IMPORT
    assert event.captured_at == captured
    assert event.recorded_at > captured
    assert event.expires_at == captured + timedelta(days=365)
    assert states["marketing.email"].state == PurposeState.GRANTED
    assert states["marketing.email"].since == captured
    assert objection.status == DpvStatus.OBJECTED
    assert states["sales.outreach"].state == PurposeState.OBJECTED


async def test_rejected_request_changes_nothing(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s:
        await ledger.grant(s, SUBJECT, "marketing.email")
    async with sessions() as s:
        with pytest.raises(InvalidChannel):
            await ledger.grant(s, SUBJECT, "marketing.email", channel=Channel.GPC)
        with pytest.raises(NotConsentBased):
            await ledger.withdraw(s, SUBJECT, "legal.retention")
        assert len(await ledger.history(s, SUBJECT)) == 1
        assert await verify_chain(s) is None


async def test_joins_a_caller_transaction(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s, s.begin():
        await ledger.grant(s, SUBJECT, "marketing.email")
        await ledger.grant(s, SUBJECT, "personalization")
    async with sessions() as s:
        events = await ledger.history(s, SUBJECT)
        states = await ledger.states(s, SUBJECT)
    assert [e.ledger_index for e in events] == [0, 1]
    assert {k: v.snapshot() for k, v in states.items()} == {
        (k[1]): v.snapshot() for k, v in replay(events).items()
    }


async def test_write_lock_timeout_is_unavailable(
    ledger: Ledger, consent_engine: Any, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from consent import CONSENT_LEDGER_LOCK_KEY

    if consent_engine.dialect.name == "sqlite":
        impatient = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'consent.db'}", connect_args={"timeout": 0.05}
        )
        take_lock = "UPDATE consent_state SET state = state WHERE 1 = 0"
    else:  # PostgreSQL: the sequencing advisory lock is held, lock_timeout is short
        impatient = create_async_engine(
            consent_engine.url, connect_args={"server_settings": {"lock_timeout": "50"}}
        )
        take_lock = f"SELECT pg_advisory_xact_lock({CONSENT_LEDGER_LOCK_KEY})"
    try:
        async with consent_engine.connect() as holder:
            await holder.execute(text(take_lock))
            async with async_sessionmaker(impatient)() as s:
                with pytest.raises(LedgerUnavailable) as caught:
                    await ledger.grant(s, SUBJECT, "marketing.email")
            await holder.rollback()
    finally:
        await impatient.dispose()
    assert caught.value.kind == "unavailable"
