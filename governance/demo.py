"""Demo data for a new database: teams with keys and about 50 customers with stories.

Deterministic (seeded) so the same demo appears on every fresh start.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from governance.service import StoryVault
    from governance.teams import IssuedKey

__all__ = ["DEMO_TEAMS", "demo_stories", "load_demo"]

DEMO_TEAMS = {
    "sales": "Account managers and inside sales",
    "marketing": "Campaigns, newsletters and partner programmes",
    "support": "Customer care: tickets, chats and calls",
    "product": "Product analytics and personalization",
}
_FIRST = [
    "Ana",
    "Ben",
    "Chloé",
    "Dmitri",
    "Eva",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Lars",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quentin",
    "Rosa",
    "Sami",
    "Tomás",
]
_LAST = [
    "Alvarez",
    "Becker",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "García",
    "Haddad",
    "Ivanova",
    "Jansen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
]
_STREETS = ["Harbour Lane", "Linden Allee", "Rue des Fleurs", "Mill Road", "Kastanienweg"]
_PRODUCTS = [
    ("Trail running shoes", 129.0),
    ("Rain jacket", 189.0),
    ("Wool socks (3)", 24.5),
    ("Day pack 22 l", 79.0),
    ("Headlamp", 39.9),
    ("Thermal bottle", 29.0),
    ("Merino base layer", 89.0),
    ("Trekking poles", 99.0),
]
_FAULTS = [
    "Sole came loose after two weeks",
    "Zip on the jacket broke",
    "Wrong size delivered",
    "Parcel arrived damaged",
    "Refund not received yet",
    "Headlamp does not charge",
]
_MOTIVES = [
    "Training for a first marathon",
    "Hiking with the kids on weekends",
    "Commuting by bike all year",
    "Wants gear that lasts, hates returns",
]
_PREFS = [
    {"channel": "email", "sizes": "EU 42"},
    {"channel": "sms", "colour": "dark"},
    {"channel": "none", "store": "city centre"},
]


def demo_stories(count: int = 50, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)  # noqa: S311  (demo content, not security)
    now = datetime.now(UTC).replace(microsecond=0)
    stories = []
    for i in range(count):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        profile = {
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{i}@example.com".replace("é", "e")
            .replace("á", "a")
            .replace("í", "i"),
            "phone": f"+49 30 {rng.randint(1000000, 9999999)}",
            "address": f"{rng.randint(1, 120)} {rng.choice(_STREETS)}, {rng.randint(10000, 99999)} Springfield",
            "birthday": f"{rng.randint(1950, 2004)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        }
        chapters: list[dict[str, Any]] = []
        day = now - timedelta(days=rng.randint(200, 900))
        for _ in range(rng.randint(2, 6)):
            product, price = rng.choice(_PRODUCTS)
            day += timedelta(days=rng.randint(5, 60))
            order = f"SO-{rng.randint(100000, 999999)}"
            chapters.append(
                {
                    "category": "commerce.purchase",
                    "kind": "purchase",
                    "occurred_at": day,
                    "body": {
                        "order": order,
                        "product": product,
                        "amount": price,
                        "currency": "EUR",
                    },
                }
            )
            chapters.append(
                {
                    "category": "commerce.invoice",
                    "kind": "invoice",
                    "occurred_at": day,
                    "body": {"invoice": f"INV-{order[3:]}", "total": price, "currency": "EUR"},
                }
            )
        for _ in range(rng.randint(0, 3)):
            fault = rng.choice(_FAULTS)
            day += timedelta(days=rng.randint(1, 20))
            chapters.append(
                {
                    "category": "support.ticket",
                    "kind": "ticket",
                    "occurred_at": day,
                    "body": {"subject": fault, "status": rng.choice(["open", "resolved"])},
                }
            )
            chapters.append(
                {
                    "category": "engagement.interaction",
                    "kind": rng.choice(["chat", "call", "email"]),
                    "occurred_at": day + timedelta(hours=2),
                    "body": {"summary": f"Customer contacted us: {fault.lower()}", "topic": fault},
                }
            )
            chapters.append(
                {
                    "category": "insight.sentiment",
                    "kind": "sentiment",
                    "occurred_at": day + timedelta(hours=3),
                    "body": {
                        "score": round(rng.uniform(-0.9, 0.6), 2),
                        "note": "tone of the conversation",
                    },
                }
            )
        chapters.append(
            {
                "category": "preference",
                "kind": "preference",
                "occurred_at": day,
                "body": rng.choice(_PREFS),
            }
        )
        chapters.append(
            {
                "category": "insight.motivation",
                "kind": "motivation",
                "occurred_at": day,
                "body": {"statement": rng.choice(_MOTIVES)},
            }
        )
        stories.append(
            {"external_ref": f"crm-{10000 + i}", "profile": profile, "chapters": chapters}
        )
    return stories


async def load_demo(vault: StoryVault) -> list[IssuedKey]:
    """Create the demo teams and keys, and the demo customers; return the keys."""
    issued: list[IssuedKey] = []
    async with vault.db.write_session() as session:
        for team, description in DEMO_TEAMS.items():
            if team not in await vault.teams.team_names(session):
                await vault.teams.create_team(session, team, roles=[], description=description)
        for team in [*DEMO_TEAMS, "compliance"]:
            issued.append(await vault.teams.issue_key(session, team, label="demo"))
        await session.commit()
    await vault.seed_demo_policy()
    for story in demo_stories():
        async with vault.db.write_session() as session:
            customer_id = await vault.vault.create_customer(
                session, external_ref=story["external_ref"], profile=story["profile"]
            )
            for ch in story["chapters"]:
                encoded = vault.vault.validate_chapter(ch["category"], ch["kind"], ch["body"])
                await vault.vault.add_chapter(
                    session,
                    customer_id,
                    category=ch["category"],
                    kind=ch["kind"],
                    occurred_at=ch["occurred_at"],
                    body=encoded,
                    author_team="sales",
                )
            await session.commit()
        await vault.seed_demo_consents(customer_id)
    return issued
