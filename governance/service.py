"""StoryVault: the application core that wires catalog, keys, vault, policy,
consent and audit together. ``api/`` calls only this object."""

from __future__ import annotations

import asyncio
import hashlib
import tomllib
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import AuditEntry, AuditWriter, BatchLog, EntryKind, RemoteLog, TransparencyLog
from consent import Ledger, PurposeTerms, ReceiptSigner
from consent import LegalBasis as ConsentBasis
from governance.auditlog import InlineSqliteLog, PgBatchLog, RelayedLog
from governance.catalog import Catalog, load_catalog
from governance.datakeys import DataKeys, check_ring_fits
from governance.db import Database
from governance.errors import Forbidden, InvalidInput, Unavailable
from governance.export import Exporter
from governance.gate import AuditSink, Gate, StoryView
from governance.identity import CustomerPrincipal, Identity
from governance.insights import InsightsOperations
from governance.keys import KeyRing
from governance.mail import Mailer
from governance.metrics import MeasuredBatchLog, watch_key_cache, watch_story_cache
from governance.models import AppMetaRow
from governance.operations import Operations
from governance.rights import Rights
from governance.settings import Settings
from governance.teams import ADMIN_ROLE, IssuedKey, PresentedKey, Principal, Teams
from governance.vault import Vault
from policies import Action, PolicyCatalog, PolicyEngine, PolicyStore, PolicyWatcher, RuleSpec

__all__ = ["DemoKeys", "StoryVault"]

log = structlog.get_logger("storyvault")


@dataclass(frozen=True, slots=True)
class DemoKeys:
    keys: list[IssuedKey]


