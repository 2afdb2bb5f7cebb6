"""Consented insights: signals derived inside the vault, shown to the customer too.

A team asks for *signals* about a customer instead of the raw notes they come
from. Each signal is computed only from the categories its (team, purpose) is
granted and whose use the purpose's legal basis allows (the gate's decision);
the profiling signals additionally need the customer's ``analytics.profiling``
consent, checked on every request (an objection counts from the next one).
The customer sees the same signals about themself (``GET /v1/me/insights``,
the export), computed by the same code from the same chapters.

Signal definitions (``now`` is the time of the request; chapters dated after
``now`` are ignored; a *contact* is a ``support.ticket`` chapter or an
``engagement.interaction`` chapter (chat, call, email, visit); a contact's
*topic* is the ticket's ``subject`` or the interaction's ``topic``, compared
case-insensitively with whitespace collapsed; a contact without one has no
topic and never counts as a repeat):

``continuity`` (support.ticket, engagement.interaction)
    ``contacts_7d`` / ``contacts_30d``: contacts in the last 7 / 30 days.
    ``repeat_contacts_30d``: contacts in the last 30 days about a topic already
    raised by an earlier contact in those 30 days (per topic: its count - 1).
    ``max_contacts_one_topic_30d``: the most contacts about one topic in 30 days.
    ``repeat_flag``: ``repeat_contacts_30d >= 1``.
    ``days_since_last_contact``: whole days since the latest contact (null: none).

``sentiment_trend`` (insight.sentiment; profiling)
    Scores are the ``score`` of sentiment chapters, numbers in [-1, 1] (others
    are ignored). ``latest``: the most recent score (null: none).
    ``scores_90d``: scores in the last 90 days. ``change_90d``: the latest score
    in the 90-day window minus the mean of the earlier scores in the window
    (null with fewer than 2). ``negative_run``: how many of the most recent
    scores in the window are negative (< 0) in a row. ``shift_flag``:
    ``change_90d <= -0.3`` or ``negative_run >= 3``. ``band``: ``negative``
    (latest < -0.2), ``positive`` (latest > 0.2), ``neutral``, ``no_data``.

``effort`` (support.ticket, engagement.interaction)
    A customer-effort indicator, 0-100, the sum of three capped parts:
    10 points per repeat contact (``repeat_contacts_30d``, at most 40),
    10 points per channel switch (distinct interaction kinds in the last 30
    days, minus one; at most 30), 10 points per open ticket (at most 30). A
    ticket is identified by its body's ``ticket_id`` if present, else by its
    topic; it is open when its most recent chapter has ``status`` "open".
    ``band``: ``low`` (< 30), ``medium`` (< 60), ``high``.

``drift_risk`` (support.ticket, engagement.interaction, commerce.purchase,
insight.sentiment; profiling)
    0-100, a weighted sum of four factors, each in [0, 1]; every factor's
    contribution (weight x factor) is returned, no opaque model:
    recency (weight 30) = min(days since the latest purchase or contact / 180, 1)
    (1 with no activity at all); frequency (weight 20) = max(0, 1 - purchases
    and contacts in the last 90 days / 6); sentiment (weight 30) = the larger
    of max(0, -latest score) and min(1, max(0, -change_90d / 0.6)) (0 without
    scores); open issues (weight 20) = min(open tickets / 3, 1).
    ``band``: ``low`` (< 34), ``medium`` (< 67), ``high``.

Decryption is minimised (``load_inputs``): only the input categories of the
signals being computed are read, and of those only the bodies a signal looks
at are decrypted (all tickets, interactions of 30 days, sentiment of 90 days
or the latest score); the rest contribute their date and kind only.

Aggregates (``insights_summary``, ``group_by`` one of ``effort_band``,
``drift_band``, ``sentiment_band``, ``open_tickets`` (groups "0", "1", "2",
"3+"); anything else is a 400) look at the customers whose legal basis allows
the purpose (and, for a profiling group, who consented to profiling), at most
``SUMMARY_MAX_CUSTOMERS`` of them (the first by pseudonym order, which is
unrelated to any attribute; ``truncated`` says so), decrypted in batches of
``SUMMARY_BATCH``, from the categories (team, purpose) is granted. Any group
smaller than ``settings.insights_k`` is suppressed (only how many groups were
is told, not their names or sizes), and so is any average over fewer than k
customers. No id ever leaves. No cursor either: paging with an arbitrary start
would let two overlapping calls be subtracted to single out one customer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import fmean
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import and_, or_, select

from audit import AuditEntry, EntryKind, Withheld
from consent import allowed_condition
from governance.errors import Forbidden, InvalidInput, NotFound
from governance.keys import open_value, value_aad
from governance.models import CHAPTERS, CUSTOMERS
from governance.vault import Chapter
from policies import Action

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from audit import TransparencyLog
    from consent import Ledger
    from governance.catalog import Catalog
    from governance.datakeys import DataKeys
    from governance.db import Database
    from governance.gate import Gate
    from governance.identity import CustomerPrincipal
    from governance.keys import KeyRing
    from governance.settings import Settings
    from governance.teams import Principal
    from governance.vault import Vault
    from policies import PolicyEngine

__all__ = [
    "GROUP_BY",
    "PROFILING_PURPOSE",
    "SIGNALS",
    "SUMMARY_MAX_CUSTOMERS",
    "InsightsOperations",
    "Signal",
    "SignalSpec",
    "compute_signals",
]

log = structlog.get_logger("storyvault.insights")

TICKET = "support.ticket"
INTERACTION = "engagement.interaction"
SENTIMENT = "insight.sentiment"
PURCHASE = "commerce.purchase"
PROFILING_PURPOSE = "analytics.profiling"
CONTACT_CATEGORIES = frozenset({TICKET, INTERACTION})

SUMMARY_MAX_CUSTOMERS = 2000
"""The most customers one summary call looks at (the first by pseudonym order)."""
SUMMARY_BATCH = 200
"""Customers whose chapters are read and decrypted together in one summary batch."""

_DAY = timedelta(days=1)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class SignalSpec:
    name: str
    inputs: tuple[str, ...]
    profiling: bool
    description: str


SIGNALS: dict[str, SignalSpec] = {
    s.name: s
    for s in (
        SignalSpec(
            "continuity",
            (TICKET, INTERACTION),
            profiling=False,
            description="how often and how recently you contacted us, and about what again",
        ),
        SignalSpec(
            "sentiment_trend",
            (SENTIMENT,),
            profiling=True,
            description="the tone recorded in conversations and how it changed",
        ),
        SignalSpec(
            "effort",
            (TICKET, INTERACTION),
            profiling=False,
            description="how much effort getting help has cost you",
        ),
        SignalSpec(
            "drift_risk",
            (TICKET, INTERACTION, PURCHASE, SENTIMENT),
            profiling=True,
            description="how likely it looks that you are drifting away from us",
        ),
    )
}
ALL_INPUTS: tuple[str, ...] = tuple(sorted({c for s in SIGNALS.values() for c in s.inputs}))

# group_by value -> (signal it needs, how a customer's group is read off that signal)
GROUP_BY: dict[str, str] = {
    "effort_band": "effort",
    "drift_band": "drift_risk",
    "sentiment_band": "sentiment_trend",
    "open_tickets": "effort",
}
# average name -> (signal, value key)
_AVERAGES: dict[str, tuple[str, str]] = {
    "contacts_30d": ("continuity", "contacts_30d"),
    "repeat_contacts_30d": ("continuity", "repeat_contacts_30d"),
    "effort": ("effort", "score"),
    "open_tickets": ("effort", "open_tickets"),
    "sentiment_latest": ("sentiment_trend", "latest"),
    "sentiment_change_90d": ("sentiment_trend", "change_90d"),
    "drift_risk": ("drift_risk", "score"),
}
# When several inputs of a signal are missing, the reason shown is the first in this order.
_REASON_ORDER = (
    "erased",
    "legal_hold_only",
    "denied_by_policy",
    "no_policy",
    "objected",
    "consent_withdrawn",
    "consent_expired",
    "no_consent",
)


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    value: dict[str, Any]
    inputs: list[str]
    explanation: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "inputs": self.inputs,
            "explanation": self.explanation,
        }


@dataclass(slots=True)
class _Plan:
    """Which signals may be computed, and why the others may not."""

    computed: list[str] = field(default_factory=list)
    withheld: list[tuple[str, str]] = field(default_factory=list)  # (signal, reason)

    @property
    def categories(self) -> list[str]:
        return sorted({c for n in self.computed for c in SIGNALS[n].inputs})


def _reason_rank(reason: str) -> int:
    return _REASON_ORDER.index(reason) if reason in _REASON_ORDER else len(_REASON_ORDER)


def plan_signals(
    available: Iterable[str], missing: dict[str, str], profiling_reason: str | None
) -> _Plan:
    """A signal is computed when all its inputs are available and, if it profiles,
    the customer's profiling consent is met; otherwise it is withheld with the
    most telling reason of a missing input, else the profiling consent's reason."""
    have = set(available)
    plan = _Plan()
    for spec in SIGNALS.values():
        absent = [c for c in spec.inputs if c not in have]
        if absent:
            reasons = sorted((missing.get(c, "no_policy") for c in absent), key=_reason_rank)
            plan.withheld.append((spec.name, reasons[0]))
        elif spec.profiling and profiling_reason is not None:
            plan.withheld.append((spec.name, profiling_reason))
        else:
            plan.computed.append(spec.name)
    return plan


