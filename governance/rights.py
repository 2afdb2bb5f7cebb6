"""Data-subject rights: the requests register, erasure by crypto-shredding,
rectification, certificates, retention sweeps and key rotation.

Erasure destroys the data keys of the erased categories in the key store,
deletes their ciphertexts and blind-index rows, withdraws every consent and
marks the customer erased; categories under legal hold (catalog
``legal_hold``) keep their own key, readable only for the hold's purpose
until the hold ends. The work is O(keys), not O(data).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from joserfc import jws
from joserfc.jwk import OKPKey
from sqlalchemy import delete, func, insert, select, tuple_, update

from audit import AuditEntry, EntryKind
from consent import Channel
from governance.errors import Conflict, InvalidInput, NotFound
from governance.models import (
    CATEGORY_STATES,
    CHAPTERS,
    CUSTOMERS,
    DATA_KEYS,
    EMAIL_INDEX,
    ERASURE_JOURNAL,
    PROFILE_VALUES,
    RIGHTS_REQUESTS,
    CategoryStateRow,
    ChapterRow,
    CustomerRow,
    DataKeyRow,
    EmailIndexRow,
    ErasureJournalRow,
    ProfileValueRow,
    RightsRequestRow,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from governance.service import StoryVault

__all__ = ["REQUEST_TYPES", "ErasureOutcome", "Rights", "due_date"]

log = structlog.get_logger("storyvault.rights")

REQUEST_TYPES = frozenset({"access", "erasure", "rectification", "objection", "restriction"})
# GDPR Art. 12(3): one month, extendable by two further months with a reason.
RESPONSE_PERIOD = timedelta(days=30)
MAX_EXTENSION = timedelta(days=60)


def due_date(received: datetime) -> datetime:
    return received + RESPONSE_PERIOD


@dataclass(frozen=True, slots=True)
class ErasureOutcome:
    request_id: str
    certificate: str
    erased: list[str]
    held: list[dict[str, Any]]
    keys_destroyed: list[str]
    audit_index: int


def _add_years(when: datetime, years: int) -> datetime:
    try:
        return when.replace(year=when.year + years)
    except ValueError:  # 29 February
        return when.replace(year=when.year + years, day=28)


class Rights:
    def __init__(self, sv: StoryVault) -> None:
        self.sv = sv

    # --- the register ----------------------------------------------------------
    async def open_request(
        self,
        session: AsyncSession,
        customer_id: str,
        type_: str,
        *,
        channel: str,
        scope: str = "",
        actor: str,
        actor_key_id: str | None,
        request_id: str | None,
        status: str = "received",
    ) -> RightsRequestRow:
        if type_ not in REQUEST_TYPES:
            raise InvalidInput(
                f"request type must be one of {', '.join(sorted(REQUEST_TYPES))}",
                code="invalid_request_type",
            )
        now = datetime.now(UTC)
        row = RightsRequestRow(
            id=str(uuid.uuid4()),
            customer_id=customer_id,
            subject=self.sv.ring.pseudonym(customer_id),
            type=type_,
            status=status,
            channel=channel,
            received_at=now,
            due_at=due_date(now),
            scope=scope[:2000],
            # The request is decided under the catalog and policy in force when it
            # arrived: a retried request keeps its meaning if either changes later.
            catalog_digest=self.sv.catalog.digest,
            policy_version=self.sv.policy.version,
        )
        session.add(row)
        await session.flush()
        row.audit_index = await self.sv.audit_in(
            session,
            AuditEntry(
                kind=EntryKind.RIGHTS_REQUEST,
                actor=actor,
                actor_key_id=actor_key_id,
                subject=row.subject,
                request_id=request_id,
                detail={
                    "operation": "request.open",
                    "request": row.id,
                    "type": type_,
                    "channel": channel,
                    "status": status,
                },
            ),
        )
        return row

    async def _step(
        self,
        session: AsyncSession,
        row: RightsRequestRow,
        status: str,
        *,
        actor: str,
        detail: dict[str, str | int | bool | None] | None = None,
    ) -> int:
        row.status = status
        if status in {"completed", "refused"}:
            row.completed_at = datetime.now(UTC)
        return await self.sv.audit_in(
            session,
            AuditEntry(
                kind=EntryKind.RIGHTS_REQUEST,
                actor=actor,
                subject=row.subject,
                detail={
                    "operation": f"request.{status}",
                    "request": row.id,
                    "type": row.type,
                    **(detail or {}),
                },
            ),
        )

    async def list_requests(
        self, customer_id: str | None, *, limit: int = 200
    ) -> list[RightsRequestRow]:
        stmt = select(RightsRequestRow).order_by(RIGHTS_REQUESTS.received_at.desc()).limit(limit)
        if customer_id is not None:
            stmt = stmt.where(RIGHTS_REQUESTS.customer_id == customer_id)
        async with self.sv.db.session() as session:
            return list((await session.execute(stmt)).scalars())

    async def get_request(self, request_id: str, customer_id: str | None) -> RightsRequestRow:
        async with self.sv.db.session() as session:
            row = await session.get(RightsRequestRow, request_id)
        if row is None or (customer_id is not None and row.customer_id != customer_id):
            raise NotFound("no such request", code="request_not_found")
        return row

    async def extend(
        self, request_id: str, *, reason: str, days: int, actor: str
    ) -> RightsRequestRow:
        if not reason.strip():
            raise InvalidInput("an extension needs a reason", code="reason_required")
        if not 1 <= days <= MAX_EXTENSION.days:
            raise InvalidInput("an extension lasts 1 to 60 days", code="invalid_extension")
        async with self.sv.db.write_session() as session, session.begin():
            row = await session.get(RightsRequestRow, request_id)
            if row is None:
                raise NotFound("no such request", code="request_not_found")
            if row.status in {"completed", "refused"}:
                raise Conflict("the request is closed", code="request_closed")
            if row.extended_reason:
                raise Conflict("the request was extended already", code="already_extended")
            row.due_at = _aware(row.due_at) + timedelta(days=days)
            row.extended_reason = reason.strip()[:500]
            await self._step(session, row, row.status, actor=actor, detail={"extended_days": days})
        return row

    # --- erasure ------------------------------------------------------------------
    def _scope(self, categories: Iterable[str] | None) -> list[str]:
        if categories is None:
            return sorted(self.sv.catalog.categories)
        scope = sorted(set(categories))
        unknown = [c for c in scope if c not in self.sv.catalog.categories]
        if unknown:
            raise InvalidInput(f"unknown category '{unknown[0][:120]}'", code="unknown_category")
        if not scope:
            raise InvalidInput(
                "name at least one category, or null for everything", code="empty_scope"
            )
        return scope

    async def erase(
        self,
        customer_id: str,
        categories: Iterable[str] | None,
        *,
        actor: str = "customer",
        actor_key_id: str | None = None,
        channel: str = "portal",
        request_id: str | None = None,
    ) -> ErasureOutcome:
        sv = self.sv
        scope = self._scope(categories)
        full = categories is None
        subject = sv.ring.pseudonym(customer_id)
        now = datetime.now(UTC)
        holds = sv.catalog.held_categories()
        async with sv.db.write_session() as session, session.begin():
            customer = await session.get(CustomerRow, customer_id)
            if customer is None or customer.status == "erased":
                raise NotFound("no such customer", code="customer_not_found")
            req = await self.open_request(
                session,
                customer_id,
                "erasure",
                channel=channel,
                scope=json.dumps(scope),
                actor=actor,
                actor_key_id=actor_key_id,
                request_id=request_id,
                status="in_progress",
            )
            erased = [c for c in scope if c not in holds]
            held: list[dict[str, Any]] = []
            for category in scope:
                hold = holds.get(category)
                if hold is None:
                    continue
                latest = (
                    await session.execute(
                        select(func.max(CHAPTERS.occurred_at)).where(
                            CHAPTERS.customer_id == customer_id, CHAPTERS.category == category
                        )
                    )
                ).scalar()
                if latest is None:
                    erased.append(category)  # nothing to hold: erase like the rest
                    continue
                until = _add_years(_aware(latest), hold.years)
                held.append(
                    {"category": category, "legal_ground": hold.purpose, "until": until.isoformat()}
                )
            erased.sort()
            # The erasure journal before anything is destroyed: it lives in the key
            # store, which a restore of the story database leaves alone, and a restore
            # re-applies every erasure in it (reapply_erasures), so none is undone.
            await self.journal_erasure(
                req.id,
                customer_id,
                erased,
                held,
                full=full,
                channel=channel,
                request_id=request_id,
                at=now,
            )
            # Crypto-shred first: once the keys are gone nothing of the scope is
            # readable anywhere, whatever happens to the rest of this transaction.
            destroyed = await sv.keys.destroy(customer_id, erased)
            await session.execute(
                delete(ProfileValueRow).where(
                    PROFILE_VALUES.customer_id == customer_id, PROFILE_VALUES.category.in_(erased)
                )
            )
            # Chapter ciphertexts are already unreadable; the sweep deletes them
            # later (purge), so an erasure costs O(keys) whatever the story's length.
            if "contact.email" in erased:
                await session.execute(
                    delete(EmailIndexRow).where(EMAIL_INDEX.customer_id == customer_id)
                )
            await session.execute(
                delete(CategoryStateRow).where(
                    CATEGORY_STATES.customer_id == customer_id,
                    CATEGORY_STATES.category.in_([*erased, *(h["category"] for h in held)]),
                )
            )
            rows = [
                {
                    "customer_id": customer_id,
                    "category": c,
                    "state": "erased",
                    "hold_purpose": None,
                    "hold_until": None,
                    "since": now,
                }
                for c in erased
            ]
            rows += [
                {
                    "customer_id": customer_id,
                    "category": h["category"],
                    "state": "held",
                    "hold_purpose": h["legal_ground"],
                    "hold_until": datetime.fromisoformat(h["until"]),
                    "since": now,
                }
                for h in held
            ]
            if rows:
                await session.execute(insert(CategoryStateRow), rows)
            values: dict[str, Any] = {"restricted": True, "updated_at": now}
            if full:
                values.update(status="erased", erased_at=now, external_ref=None)
                await self._withdraw_consents(
                    session, subject, actor=actor, evidence="erasure request"
                )
            await session.execute(
                update(CustomerRow).where(CUSTOMERS.id == customer_id).values(**values)
            )
            audit_index = await sv.audit_in(
                session,
                AuditEntry(
                    kind=EntryKind.ERASURE,
                    actor=actor,
                    actor_key_id=actor_key_id,
                    subject=subject,
                    categories=tuple(erased),
                    request_id=request_id,
                    detail={
                        "request": req.id,
                        "full": full,
                        "keys_destroyed": len(destroyed),
                        "held": ",".join(h["category"] for h in held),
                    },
                ),
            )
            certificate = self.certificate(
                request_id=req.id,
                subject=subject,
                erased=erased,
                held=held,
                keys_destroyed=destroyed,
                audit_index=audit_index,
                at=now,
            )
            req.certificate = certificate
            await self._step(session, req, "completed", actor=actor)
        log.info(
            "erasure.completed",
            subject=subject,
            erased=len(erased),
            held=len(held),
            keys_destroyed=len(destroyed),
            audit_index=audit_index,
        )
        return ErasureOutcome(
            request_id=req.id,
            certificate=certificate,
            erased=erased,
            held=held,
            keys_destroyed=destroyed,
            audit_index=audit_index,
        )

    async def _withdraw_consents(
        self, session: AsyncSession, subject: str, *, actor: str, evidence: str
    ) -> None:
        """Withdraw every standing grant of an erased customer, each with its audit leaf."""
        sv = self.sv
        for purpose, state in (await sv.ledger.states(session, subject)).items():
            if state.state != "granted":
                continue
            event = await sv.ledger.record(
                session,
                subject,
                purpose,
                granted=False,
                channel=Channel.API,
                actor="customer" if actor != "system" else "system",
                evidence=evidence,
            )
            await sv.audit_in(
                session,
                AuditEntry(
                    kind=EntryKind.CONSENT,
                    actor=actor,
                    subject=subject,
                    purpose=purpose,
                    consent_index=event.ledger_index,
                    detail={"event": str(event.event_type), "reason": "erasure"},
                ),
            )

    def certificate(
        self,
        *,
        request_id: str,
        subject: str,
        erased: list[str],
        held: list[dict[str, Any]],
        keys_destroyed: list[str],
        audit_index: int,
        at: datetime,
    ) -> str:
        """An erasure certificate: a compact JWS (EdDSA) the customer keeps."""
        signing = self.sv.ring.signing_key
        key = OKPKey.import_key(signing.private)
        claims = {
            "typ": "erasure-certificate",
            "jti": request_id,
            "iat": int(at.timestamp()),
            "erased_at": at.isoformat(),
            "controller": "Story Vault",
            "sub": subject,
            "categories_erased": erased,
            "categories_held": held,
            "keys_destroyed": keys_destroyed,
            "audit_index": audit_index,
            "method": "crypto-shredding: AES-256-GCM data keys destroyed in the key store",
        }
        payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
        header = {"alg": "EdDSA", "kid": signing.kid, "typ": "erasure-certificate+jwt"}
        return jws.serialize_compact(header, payload, key, algorithms=["EdDSA"])

    # --- the erasure journal and restores ----------------------------------------
    async def journal_erasure(
        self,
        request: str,
        customer_id: str,
        erased: list[str],
        held: list[dict[str, Any]],
        *,
        full: bool,
        channel: str,
        request_id: str | None,
        at: datetime,
    ) -> None:
        """Record an erasure in the key store's append-only journal (its own transaction:
        it must outlive a rollback of the story transaction as the destroyed keys do)."""
        async with self.sv.keystore.write_session() as ks:
            ks.add(
                ErasureJournalRow(
                    id=request,
                    customer_id=customer_id,
                    categories=json.dumps(erased),
                    held=json.dumps(held),
                    full=full,
                    channel=channel[:20],
                    request_id=(request_id or None) and request_id[:64],
                    erased_at=at,
                )
            )
            await ks.commit()

    async def erasure_journal(self, since: datetime | None = None) -> list[ErasureJournalRow]:
        stmt = select(ErasureJournalRow).order_by(ERASURE_JOURNAL.erased_at, ERASURE_JOURNAL.id)
        if since is not None:
            stmt = stmt.where(ERASURE_JOURNAL.erased_at >= since)
        async with self.sv.keystore.session() as ks:
            return list((await ks.execute(stmt)).scalars())

    async def reapply_erasures(self, since: datetime | None = None) -> dict[str, int]:
        """Apply again every journalled erasure recorded at or after ``since`` (all when
        None), after a restore: keys destroyed (again), ciphertexts and blind-index rows
        deleted, category states and the customer marked erased, consents withdrawn,
        the request re-registered. Idempotent: an erasure the database already shows
        changes nothing and is not audited again."""
        counts = {"journalled": 0, "reapplied": 0, "keys_destroyed": 0, "values_deleted": 0}
        for entry in await self.erasure_journal(since):
            counts["journalled"] += 1
            keys, values, changed = await self._reapply(entry)
            counts["keys_destroyed"] += keys
            counts["values_deleted"] += values
            counts["reapplied"] += int(changed)
        log.info("erasure.reapplied", **counts)
        return counts

    async def _reapply_keys(
        self, cid: str, erased: list[str], at: datetime
    ) -> tuple[list[str], set[str]]:
        """Destroy the keys of the erased scopes that existed at the erasure (a key
        created later, after a partial erasure, belongs to data given since); return
        them and the ids of the scopes' keys still live."""
        sv = self.sv
        now = datetime.now(UTC)
        # 1. the key store: keys of the erased scopes that existed at the erasure (a key
        # created later, after a partial erasure, belongs to data given since).
        async with sv.keystore.write_session() as ks:
            ids = list(
                (
                    await ks.execute(
                        select(DATA_KEYS.id).where(
                            DATA_KEYS.customer_id == cid,
                            DATA_KEYS.scope.in_(erased),
                            DATA_KEYS.destroyed_at.is_(None),
                            DATA_KEYS.created_at <= at,
                        )
                    )
                ).scalars()
            )
            if ids:
                await ks.execute(
                    update(DataKeyRow)
                    .where(DATA_KEYS.id.in_(ids))
                    .values(wrapped=None, destroyed_at=now)
                )
            await ks.commit()
            live = set(
                (
                    await ks.execute(
                        select(DATA_KEYS.id).where(
                            DATA_KEYS.customer_id == cid,
                            DATA_KEYS.scope.in_(erased),
                            DATA_KEYS.destroyed_at.is_(None),
                        )
                    )
                ).scalars()
            )
        sv.keys.forget(ids)
        return ids, live

    async def _reapply(self, entry: ErasureJournalRow) -> tuple[int, int, bool]:
        sv = self.sv
        cid = entry.customer_id
        erased: list[str] = json.loads(entry.categories)
        held: list[dict[str, Any]] = json.loads(entry.held)
        at = _aware(entry.erased_at)
        now = datetime.now(UTC)
        ids, live = await self._reapply_keys(cid, erased, at)
        # 2. the story database: every ciphertext of the erased categories whose key is
        # gone, the blind index, the states, the customer, consents and the register.
        subject = sv.ring.pseudonym(cid)
        async with sv.db.write_session() as session, session.begin():
            deleted = 0
            for table, cols in ((ProfileValueRow, PROFILE_VALUES), (ChapterRow, CHAPTERS)):
                result = await session.execute(
                    delete(table).where(
                        cols.customer_id == cid,
                        cols.category.in_(erased),
                        cols.dek_id.notin_(sorted(live)),
                    )
                )
                deleted += int(getattr(result, "rowcount", 0) or 0)
            if "contact.email" in erased:
                left = (
                    await session.execute(
                        select(func.count()).where(
                            PROFILE_VALUES.customer_id == cid,
                            PROFILE_VALUES.category == "contact.email",
                        )
                    )
                ).scalar_one()
                if not left:
                    result = await session.execute(
                        delete(EmailIndexRow).where(EMAIL_INDEX.customer_id == cid)
                    )
                    deleted += int(getattr(result, "rowcount", 0) or 0)
            customer = await session.get(CustomerRow, cid)
            changed = bool(ids or deleted)
            if customer is not None:
                states = await sv.vault.category_states(session, cid)
                wanted: list[tuple[str, str, str | None, datetime | None]] = [
                    (c, "erased", None, None) for c in erased
                ]
                wanted += [
                    (
                        h["category"],
                        "held",
                        h["legal_ground"],
                        datetime.fromisoformat(h["until"]),
                    )
                    for h in held
                ]
                for category, state, purpose, until in wanted:
                    current = states.get(category)
                    if current is not None and (current[0] == state or current[0] == "erased"):
                        continue
                    await session.execute(
                        delete(CategoryStateRow).where(
                            CATEGORY_STATES.customer_id == cid,
                            CATEGORY_STATES.category == category,
                        )
                    )
                    session.add(
                        CategoryStateRow(
                            customer_id=cid,
                            category=category,
                            state=state,
                            hold_purpose=purpose,
                            hold_until=until,
                            since=at,
                        )
                    )
                    changed = True
                values: dict[str, Any] = {}
                if not customer.restricted:
                    values["restricted"] = True
                if entry.full and customer.status != "erased":
                    values.update(status="erased", erased_at=at, external_ref=None)
                    await self._withdraw_consents(
                        session,
                        subject,
                        actor="system",
                        evidence="erasure re-applied after a restore",
                    )
                if values:
                    values["updated_at"] = now
                    await session.execute(
                        update(CustomerRow).where(CUSTOMERS.id == cid).values(**values)
                    )
                    changed = True
                if await session.get(RightsRequestRow, entry.id) is None:
                    session.add(
                        RightsRequestRow(
                            id=entry.id,
                            customer_id=cid,
                            subject=subject,
                            type="erasure",
                            status="completed",
                            channel=entry.channel,
                            received_at=at,
                            due_at=due_date(at),
                            completed_at=at,
                            scope=json.dumps(erased)[:2000],
                            catalog_digest=sv.catalog.digest,
                            policy_version=sv.policy.version,
                        )
                    )
                    changed = True
            if changed:
                await sv.audit_in(
                    session,
                    AuditEntry(
                        kind=EntryKind.ERASURE,
                        actor="system",
                        subject=subject,
                        categories=tuple(erased),
                        request_id=entry.request_id,
                        detail={
                            "operation": "erasure.reapplied",
                            "request": entry.id,
                            "full": entry.full,
                            "keys_destroyed": len(ids),
                            "values_deleted": deleted,
                        },
                    ),
                )
        return len(ids), deleted, changed

    # --- retention ----------------------------------------------------------------
    async def sweep(self, now: datetime | None = None) -> dict[str, int]:
        """Delete chapters past their category's retention; shred held scopes whose
        hold ended; expire consents past their maximum age. Each action is audited."""
        sv = self.sv
        now = now or datetime.now(UTC)
        counts = {
            "chapters_deleted": 0,
            "holds_ended": 0,
            "consents_expired": 0,
            "shredded_purged": 0,
        }
        async with sv.db.write_session() as session, session.begin():
            erased_scope = select(CATEGORY_STATES.customer_id, CATEGORY_STATES.category).where(
                CATEGORY_STATES.state == "erased"
            )
            result = await session.execute(
                delete(ChapterRow).where(
                    tuple_(CHAPTERS.customer_id, CHAPTERS.category).in_(erased_scope)
                )
            )
            purged = int(getattr(result, "rowcount", 0) or 0)
            if purged:
                await sv.audit_in(
                    session,
                    AuditEntry(
                        kind=EntryKind.RETENTION,
                        actor="system",
                        detail={"operation": "purge.shredded", "chapters": purged},
                    ),
                )
            counts["shredded_purged"] = purged
        for category in sv.catalog.categories.values():
            if category.retention is None or category.legal_hold is not None:
                continue
            cutoff = now - category.retention
            async with sv.db.write_session() as session, session.begin():
                result = await session.execute(
                    delete(ChapterRow).where(
                        CHAPTERS.category == category.name, CHAPTERS.occurred_at < cutoff
                    )
                )
                deleted = int(getattr(result, "rowcount", 0) or 0)
                if deleted:
                    await sv.audit_in(
                        session,
                        AuditEntry(
                            kind=EntryKind.RETENTION,
                            actor="system",
                            categories=(category.name,),
                            detail={
                                "operation": "retention.delete",
                                "chapters": deleted,
                                "cutoff": cutoff.isoformat(),
                            },
                        ),
                    )
            counts["chapters_deleted"] += deleted
        async with sv.db.write_session() as session, session.begin():
            ended = (
                await session.execute(
                    select(CATEGORY_STATES.customer_id, CATEGORY_STATES.category).where(
                        CATEGORY_STATES.state == "held", CATEGORY_STATES.hold_until < now
                    )
                )
            ).all()
            for row in ended:
                destroyed = await sv.keys.destroy(row.customer_id, [row.category])
                await session.execute(
                    delete(ChapterRow).where(
                        CHAPTERS.customer_id == row.customer_id, CHAPTERS.category == row.category
                    )
                )
                await session.execute(
                    update(CategoryStateRow)
                    .where(
                        CATEGORY_STATES.customer_id == row.customer_id,
                        CATEGORY_STATES.category == row.category,
                    )
                    .values(state="erased", hold_purpose=None, hold_until=None, since=now)
                )
                await sv.audit_in(
                    session,
                    AuditEntry(
                        kind=EntryKind.RETENTION,
                        actor="system",
                        subject=sv.ring.pseudonym(row.customer_id),
                        categories=(row.category,),
                        detail={"operation": "hold.ended", "keys_destroyed": len(destroyed)},
                    ),
                )
            counts["holds_ended"] = len(ended)
        async with sv.db.write_session() as session:
            expired = await sv.ledger.expire_due(session)
        # Outside the write session: the group commit takes the same write lock.
        for event in expired:
            await sv.audit_writer_append(
                AuditEntry(
                    kind=EntryKind.CONSENT,
                    actor="system",
                    subject=event.subject,
                    purpose=event.purpose,
                    consent_index=event.ledger_index,
                    detail={"event": "expire"},
                )
            )
        counts["consents_expired"] = len(expired)
        log.info("retention.swept", **counts)
        return counts

    # --- key rotation --------------------------------------------------------------
    async def rotate_keys(
        self, *, batch: int = 500, progress: Any = None, actor: str = "system"
    ) -> dict[str, int]:
        """A new KEK version; every live data key re-wrapped in batches while reads
        and writes go on; the old KEKs retired once nothing uses them."""
        sv = self.sv
        ring = sv.ring
        if ring.path is None:
            raise Conflict(
                "this key ring comes from STORYVAULT_KEYRING: rotate it where it is stored",
                code="keyring_external",
            )
        old = set(ring.keks)
        new_version = ring.add_kek()
        ring.save()
        await sv.audit_writer_append(
            AuditEntry(
                kind=EntryKind.KEY_EVENT,
                actor=actor,
                detail={"operation": "kek.added", "kek_version": new_version},
            )
        )
        total = 0
        while True:
            done = await sv.keys.rewrap_batch(limit=batch)
            total += done
            if progress is not None:
                progress(total)
            if done < batch:
                break
        in_use = await sv.keys.kek_versions_in_use()
        retired = sorted(v for v in old if v not in in_use and v != ring.current_kek)
        for version in retired:
            ring.retire_kek(version)
        ring.save()
        await sv.audit_writer_append(
            AuditEntry(
                kind=EntryKind.KEY_EVENT,
                actor=actor,
                detail={
                    "operation": "kek.rotated",
                    "kek_version": new_version,
                    "rewrapped": total,
                    "retired": ",".join(map(str, retired)),
                },
            )
        )
        log.info("keys.rotated", kek_version=new_version, rewrapped=total, retired=retired)
        return {"kek_version": new_version, "rewrapped": total, "retired": len(retired)}


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