class StoryVault(Operations, InsightsOperations):
    def __init__(self, settings: Settings, *, catalog: Catalog | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or load_catalog(settings.catalog_path)
        self.ring, self.ring_created = KeyRing.load_or_create(
            settings.data_dir, settings.keyring_json
        )
        self.db = Database(
            settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_size=settings.db_pool_size,
        )
        keystore_url = settings.effective_keystore_url
        self.keystore = (
            self.db
            if keystore_url == settings.database_url
            else Database(
                keystore_url,
                sqlite_synchronous=settings.sqlite_synchronous,
                pool_size=8,
                pre_ping=True,
            )
        )
        self.keys = DataKeys(
            self.ring,
            self.keystore,
            cache_size=settings.dek_cache_size,
            cache_ttl=settings.dek_cache_ttl,
        )
        watch_key_cache(self.keys)
        self.vault = Vault(
            self.ring, self.catalog, self.keys, story_cache_rows=settings.story_cache_rows
        )
        if self.vault.story_cache is not None:
            watch_story_cache(self.vault.story_cache)
        self.teams = Teams(self.ring)
        self.identity = Identity(
            self.ring, code_ttl=settings.login_code_ttl, session_ttl=settings.session_ttl
        )
        self.mailer = Mailer(settings.mail_url or f"file://{settings.data_dir / 'outbox'}")
        self.demo_keys: list[IssuedKey] = []
        signing = self.ring.signing_key
        self.ledger = Ledger(self.purpose_terms())
        self.receipts = ReceiptSigner(
            signing.private, signing.kid, controller={"name": "Story Vault", "contact": "privacy"}
        )
        self.audit_log = TransparencyLog(self.db.engine, signing.private, signing.kid)
        batch_log: BatchLog
        if settings.audit_socket is not None:
            # The audit log's own process appends (governance.auditproc).
            batch_log = RelayedLog(RemoteLog(settings.audit_socket))
        elif self.db.sync_engine is not None:
            batch_log = InlineSqliteLog(self.audit_log, self.db)
        elif self.db.dialect == "postgresql":
            batch_log = PgBatchLog(self.audit_log, self.db)
        else:
            batch_log = self.audit_log  # SQLite in memory (tests)
        # Closing a batch early (once every caller that can be pending is) pays
        # where the gated read reaches its entry in lock step: on SQLite, whose
        # reads run in place (see audit.AuditWriter).
        self._batch_log = batch_log
        if isinstance(batch_log, RelayedLog):
            # The audit process gathers: the worker sends its reads' entries in parts
            # of 8 as they come (and the rest at the end of the loop's pass), without
            # waiting for the parts before to commit (see audit.AuditWriter). Measured
            # against the whole pass's entries in one part, which left the worker idle
            # while they committed: docs/benchmarks-history.md, the ninth round.
            self.audit_writer = AuditWriter(
                MeasuredBatchLog(batch_log),
                max_delay=0.0,
                early_close=False,
                in_flight=64,
                send_at=8,
            )
        else:
            self.audit_writer = AuditWriter(
                MeasuredBatchLog(batch_log),
                max_delay=settings.audit_batch_ms / 1000.0,
                early_close=self.db.dialect == "sqlite",
            )
        self.audit: AuditSink = self.audit_writer
        self.policy_store = PolicyStore(self.db.engine)
        self.policy = PolicyEngine(self.policy_store, self._policy_catalog(set()))
        self.policy_watcher: PolicyWatcher | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.rights = Rights(self)
        self.exporter = Exporter(self)
        self.gate = Gate(self.catalog, self.policy, self.ledger, self.vault, self.ring, self.audit)

    def purpose_terms(self) -> list[PurposeTerms]:
        return [
            PurposeTerms(
                name=p.name,
                legal_basis=ConsentBasis(p.legal_basis),
                notice_id=p.notice_id,
                notice_version=p.notice_version,
                notice_text=p.notice,
                sale_or_sharing=p.sale_or_sharing,
                max_age=p.max_age,
            )
            for p in self.catalog.purposes.values()
        ]

    def _policy_catalog(self, teams: set[str]) -> PolicyCatalog:
        return PolicyCatalog.of(
            teams=teams, categories=self.catalog.categories, purposes=self.catalog.purposes
        )

    async def refresh_policy_catalog(self) -> None:
        async with self.db.session() as session:
            teams = await self.teams.team_names(session)
        await self.policy.set_catalog(self._policy_catalog(teams))

    # --- lifecycle -------------------------------------------------------
    async def start(self, *, migrate: bool = True) -> None:
        if migrate:
            await self.db.upgrade()
            if self.keystore is not self.db:
                await self.keystore.upgrade()
        async with self.db.write_session() as session:
            check_ring_fits(self.ring, await self.keys.kek_versions_in_use())
            fresh = await session.get(AppMetaRow, "initialized") is None
            if fresh:
                session.add(AppMetaRow(key="initialized", value=self.catalog.digest))
                for team, roles in (("compliance", [ADMIN_ROLE]),):
                    await self.teams.create_team(session, team, roles=roles)
            if self.settings.admin_key:
                await self.teams.ensure_key(
                    session, "compliance", self.settings.admin_key, key_id="key_env_admin"
                )
            await session.commit()
        await self.refresh_policy_catalog()
        self.db.start_checkpointer()
        await self.audit_writer.start()
        if fresh and self.settings.demo_data:
            from governance.demo import load_demo

            self.demo_keys = await load_demo(self)
        self.policy_watcher = self.policy.watcher(
            dsn=None if self.db.is_sqlite else self.settings.database_url
        )
        await self.policy_watcher.start()
        if self.settings.retention_interval > 0:
            self._sweeper = asyncio.create_task(self._sweep_forever())
        log.info("storyvault.started", database=self.db.dialect, fresh=fresh)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retention_interval)
            try:
                await self.rights.sweep()
            except Exception as exc:  # noqa: BLE001  (a failed sweep is retried next round)
                log.error("retention.sweep_failed", error=type(exc).__name__)  # noqa: TRY400  (no traceback: its frames may hold personal values)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        # Every step is bounded: a listener or pool connection that never answers
        # (a database gone away mid-shutdown) must not keep the process from exiting.
        if self.policy_watcher is not None:
            await self._bounded("policy_watcher", self.policy_watcher.stop())
            self.policy_watcher = None
        await self._bounded("audit_writer", self.audit_writer.stop())
        if isinstance(self._batch_log, RelayedLog):
            await self._bounded("audit_connection", self._batch_log.close())
        await self._bounded("database", self.db.dispose())
        if self.keystore is not self.db:
            await self._bounded("keystore", self.keystore.dispose())

    @staticmethod
    async def _bounded(step: str, work: Awaitable[None], seconds: float = 10.0) -> None:
        try:
            async with asyncio.timeout(seconds):
                await work
        except TimeoutError:
            log.warning("storyvault.stop_timeout", step=step, seconds=seconds)

    async def ready(self) -> dict[str, Any]:
        """Raise Unavailable naming the first unusable part: the database, the key store,
        the key ring (the current KEK must wrap and unwrap) or the audit writer."""
        try:
            async with self.db.session() as session:
                await session.execute(select(1))
        except Exception as exc:
            raise Unavailable("the database is unreachable", code="database_unavailable") from exc
        try:
            async with self.keystore.session() as session:
                await session.execute(select(1))
        except Exception as exc:
            raise Unavailable("the key store is unreachable", code="keystore_unavailable") from exc
        probe = b"\0" * 32
        try:
            version, wrapped = self.ring.wrap(probe, b"ready")
            round_trip = self.ring.unwrap(version, wrapped, b"ready")
        except Exception as exc:
            raise Unavailable("the key ring is unusable", code="keyring_unavailable") from exc
        if round_trip != probe:
            raise Unavailable("the key ring is unusable", code="keyring_unavailable")
        if not self.audit_writer.running:
            raise Unavailable("the audit writer is not running", code="audit_unavailable")
        return {
            "database": "ok",
            "keystore": "ok",
            "keys": "ok",
            "audit_writer": "ok",
            "kek": self.ring.current_kek,
        }

    # --- authorization -------------------------------------------------------
    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.is_admin:
            raise Forbidden("this action needs the admin role", code="admin_required")

    def check_purpose(self, purpose: str | None) -> str:
        return self.gate.check_purpose(purpose)

    async def audit_in(self, session: AsyncSession, entry: AuditEntry) -> int:
        """Append ``entry`` inside the caller's transaction: the change and its
        evidence commit together or not at all."""
        result = await self.audit_log.append_in(await session.connection(), [entry])
        return result.first_index

    async def audit_writer_append(self, entry: AuditEntry) -> int:
        """Append through the group-commit writer; returns once durable."""
        return await self.audit.append(entry)

    def _write_entry(
        self,
        principal: Principal,
        subject: str,
        purpose: str,
        categories: Iterable[str],
        operation: str,
        request_id: str | None,
        table_version: int,
    ) -> AuditEntry:
        return AuditEntry(
            kind=EntryKind.WRITE,
            actor=principal.team,
            actor_key_id=principal.key_id,
            subject=subject,
            purpose=purpose,
            policy_version=table_version,
            categories=tuple(sorted(set(categories))),
            request_id=request_id,
            detail={"operation": operation},
        )

    # --- the story (teams, through the gate) ----------------------------------
    async def create_customer(
        self,
        principal: Principal,
        purpose: str | None,
        *,
        external_ref: str | None,
        profile: Mapping[str, object],
        request_id: str | None = None,
    ) -> str:
        purpose = self.check_purpose(purpose)
        clean = {k: v for k, v in self.vault.validate_profile(profile).items() if v is not None}
        categories = [self.catalog.profile_fields[k].category for k in clean]
        table = await self.gate.check_write(None, principal, purpose, categories, None)
        async with self.db.write_session() as session:
            customer_id = await self.vault.create_customer(
                session, external_ref=external_ref, profile=clean
            )
            subject = self.ring.pseudonym(customer_id)
            await self.audit_in(
                session,
                self._write_entry(
                    principal,
                    subject,
                    purpose,
                    categories,
                    "customer.create",
                    request_id,
                    table.version,
                ),
            )
            await session.commit()
        log.info("customer.created", team=principal.team, subject=subject)
        return customer_id

    async def find_customers(
        self, principal: Principal, purpose: str | None, email: str
    ) -> list[str]:
        """Lookup by e-mail reveals that an address is a customer's: it needs a read
        rule for ``contact.email`` for the purpose."""
        purpose = self.check_purpose(purpose)
        table = self.gate.policy_table(principal, purpose, Action.READ)
        decision = table.decide("contact.email")
        if not decision.allowed:
            raise Forbidden(
                f"team '{principal.team}' may not look up e-mail addresses for '{purpose}'",
                code=decision.reason or "no_policy",
                reason=decision.reason or "no_policy",
            )
        async with self.db.session() as session:
            return await self.vault.find_by_email(session, email)

    async def read_story(
        self,
        credential: Principal | PresentedKey,
        customer_id: str,
        purpose: str | None,
        request_id: str | None = None,
    ) -> StoryView:
        """The gated read (``Gate.read_story``); a ``PresentedKey`` is looked up in
        the read's own round trip."""
        return await self.gate.read_story(self.db, credential, customer_id, purpose, request_id)

    async def team_principal(self, credential: Principal | PresentedKey) -> Principal:
        """The principal of ``credential`` (a ``PresentedKey`` looked up now; 401 if
        it is unknown or revoked)."""
        return await self.gate.principal(self.db, credential)

    def presented_key(self, secret: str) -> PresentedKey:
        """A team API key to be looked up by the request's own read (``read_story``)."""
        return self.teams.presented(secret)

    async def update_profile(
        self,
        principal: Principal,
        purpose: str | None,
        customer_id: str,
        changes: Mapping[str, object],
        request_id: str | None = None,
    ) -> None:
        purpose = self.check_purpose(purpose)
        clean = self.vault.validate_profile(changes, allow_null=True)
        if not clean:
            raise InvalidInput("no profile field to change", code="empty_change")
        categories = [self.catalog.profile_fields[k].category for k in clean]
        subject = self.ring.pseudonym(customer_id)
        async with self.db.write_session() as session:
            await self.vault.require_active(session, customer_id)
            table = await self.gate.check_write(session, principal, purpose, categories, subject)
            await self.vault.update_profile(session, customer_id, clean)
            await self.audit_in(
                session,
                self._write_entry(
                    principal,
                    subject,
                    purpose,
                    categories,
                    "profile.update",
                    request_id,
                    table.version,
                ),
            )
            await session.commit()

    async def add_chapter(
        self,
        principal: Principal,
        purpose: str | None,
        customer_id: str,
        *,
        category: str,
        kind: str,
        occurred_at: datetime,
        body: object,
        request_id: str | None = None,
    ) -> str:
        purpose = self.check_purpose(purpose)
        encoded = self.vault.validate_chapter(category, kind, body)
        subject = self.ring.pseudonym(customer_id)
        async with self.db.write_session() as session:
            await self.vault.require_active(session, customer_id)
            table = await self.gate.check_write(session, principal, purpose, [category], subject)
            chapter_id = await self.vault.add_chapter(
                session,
                customer_id,
                category=category,
                kind=kind,
                occurred_at=occurred_at,
                body=encoded,
                author_team=principal.team,
            )
            await self.audit_in(
                session,
                self._write_entry(
                    principal,
                    subject,
                    purpose,
                    [category],
                    "chapter.add",
                    request_id,
                    table.version,
                ),
            )
            await session.commit()
        return chapter_id

    # --- teams and keys ------------------------------------------------------
    async def authenticate_team(self, secret: str) -> Principal | None:
        return await self.db.query(lambda: self.teams.authenticate(secret))

    async def authenticate_customer(self, token: str) -> CustomerPrincipal | None:
        async with self.db.session() as session:
            return await self.identity.authenticate(session, token)

    # --- customer sign-in ------------------------------------------------------
    async def login(self, email: str, client: str) -> None:
        """Start a sign-in; the caller answers 202 whatever happens here."""
        email = email.strip()
        if not 3 <= len(email) <= 320 or "@" not in email:
            raise InvalidInput("'email' must be an e-mail address", code="invalid_value")
        async with self.db.write_session() as session:
            ids = await self.vault.find_by_email(session, email)
            customer_id = ids[0] if len(ids) == 1 else None
            code = await self.identity.start_login(session, email, client, customer_id)
            await session.commit()
        if code is not None:
            minutes = self.settings.login_code_ttl // 60
            await self.mailer.send(
                email,
                "Your Story Vault sign-in code",
                f"Your sign-in code is {code}\n\nIt is valid for {minutes} minutes and can be "
                "used once. If you did not ask for it, ignore this message.\n",
            )
            log.info("login.code_sent", customer=self.ring.pseudonym(customer_id or ""))

    async def verify_login(self, email: str, code: str) -> tuple[str, datetime]:
        async with self.db.write_session() as session:
            customer_id, token, expires = await self.identity.verify(session, email, code)
            await session.commit()
        log.info("login.verified", customer=self.ring.pseudonym(customer_id))
        return token, expires

    async def logout(self, principal: CustomerPrincipal) -> None:
        async with self.db.write_session() as session:
            await self.identity.logout(session, principal.session_id)
            await session.commit()

    async def create_team(self, name: str, *, roles: list[str], description: str) -> Any:
        async with self.db.write_session() as session:
            row = await self.teams.create_team(session, name, roles=roles, description=description)
            await session.commit()
        await self.refresh_policy_catalog()
        log.info("team.created", team=name)
        return row

    async def issue_key(self, team: str, *, label: str) -> IssuedKey:
        async with self.db.write_session() as session:
            issued = await self.teams.issue_key(session, team, label=label)
            await session.commit()
        log.info("key.issued", team=team, key_id=issued.id)
        return issued

    async def revoke_key(self, key_id: str) -> None:
        async with self.db.write_session() as session:
            await self.teams.revoke_key(session, key_id)
            await session.commit()
        log.info("key.revoked", key_id=key_id)

    # --- the customer's rights ------------------------------------------------------
    async def rectify(
        self, customer: CustomerPrincipal, changes: Mapping[str, object], request_id: str | None
    ) -> str:
        """Rectification (Art. 16): the customer corrects their own profile."""
        clean = self.vault.validate_profile(changes, allow_null=True)
        if not clean:
            raise InvalidInput("no profile field to change", code="empty_change")
        categories = sorted({self.catalog.profile_fields[k].category for k in clean})
        async with self.db.write_session() as session, session.begin():
            await self.vault.require_active(session, customer.customer_id)
            req = await self.rights.open_request(
                session,
                customer.customer_id,
                "rectification",
                channel="portal",
                scope=",".join(sorted(clean)),
                actor="customer",
                actor_key_id=None,
                request_id=request_id,
                status="in_progress",
            )
            await self.vault.update_profile(session, customer.customer_id, clean)
            await self.audit_in(
                session,
                AuditEntry(
                    kind=EntryKind.RECTIFICATION,
                    actor="customer",
                    subject=self.ring.pseudonym(customer.customer_id),
                    categories=tuple(categories),
                    request_id=request_id,
                    detail={"request": req.id, "fields": ",".join(sorted(clean))},
                ),
            )
            await self.rights._step(session, req, "completed", actor="customer")
        return req.id

    # --- demo hooks (filled in by the policy and consent layers) --------------
    async def seed_demo_policy(self) -> None:
        """Load the demo deployment's starter policy (governance/demo_policy.toml)."""
        raw = resources.files("governance").joinpath("demo_policy.toml").read_text()
        async with self.db.session() as session:
            teams = await self.teams.team_names(session)
        catalog = self._policy_catalog(teams)
        for rule in tomllib.loads(raw)["rules"]:
            await self.policy_store.add_rule(RuleSpec(**rule), catalog)
        await self.policy.reload()

    async def seed_demo_consents(self, customer_id: str) -> None:
        """Give demo customers a varied consent picture (deterministic per customer)."""
        subject = self.ring.pseudonym(customer_id)
        pick = int(hashlib.sha256(customer_id.encode()).hexdigest()[:4], 16)
        choices = [
            ("marketing.email", pick % 3 != 0),
            ("personalization", pick % 2 == 0),
            ("analytics.profiling", pick % 5 < 3),
            ("sharing.partners", pick % 7 == 0),
        ]
        async with self.db.write_session() as session, session.begin():
            for purpose, granted in choices:
                if granted:
                    event = await self.ledger.record(session, subject, purpose, granted=True)
                    await self.audit_in(
                        session,
                        AuditEntry(
                            kind=EntryKind.CONSENT,
                            actor="customer",
                            subject=subject,
                            purpose=purpose,
                            consent_index=event.ledger_index,
                            detail={
                                "event": "grant",
                                "event_id": str(event.event_id),
                                "channel": "portal",
                            },
                        ),
                    )
