"""Compliance reports: records of processing, consent evidence, the requests
register, access statistics and log integrity, as JSON, CSV or HTML.

Every report is built in two steps: ``Reports.build`` gathers the data (a plain
dict, the JSON format) with aggregations done in SQL (GROUP BY, and the
database's JSON functions over audit leaves), so memory stays bounded by the
number of groups, not by the number of rows; ``render`` turns it into CSV or a
self-contained HTML page (Jinja2, charts as inline SVG drawn by matplotlib with
text as paths: no fonts, scripts or network needed, printable).

``Reports.generate`` renders one and writes the SHA-256 of the exact bytes
returned to the audit log (kind ``report``), so a report handed to an auditor
can be matched to the log later.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import case, func, select, text
from sqlalchemy.sql.elements import ColumnElement

from audit import (
    AuditEntry,
    EntryKind,
    InvalidProofRequest,
    decode_leaf,
    verify_consistency,
    verify_log,
    verify_tree_head,
)
from audit import entries as audit_entries
from audit import tree_heads as audit_tree_heads
from consent import ConsentEvent, ConsentState, DpvStatus, EventType, chain_head, verify_chain
from governance.errors import InvalidInput, NotFound
from governance.keys import describe
from governance.models import DATA_KEYS, RIGHTS_REQUESTS
from policies import Action

if TYPE_CHECKING:
    from governance.service import StoryVault

__all__ = [
    "DEFAULT_WINDOW",
    "FORMATS",
    "REPORTS",
    "RenderedReport",
    "ReportRequestError",
    "Reports",
    "Window",
]

REPORTS = ("ropa", "consent", "requests", "access", "integrity")
FORMATS = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "html": "text/html; charset=utf-8",
}
DEFAULT_WINDOW = timedelta(days=90)
MAX_WINDOW = timedelta(days=3660)
DUE_SOON = timedelta(days=7)
CLOSED = ("completed", "refused")

SECURITY_MEASURES = (
    "Every personal value encrypted at rest with AES-256-GCM; associated data binds each "
    "ciphertext to its customer, record and field.",
    "A data key per customer and category scope, wrapped by a versioned key-encryption key "
    "(KEK); KEKs rotate online and old versions are retired once unused.",
    "Key store separated from the data store (its own database in production), so a copy "
    "of the data alone decrypts nothing.",
    "Erasure by crypto-shredding: destroying a data key makes every copy (replicas, backups) "
    "of what it sealed unreadable.",
    "Look-ups by e-mail through a keyed blind index (HMAC-SHA-256), never plaintext.",
    "Purpose-bound access: every read names a purpose; policy decision tables and the "
    "customer's consent decide per category; masks (partial, hash, redact, year only).",
    "Pseudonymous ids only in logs and audit entries.",
    "Tamper-evident audit log: RFC 9162 Merkle tree with Ed25519-signed tree heads, "
    "inclusion and consistency proofs; data leaves only after its audit entry is durable.",
    "Hash-chained, append-only consent ledger with signed (JWS) receipts.",
    "Team API keys and customer sessions stored as keyed digests only; admin actions need "
    "the admin role.",
)

# Denied reads are counted once, under the most specific reason among their
# withheld categories: a legal-basis reason beats a policy reason.
REASON_RANK = (
    "erased",
    "legal_hold_only",
    "consent_withdrawn",
    "consent_expired",
    "objected",
    "no_consent",
    "denied_by_policy",
    "no_policy",
    "unknown_purpose",
)
CONSENT_MEASURES = (
    "grants",
    "withdrawals",
    "expiries",
    "objections",
    "gpc_opt_outs",
    "objections_lifted",
)


class ReportRequestError(InvalidInput):
    """A malformed report request (unknown format, bad window): HTTP 400."""

    kind: ClassVar[str] = "bad_request"


@dataclass(frozen=True, slots=True)
class Window:
    since: datetime
    until: datetime

    @classmethod
    def of(
        cls, since: datetime | None, until: datetime | None, *, now: datetime | None = None
    ) -> Window:
        end = _aware(until) if until is not None else (now or datetime.now(UTC))
        start = _aware(since) if since is not None else end - DEFAULT_WINDOW
        if start >= end:
            raise ReportRequestError("'since' must be before 'until'", code="invalid_window")
        if end - start > MAX_WINDOW:
            raise ReportRequestError(
                "a report window spans at most ten years", code="invalid_window"
            )
        return cls(start, end)

    @property
    def naive(self) -> tuple[datetime, datetime]:
        return _naive(self.since), _naive(self.until)

    def days(self) -> list[str]:
        first, last = self.since.date(), (self.until - timedelta(microseconds=1)).date()
        return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]

    def as_dict(self) -> dict[str, str | None]:
        return {"since": _iso(self.since), "until": _iso(self.until)}


@dataclass(frozen=True, slots=True)
class RenderedReport:
    name: str
    format: str
    media_type: str
    body: bytes
    sha256: str
    audit_index: int

    @property
    def filename(self) -> str:
        return f"storyvault-{self.name}-report.{self.format}"


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _naive(value: datetime) -> datetime:
    return _aware(value).replace(tzinfo=None)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return _aware(value).isoformat().replace("+00:00", "Z")


def _day_text(day: Any) -> str:
    if isinstance(day, datetime | date):
        return day.isoformat()[:10]
    return str(day)[:10]


class Reports:
    """The five compliance reports over one StoryVault."""

    def __init__(self, sv: StoryVault) -> None:
        self.sv = sv
        self._dialect = sv.db.dialect

    # --- entry points -------------------------------------------------------------
    @staticmethod
    def check(name: str, fmt: str) -> None:
        if name not in REPORTS:
            raise NotFound(f"no report named '{name[:40]}'", code="unknown_report")
        if fmt not in FORMATS:
            raise ReportRequestError(
                f"format must be one of: {', '.join(FORMATS)}", code="invalid_format"
            )

    async def build(
        self,
        name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        from_size: int | None = None,
        from_root: str | None = None,
        verify: bool = True,
    ) -> dict[str, Any]:
        """The report's data (what the JSON format returns)."""
        self.check(name, "json")
        window = Window.of(since, until)
        started = time.perf_counter()
        if name == "ropa":
            body = self._ropa()
        elif name == "consent":
            body = await self._consent(window)
        elif name == "requests":
            body = await self._requests(window)
        elif name == "access":
            body = await self._access(window)
        else:
            body = await self._integrity(from_size, from_root, verify=verify)
        return {
            "report": name,
            "title": TITLES[name],
            "generated_at": _iso(datetime.now(UTC)),
            "window": None if name in ("ropa", "integrity") else window.as_dict(),
            "catalog_digest": self.sv.catalog.digest,
            "policy_version": self.sv.policy.version,
            **body,
            "build_ms": round((time.perf_counter() - started) * 1000, 1),
        }

    async def generate(
        self,
        name: str,
        fmt: str = "json",
        *,
        actor: str,
        actor_key_id: str | None = None,
        request_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        from_size: int | None = None,
        from_root: str | None = None,
        verify: bool = True,
    ) -> RenderedReport:
        """Build, render, hash and audit one report."""
        self.check(name, fmt)
        data = await self.build(
            name, since=since, until=until, from_size=from_size, from_root=from_root, verify=verify
        )
        body = await asyncio.to_thread(render, data, fmt)
        digest = hashlib.sha256(body).hexdigest()
        window = data.get("window") or {}
        index = await self.sv.audit_writer_append(
            AuditEntry(
                kind=EntryKind.REPORT,
                actor=actor,
                actor_key_id=actor_key_id,
                request_id=request_id,
                detail={
                    "operation": "report.generate",
                    "report": name,
                    "format": fmt,
                    "sha256": digest,
                    "bytes": len(body),
                    "since": window.get("since"),
                    "until": window.get("until"),
                },
            )
        )
        return RenderedReport(name, fmt, FORMATS[fmt], body, digest, index)

    # --- helpers ------------------------------------------------------------------
    def _day(self, column: Any, *, aware: bool) -> ColumnElement[Any]:
        """The UTC calendar day of a timestamp column, as 'YYYY-MM-DD' text."""
        if self._dialect == "postgresql":
            utc = func.timezone("UTC", column) if aware else column
            return func.to_char(utc, "YYYY-MM-DD")
        return func.date(column)

    # --- ropa ---------------------------------------------------------------------
    def _ropa(self) -> dict[str, Any]:
        catalog = self.sv.catalog
        snapshot = self.sv.policy.snapshot
        purposes = []
        for purpose in catalog.purposes.values():
            recipients: dict[str, dict[str, str]] = {}
            writers: set[str] = set()
            for (team, p, action), table in snapshot.tables.items():
                if p != purpose.name or not table.allowed:
                    continue
                if action == Action.READ:
                    recipients[team] = {c: str(table[c].mask) for c in sorted(table.allowed)}
                elif action == Action.WRITE:
                    writers.add(team)
            categories = sorted({c for allowed in recipients.values() for c in allowed})
            purposes.append(
                {
                    "purpose": purpose.name,
                    "description": purpose.description,
                    "legal_basis": purpose.legal_basis,
                    "data_use": purpose.fideslang,
                    "sale_or_sharing": purpose.sale_or_sharing,
                    "notice_version": purpose.notice_version,
                    "notice_sha256": purpose.notice_sha256,
                    "consent_valid_days": purpose.max_age_days or None,
                    "data_subjects": ["customers"],
                    "categories": [
                        {
                            "category": c,
                            "fideslang": catalog.categories[c].fideslang,
                            "retention": _retention(catalog.categories[c]),
                        }
                        for c in categories
                        if c in catalog.categories
                    ],
                    "recipients": [
                        {"team": team, "categories": masks}
                        for team, masks in sorted(recipients.items())
                    ],
                    "sources": sorted(writers),
                }
            )
        return {
            "controller": "Story Vault",
            "purposes": purposes,
            "categories": [
                {
                    "category": c.name,
                    "fideslang": c.fideslang,
                    "description": c.description,
                    "retention": _retention(c),
                    "retention_days": c.retention_days or None,
                    "legal_hold": (
                        {"purpose": c.legal_hold.purpose, "years": c.legal_hold.years}
                        if c.legal_hold
                        else None
                    ),
                }
                for c in catalog.categories.values()
            ],
            "security_measures": list(SECURITY_MEASURES),
            "international_transfers": "none recorded by this service",
        }

    # --- consent ------------------------------------------------------------------
    async def _consent(self, window: Window) -> dict[str, Any]:
        ev = ConsentEvent.__table__.c  # type: ignore[attr-defined]
        measure = case(
            (ev.event_type == EventType.GPC_OPT_OUT.value, "gpc_opt_outs"),
            (ev.event_type == EventType.EXPIRE.value, "expiries"),
            (
                ev.status.in_(
                    [DpvStatus.CONSENT_GIVEN.value, DpvStatus.RENEWED_CONSENT_GIVEN.value]
                ),
                "grants",
            ),
            (ev.status == DpvStatus.CONSENT_WITHDRAWN.value, "withdrawals"),
            (ev.status == DpvStatus.OBJECTED.value, "objections"),
            (ev.status == DpvStatus.VALID_FOR_PROCESSING.value, "objections_lifted"),
            else_="other",
        ).label("measure")
        day = self._day(ev.recorded_at, aware=True).label("day")
        # Bound as the column's own type, so SQLite gets its naive-UTC text form.
        in_window = (ev.recorded_at >= window.since) & (ev.recorded_at < window.until)
        query = (
            select(day, ev.purpose, ev.notice_version, measure, func.count().label("n"))
            .where(in_window)
            .group_by(day, ev.purpose, ev.notice_version, measure)
        )
        st = ConsentState.__table__.c  # type: ignore[attr-defined]
        standing_q = select(st.purpose, st.state, func.count().label("n")).group_by(
            st.purpose, st.state
        )
        channel_q = (
            select(ev.channel, func.count().label("n")).where(in_window).group_by(ev.channel)
        )
        async with self.sv.db.session() as session:
            rows = (await session.execute(query)).all()
            standing_rows = (await session.execute(standing_q)).all()
            channel_rows = (await session.execute(channel_q)).all()
        days = window.days()
        totals: dict[tuple[str, str], dict[str, int]] = {}
        by_day: dict[str, dict[str, int]] = {d: dict.fromkeys(CONSENT_MEASURES, 0) for d in days}
        detail: list[dict[str, Any]] = []
        cells: dict[tuple[str, str, str], dict[str, int]] = {}
        for row in rows:
            d = _day_text(row.day)
            if row.measure not in CONSENT_MEASURES:
                continue
            key = (row.purpose, row.notice_version)
            totals.setdefault(key, dict.fromkeys(CONSENT_MEASURES, 0))[row.measure] += row.n
            by_day.setdefault(d, dict.fromkeys(CONSENT_MEASURES, 0))[row.measure] += row.n
            cells.setdefault((d, *key), dict.fromkeys(CONSENT_MEASURES, 0))[row.measure] += row.n
        for (d, purpose, version), counts in sorted(cells.items()):
            detail.append({"day": d, "purpose": purpose, "notice_version": version, **counts})
        for terms in self.sv.catalog.purposes.values():
            if terms.legal_basis in ("consent", "legitimate_interest"):
                totals.setdefault(
                    (terms.name, terms.notice_version), dict.fromkeys(CONSENT_MEASURES, 0)
                )
        standing: dict[str, dict[str, int]] = {}
        for row in standing_rows:
            standing.setdefault(row.purpose, {})[str(row.state)] = row.n
        legal = {p.name: p.legal_basis for p in self.sv.catalog.purposes.values()}
        return {
            "by_purpose": [
                {
                    "purpose": purpose,
                    "notice_version": version,
                    "legal_basis": legal.get(purpose),
                    **counts,
                }
                for (purpose, version), counts in sorted(totals.items())
            ],
            "by_day": [{"day": d, **by_day[d]} for d in sorted(by_day)],
            "detail": detail,
            "by_channel": {str(r.channel): r.n for r in channel_rows},
            "current_standing": standing,
            "measures": {
                "grants": "consent given or renewed (direct or imported)",
                "withdrawals": "consent withdrawn (direct or imported)",
                "expiries": "expiry events written by the retention sweep",
                "objections": "Art. 21 objections to legitimate-interest purposes",
                "gpc_opt_outs": "Global Privacy Control (Sec-GPC: 1) opt-outs",
                "objections_lifted": "objections the customer lifted again",
            },
        }

    # --- requests -----------------------------------------------------------------
    async def _requests(self, window: Window) -> dict[str, Any]:
        rr = RIGHTS_REQUESTS
        now = datetime.now(UTC)
        is_open = rr.status.notin_(CLOSED)
        received_in = (rr.received_at >= window.since) & (rr.received_at < window.until)
        completed_in = (rr.completed_at >= window.since) & (rr.completed_at < window.until)
        if self._dialect == "postgresql":
            days_expr: ColumnElement[Any] = (
                func.extract("epoch", rr.completed_at - rr.received_at) / 86400.0
            )
        else:
            days_expr = func.julianday(rr.completed_at) - func.julianday(rr.received_at)

        def n(cond: ColumnElement[bool]) -> ColumnElement[int]:
            return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

        by_type_q = select(
            rr.type,
            n(is_open).label("open"),
            n(is_open & (rr.due_at >= now) & (rr.due_at <= now + DUE_SOON)).label("due_soon"),
            n(is_open & (rr.due_at < now)).label("overdue"),
            n(received_in).label("received"),
            n(completed_in & (rr.status == "completed")).label("completed"),
            n(completed_in & (rr.status == "refused")).label("refused"),
            n(completed_in & (rr.completed_at > rr.due_at)).label("completed_late"),
            n(rr.extended_reason.is_not(None) & (is_open | completed_in)).label("extended"),
        ).group_by(rr.type)
        done = completed_in & (rr.status == "completed")
        count_done_q = select(func.count()).where(done)
        received_day = self._day(rr.received_at, aware=True).label("day")
        completed_day = self._day(rr.completed_at, aware=True).label("day")
        received_by_day_q = (
            select(received_day, func.count().label("n")).where(received_in).group_by(received_day)
        )
        completed_by_day_q = (
            select(completed_day, func.count().label("n")).where(done).group_by(completed_day)
        )
        extensions_q = (
            select(rr.id, rr.type, rr.status, rr.received_at, rr.due_at, rr.extended_reason)
            .where(rr.extended_reason.is_not(None), is_open | completed_in)
            .order_by(rr.received_at.desc())
            .limit(500)
        )
        register_q = (
            select(
                rr.id,
                rr.type,
                rr.status,
                rr.channel,
                rr.received_at,
                rr.due_at,
                rr.completed_at,
                rr.extended_reason,
            )
            .where(is_open | received_in | completed_in)
            .order_by(rr.received_at, rr.id)
        )
        async with self.sv.db.session() as session:
            type_rows = (await session.execute(by_type_q)).all()
            n_done = int((await session.execute(count_done_q)).scalar_one())
            median = None
            if n_done:
                # The median in SQL on both dialects: the middle one or two by ORDER BY.
                mid = (
                    await session.execute(
                        select(days_expr.label("d"))
                        .where(done)
                        .order_by(days_expr)
                        .offset((n_done - 1) // 2)
                        .limit(2 - n_done % 2)
                    )
                ).scalars()
                values = [float(v) for v in mid]
                median = round(sum(values) / len(values), 2)
            received_days = {
                _day_text(r.day): r.n for r in await session.execute(received_by_day_q)
            }
            completed_days = {
                _day_text(r.day): r.n for r in await session.execute(completed_by_day_q)
            }
            extensions = [
                {
                    "request_id": r.id,
                    "type": r.type,
                    "status": r.status,
                    "received_at": _iso(r.received_at),
                    "due_at": _iso(r.due_at),
                    "reason": r.extended_reason,
                }
                for r in await session.execute(extensions_q)
            ]
            register = []
            result = await session.stream(register_q.execution_options(yield_per=1000))
            async for r in result:
                due = _aware(r.due_at)
                completed = _aware(r.completed_at) if r.completed_at is not None else None
                register.append(
                    {
                        "request_id": r.id,
                        "type": r.type,
                        "status": r.status,
                        "channel": r.channel,
                        "received_at": _iso(r.received_at),
                        "due_at": _iso(due),
                        "completed_at": _iso(completed),
                        "days_to_complete": (
                            round((completed - _aware(r.received_at)).total_seconds() / 86400, 2)
                            if completed
                            else None
                        ),
                        "overdue": completed is None and due < now,
                        "extended_reason": r.extended_reason,
                    }
                )
        fields = (
            "open",
            "due_soon",
            "overdue",
            "received",
            "completed",
            "refused",
            "completed_late",
            "extended",
        )
        by_type = {r.type: {f: int(getattr(r, f)) for f in fields} for r in type_rows}
        summary = {f: sum(t[f] for t in by_type.values()) for f in fields}
        summary["median_days_to_complete"] = median  # type: ignore[assignment]
        return {
            "as_of": _iso(now),
            "due_soon_days": DUE_SOON.days,
            "summary": summary,
            "by_type": by_type,
            "by_day": [
                {
                    "day": d,
                    "received": received_days.get(d, 0),
                    "completed": completed_days.get(d, 0),
                }
                for d in window.days()
            ],
            "extensions": extensions,
            "register": register,
        }

    # --- access -------------------------------------------------------------------
    async def _access(self, window: Window) -> dict[str, Any]:
        since, until = window.naive
        e = audit_entries.c
        reads = ("disclosure", "denial")
        in_window = (e.created_at >= since) & (e.created_at < until)
        reads_q = (
            select(e.kind, e.actor, e.purpose, func.count().label("n"))
            .where(e.kind.in_(reads), in_window)
            .group_by(e.kind, e.actor, e.purpose)
        )
        params = {"since": since, "until": until}
        async with self.sv.db.session() as session:
            read_rows = (await session.execute(reads_q)).all()
            if self._dialect == "postgresql":
                leaf_rows = await self._leaf_counts_pg(session, params)
            else:
                leaf_rows = await self._leaf_counts_sqlite(session, params)
        category_rows = [r for r in leaf_rows if r[0] == "c"]
        withheld_rows = [r for r in leaf_rows if r[0] == "w"]
        denial_rows = [(a, p, int(k), n) for m, a, p, k, n in leaf_rows if m == "d"]
        reads_by: dict[tuple[str, str], dict[str, int]] = {}
        for row in read_rows:
            counts = reads_by.setdefault(
                (row.actor, row.purpose or ""), {"disclosures": 0, "denials": 0}
            )
            counts["disclosures" if row.kind == "disclosure" else "denials"] += row.n
        denials_by_reason: dict[str, int] = {}
        denial_matrix: list[dict[str, Any]] = []
        for actor, purpose, top, n in sorted(denial_rows, key=lambda r: (r[0], r[1] or "", r[2])):
            code = REASON_RANK[top] if 0 <= top < len(REASON_RANK) else "other"
            denials_by_reason[code] = denials_by_reason.get(code, 0) + n
            denial_matrix.append({"team": actor, "purpose": purpose, "reason": code, "denials": n})
        withheld_by_reason: dict[str, int] = {}
        for _, _, _, reason, n in withheld_rows:
            withheld_by_reason[reason] = withheld_by_reason.get(reason, 0) + n
        return {
            "reads": [
                {"team": team, "purpose": purpose, **counts}
                for (team, purpose), counts in sorted(reads_by.items())
            ],
            "totals": {
                "disclosures": sum(c["disclosures"] for c in reads_by.values()),
                "denials": sum(c["denials"] for c in reads_by.values()),
            },
            "disclosures": [
                {"team": a, "purpose": p, "category": k, "count": n}
                for _, a, p, k, n in sorted(category_rows, key=lambda r: (r[1], r[2] or "", r[3]))
            ],
            "denials_by_reason": dict(sorted(denials_by_reason.items())),
            "denials": denial_matrix,
            "withheld_by_reason": dict(sorted(withheld_by_reason.items())),
            "withheld": [
                {"team": a, "purpose": p, "reason": k, "count": n}
                for _, a, p, k, n in sorted(withheld_rows, key=lambda r: (r[1], r[2] or "", r[3]))
            ],
            "notes": (
                "A disclosure is a gated read that released at least one category; a denial "
                "released none. A denial counts once, under its most specific reason "
                f"({' > '.join(REASON_RANK)}). Withheld counts are per category and read."
            ),
        }

    # One pass over the leaves in the window yields three kinds of rows, as
    # (measure, team, purpose, key, count): "c" disclosed category, "w" withheld
    # reason (per category and read), "d" the rank of a denied read's top reason.
    _RANK_SQL = " ".join(f"WHEN '{r}' THEN {i}" for i, r in enumerate(REASON_RANK))

    async def _leaf_counts_pg(
        self, session: Any, params: dict[str, Any]
    ) -> list[tuple[str, str, str | None, str, int]]:
        # OFFSET 0 keeps the parsed document a per-row value: each leaf is parsed once.
        sql = (
            "SELECT x.m, e.actor, e.purpose, x.k, count(*) AS n "  # noqa: S608  (constant fragments)
            "FROM audit_entries e "
            "CROSS JOIN LATERAL (SELECT convert_from(e.leaf, 'UTF8')::jsonb AS j OFFSET 0) d "
            "CROSS JOIN LATERAL ("
            "  SELECT 'c' AS m, c.value AS k FROM jsonb_array_elements_text("
            "    CASE WHEN e.kind = 'disclosure' THEN d.j -> 'categories' ELSE '[]'::jsonb END"
            "  ) AS c"
            "  UNION ALL SELECT 'w', w.value ->> 'reason' "
            "    FROM jsonb_array_elements(d.j -> 'withheld') AS w"
            "  UNION ALL SELECT 'd', min(CASE w.value ->> 'reason' "
            f"   {self._RANK_SQL} ELSE 99 END)::text "
            "    FROM jsonb_array_elements(d.j -> 'withheld') AS w "
            "    WHERE e.kind = 'denial' HAVING count(*) > 0"
            ") x "
            "WHERE e.kind IN ('disclosure', 'denial') "
            "AND e.created_at >= :since AND e.created_at < :until "
            "GROUP BY x.m, e.actor, e.purpose, x.k"
        )
        rows = (await session.execute(text(sql), params)).all()
        return [(r.m, r.actor, r.purpose, r.k, int(r.n)) for r in rows]

    async def _leaf_counts_sqlite(
        self, session: Any, params: dict[str, Any]
    ) -> list[tuple[str, str, str | None, str, int]]:
        window = "e.created_at >= :since AND e.created_at < :until"
        leaf = "CAST(e.leaf AS TEXT)"
        reason = "json_extract(w.value, '$.reason')"
        sql = (
            "SELECT 'c' AS m, e.actor, e.purpose, c.value AS k, count(*) AS n "  # noqa: S608  (constant fragments)
            f"FROM audit_entries e, json_each({leaf}, '$.categories') AS c "
            f"WHERE e.kind = 'disclosure' AND {window} GROUP BY e.actor, e.purpose, c.value "
            f"UNION ALL SELECT 'w', e.actor, e.purpose, {reason}, count(*) "
            f"FROM audit_entries e, json_each({leaf}, '$.withheld') AS w "
            f"WHERE e.kind IN ('disclosure', 'denial') AND {window} "
            f"GROUP BY e.actor, e.purpose, {reason} "
            "UNION ALL SELECT 'd', actor, purpose, CAST(top AS TEXT), count(*) FROM ("
            "  SELECT e.leaf_index, e.actor, e.purpose, "
            f"  min(CASE {reason} {self._RANK_SQL} ELSE 99 END) AS top "
            f"  FROM audit_entries e, json_each({leaf}, '$.withheld') AS w "
            f"  WHERE e.kind = 'denial' AND {window} "
            "  GROUP BY e.leaf_index, e.actor, e.purpose) "
            "GROUP BY actor, purpose, top"
        )
        rows = (await session.execute(text(sql), params)).all()
        return [(r.m, r.actor, r.purpose, str(r.k), int(r.n)) for r in rows]

    # --- integrity ----------------------------------------------------------------
    async def _integrity(
        self, from_size: int | None, from_root: str | None, *, verify: bool
    ) -> dict[str, Any]:
        sv = self.sv
        log = sv.audit_log
        keys = dict(sv.ring.public_jwks())
        head = await log.latest_tree_head()
        head_json: dict[str, Any] | None = None
        if head is not None:
            key = keys.get(head.key_id)
            head_json = {
                "tree_size": head.tree_size,
                "root_hash": head.root_hash.hex(),
                "timestamp": _iso(head.timestamp),
                "timestamp_ms": head.timestamp_ms,
                "signature": base64.b64encode(head.signature).decode(),
                "key_id": head.key_id,
                "signature_valid": key is not None and verify_tree_head(head, key),
            }
        consistency = await self._consistency(head, from_size, from_root)
        verification: dict[str, Any] = {"performed": False}
        if verify:
            started = time.perf_counter()
            result = await verify_log(sv.db.engine, keys)
            d = result.divergence
            verification = {
                "performed": True,
                "ok": result.ok,
                "tree_size": result.tree_size,
                "entries_checked": result.entries_checked,
                "nodes_checked": result.nodes_checked,
                "tree_heads_checked": result.tree_heads_checked,
                "divergence": (
                    None
                    if d is None
                    else {
                        "what": d.what,
                        "leaf_index": d.leaf_index,
                        "tree_size": d.tree_size,
                        "detail": d.detail,
                    }
                ),
                "seconds": round(time.perf_counter() - started, 3),
            }
        ledger: dict[str, Any] = {"performed": False}
        async with sv.db.session() as session:
            size, chain_hash = await chain_head(session)
            if verify:
                started = time.perf_counter()
                bad = await verify_chain(session, batch_size=5000)
                ledger = {
                    "performed": True,
                    "ok": bad is None,
                    "first_bad_index": bad,
                    "seconds": round(time.perf_counter() - started, 3),
                }
            ledger["events"] = size
            ledger["head_hash"] = chain_hash
            growth = await self._log_growth(session)
            key_events = await self._key_events(session)
        async with sv.keystore.session() as session:
            kek_rows = (
                await session.execute(
                    select(DATA_KEYS.kek_version, func.count().label("n"))
                    .where(DATA_KEYS.destroyed_at.is_(None))
                    .group_by(DATA_KEYS.kek_version)
                )
            ).all()
            destroyed = int(
                (
                    await session.execute(
                        select(func.count()).where(DATA_KEYS.destroyed_at.is_not(None))
                    )
                ).scalar_one()
            )
        ring = describe(sv.ring)
        live = {int(r.kek_version): int(r.n) for r in kek_rows}
        stale = sum(n for v, n in live.items() if v != sv.ring.current_kek)
        return {
            "tree_head": head_json,
            "consistency": consistency,
            "log_verification": verification,
            "consent_ledger": ledger,
            "log_growth": growth,
            "keys": {
                "current_kek": ring["current_kek"],
                "kek_versions": ring["kek_versions"],
                "retired_keks": ring["retired_keks"],
                "signing_key_ids": ring["signing_kids"],
                "data_keys_by_kek": {str(v): n for v, n in sorted(live.items())},
                "data_keys_destroyed": destroyed,
                "rotation_status": "current" if stale == 0 else "rewrap_pending",
                "data_keys_on_older_keks": stale,
                "recent_key_events": key_events,
            },
        }

    async def _consistency(
        self, head: Any, from_size: int | None, from_root: str | None
    ) -> dict[str, Any] | None:
        if from_size is None:
            return None
        log = self.sv.audit_log
        if head is None or not 0 < from_size <= head.tree_size:
            raise ReportRequestError(
                f"from_size must be between 1 and the current tree size "
                f"({0 if head is None else head.tree_size})",
                code="invalid_from_size",
            )
        if from_root is not None:
            try:
                first_root = bytes.fromhex(from_root)
            except ValueError:
                raise ReportRequestError(
                    "from_root must be a hex SHA-256 hash", code="invalid_from_root"
                ) from None
            root_source = "given"
        else:
            first_root = await log.root_at(from_size)
            root_source = "stored"
        try:
            proof = await log.consistency_proof(from_size, head.tree_size)
        except InvalidProofRequest as exc:  # pragma: no cover - bounds checked above
            raise ReportRequestError(str(exc), code="invalid_from_size") from None
        ok = verify_consistency(from_size, head.tree_size, proof.proof, first_root, head.root_hash)
        return {
            "first": from_size,
            "second": head.tree_size,
            "first_root": first_root.hex(),
            "first_root_source": root_source,
            "second_root": head.root_hash.hex(),
            "proof": [h.hex() for h in proof.proof],
            "verified": ok,
            "note": (
                "first_root came from the log itself; pass from_root (the root hash in the "
                "previous report) to check against your own copy"
                if root_source == "stored"
                else "checked against the root hash you supplied"
            ),
        }

    async def _log_growth(self, session: Any) -> list[dict[str, Any]]:
        th = audit_tree_heads.c
        day_number = th.timestamp_ms // 86_400_000
        rows = (
            await session.execute(
                select(day_number.label("d"), func.max(th.tree_size).label("size"))
                .group_by(day_number)
                .order_by(day_number)
            )
        ).all()
        epoch = date(1970, 1, 1)
        return [
            {"day": (epoch + timedelta(days=int(r.d))).isoformat(), "tree_size": int(r.size)}
            for r in rows[-366:]
        ]

    async def _key_events(self, session: Any) -> list[dict[str, Any]]:
        e = audit_entries.c
        rows = (
            await session.execute(
                select(e.leaf_index, e.leaf)
                .where(e.kind == EntryKind.KEY_EVENT.value)
                .order_by(e.leaf_index.desc())
                .limit(10)
            )
        ).all()
        out = []
        for row in rows:
            entry = decode_leaf(bytes(row.leaf))
            out.append(
                {
                    "index": row.leaf_index,
                    "timestamp": _iso(entry.timestamp),
                    "operation": entry.detail.get("operation"),
                    "kek_version": entry.detail.get("kek_version"),
                }
            )
        return out


TITLES = {
    "ropa": "Records of processing activities (GDPR Art. 30)",
    "consent": "Consent evidence",
    "requests": "Data-subject requests register",
    "access": "Access to customer stories",
    "integrity": "Log integrity and keys",
}


def _retention(category: Any) -> str:
    if category.legal_hold is not None:
        return (
            f"kept {category.legal_hold.years} years under legal hold "
            f"({category.legal_hold.purpose}), also after erasure"
        )
    if category.retention_days:
        return f"{category.retention_days} days after it was recorded, then deleted"
    return "for the customer relationship; erased on request"


# --- rendering ---------------------------------------------------------------------


def render(data: Mapping[str, Any], fmt: str) -> bytes:
    """The report in ``fmt``: JSON, CSV or a self-contained HTML page."""
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False, default=str).encode()
    if fmt == "csv":
        return render_csv(data).encode()
    if fmt == "html":
        return render_html(data).encode()
    raise ReportRequestError(f"format must be one of: {', '.join(FORMATS)}", code="invalid_format")


