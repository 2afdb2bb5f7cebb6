"""Customer sign-in: one-time codes by mail, then an opaque session token.

* ``login`` always behaves the same whether or not the address belongs to a
  customer (no account enumeration): a code row is written either way, a
  mail only goes out for a customer.
* Codes: 8 digits, valid for the configured TTL (10 minutes), single use,
  stored as a keyed digest, locked after 5 wrong attempts.
* Rate limits per address (blind index) and per client address (keyed
  digest of the IP), answered with 429 and Retry-After.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from governance.errors import GovernanceError, Unauthorized
from governance.keys import KeyRing
from governance.models import (
    CUSTOMER_SESSIONS,
    CUSTOMERS,
    LOGIN_CODES,
    CustomerRow,
    CustomerSessionRow,
    LoginCodeRow,
)

__all__ = ["CustomerPrincipal", "Identity", "RateLimited"]

MAX_ATTEMPTS = 5
WINDOW = timedelta(minutes=15)
CODES_PER_ADDRESS = 5
CODES_PER_CLIENT = 30


class RateLimited(GovernanceError):
    code = "rate_limited"
    kind = "too_many"


@dataclass(frozen=True, slots=True)
class CustomerPrincipal:
    customer_id: str
    session_id: str
    # An erased customer's open session may still read its requests register
    # (to fetch the erasure certificate) and nothing else.
    erased: bool = False


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Identity:
    def __init__(self, ring: KeyRing, *, code_ttl: int, session_ttl: int) -> None:
        self.ring = ring
        self.code_ttl = timedelta(seconds=code_ttl)
        self.session_ttl = timedelta(seconds=session_ttl)

    def _code_digest(self, blind: str, code: str) -> str:
        return self.ring.token_digest(f"login:{blind}:{code}")

    async def start_login(
        self, session: AsyncSession, email: str, client: str, customer_id: str | None
    ) -> str | None:
        """Record a code for this address; return it only when a customer should be mailed."""
        now = datetime.now(UTC)
        blind = self.ring.blind_index(email)
        client_digest = self.ring.token_digest(f"client:{client}")
        since = now - WINDOW
        per_address = (
            await session.execute(
                select(func.count(), func.min(LOGIN_CODES.created_at)).where(
                    LOGIN_CODES.blind_index == blind, LOGIN_CODES.created_at > since
                )
            )
        ).one()
        per_client = (
            await session.execute(
                select(func.count(), func.min(LOGIN_CODES.created_at)).where(
                    LOGIN_CODES.client_digest == client_digest, LOGIN_CODES.created_at > since
                )
            )
        ).one()
        for (count, oldest), limit in (
            (per_address, CODES_PER_ADDRESS),
            (per_client, CODES_PER_CLIENT),
        ):
            if count >= limit:
                retry = (_aware(oldest) + WINDOW - now).total_seconds()
                raise RateLimited(
                    "too many sign-in requests; try again later", retry_after=max(1, int(retry) + 1)
                )
        code = f"{secrets.randbelow(10**8):08d}"
        session.add(
            LoginCodeRow(
                id=str(uuid.uuid4()),
                blind_index=blind,
                client_digest=client_digest,
                customer_id=customer_id,
                code_digest=self._code_digest(blind, code),
                created_at=now,
                expires_at=now + self.code_ttl,
            )
        )
        return code if customer_id is not None else None

    async def verify(
        self, session: AsyncSession, email: str, code: str
    ) -> tuple[str, str, datetime]:
        """Check a code; on success return (customer_id, session token, expiry)."""
        now = datetime.now(UTC)
        blind = self.ring.blind_index(email)
        row = (
            await session.execute(
                select(
                    LOGIN_CODES.id,
                    LOGIN_CODES.code_digest,
                    LOGIN_CODES.attempts,
                    LOGIN_CODES.customer_id,
                    LOGIN_CODES.expires_at,
                )
                .where(LOGIN_CODES.blind_index == blind, LOGIN_CODES.used_at.is_(None))
                .order_by(LOGIN_CODES.created_at.desc())
                .limit(1)
            )
        ).first()
        invalid = Unauthorized("the code is wrong, expired or used", code="invalid_code")
        if row is None or _aware(row.expires_at) <= now:
            raise invalid
        # Count the attempt before comparing, atomically: parallel guesses cannot
        # all slip in under the limit.
        counted = await session.execute(
            update(LoginCodeRow)
            .where(
                LOGIN_CODES.id == row.id,
                LOGIN_CODES.attempts < MAX_ATTEMPTS,
                LOGIN_CODES.used_at.is_(None),
            )
            .values(attempts=LOGIN_CODES.attempts + 1)
        )
        if getattr(counted, "rowcount", 0) != 1:
            await session.rollback()
            retry = int((_aware(row.expires_at) - now).total_seconds()) + 1
            raise RateLimited(
                "too many wrong codes; request a new code later",
                code="code_locked",
                retry_after=retry,
            )
        candidate = self._code_digest(blind, code.strip())
        if row.customer_id is None or not hmac.compare_digest(candidate, row.code_digest):
            await session.commit()
            raise invalid
        consumed = await session.execute(
            update(LoginCodeRow)
            .where(LOGIN_CODES.id == row.id, LOGIN_CODES.used_at.is_(None))
            .values(used_at=now)
        )
        if getattr(consumed, "rowcount", 0) != 1:  # a concurrent verify used it first
            raise invalid
        token = "svs_" + secrets.token_urlsafe(32)
        expires = now + self.session_ttl
        session.add(
            CustomerSessionRow(
                id=str(uuid.uuid4()),
                digest=self.ring.token_digest(token),
                customer_id=row.customer_id,
                created_at=now,
                expires_at=expires,
            )
        )
        return row.customer_id, token, expires

    async def authenticate(self, session: AsyncSession, token: str) -> CustomerPrincipal | None:
        if not token.startswith("svs_") or len(token) > 200:
            return None
        row = (
            await session.execute(
                select(
                    CUSTOMER_SESSIONS.id,
                    CUSTOMER_SESSIONS.customer_id,
                    CUSTOMER_SESSIONS.expires_at,
                    CUSTOMER_SESSIONS.revoked_at,
                    CUSTOMERS.status,
                )
                .join(CustomerRow, CUSTOMERS.id == CUSTOMER_SESSIONS.customer_id)
                .where(CUSTOMER_SESSIONS.digest == self.ring.token_digest(token))
            )
        ).first()
        if row is None or row.revoked_at is not None:
            return None
        if _aware(row.expires_at) <= datetime.now(UTC):
            return None
        return CustomerPrincipal(
            customer_id=row.customer_id, session_id=row.id, erased=row.status == "erased"
        )

    async def logout(self, session: AsyncSession, session_id: str) -> None:
        await session.execute(
            update(CustomerSessionRow)
            .where(CUSTOMER_SESSIONS.id == session_id)
            .values(revoked_at=datetime.now(UTC))
        )
