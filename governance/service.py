"""StoryVault: the application core that wires catalog, keys, vault, policy,
consent and audit together. ``api/`` calls only this object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select

from governance.catalog import Catalog, load_catalog
from governance.datakeys import DataKeys, check_ring_fits
from governance.db import Database
from governance.errors import Forbidden, InvalidInput
from governance.identity import CustomerPrincipal, Identity
from governance.keys import KeyRing
from governance.mail import Mailer
from governance.models import AppMetaRow
from governance.settings import Settings
from governance.teams import ADMIN_ROLE, IssuedKey, Principal, Teams
from governance.vault import Vault

__all__ = ["DemoKeys", "StoryVault"]

log = structlog.get_logger("storyvault")


@dataclass(frozen=True, slots=True)
class DemoKeys:
    keys: list[IssuedKey]


class StoryVault:
    def __init__(self, settings: Settings, *, catalog: Catalog | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or load_catalog(settings.catalog_path)
        self.ring, self.ring_created = KeyRing.load_or_create(
            settings.data_dir, settings.keyring_json
        )
        self.db = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        self.keys = DataKeys(
            self.ring, cache_size=settings.dek_cache_size, cache_ttl=settings.dek_cache_ttl
        )
        self.vault = Vault(self.ring, self.catalog, self.keys)
        self.teams = Teams(self.ring)
        self.identity = Identity(
            self.ring, code_ttl=settings.login_code_ttl, session_ttl=settings.session_ttl
        )
        self.mailer = Mailer(settings.mail_url or f"file://{settings.data_dir / 'outbox'}")
        self.demo_keys: list[IssuedKey] = []

    # --- lifecycle -------------------------------------------------------
    async def start(self, *, migrate: bool = True) -> None:
        if migrate:
            await self.db.upgrade()
        async with self.db.write_session() as session:
            check_ring_fits(self.ring, await self.keys.kek_versions_in_use(session))
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
        if fresh and self.settings.demo_data:
            from governance.demo import load_demo

            self.demo_keys = await load_demo(self)
        log.info("storyvault.started", database=self.db.dialect, fresh=fresh)

    async def stop(self) -> None:
        await self.db.dispose()

    async def ready(self) -> dict[str, Any]:
        async with self.db.session() as session:
            await session.execute(select(1))
        return {"database": "ok", "keys": "ok", "kek": self.ring.current_kek}

    # --- authorization (until the gate) -----------------------------------
    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.is_admin:
            raise Forbidden("this action needs the admin role", code="admin_required")

    def check_purpose(self, purpose: str | None) -> str:
        if not purpose:
            raise InvalidInput("the 'purpose' query parameter is required", code="purpose_required")
        if purpose not in self.catalog.purposes:
            raise InvalidInput(f"unknown purpose '{purpose[:80]}'", code="unknown_purpose")
        return purpose

    # --- the story ---------------------------------------------------------
    async def create_customer(
        self,
        principal: Principal,
        purpose: str | None,
        *,
        external_ref: str | None,
        profile: Mapping[str, object],
    ) -> str:
        self.check_purpose(purpose)
        self.require_admin(principal)
        clean = {k: v for k, v in self.vault.validate_profile(profile).items() if v is not None}
        async with self.db.write_session() as session:
            customer_id = await self.vault.create_customer(
                session, external_ref=external_ref, profile=clean
            )
            await session.commit()
        log.info("customer.created", team=principal.team, customer=self.ring.pseudonym(customer_id))
        return customer_id

    async def find_customers(
        self, principal: Principal, purpose: str | None, email: str
    ) -> list[str]:
        self.check_purpose(purpose)
        self.require_admin(principal)
        async with self.db.session() as session:
            return await self.vault.find_by_email(session, email)

    async def update_profile(
        self,
        principal: Principal,
        purpose: str | None,
        customer_id: str,
        changes: Mapping[str, object],
    ) -> None:
        self.check_purpose(purpose)
        self.require_admin(principal)
        clean = self.vault.validate_profile(changes, allow_null=True)
        async with self.db.write_session() as session:
            await self.vault.require_active(session, customer_id)
            await self.vault.update_profile(session, customer_id, clean)
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
    ) -> str:
        self.check_purpose(purpose)
        self.require_admin(principal)
        encoded = self.vault.validate_chapter(category, kind, body)
        async with self.db.write_session() as session:
            await self.vault.require_active(session, customer_id)
            chapter_id = await self.vault.add_chapter(
                session,
                customer_id,
                category=category,
                kind=kind,
                occurred_at=occurred_at,
                body=encoded,
                author_team=principal.team,
            )
            await session.commit()
        return chapter_id

    # --- teams and keys ------------------------------------------------------
    async def authenticate_team(self, secret: str) -> Principal | None:
        async with self.db.session() as session:
            return await self.teams.authenticate(session, secret)

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

    # --- demo hooks (filled in by the policy and consent layers) --------------
    async def seed_demo_policy(self) -> None:
        return None

    async def seed_demo_consents(self, customer_id: str) -> None:
        return None
