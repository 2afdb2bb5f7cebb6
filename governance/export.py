"""Export of everything held about a customer (GDPR Art. 15, portability Art. 20).

The JSON document follows ``export_schema.json`` (published at
``/v1/schemas/export.json``). It is produced as a stream: chapters are read,
decrypted and written in batches, so a story of any length exports in
bounded memory. The ZIP holds the same JSON, one CSV per section and a README.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import select, tuple_

from audit import AuditEntry, EntryKind
from governance.keys import open_value, value_aad
from governance.models import CHAPTERS, RIGHTS_REQUESTS
from policies import Action

if TYPE_CHECKING:
    from governance.service import StoryVault

__all__ = ["EXPORT_FORMAT", "Exporter", "export_schema"]

EXPORT_FORMAT = "storyvault.export/1"
BATCH = 500


def export_schema() -> dict[str, Any]:
    raw = resources.files("governance").joinpath("export_schema.json").read_text()
    schema: dict[str, Any] = json.loads(raw)
    return schema


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_default, separators=(",", ":"))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).isoformat()
    return str(value)


class Exporter:
    def __init__(self, sv: StoryVault) -> None:
        self.sv = sv

    def _recipients(self, category: str, purpose: str) -> list[str]:
        snapshot = self.sv.policy.snapshot
        teams = sorted(
            {team for (team, p, a) in snapshot.tables if p == purpose and a == Action.READ}
        )
        return [
            t
            for t in teams
            if self.sv.policy.table(t, purpose, Action.READ).decide(category).allowed
        ]

    def categories_section(self, sources: dict[str, list[str]]) -> list[dict[str, Any]]:
        out = []
        for cat in self.sv.catalog.categories.values():
            uses = []
            for purpose in self.sv.catalog.purposes.values():
                recipients = self._recipients(cat.name, purpose.name)
                if recipients:
                    uses.append(
                        {
                            "purpose": purpose.name,
                            "description": purpose.description,
                            "legal_basis": purpose.legal_basis,
                            "recipients": recipients,
                        }
                    )
            out.append(
                {
                    "category": cat.name,
                    "fideslang": cat.fideslang,
                    "description": cat.description,
                    "purposes": uses,
                    "retention_days": cat.retention_days or None,
                    "legal_hold": (
                        {"purpose": cat.legal_hold.purpose, "years": cat.legal_hold.years}
                        if cat.legal_hold
                        else None
                    ),
                    "source": sources.get(cat.name, []),
                }
            )
        return out

    async def _chapters(self, customer_id: str) -> AsyncIterator[list[dict[str, Any]]]:
        after: tuple[datetime, str] | None = None
        while True:
            stmt = (
                select(
                    CHAPTERS.id,
                    CHAPTERS.category,
                    CHAPTERS.kind,
                    CHAPTERS.occurred_at,
                    CHAPTERS.author_team,
                    CHAPTERS.dek_id,
                    CHAPTERS.sealed,
                )
                .where(CHAPTERS.customer_id == customer_id)
                .order_by(CHAPTERS.occurred_at, CHAPTERS.id)
                .limit(BATCH)
            )
            if after is not None:
                stmt = stmt.where(tuple_(CHAPTERS.occurred_at, CHAPTERS.id) > after)
            async with self.sv.db.session() as session:
                rows = (await session.execute(stmt)).all()
            if not rows:
                return
            keys = await self.sv.keys.for_read({r.dek_id for r in rows})
            batch = []
            for r in rows:
                aead = keys.get(r.dek_id)
                if aead is None:
                    continue
                body = open_value(
                    aead, r.sealed, value_aad(customer_id, r.id, r.category, r.dek_id)
                )
                batch.append(
                    {
                        "id": r.id,
                        "category": r.category,
                        "kind": r.kind,
                        "occurred_at": r.occurred_at,
                        "author_team": r.author_team,
                        "body": json.loads(body),
                    }
                )
            yield batch
            after = (rows[-1].occurred_at, rows[-1].id)

    async def _head(self, customer_id: str) -> dict[str, Any]:
        sv = self.sv
        subject = sv.ring.pseudonym(customer_id)
        async with sv.db.session() as session:
            customer = await sv.vault.require_active(session, customer_id)
            story = await sv.vault.read_story(
                session, customer_id, categories=[], customer=customer
            )
            profile_story = await sv.vault.read_story(
                session,
                customer_id,
                categories={f.category for f in sv.catalog.profile_fields.values()},
                customer=customer,
            )
            history = await sv.ledger.history(session, subject)
            sources_rows = (
                await session.execute(
                    select(CHAPTERS.category, CHAPTERS.author_team)
                    .where(CHAPTERS.customer_id == customer_id)
                    .distinct()
                )
            ).all()
            requests = (
                await session.execute(
                    select(
                        RIGHTS_REQUESTS.id,
                        RIGHTS_REQUESTS.type,
                        RIGHTS_REQUESTS.status,
                        RIGHTS_REQUESTS.received_at,
                        RIGHTS_REQUESTS.due_at,
                        RIGHTS_REQUESTS.completed_at,
                    )
                    .where(RIGHTS_REQUESTS.customer_id == customer_id)
                    .order_by(RIGHTS_REQUESTS.received_at)
                )
            ).all()
        del story
        sources: dict[str, list[str]] = {}
        for row in sources_rows:
            sources.setdefault(row.category, []).append(f"team:{row.author_team}")
        for f in sv.catalog.profile_fields.values():
            if f.name in profile_story.profile:
                sources.setdefault(f.category, []).append("profile")
        consents = await sv.consents_of(customer_id)
        insights = await sv.insights_for_export(customer_id)
        access: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = await sv.audit_log.list_entries(
                subject=subject, kinds=[EntryKind.DISCLOSURE], cursor=cursor, limit=500
            )
            access.extend(
                {
                    "index": s.leaf_index,
                    "team": s.entry.actor,
                    "purpose": s.entry.purpose,
                    "categories": list(s.entry.categories),
                    "at": s.entry.timestamp,
                }
                for s in page.items
                if s.entry.actor != "customer"
            )
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return {
            "format": EXPORT_FORMAT,
            "generated_at": datetime.now(UTC),
            "controller": "Story Vault",
            "customer": {
                "id": customer_id,
                "subject": subject,
                "created_at": customer.created_at,
                "status": customer.status,
            },
            "profile": [
                {"field": k, "category": profile_story.profile_categories[k], "value": v}
                for k, v in sorted(profile_story.profile.items())
            ],
            "consents": [
                {
                    "purpose": c.purpose,
                    "description": c.description,
                    "legal_basis": c.legal_basis,
                    "state": c.state,
                    "since": c.since,
                    "expires_at": c.expires_at,
                    "allowed": c.allowed,
                }
                for c in consents
            ],
            "consent_history": [
                {
                    "ledger_index": e.ledger_index,
                    "event_id": str(e.event_id),
                    "purpose": e.purpose,
                    "event": str(e.event_type),
                    "status": str(e.status),
                    "channel": str(e.channel),
                    "at": e.recorded_at,
                    "notice_version": e.notice_version,
                    "receipt": sv.receipts.issue(e, sv.ledger.terms(e.purpose)),
                }
                for e in history
                if e.purpose in sv.ledger.purposes
            ],
            "access_log": access,
            "categories": self.categories_section(sources),
            "requests": [
                {
                    "id": r.id,
                    "type": r.type,
                    "status": r.status,
                    "received_at": r.received_at,
                    "due_at": r.due_at,
                    "completed_at": r.completed_at,
                }
                for r in requests
            ],
            "insights": insights,
        }

    async def stream_json(
        self,
        customer_id: str,
        *,
        request_id: str | None = None,
        chapter_sink: IO[str] | None = None,
    ) -> AsyncIterator[bytes]:
        """The export document as a stream of UTF-8 chunks; chapters last, in batches."""
        head = await self._head(customer_id)
        await self.sv.audit_writer_append(
            AuditEntry(
                kind=EntryKind.EXPORT,
                actor="customer",
                subject=head["customer"]["subject"],
                purpose="data_subject.access",
                request_id=request_id,
                categories=tuple(sorted(self.sv.catalog.categories)),
                detail={"operation": "me.export"},
            )
        )
        text = _dump(head)
        yield (text[:-1] + ',"chapters":[').encode()
        writer = csv.writer(chapter_sink) if chapter_sink is not None else None
        if writer is not None:
            writer.writerow(["id", "category", "kind", "occurred_at", "author_team", "body"])
        first = True
        async for batch in self._chapters(customer_id):
            parts = []
            for ch in batch:
                parts.append(("" if first else ",") + _dump(ch))
                first = False
                if writer is not None:
                    writer.writerow(
                        [
                            ch["id"],
                            ch["category"],
                            ch["kind"],
                            _default(ch["occurred_at"]),
                            ch["author_team"],
                            _dump(ch["body"]),
                        ]
                    )
            yield "".join(parts).encode()
        yield b"]}"

    async def zip_file(self, customer_id: str, *, request_id: str | None = None) -> IO[bytes]:
        """The ZIP export in a spooled temporary file (memory-bounded, spills to disk)."""
        out = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115  (the caller streams and closes it)
        chapters_csv = tempfile.SpooledTemporaryFile(  # noqa: SIM115  (closed below, after use)
            max_size=4 * 1024 * 1024, mode="w+", newline=""
        )
        head_json = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            with zf.open("export.json", "w") as fh:
                async for chunk in self.stream_json(
                    customer_id, request_id=request_id, chapter_sink=chapters_csv
                ):
                    fh.write(chunk)
                    if head_json.tell() == 0:
                        head_json.write(chunk)
            chapters_csv.seek(0)
            with zf.open("chapters.csv", "w") as fh:
                while block := chapters_csv.read(65536):
                    fh.write(block.encode())
            chapters_csv.close()
            head = json.loads(head_json.getvalue()[: -len(b',"chapters":[')].decode() + "}")
            for name, rows in (
                ("profile.csv", head["profile"]),
                ("consents.csv", head["consents"]),
                ("consent_history.csv", head["consent_history"]),
                ("access_log.csv", head["access_log"]),
                ("categories.csv", head["categories"]),
                ("requests.csv", head["requests"]),
                ("insights.csv", head["insights"]),
            ):
                zf.writestr(name, _csv(rows))
            zf.writestr("README.txt", README)
        out.seek(0)
        return out


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _dump(v) if isinstance(v, list | dict) else v for k, v in row.items()})
    return buf.getvalue()


README = """Your Story Vault export
=======================

export.json          everything we hold about you, machine-readable (JSON Schema:
                     /v1/schemas/export.json, format storyvault.export/1)
profile.csv          your profile fields
chapters.csv         every chapter of your story (purchases, tickets, chats, notes),
                     the body as JSON
consents.csv         each purpose we use data for, its legal basis, and your choice
consent_history.csv  every consent event, each with its signed receipt (JWS; keys at
                     /.well-known/jwks.json)
access_log.csv       who read which parts of your story, when, and for what purpose;
                     each entry's index lets anyone fetch a proof from our audit log
categories.csv       for each kind of data: purposes, legal basis, recipients (teams),
                     retention, and where it came from
requests.csv         your privacy requests and their deadlines
insights.csv         what we infer about you (signals), from which data, and why; the
                     profiling ones only if you agreed to analytics.profiling
"""
