"""The naive reference (d) of ``make bench``: the gated read as a team would build it
with the same libraries, without this project's design.

Same database file, same key ring, same tables, same policy rules, same answer
shape; but per request:

* the API key is looked up through the ORM;
* one pycasbin ``enforce`` per category (12 of them), no compiled table;
* the consent projection row is loaded through the ORM;
* the story is loaded through the ORM (customer, profile values, chapters, data keys);
* every data key is unwrapped again (no key cache), every field decrypted (AES-GCM);
* one audit row INSERT and its own COMMIT (its own ``naive_audit`` table).

Served by uvicorn as its own process (``bench.run`` starts it)::

    NAIVE_DATA_DIR=var/bench .venv/bin/uvicorn bench.naive_app:app_factory --factory
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import casbin
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from litestar import Litestar, Request, get
from litestar.exceptions import NotAuthorizedException, NotFoundException
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, event, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import registry
from sqlmodel import col

from consent._models import ConsentState
from governance.catalog import load_catalog
from governance.datakeys import dek_aad
from governance.keys import KeyRing, open_value, value_aad
from governance.models import ApiKeyRow, ChapterRow, CustomerRow, DataKeyRow, ProfileValueRow
from policies import Mask, PolicyStore, apply_mask
from policies._model import MASK_RANK

MODEL = Path(__file__).resolve().parent.parent / "policies" / "model.conf"

_metadata = MetaData()
naive_audit = Table(
    "naive_audit",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("subject", String(64), nullable=False),
    Column("purpose", String(120), nullable=False),
    Column("disclosed", Text, nullable=False),
    Column("withheld", Text, nullable=False),
    Column("request_id", String(64), nullable=False),
)


class NaiveAudit:
    """ORM class of the naive audit table."""

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


registry().map_imperatively(NaiveAudit, naive_audit)


def _key_match(category: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return category.startswith(pattern[:-1])
    return category == pattern


def app_factory() -> Litestar:
    data_dir = Path(os.environ.get("NAIVE_DATA_DIR", "./var"))
    url = (
        os.environ.get("NAIVE_DATABASE_URL") or f"sqlite+aiosqlite:///{data_dir / 'storyvault.db'}"
    )
    ring, _ = KeyRing.load_or_create(data_dir, os.environ.get("STORYVAULT_KEYRING") or None)
    catalog = load_catalog(None)
    categories = sorted(catalog.categories)
    mask_key = ring.derived("mask-pseudonym/v1")
    engine: AsyncEngine = create_async_engine(url)
    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    sessions = async_sessionmaker(engine, expire_on_commit=False)
    # The data keys live in the key store, a database of their own (see DataKeys).
    keystore_url = os.environ.get("NAIVE_KEYSTORE_URL") or url
    key_engine = engine if keystore_url == url else create_async_engine(keystore_url)
    key_sessions = async_sessionmaker(key_engine, expire_on_commit=False)
    enforcer = casbin.Enforcer(str(MODEL))
    rules: list[tuple[str, str, str, str, str, str]] = []

    async def startup() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(_metadata.create_all)
        for rule in await PolicyStore(engine).list_rules():
            line = rule.line()
            rules.append(line)
            enforcer.add_policy(*line)

    async def shutdown() -> None:
        await engine.dispose()
        await key_engine.dispose()

    def mask_for(team: str, category: str, purpose: str) -> Mask:
        masks = [
            Mask(m)
            for sub, obj, act, pur, eft, m in rules
            if sub == team
            and act == "read"
            and eft == "allow"
            and pur in (purpose, "*")
            and _key_match(category, obj)
        ]
        return max(masks, key=lambda m: MASK_RANK[m], default=Mask.NONE)

    @get("/v1/customers/{customer_id:str}/story")
    async def story(request: Request[Any, Any, Any], customer_id: str, purpose: str) -> Any:
        header = request.headers.get("authorization", "")
        secret = header.removeprefix("Bearer ").strip()
        async with sessions() as session:
            key = (
                await session.execute(
                    select(ApiKeyRow).where(col(ApiKeyRow.digest) == ring.token_digest(secret))
                )
            ).scalar_one_or_none()
            if key is None or key.revoked_at is not None:
                raise NotAuthorizedException("unknown API key")
            customer = await session.get(CustomerRow, customer_id)
            if customer is None or customer.status == "erased":
                raise NotFoundException("no such customer")
            # One pycasbin enforce per category.
            allowed = [c for c in categories if enforcer.enforce(key.team, c, "read", purpose)]
            withheld = [
                {"category": c, "reason": "no_policy"} for c in categories if c not in allowed
            ]
            state = (
                await session.execute(
                    select(ConsentState).where(
                        col(ConsentState.subject) == customer.subject,
                        col(ConsentState.purpose) == purpose,
                    )
                )
            ).scalar_one_or_none()
            now = datetime.now(UTC)
            basis = catalog.purposes[purpose].legal_basis
            if basis == "consent" and (
                state is None
                or state.state != "granted"
                or (state.expires_at is not None and state.expires_at <= now)
            ):
                withheld += [{"category": c, "reason": "no_consent"} for c in allowed]
                allowed = []
            masks = {c: mask_for(key.team, c, purpose) for c in allowed}
            values = list(
                (
                    await session.execute(
                        select(ProfileValueRow).where(
                            col(ProfileValueRow.customer_id) == customer_id
                        )
                    )
                ).scalars()
            )
            chapters = list(
                (
                    await session.execute(
                        select(ChapterRow)
                        .where(col(ChapterRow.customer_id) == customer_id)
                        .order_by(col(ChapterRow.occurred_at), col(ChapterRow.id))
                    )
                ).scalars()
            )
            # The key store is this same database on PostgreSQL: use the open
            # session (a second connection per request exhausts the pool).
            keys_cm = nullcontext(session) if key_engine is engine else key_sessions()
            async with keys_cm as key_session:
                dek_rows = list(
                    (
                        await key_session.execute(
                            select(DataKeyRow).where(col(DataKeyRow.customer_id) == customer_id)
                        )
                    ).scalars()
                )
            aeads = {
                k.id: AESGCM(
                    ring.unwrap(k.kek_version, k.wrapped, dek_aad(customer_id, k.scope, k.id))
                )
                for k in dek_rows
                if k.wrapped is not None
            }
            profile: dict[str, Any] = {}
            for v in values:
                if v.category in masks and v.dek_id in aeads:
                    plain = open_value(
                        aeads[v.dek_id],
                        v.sealed,
                        value_aad(customer_id, v.field, v.field, v.dek_id),
                    ).decode()
                    m = masks[v.category]
                    profile[v.field] = (
                        plain if m == Mask.NONE else apply_mask(m, plain, pseudonym_key=mask_key)
                    )
            story_chapters: list[dict[str, Any]] = []
            for ch in chapters:
                if ch.category in masks and ch.dek_id in aeads:
                    body = json.loads(
                        open_value(
                            aeads[ch.dek_id],
                            ch.sealed,
                            value_aad(customer_id, ch.id, ch.category, ch.dek_id),
                        )
                    )
                    m = masks[ch.category]
                    story_chapters.append(
                        {
                            "id": ch.id,
                            "category": ch.category,
                            "kind": ch.kind,
                            "occurred_at": ch.occurred_at,
                            "author_team": ch.author_team,
                            "body": body
                            if m == Mask.NONE
                            else apply_mask(m, body, pseudonym_key=mask_key),
                        }
                    )
            # One audit row and its own commit per request.
            session.add(
                NaiveAudit(
                    at=now,
                    actor=key.team,
                    key_id=key.id,
                    subject=customer.subject,
                    purpose=purpose,
                    disclosed=json.dumps(sorted(masks)),
                    withheld=json.dumps(withheld),
                    request_id=uuid.uuid4().hex,
                )
            )
            await session.commit()
        return {
            "customer_id": customer_id,
            "purpose": purpose,
            "profile": profile,
            "chapters": story_chapters,
            "withheld": withheld,
        }

    @get("/health", sync_to_thread=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar(
        route_handlers=[story, health],
        on_startup=[startup],
        on_shutdown=[shutdown],
        logging_config=None,
        debug=False,
    )
