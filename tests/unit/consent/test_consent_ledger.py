"""Ledger sequencing, projection == replay, chain verification, audience SQL."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, MetaData, String, Table, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel, col

from consent import (
    CONSENT_TABLES,
    ConsentError,
    ConsentEvent,
    ConsentState,
    Ledger,
    PurposeTerms,
    ReceiptSigner,
    UniverseRequired,
    audience_query,
    chain_hash,
    chain_head,
    evaluate,
    replay,
    verify_chain,
)

Sessions = async_sessionmaker[AsyncSession]


async def all_events(s: AsyncSession) -> list[ConsentEvent]:
    result = await s.execute(
        select(ConsentEvent)
        .order_by(col(ConsentEvent.ledger_index))
        .execution_options(populate_existing=True)
    )
    return list(result.scalars())


async def projection(s: AsyncSession) -> dict[tuple[str, str], tuple[Any, ...]]:
    result = await s.execute(select(ConsentState).execution_options(populate_existing=True))
    return {(r.subject, r.purpose): r.snapshot() for r in result.scalars()}


def replayed(events: list[ConsentEvent]) -> dict[tuple[str, str], tuple[Any, ...]]:
    return {k: v.snapshot() for k, v in replay(events).items()}


# -- sequencing under concurrency -------------------------------------------------


async def test_fifty_concurrent_toggles_on_one_subject(
    ledger: Ledger, sessions: Sessions, catalog: dict[str, PurposeTerms]
) -> None:
    signer = ReceiptSigner(Ed25519PrivateKey.generate(), "receipts-1", {"name": "Story Vault"})
    rng = random.Random(7)
    plan = [
        (rng.choice(["marketing.email", "sharing.partners"]), rng.random() < 0.5) for _ in range(50)
    ]

    async def toggle(purpose: str, granted: bool) -> tuple[ConsentEvent, str]:
        async with sessions() as s:
            event = await ledger.record(s, "cus_busy", purpose, granted=granted)
        return event, signer.issue(event, catalog[purpose])

    results = await asyncio.gather(*(toggle(p, g) for p, g in plan))

    async with sessions() as s:
        events = await all_events(s)
        stored = await projection(s)
        assert await verify_chain(s) is None
        assert await chain_head(s) == (50, events[-1].hash)
    # One total, gap-free order; every call got its own index.
    assert [e.ledger_index for e in events] == list(range(50))
    assert sorted(e.ledger_index for e, _ in results) == list(range(50))
    assert stored == replayed(events)
    # prev_event_id links each pair's events in ledger order.
    for purpose in ("marketing.email", "sharing.partners"):
        chain = [e for e in events if e.purpose == purpose]
        assert [e.prev_event_id for e in chain] == [None, *[e.event_id for e in chain[:-1]]]
    # The receipt of the last event of each pair states the final projection.
    signer_claims = {}
    for event, _token in sorted(results, key=lambda r: r[0].ledger_index):
        signer_claims[event.purpose] = signer.claims(event, catalog[event.purpose])
    for purpose, claims in signer_claims.items():
        assert claims["state"] == stored[("cus_busy", purpose)][2]
        assert claims["ledger_index"] == stored[("cus_busy", purpose)][6]


async def test_gap_free_index_is_enforced_by_primary_key(
    ledger: Ledger, sessions: Sessions
) -> None:
    async with sessions() as s:
        first = await ledger.grant(s, "cus_1", "marketing.email")
    async with sessions() as s:
        clone = ConsentEvent.model_validate(first.model_dump() | {"event_id": first.event_id})
        s.add(clone)
        with pytest.raises(IntegrityError):
            await s.commit()


# -- tamper evidence ---------------------------------------------------------------


async def _seed(ledger: Ledger, sessions: Sessions, n: int = 6) -> None:
    async with sessions() as s:
        for i in range(n):
            await ledger.record(s, f"cus_{i % 2}", "marketing.email", granted=i % 3 != 2)


async def _tamper(engine: AsyncEngine, *statements: str) -> None:
    drops = {
        "sqlite": [
            "DROP TRIGGER IF EXISTS consent_event_no_update",
            "DROP TRIGGER IF EXISTS consent_event_no_delete",
        ],
        "postgresql": ["DROP TRIGGER IF EXISTS consent_event_no_change ON consent_event"],
    }[engine.dialect.name]
    async with engine.begin() as conn:
        for drop in drops:
            await conn.execute(text(drop))
        for statement in statements:
            await conn.execute(text(statement))


async def test_append_only_triggers_block_edits(
    ledger: Ledger, sessions: Sessions, consent_engine: AsyncEngine
) -> None:
    await _seed(ledger, sessions, 2)
    for statement in (
        "UPDATE consent_event SET purpose = 'x' WHERE ledger_index = 0",
        "DELETE FROM consent_event WHERE ledger_index = 1",
    ):
        with pytest.raises(Exception, match="append-only"):
            async with consent_engine.begin() as conn:
                await conn.execute(text(statement))


async def test_intact_chain_verifies(ledger: Ledger, sessions: Sessions) -> None:
    await _seed(ledger, sessions)
    async with sessions() as s:
        assert await verify_chain(s) is None
        assert await verify_chain(s, batch_size=2) is None


@pytest.mark.parametrize(
    ("statements", "first_bad"),
    [
        (["UPDATE consent_event SET status = 'dpv:ConsentGiven' WHERE ledger_index = 2"], 2),
        (["UPDATE consent_event SET subject = 'cus_9' WHERE ledger_index = 4"], 4),
        (["UPDATE consent_event SET evidence = 'forged' WHERE ledger_index = 0"], 0),
        (["UPDATE consent_event SET hash = prev_hash WHERE ledger_index = 3"], 3),
        (["DELETE FROM consent_event WHERE ledger_index = 3"], 3),
        (["DELETE FROM consent_event WHERE ledger_index = 0"], 0),
        (
            [  # swap rows 1 and 2 (index is part of the hashed content)
                "UPDATE consent_event SET ledger_index = -1 WHERE ledger_index = 1",
                "UPDATE consent_event SET ledger_index = 1 WHERE ledger_index = 2",
                "UPDATE consent_event SET ledger_index = 2 WHERE ledger_index = -1",
            ],
            1,
        ),
    ],
    ids=["status", "subject", "evidence", "hash", "delete-middle", "delete-first", "reorder"],
)
async def test_verify_chain_finds_first_tampered_index(
    ledger: Ledger,
    sessions: Sessions,
    consent_engine: AsyncEngine,
    statements: list[str],
    first_bad: int,
) -> None:
    await _seed(ledger, sessions)
    await _tamper(consent_engine, *statements)
    async with sessions() as s:
        assert await verify_chain(s) == first_bad
        assert await verify_chain(s, batch_size=2) == first_bad


async def test_rehashed_reorder_is_still_detected(
    ledger: Ledger, sessions: Sessions, consent_engine: AsyncEngine
) -> None:
    """Swapping two rows' indexes AND recomputing one row's hash still breaks the links."""
    await _seed(ledger, sessions)
    async with sessions() as s:
        events = await all_events(s)
    forged = ConsentEvent.model_validate(events[2].model_dump() | {"ledger_index": 1})
    forged.prev_hash = events[0].hash
    forged_hash = chain_hash(forged.prev_hash, forged.leaf_bytes())
    await _tamper(
        consent_engine,
        "DELETE FROM consent_event WHERE ledger_index = 1",
        f"UPDATE consent_event SET ledger_index = 1, prev_hash = '{forged.prev_hash}', "
        f"hash = '{forged_hash}' WHERE ledger_index = 2",
    )
    async with sessions() as s:
        assert await verify_chain(s) == 2  # row 1 now checks out, index 2 is missing


async def test_leaf_bytes_survive_a_database_round_trip(ledger: Ledger, sessions: Sessions) -> None:
    async with sessions() as s:
        recorded = await ledger.import_consent(
            s,
            "cus_rt",
            "marketing.email",
            granted=True,
            actor="key_1",
            evidence="form \u00e9\u4e2d",
            captured_at=ledger.now() - timedelta(hours=1),
        )
        written = recorded.leaf_bytes()
    async with sessions() as s:
        (loaded,) = await all_events(s)
    assert loaded.leaf_bytes() == written
    assert loaded.compute_hash() == loaded.hash
    assert b'"schema":"storyvault.consent.event/1"' in written


# -- projection == replay (property) ---------------------------------------------

_PURPOSES = ["marketing.email", "sales.outreach", "sharing.partners", "service.support", "nope"]


def _operations() -> Any:
    op = st.tuples(
        st.sampled_from(["grant", "withdraw", "gpc", "import", "expire", "sweep", "tick"]),
        st.sampled_from(["cus_a", "cus_b", "cus_c"]),
        st.sampled_from(_PURPOSES),
        st.booleans(),
        st.integers(min_value=0, max_value=400),
    )
    return st.lists(op, max_size=25)


async def _run_history(
    catalog: dict[str, PurposeTerms], clock: Any, ops: list[tuple[str, str, str, bool, int]]
) -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    async with engine.begin() as conn:
        await conn.run_sync(
            lambda sync_conn: SQLModel.metadata.create_all(sync_conn, tables=list(CONSENT_TABLES))
        )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    ledger = Ledger(catalog.values(), clock=clock)
    try:
        for kind, subject, purpose, flag, amount in ops:
            async with sessions() as s:
                try:
                    if kind == "grant":
                        await ledger.grant(s, subject, purpose)
                    elif kind == "withdraw":
                        await ledger.withdraw(s, subject, purpose)
                    elif kind == "gpc":
                        await ledger.record_gpc(s, subject)
                    elif kind == "import":
                        await ledger.import_consent(
                            s,
                            subject,
                            purpose,
                            granted=flag,
                            actor="key_import",
                            evidence="batch 7",
                            captured_at=ledger.now() - timedelta(days=amount % 50),
                        )
                    elif kind == "expire":
                        await ledger.expire(s, subject, purpose)
                    elif kind == "sweep":
                        await ledger.expire_due(s)
                    else:
                        clock.advance(timedelta(days=amount))
                except ConsentError:
                    pass  # a refused request must change nothing; checked below
        async with sessions() as s:
            events = await all_events(s)
            stored = await projection(s)
            assert [e.ledger_index for e in events] == list(range(len(events)))
            assert stored == replayed(events)
            assert await verify_chain(s) is None
            now = ledger.now()
            for (subject, purpose), state in replay(events).items():
                terms = catalog[purpose]
                assert await ledger.check(s, subject, purpose, now) == evaluate(state, terms, now)
    finally:
        await engine.dispose()


def test_replay_equals_projection_for_random_histories(
    catalog: dict[str, PurposeTerms], make_clock: Any
) -> None:
    @settings(max_examples=40, deadline=None)
    @given(ops=_operations())
    def check(ops: list[tuple[str, str, str, bool, int]]) -> None:
        asyncio.run(_run_history(catalog, make_clock(), ops))

    check()


# -- audience: SQL agrees with evaluate ---------------------------------------------


async def test_audience_matches_evaluate(
    ledger: Ledger,
    sessions: Sessions,
    consent_engine: AsyncEngine,
    catalog: dict[str, PurposeTerms],
    clock: Any,
) -> None:
    customers = Table("test_customers", MetaData(), Column("pseudonym", String, primary_key=True))
    async with consent_engine.begin() as conn:
        await conn.run_sync(customers.create)
        await conn.execute(insert(customers), [{"pseudonym": f"cus_{i:03d}"} for i in range(40)])

    rng = random.Random(3)
    async with sessions() as s:
        for i in range(40):
            subject = f"cus_{i:03d}"
            for purpose in ("marketing.email", "analytics.profiling", "sharing.partners"):
                roll = rng.random()
                if roll < 0.5:
                    await ledger.grant(s, subject, purpose)
                elif roll < 0.7:
                    await ledger.withdraw(s, subject, purpose)
            if rng.random() < 0.3:
                await ledger.withdraw(s, subject, "sales.outreach")
            if rng.random() < 0.2:
                await ledger.record_gpc(s, subject)
            if i == 20:
                clock.advance(timedelta(days=20))  # earlier analytics grants lapse first
    clock.advance(timedelta(days=15))
    now = ledger.now()

    async with sessions() as s:
        states = await projection(s)
        rows = replay(await all_events(s))
        assert states == {key: row.snapshot() for key, row in rows.items()}
        subjects = [f"cus_{i:03d}" for i in range(40)]
        for name, terms in catalog.items():
            expected = [
                subj for subj in subjects if evaluate(rows.get((subj, name)), terms, now) is None
            ]
            pages = [
                page
                async for page in ledger.audience(
                    s, name, now=now, universe=customers.c.pseudonym, page_size=7
                )
            ]
            assert [subj for page in pages for subj in page] == expected, name
            assert all(len(page) <= 7 for page in pages)
            if terms.legal_basis == "consent":
                alone = [subj async for page in ledger.audience(s, name, now=now) for subj in page]
                assert alone == expected, name
                if name in ("marketing.email", "sharing.partners"):
                    assert 0 < len(expected) < 40, name
            else:
                with pytest.raises(UniverseRequired):
                    audience_query(terms, now)