# --- the computation (pure: chapters in, signals out) ----------------------------


def _topic(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    key = _SPACE.sub(" ", text).strip().casefold()
    return key or None


def _score(body: dict[str, Any]) -> float | None:
    raw = body.get("score")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    value = float(raw)
    return value if -1.0 <= value <= 1.0 else None


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _r(x: float, digits: int = 3) -> float:
    return round(x, digits)


@dataclass(slots=True)
class _Facts:
    """What the signals are computed from, gathered in one pass over the chapters."""

    now: datetime
    contacts: list[tuple[datetime, str | None]] = field(default_factory=list)
    interaction_kinds_30d: set[str] = field(default_factory=set)
    tickets: dict[str, tuple[datetime, str]] = field(default_factory=dict)  # key -> (at, status)
    scores: list[tuple[datetime, float]] = field(default_factory=list)
    purchases: list[datetime] = field(default_factory=list)

    @classmethod
    def gather(cls, chapters: Iterable[Chapter], now: datetime) -> _Facts:
        facts = cls(now=now)
        month = now - 30 * _DAY
        for ch in chapters:
            at = ch.occurred_at
            if at > now:
                continue
            body = ch.body if isinstance(ch.body, dict) else {}
            if ch.category == TICKET:
                topic = _topic(body.get("subject"))
                facts.contacts.append((at, topic))
                raw_id = body.get("ticket_id")
                key = f"id:{raw_id}" if isinstance(raw_id, str | int) else topic or f"ch:{ch.id}"
                status = body.get("status")
                previous = facts.tickets.get(key)
                if previous is None or previous[0] <= at:
                    facts.tickets[key] = (at, status.casefold() if isinstance(status, str) else "")
            elif ch.category == INTERACTION:
                facts.contacts.append((at, _topic(body.get("topic"))))
                if at >= month:
                    facts.interaction_kinds_30d.add(ch.kind)
            elif ch.category == SENTIMENT:
                score = _score(body)
                if score is not None:
                    facts.scores.append((at, score))
            elif ch.category == PURCHASE:
                facts.purchases.append(at)
        facts.contacts.sort(key=lambda c: c[0])
        facts.scores.sort(key=lambda s: s[0])
        return facts

    # derived figures shared by several signals
    def contacts_since(self, days: int) -> list[tuple[datetime, str | None]]:
        start = self.now - days * _DAY
        return [c for c in self.contacts if c[0] >= start]

    def topic_counts_30d(self) -> Counter[str]:
        return Counter(t for _, t in self.contacts_since(30) if t is not None)

    def repeat_contacts_30d(self) -> int:
        return sum(n - 1 for n in self.topic_counts_30d().values() if n > 1)

    def open_tickets(self) -> int:
        return sum(1 for _, status in self.tickets.values() if status == "open")

    def days_since(self, at: datetime | None) -> int | None:
        return None if at is None else int((self.now - at) / _DAY)


def _continuity(f: _Facts) -> tuple[dict[str, Any], str]:
    c7, c30 = len(f.contacts_since(7)), len(f.contacts_since(30))
    counts = f.topic_counts_30d()
    repeats = sum(n - 1 for n in counts.values() if n > 1)
    top = max(counts.values(), default=0)
    last = f.days_since(f.contacts[-1][0] if f.contacts else None)
    value = {
        "contacts_7d": c7,
        "contacts_30d": c30,
        "repeat_contacts_30d": repeats,
        "max_contacts_one_topic_30d": top,
        "repeat_flag": repeats >= 1,
        "days_since_last_contact": last,
    }
    parts = [
        f"{_plural(c7, 'contact')} (support tickets, chats, calls, e-mails or visits) in the "
        f"last 7 days and {c30} in the last 30 days."
    ]
    if repeats:
        parts.append(
            f"{_plural(repeats, 'of them repeats', 'of them repeat')} a topic already raised "
            f"in those 30 days (up to {top} contacts about the same topic), so this is a "
            "repeat contact."
        )
    else:
        parts.append("No topic was raised more than once in the last 30 days.")
    parts.append(
        "No contact on record." if last is None else f"Last contact {_plural(last, 'day')} ago."
    )
    return value, " ".join(parts)


def _sentiment(f: _Facts) -> tuple[dict[str, Any], str]:
    latest = f.scores[-1][1] if f.scores else None
    window = [s for at, s in f.scores if at >= f.now - 90 * _DAY]
    change = window[-1] - fmean(window[:-1]) if len(window) >= 2 else None
    run = 0
    for s in reversed(window):
        if s >= 0:
            break
        run += 1
    shift = (change is not None and change <= -0.3) or run >= 3
    band = (
        "no_data"
        if latest is None
        else "negative"
        if latest < -0.2
        else "positive"
        if latest > 0.2
        else "neutral"
    )
    value = {
        "latest": None if latest is None else _r(latest),
        "latest_days_ago": f.days_since(f.scores[-1][0]) if f.scores else None,
        "scores_90d": len(window),
        "change_90d": None if change is None else _r(change),
        "negative_run": run,
        "shift_flag": shift,
        "band": band,
    }
    if latest is None:
        return value, "No sentiment score is recorded, so there is no trend."
    parts = [f"The latest recorded sentiment score is {latest:+.2f} (on a scale from -1 to +1)."]
    if change is None:
        parts.append(
            f"With {_plural(len(window), 'score')} in the last 90 days there is no change "
            "to measure."
        )
    else:
        parts.append(
            f"It is {change:+.2f} against the average of the {len(window) - 1} earlier "
            "score(s) of the last 90 days."
        )
    if run:
        parts.append(
            f"The {_plural(run, 'most recent score was', 'most recent scores were')} negative."
        )
    parts.append(
        "This counts as a shift in sentiment (a fall of 0.3 or more, or 3 negative scores in "
        "a row)."
        if shift
        else "This is not a shift in sentiment (that needs a fall of 0.3 or more, or 3 "
        "negative scores in a row)."
    )
    return value, " ".join(parts)


def _effort(f: _Facts) -> tuple[dict[str, Any], str]:
    repeats = f.repeat_contacts_30d()
    kinds = sorted(f.interaction_kinds_30d)
    switches = max(0, len(kinds) - 1)
    open_tickets = f.open_tickets()
    parts_pts = {
        "repeat_contacts": min(repeats, 4) * 10,
        "channel_switches": min(switches, 3) * 10,
        "open_tickets": min(open_tickets, 3) * 10,
    }
    score = sum(parts_pts.values())
    band = "low" if score < 30 else "medium" if score < 60 else "high"
    value = {
        "score": score,
        "band": band,
        "repeat_contacts_30d": repeats,
        "channels_30d": kinds,
        "channel_switches_30d": switches,
        "open_tickets": open_tickets,
        "points": parts_pts,
    }
    explanation = (
        f"Effort {score}/100 ({band}): {parts_pts['repeat_contacts']} points for "
        f"{_plural(repeats, 'repeat contact')} in the last 30 days (10 each, at most 40), "
        f"{parts_pts['channel_switches']} for "
        f"{_plural(switches, 'channel switch', 'channel switches')} "
        f"({', '.join(kinds) or 'no interactions'} in the last 30 days; 10 each, at most 30), "
        f"{parts_pts['open_tickets']} for {_plural(open_tickets, 'open ticket')} (10 each, at "
        "most 30)."
    )
    return value, explanation


_DRIFT_WEIGHTS = {"recency": 30, "frequency": 20, "sentiment": 30, "open_issues": 20}


def _drift(f: _Facts) -> tuple[dict[str, Any], str]:
    activity = sorted([at for at, _ in f.contacts] + f.purchases)
    last = f.days_since(activity[-1] if activity else None)
    recency = 1.0 if last is None else min(last / 180, 1.0)
    recent = sum(1 for at in activity if at >= f.now - 90 * _DAY)
    frequency = max(0.0, 1.0 - recent / 6)
    latest = f.scores[-1][1] if f.scores else None
    window = [s for at, s in f.scores if at >= f.now - 90 * _DAY]
    change = window[-1] - fmean(window[:-1]) if len(window) >= 2 else None
    negativity = max(0.0, -latest) if latest is not None else 0.0
    decline = min(1.0, max(0.0, -change / 0.6)) if change is not None else 0.0
    sentiment = max(negativity, decline)
    open_tickets = f.open_tickets()
    open_issues = min(open_tickets / 3, 1.0)
    factors = {
        "recency": recency,
        "frequency": frequency,
        "sentiment": sentiment,
        "open_issues": open_issues,
    }
    contributions = {k: _DRIFT_WEIGHTS[k] * v for k, v in factors.items()}
    score = round(sum(contributions.values()))
    band = "low" if score < 34 else "medium" if score < 67 else "high"
    c = {k: _r(v, 1) for k, v in contributions.items()}
    value = {
        "score": score,
        "band": band,
        "factors": {k: _r(v) for k, v in factors.items()},
        "weights": dict(_DRIFT_WEIGHTS),
        "contributions": c,
        "days_since_last_activity": last,
        "activities_90d": recent,
        "open_tickets": open_tickets,
    }
    if last is None:
        recency_text = "no purchase or contact on record"
    else:
        recency_text = (
            f"last purchase or contact {_plural(last, 'day')} ago; 180 days or more counts fully"
        )
    active = _plural(recent, "purchase or contact", "purchases and contacts")
    if latest is None:
        sentiment_text = "no sentiment score on record"
    else:
        sentiment_text = f"latest score {latest:+.2f}"
        if change is not None:
            sentiment_text += f", change {change:+.2f} over 90 days"
        sentiment_text += "; the larger of the negativity and the fall, a fall of 0.6 counts fully"
    explanation = (
        f"Drift risk {score}/100 ({band}), the sum of four weighted factors: "
        f"recency {c['recency']} of 30 ({recency_text}), "
        f"frequency {c['frequency']} of 20 ({active} in the last 90 days; 6 or more count as "
        f"fully active), sentiment {c['sentiment']} of 30 ({sentiment_text}), "
        f"open issues {c['open_issues']} of 20 ({_plural(open_tickets, 'open ticket')}; "
        "3 or more count fully). No other data and no model is used."
    )
    return value, explanation


_COMPUTE = {
    "continuity": _continuity,
    "sentiment_trend": _sentiment,
    "effort": _effort,
    "drift_risk": _drift,
}


def compute_signals(
    chapters: Iterable[Chapter], now: datetime, names: Sequence[str]
) -> list[Signal]:
    """The named signals over ``chapters`` (only those of the signals' input categories
    are looked at), in the order of ``SIGNALS``."""
    facts = _Facts.gather(chapters, now)
    out = []
    for name, spec in SIGNALS.items():
        if name in names:
            value, explanation = _COMPUTE[name](facts)
            out.append(Signal(name, value, list(spec.inputs), explanation))
    return out


def _group_of(group_by: str, signal: Signal) -> str:
    if group_by == "open_tickets":
        n = int(signal.value["open_tickets"])
        return "3+" if n >= 3 else str(n)
    return str(signal.value["band"])


def _summarize(
    groups: dict[str, list[dict[str, Signal]]], signals: list[str], k: int
) -> tuple[list[dict[str, Any]], int]:
    """Counts and averages per group; groups (and averages) over fewer than k
    customers are suppressed: only how many groups were is told."""
    shown: list[dict[str, Any]] = []
    suppressed = 0
    for name in sorted(groups):
        members = groups[name]
        if len(members) < k:
            suppressed += 1
            continue
        averages: dict[str, float | None] = {}
        for avg_name, (signal, key) in _AVERAGES.items():
            if signal not in signals:
                continue
            values = [
                float(m[signal].value[key])
                for m in members
                if signal in m and m[signal].value[key] is not None
            ]
            averages[avg_name] = _r(fmean(values)) if len(values) >= k else None
        shown.append({"group": name, "count": len(members), "averages": averages})
    return shown, suppressed


_WITHHELD_TEXT = {
    "no_consent": "you have not agreed to analytics.profiling, so we do not compute it",
    "consent_withdrawn": (
        "you withdrew (objected to) analytics.profiling, so we no longer compute it"
    ),
    "consent_expired": "your analytics.profiling consent expired, so we no longer compute it",
}


# --- the operations (mixed into StoryVault) --------------------------------------


class InsightsOperations:
    """Mixed into StoryVault; these are the collaborators it provides."""

    settings: Settings
    catalog: Catalog
    db: Database
    ring: KeyRing
    keys: DataKeys
    ledger: Ledger
    audit_log: TransparencyLog
    policy: PolicyEngine
    gate: Gate
    vault: Vault

    def check_purpose(self, purpose: str | None) -> str:
        raise NotImplementedError

    async def audit_writer_append(self, entry: AuditEntry) -> int:
        raise NotImplementedError

    async def customer_insights(
        self,
        principal: Principal,
        customer_id: str,
        purpose: str | None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/customers/{id}/insights?purpose=P``: the signals (team, purpose)
        may see about one customer; audited (durably) before they are returned."""
        purpose = self.check_purpose(purpose)
        self.gate.policy_table(principal, purpose, Action.READ)  # no rule at all: 403
        subject = self.ring.pseudonym(customer_id)
        async with self.db.session() as session:
            customer = await self.vault.customer(session, customer_id)
            if customer is None or customer.status == "erased":
                raise NotFound("no such customer", code="customer_not_found")
            decision = await self.gate.decide(
                session, principal, subject, purpose, categories=ALL_INPUTS
            )
            if customer.restricted:
                await self.gate.apply_category_states(session, customer_id, decision)
            profiling = await self.ledger.check(session, subject, PROFILING_PURPOSE)
            missing = {c: r for c, r in decision.withheld if c in ALL_INPUTS}
            plan = plan_signals(decision.granted, missing, profiling.value if profiling else None)
            needed = plan.categories
            now = self.ledger.now()
            loaded = await self.load_inputs(session, [customer_id], needed, now)
        signals = compute_signals(loaded.get(customer_id, []), now, plan.computed)
        withheld_categories = sorted(missing.items())
        index = await self.audit_writer_append(
            AuditEntry(
                kind=EntryKind.DISCLOSURE if signals else EntryKind.DENIAL,
                actor=principal.team,
                actor_key_id=principal.key_id,
                subject=subject,
                purpose=purpose,
                policy_version=decision.table.version,
                categories=tuple(needed),
                withheld=tuple(Withheld(category=c, reason=r) for c, r in withheld_categories),
                request_id=request_id,
                detail={
                    "operation": "insights.read",
                    "signals": ",".join(s.name for s in signals),
                    "withheld_signals": ",".join(f"{n}:{r}" for n, r in plan.withheld),
                },
            )
        )
        log.info(
            "insights.read",
            team=principal.team,
            subject=subject,
            purpose=purpose,
            signals=[s.name for s in signals],
            withheld=[f"{n}:{r}" for n, r in plan.withheld],
            audit_index=index,
        )
        return {
            "customer_id": customer_id,
            "purpose": purpose,
            "signals": [s.as_json() for s in signals],
            "withheld": [{"category": c, "reason": r} for c, r in withheld_categories]
            + [{"signal": n, "reason": r} for n, r in plan.withheld],
            "audit_index": index,
        }

    async def _own_insights(
        self, customer_id: str
    ) -> tuple[list[Signal], list[dict[str, Any]], str | None]:
        """Every signal over the customer's whole story; profiling ones only with consent."""
        subject = self.ring.pseudonym(customer_id)
        async with self.db.session() as session:
            customer = await self.vault.require_active(session, customer_id)
            reason = await self.ledger.check(session, subject, PROFILING_PURPOSE)
            profiling = reason.value if reason else None
            plan = plan_signals(ALL_INPUTS, {}, profiling)
            now = self.ledger.now()
            loaded = await self.load_inputs(session, [customer.id], plan.categories, now)
        signals = compute_signals(loaded.get(customer_id, []), now, plan.computed)
        withheld = [
            {
                "signal": name,
                "reason": r,
                "explanation": f"{SIGNALS[name].description.capitalize()}: "
                f"{_WITHHELD_TEXT.get(r, 'not computed')}. It is profiling; you can agree to or "
                "object to analytics.profiling at any time in your consents.",
            }
            for name, r in plan.withheld
        ]
        return signals, withheld, profiling

    async def my_insights(
        self, customer: CustomerPrincipal, request_id: str | None = None
    ) -> dict[str, Any]:
        """``GET /v1/me/insights``: what is inferred about the customer, with explanations
        (GDPR Art. 15(1)(h)); audited like ``my_story``."""
        signals, withheld, profiling = await self._own_insights(customer.customer_id)
        categories = sorted({c for s in signals for c in s.inputs})
        await self.audit_writer_append(
            AuditEntry(
                kind=EntryKind.DISCLOSURE,
                actor="customer",
                subject=self.ring.pseudonym(customer.customer_id),
                purpose="data_subject.access",
                categories=tuple(categories),
                request_id=request_id,
                detail={"operation": "me.insights", "signals": ",".join(s.name for s in signals)},
            )
        )
        return {
            "customer_id": customer.customer_id,
            "generated_at": self.ledger.now(),
            "profiling": {
                "purpose": PROFILING_PURPOSE,
                "allowed": profiling is None,
                "reason": profiling,
                "explanation": (
                    "You agreed to analytics.profiling, so we also compute your sentiment trend "
                    "and drift risk. To object, withdraw it: PUT /v1/me/consents/"
                    'analytics.profiling {"granted": false}; from then on they are computed '
                    "for no one."
                    if profiling is None
                    else "You have not agreed to analytics.profiling (or withdrew it), so your "
                    "sentiment trend and drift risk are not computed for anyone."
                ),
            },
            "signals": [s.as_json() for s in signals],
            "withheld": withheld,
        }

    async def insights_for_export(self, customer_id: str) -> list[dict[str, Any]]:
        """The export's ``insights`` section: every signal, computed or not (the export
        itself is audited by the exporter)."""
        signals, withheld, _ = await self._own_insights(customer_id)
        out: list[dict[str, Any]] = [
            {
                "name": s.name,
                "computed": True,
                "inputs": s.inputs,
                "value": s.value,
                "explanation": s.explanation,
                "reason": None,
            }
            for s in signals
        ]
        out.extend(
            {
                "name": w["signal"],
                "computed": False,
                "inputs": list(SIGNALS[w["signal"]].inputs),
                "value": None,
                "explanation": w["explanation"],
                "reason": w["reason"],
            }
            for w in withheld
        )
        order = list(SIGNALS)
        out.sort(key=lambda item: order.index(item["name"]))
        return out

    async def insights_summary(
        self,
        principal: Principal,
        purpose: str | None,
        group_by: str | None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/insights/summary?purpose=P&group_by=F``: counts and averages per
        group over customers whose legal basis allows P, from the categories
        (team, P) is granted; small groups and small averages are suppressed."""
        purpose = self.check_purpose(purpose)
        table = self.gate.policy_table(principal, purpose, Action.READ)
        if group_by not in GROUP_BY:
            raise InvalidInput(
                f"group_by must be one of: {', '.join(sorted(GROUP_BY))}", code="invalid_query"
            )
        missing: dict[str, str] = {}
        for category in ALL_INPUTS:
            d = table.decide(category)
            if not d.allowed:
                missing[category] = d.reason or "no_policy"
        allowed_by_policy = plan_signals([c for c in ALL_INPUTS if c not in missing], missing, None)
        group_signal = GROUP_BY[group_by]
        if group_signal not in allowed_by_policy.computed:
            reason = dict(allowed_by_policy.withheld)[group_signal]
            raise Forbidden(
                f"team '{principal.team}' may not derive '{group_signal}' for '{purpose}'",
                code=reason,
                reason=reason,
            )
        k = self.settings.insights_k
        now = self.ledger.now()
        profiling_terms = self.ledger.terms(PROFILING_PURPOSE)
        subject_col = CUSTOMERS.subject
        profiling_ok = allowed_condition(profiling_terms, now, subject_col)
        query = (
            select(CUSTOMERS.id, CUSTOMERS.restricted, profiling_ok.label("profiling"))
            .where(
                CUSTOMERS.status == "active",
                allowed_condition(self.ledger.terms(purpose), now, subject_col),
            )
            .order_by(subject_col)
            .limit(SUMMARY_MAX_CUSTOMERS + 1)
        )
        if SIGNALS[group_signal].profiling:
            query = query.where(profiling_ok)
        needed = allowed_by_policy.categories
        groups: dict[str, list[dict[str, Signal]]] = {}
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
            truncated = len(rows) > SUMMARY_MAX_CUSTOMERS
            rows = rows[:SUMMARY_MAX_CUSTOMERS]
            for start in range(0, len(rows), SUMMARY_BATCH):
                batch = rows[start : start + SUMMARY_BATCH]
                stories = await self.load_inputs(session, [r.id for r in batch], needed, now)
                for row in batch:
                    names = [
                        n
                        for n in allowed_by_policy.computed
                        if row.profiling or not SIGNALS[n].profiling
                    ]
                    chapters = stories.get(row.id, [])
                    if row.restricted:
                        states = await self.vault.category_states(session, row.id)
                        gone = {
                            c
                            for c, (state, hold) in states.items()
                            if state == "erased" or hold != purpose
                        }
                        names = [n for n in names if not gone & set(SIGNALS[n].inputs)]
                        chapters = [ch for ch in chapters if ch.category not in gone]
                    if group_signal not in names:
                        continue
                    signals = {s.name: s for s in compute_signals(chapters, now, names)}
                    groups.setdefault(_group_of(group_by, signals[group_signal]), []).append(
                        signals
                    )
        shown, suppressed = _summarize(groups, allowed_by_policy.computed, k)
        index = await self.audit_writer_append(
            AuditEntry(
                kind=EntryKind.DISCLOSURE,
                actor=principal.team,
                actor_key_id=principal.key_id,
                purpose=purpose,
                policy_version=table.version,
                categories=tuple(needed),
                withheld=tuple(Withheld(category=c, reason=r) for c, r in sorted(missing.items())),
                request_id=request_id,
                detail={
                    "operation": "insights.summary",
                    "group_by": group_by,
                    "signals": ",".join(allowed_by_policy.computed),
                    "groups": len(shown),
                    "suppressed_groups": suppressed,
                },
            )
        )
        log.info(
            "insights.summary",
            team=principal.team,
            purpose=purpose,
            group_by=group_by,
            groups=len(shown),
            suppressed_groups=suppressed,
            audit_index=index,
        )
        return {
            "purpose": purpose,
            "group_by": group_by,
            "k": k,
            "signals": list(allowed_by_policy.computed),
            "groups": shown,
            "customers_included": sum(g["count"] for g in shown),
            "suppressed_groups": suppressed,
            "truncated": truncated,
            "max_customers": SUMMARY_MAX_CUSTOMERS,
            "withheld": [{"category": c, "reason": r} for c, r in sorted(missing.items())]
            + [{"signal": n, "reason": r} for n, r in allowed_by_policy.withheld],
            "audit_index": index,
        }

    async def load_inputs(
        self,
        session: AsyncSession,
        customer_ids: list[str],
        categories: Iterable[str],
        now: datetime,
    ) -> dict[str, list[Chapter]]:
        """The chapters of ``categories`` the signals are computed from, per customer.

        Data minimisation: a body is decrypted only where a signal reads it
        (every ticket, for its status; interactions of the last 30 days, for
        their topic; sentiment of the last 90 days, or else the latest one).
        Every other chapter is passed on with its date and kind only (body
        ``{}``), and only if its data key still exists (erased data counts for
        nothing). The result is the same as over fully decrypted chapters."""
        wanted = sorted(set(categories))
        if not customer_ids or not wanted:
            return {}
        in_scope = (
            CHAPTERS.customer_id.in_(customer_ids),
            CHAPTERS.category.in_(wanted),
        )
        meta = (
            await session.execute(
                select(
                    CHAPTERS.id,
                    CHAPTERS.customer_id,
                    CHAPTERS.category,
                    CHAPTERS.kind,
                    CHAPTERS.occurred_at,
                    CHAPTERS.author_team,
                    CHAPTERS.dek_id,
                ).where(*in_scope)
            )
        ).all()
        month, quarter = now - 30 * _DAY, now - 90 * _DAY
        needs_body = or_(
            CHAPTERS.category == TICKET,
            and_(CHAPTERS.category == INTERACTION, CHAPTERS.occurred_at >= month),
            and_(CHAPTERS.category == SENTIMENT, CHAPTERS.occurred_at >= quarter),
        )
        sealed: dict[str, tuple[str, bytes]] = {
            r.id: (r.dek_id, r.sealed)
            for r in await session.execute(
                select(CHAPTERS.id, CHAPTERS.dek_id, CHAPTERS.sealed).where(*in_scope, needs_body)
            )
        }
        # the latest sentiment score counts even when it is older than 90 days
        latest: dict[str, tuple[datetime, str]] = {}
        for r in meta:
            at = _utc(r.occurred_at)
            if r.category == SENTIMENT and at <= now:
                best = latest.get(r.customer_id)
                if best is None or best < (at, r.id):
                    latest[r.customer_id] = (at, r.id)
        extra = [ch_id for _, ch_id in latest.values() if ch_id not in sealed]
        if extra:
            for row in await session.execute(
                select(CHAPTERS.id, CHAPTERS.dek_id, CHAPTERS.sealed).where(CHAPTERS.id.in_(extra))
            ):
                sealed[row.id] = (row.dek_id, row.sealed)
        keys = await self.keys.for_read({r.dek_id for r in meta})
        out: dict[str, list[Chapter]] = {}
        for r in meta:
            aead = keys.get(r.dek_id)
            if aead is None:
                continue  # its key was destroyed: the chapter no longer exists
            body: dict[str, Any] = {}
            if r.id in sealed:
                raw = open_value(
                    aead, sealed[r.id][1], value_aad(r.customer_id, r.id, r.category, r.dek_id)
                )
                body = json.loads(raw)
            out.setdefault(r.customer_id, []).append(
                Chapter(
                    id=r.id,
                    category=r.category,
                    kind=r.kind,
                    occurred_at=_utc(r.occurred_at),
                    author_team=r.author_team,
                    body=body,
                )
            )
        return out


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