def _csv_rows(data: Mapping[str, Any]) -> tuple[Sequence[str], Iterable[Sequence[Any]]]:
    name = data["report"]
    header: Sequence[str]
    rows: list[Sequence[Any]] = []
    if name == "ropa":
        header = (
            "purpose",
            "legal_basis",
            "data_use",
            "sale_or_sharing",
            "category",
            "fideslang_category",
            "data_subjects",
            "recipients",
            "retention",
        )
        for p in data["purposes"]:
            cats = p["categories"] or [{"category": "", "fideslang": "", "retention": ""}]
            for c in cats:
                recipients = [
                    f"{r['team']} ({r['categories'][c['category']]})"
                    if r["categories"].get(c["category"], "none") != "none"
                    else r["team"]
                    for r in p["recipients"]
                    if c["category"] in r["categories"]
                ]
                rows.append(
                    (
                        p["purpose"],
                        p["legal_basis"],
                        p["data_use"],
                        p["sale_or_sharing"],
                        c["category"],
                        c["fideslang"],
                        "; ".join(p["data_subjects"]),
                        "; ".join(recipients),
                        c["retention"],
                    )
                )
        return header, rows
    if name == "consent":
        header = ("day", "purpose", "notice_version", *CONSENT_MEASURES)
        return header, (
            (r["day"], r["purpose"], r["notice_version"], *(r[m] for m in CONSENT_MEASURES))
            for r in data["detail"]
        )
    if name == "requests":
        header = (
            "request_id",
            "type",
            "status",
            "channel",
            "received_at",
            "due_at",
            "completed_at",
            "days_to_complete",
            "overdue",
            "extended_reason",
        )
        return header, ([r[h] for h in header] for r in data["register"])
    if name == "access":
        header = ("measure", "team", "purpose", "category", "reason", "count")
        for r in data["reads"]:
            rows.append(("disclosures", r["team"], r["purpose"], "", "", r["disclosures"]))
            rows.append(("denials", r["team"], r["purpose"], "", "", r["denials"]))
        rows += [
            ("disclosed", r["team"], r["purpose"], r["category"], "", r["count"])
            for r in data["disclosures"]
        ]
        rows += [
            ("denied_read", r["team"], r["purpose"], "", r["reason"], r["denials"])
            for r in data["denials"]
        ]
        rows += [
            ("withheld", r["team"], r["purpose"], "", r["reason"], r["count"])
            for r in data["withheld"]
        ]
        return header, rows
    # integrity: key/value pairs
    return ("key", "value"), _flatten(
        {
            k: data[k]
            for k in ("tree_head", "consistency", "log_verification", "consent_ledger", "keys")
        }
    )


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and value and isinstance(value[0], Mapping):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}[{i}]")
    elif isinstance(value, list):
        yield prefix, " ".join(str(v) for v in value)
    else:
        yield prefix, "" if value is None else value


