"""Plain-language wording for the portal: legal bases, consent states, story parts.

Everything a customer reads about a purpose or a category comes from the
catalog (its descriptions); this module only adds the words around them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from governance.catalog import Catalog

__all__ = [
    "BASIS",
    "ConsentRow",
    "category_label",
    "consent_rows",
    "field_label",
    "format_when",
    "humanize",
    "purpose_label",
    "story_groups",
]

PROFILE_LABELS = {
    "name": "Name",
    "email": "E-mail address",
    "phone": "Telephone number",
    "address": "Postal address",
    "birthday": "Date of birth",
}

# legal basis -> (what it is called, what it means for you)
BASIS: dict[str, tuple[str, str]] = {
    "consent": (
        "Your consent",
        "We only do this if you say yes, and you can withdraw your consent at any time.",
    ),
    "legitimate_interest": (
        "Our legitimate interest",
        "We may do this without asking first, but you can object at any time and we stop.",
    ),
    "contract": (
        "Needed for our contract with you",
        "We need this to deliver what you ordered and to help you; it cannot be switched off "
        "while you are a customer.",
    ),
    "legal_obligation": (
        "Required by law",
        "The law requires this; it cannot be switched off.",
    ),
}


def format_when(value: object) -> str:
    """``12 March 2025, 14:03 UTC`` for datetimes (and RFC 3339 strings)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return text
    if not isinstance(value, datetime):
        return str(value)
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return f"{moment.day} {moment:%B %Y, %H:%M} UTC"


def format_day(value: object) -> str:
    """``12 March 2025`` for datetimes (and RFC 3339 strings)."""
    full = format_when(value)
    return full.split(",", 1)[0] if "," in full else full


def humanize(key: str) -> str:
    words = key.replace("_", " ").replace(".", " ").strip()
    return words[:1].upper() + words[1:]


def field_label(field: str) -> str:
    return PROFILE_LABELS.get(field, humanize(field))


def category_label(catalog: Catalog, category: str) -> str:
    cat = catalog.categories.get(category)
    if cat is None:
        return humanize(category)
    text = cat.description
    # Catalog descriptions are written for staff; the portal speaks to the customer.
    for staff, customer in (("The customer's ", "Your "), ("the customer's ", "your ")):
        text = text.replace(staff, customer)
    return text


def purpose_label(catalog: Catalog, purpose: str | None) -> str:
    if purpose is None:
        return ""
    found = catalog.purposes.get(purpose)
    if found is not None:
        return found.description
    if purpose == "data_subject.access":
        return "Showing you your own story"
    return humanize(purpose)


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class StoryGroup:
    category: str
    label: str
    chapters: list[dict[str, Any]]


def story_groups(catalog: Catalog, chapters: Iterable[Mapping[str, Any]]) -> list[StoryGroup]:
    """Chapters grouped by category, in catalog order, newest first inside a group."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for ch in chapters:
        body = ch.get("body") or {}
        by_category.setdefault(str(ch["category"]), []).append(
            {
                "kind": humanize(str(ch["kind"])),
                "when": format_when(ch.get("occurred_at")),
                "sort": str(ch.get("occurred_at") or ""),
                "team": humanize(str(ch.get("author_team") or "")),
                "facts": [(humanize(str(k)), _value_text(v)) for k, v in body.items()]
                if isinstance(body, Mapping)
                else [("Details", _value_text(body))],
            }
        )
    order = [c for c in catalog.categories if c in by_category]
    order += sorted(c for c in by_category if c not in catalog.categories)
    return [
        StoryGroup(
            category=c,
            label=category_label(catalog, c),
            chapters=sorted(by_category[c], key=lambda x: x["sort"], reverse=True),
        )
        for c in order
    ]


@dataclass(frozen=True, slots=True)
class ConsentRow:
    purpose: str
    slug: str
    description: str
    notice: str
    basis: str
    basis_label: str
    basis_meaning: str
    state_label: str
    since: str
    expires: str
    allowed: bool
    switchable: bool
    action: str  # "grant" or "withdraw" (empty when not switchable)
    button: str
    sale_or_sharing: bool
    gpc_locked: bool


def _state_label(basis: str, state: str, allowed: bool) -> str:
    if basis in ("contract", "legal_obligation"):
        return "Always on"
    if state == "gpc_opted_out":
        return "Off: opted out by your browser's Global Privacy Control signal"
    if basis == "legitimate_interest":
        return "Off: you objected" if state == "objected" else "On: you have not objected"
    return {
        "granted": "On: consent given" if allowed else "Off: consent has expired",
        "withdrawn": "Off: consent withdrawn",
        "expired": "Off: consent has expired",
    }.get(state, "Off: not given")


def consent_rows(catalog: Catalog, items: Iterable[Any], *, gpc: bool) -> list[ConsentRow]:
    rows = []
    for c in items:
        basis_label, meaning = BASIS.get(c.legal_basis, (humanize(c.legal_basis), ""))
        switchable = c.legal_basis in ("consent", "legitimate_interest")
        gpc_locked = gpc and c.sale_or_sharing
        if not switchable:
            action, button = "", ""
        elif c.legal_basis == "legitimate_interest":
            action, button = ("withdraw", "Object") if c.allowed else ("grant", "Lift my objection")
        else:
            action, button = (
                ("withdraw", "Withdraw consent") if c.allowed else ("grant", "Give consent")
            )
        purpose = catalog.purposes.get(c.purpose)
        rows.append(
            ConsentRow(
                purpose=c.purpose,
                slug=c.purpose.replace(".", "-"),
                description=c.description,
                notice=purpose.notice if purpose else "",
                basis=c.legal_basis,
                basis_label=basis_label,
                basis_meaning=meaning,
                state_label=_state_label(c.legal_basis, c.state, c.allowed),
                since=format_when(c.since),
                expires=format_day(c.expires_at),
                allowed=c.allowed,
                switchable=switchable,
                action=action,
                button=button,
                sale_or_sharing=c.sale_or_sharing,
                gpc_locked=gpc_locked and action == "grant",
            )
        )
    return rows