def render_csv(data: Mapping[str, Any]) -> str:
    header, rows = _csv_rows(data)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return out.getvalue()


_ENV = Environment(
    loader=PackageLoader("governance", "report_templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_CHART_LOCK = threading.Lock()  # matplotlib's rcParams are process-global
_PALETTE = ("#1f5f8b", "#c0392b", "#7f8c8d", "#d68910", "#6c3483", "#1e8449", "#2e4053")


def _figure(width: float = 8.0, height: float = 3.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=96, layout="constrained")


def _svg(fig: Any, name: str) -> Markup:
    import matplotlib

    matplotlib.use("Agg")
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": f"sv-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    # Drop the RDF metadata block: nothing in it is needed to draw or read the chart.
    start, end = svg.find("<metadata>"), svg.find("</metadata>")
    if 0 <= start < end:
        svg = svg[:start] + svg[end + len("</metadata>") :]
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{name} chart" class="chart" ', 1)
    return Markup(svg)  # noqa: S704  (our own matplotlib output, no user input inside)


def _style(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)


def _day_ticks(ax: Any, days: Sequence[str]) -> None:
    step = max(1, len(days) // 10)
    ticks = list(range(0, len(days), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([days[i][5:] for i in ticks], rotation=0)


def _consent_charts(data: Mapping[str, Any]) -> list[tuple[str, Markup]]:
    days = [r["day"] for r in data["by_day"]]
    fig = _figure()
    ax = fig.add_subplot()
    x = range(len(days))
    for i, m in enumerate(("grants", "withdrawals", "expiries", "objections", "gpc_opt_outs")):
        ax.plot(
            x,
            [r[m] for r in data["by_day"]],
            label=m.replace("_", " "),
            color=_PALETTE[i],
            linewidth=1.4,
            marker="o" if len(days) <= 31 else None,
            markersize=3,
        )
    _style(ax)
    _day_ticks(ax, days)
    ax.set_ylabel("events per day", fontsize=8)
    ax.legend(fontsize=7, frameon=False, ncols=5, loc="upper left")
    trend = _svg(fig, "consent-trend")
    rows = data["by_purpose"]
    fig = _figure(8.0, 0.45 * max(len(rows), 3) + 0.8)
    ax = fig.add_subplot()
    labels = [f"{r['purpose']} v{r['notice_version']}" for r in rows]
    left = [0] * len(rows)
    for i, m in enumerate(CONSENT_MEASURES[:5]):
        vals = [r[m] for r in rows]
        ax.barh(labels, vals, left=left, color=_PALETTE[i], label=m.replace("_", " "))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    _style(ax)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.invert_yaxis()
    fig.legend(fontsize=7, frameon=False, ncols=5, loc="outside lower center")
    return [
        ("Consent events per day", trend),
        ("Events per purpose and notice version", _svg(fig, "consent-purposes")),
    ]


def _requests_charts(data: Mapping[str, Any]) -> list[tuple[str, Markup]]:
    buckets = ("open", "due_soon", "overdue", "completed", "refused", "extended")
    types = sorted(data["by_type"])
    fig = _figure(8.0, 3.0)
    ax = fig.add_subplot()
    bottom = [0] * len(buckets)
    for i, t in enumerate(types):
        vals = [data["by_type"][t][b] for b in buckets]
        ax.bar(
            [b.replace("_", " ") for b in buckets],
            vals,
            bottom=bottom,
            label=t,
            color=_PALETTE[i % len(_PALETTE)],
        )
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    if not types:
        ax.bar([b.replace("_", " ") for b in buckets], bottom, color=_PALETTE[2])
    _style(ax)
    if types:
        ax.legend(fontsize=7, frameon=False)
    status = _svg(fig, "requests-status")
    days = [r["day"] for r in data["by_day"]]
    fig = _figure(8.0, 2.6)
    ax = fig.add_subplot()
    x = range(len(days))
    ax.bar(x, [r["received"] for r in data["by_day"]], color=_PALETTE[0], label="received")
    ax.plot(
        x,
        [r["completed"] for r in data["by_day"]],
        color=_PALETTE[1],
        label="completed",
        linewidth=1.4,
    )
    _style(ax)
    _day_ticks(ax, days)
    ax.legend(fontsize=7, frameon=False)
    return [
        ("Requests by state and type", status),
        ("Received and completed per day", _svg(fig, "requests-days")),
    ]


def _access_charts(data: Mapping[str, Any]) -> list[tuple[str, Markup]]:
    reads = sorted(data["reads"], key=lambda r: -(r["disclosures"] + r["denials"]))[:15]
    fig = _figure(8.0, 0.42 * max(len(reads), 3) + 0.8)
    ax = fig.add_subplot()
    labels = [f"{r['team']} / {r['purpose']}" for r in reads]
    ax.barh(labels, [r["disclosures"] for r in reads], color=_PALETTE[0], label="disclosures")
    ax.barh(
        labels,
        [r["denials"] for r in reads],
        left=[r["disclosures"] for r in reads],
        color=_PALETTE[1],
        label="denials",
    )
    _style(ax)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.invert_yaxis()
    fig.legend(fontsize=7, frameon=False, ncols=2, loc="outside lower center")
    by_team = _svg(fig, "access-reads")
    reasons = data["denials_by_reason"] or {"(none)": 0}
    fig = _figure(8.0, 2.6)
    ax = fig.add_subplot()
    ax.bar(list(reasons), list(reasons.values()), color=_PALETTE[1])
    _style(ax)
    return [
        ("Reads per team and purpose", by_team),
        ("Denied reads by reason code", _svg(fig, "access-denials")),
    ]


def _integrity_charts(data: Mapping[str, Any]) -> list[tuple[str, Markup]]:
    growth = data["log_growth"]
    if not growth:
        return []
    fig = _figure(8.0, 2.6)
    ax = fig.add_subplot()
    ax.plot(
        range(len(growth)),
        [g["tree_size"] for g in growth],
        color=_PALETTE[0],
        marker="o" if len(growth) <= 31 else None,
        markersize=3,
    )
    _style(ax)
    _day_ticks(ax, [g["day"] for g in growth])
    ax.set_ylabel("entries (tree size)", fontsize=8)
    return [("Audit log size at the end of each day", _svg(fig, "integrity-growth"))]


_CHARTS: dict[str, Callable[[Mapping[str, Any]], list[tuple[str, Markup]]]] = {
    "consent": _consent_charts,
    "requests": _requests_charts,
    "access": _access_charts,
    "integrity": _integrity_charts,
}


def render_html(data: Mapping[str, Any]) -> str:
    name = data["report"]
    make = _CHARTS.get(name)
    with _CHART_LOCK:
        charts = make(data) if make is not None else []
    template = _ENV.get_template(f"{name}.html")
    return template.render(r=data, charts=charts)
