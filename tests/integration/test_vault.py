"""The encrypted story vault over HTTP, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from governance.keys import KeyRing, KeyRingError
from governance.service import StoryVault
from governance.settings import Settings
from tests.conftest import make_settings, remember_personal
from tests.pgserver import PgServer

PURPOSE = "service.support"
EMAIL = "Zelda.Quartermain@Example.org"
NAME = "Zelda Quartermain"
CHAPTER_TEXT = "complained about the turquoise kayak paddle"


async def _create(client: AsyncTestClient[Any], support: dict[str, str], **profile: str) -> str:
    remember_personal(*profile.values())
    resp = await client.post(
        f"/v1/customers?purpose={PURPOSE}",
        json={"external_ref": "crm-1", "profile": profile},
        headers=support,
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def test_nothing_stored_in_plaintext(
    client: AsyncTestClient[Any],
    support: dict[str, str],
    settings: Settings,
    backend: str,
    request: pytest.FixtureRequest,
    direct: StoryVault,
) -> None:
    """Grepping the raw database for any stored value finds nothing (invariant 1)."""
    remember_personal(CHAPTER_TEXT)
    cid = await _create(
        client,
        support,
        name=NAME,
        email=EMAIL,
        phone="+49 30 5550199",
        birthday="1984-02-29",
        address="17 Juniper Crescent, 40210 Lakeside",
    )
    resp = await client.post(
        f"/v1/customers/{cid}/chapters?purpose={PURPOSE}",
        headers=support,
        json={
            "category": "support.ticket",
            "kind": "ticket",
            "occurred_at": "2026-01-02T10:00:00Z",
            "body": {"subject": CHAPTER_TEXT},
        },
    )
    assert resp.status_code == 201, resp.text
    if backend == "sqlite":
        path = Path(settings.database_url.split(":///", 1)[1])
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    else:
        pg: PgServer = request.getfixturevalue("pg")
        raw = pg.pg_dump(settings.database_url.rsplit("/", 1)[1])
    assert len(raw) > 1000
    for value in (
        EMAIL,
        EMAIL.lower(),
        NAME,
        "Quartermain",
        "5550199",
        "1984-02-29",
        "Juniper",
        CHAPTER_TEXT,
        "turquoise",
    ):
        assert value.encode() not in raw, f"a stored value appears in the raw {backend} data"
    # the story still decrypts through the service
    vault: StoryVault = direct
    async with vault.db.session() as session:
        story = await vault.vault.read_story(session, cid)
    assert story.profile["email"] == EMAIL
    assert story.chapters[0].body == {"subject": CHAPTER_TEXT}


async def test_blind_index_lookup_ignores_case_and_spaces(
    client: AsyncTestClient[Any], support: dict[str, str]
) -> None:
    """A customer is found by e-mail whatever its case and surrounding spaces."""
    cid = await _create(client, support, name=NAME, email=EMAIL)
    await _create(client, support, name="Other Person", email="other.person@example.org")
    for probe in (EMAIL, EMAIL.upper(), f"  {EMAIL.lower()}  "):
        resp = await client.get(
            "/v1/customers", params={"email": probe, "purpose": PURPOSE}, headers=support
        )
        assert resp.status_code == 200
        assert resp.json() == {"items": [{"id": cid}]}
    resp = await client.get(
        "/v1/customers", params={"email": "nobody@example.org", "purpose": PURPOSE}, headers=support
    )
    assert resp.json() == {"items": []}


def test_blind_index_differs_between_deployments() -> None:
    """Another deployment's key ring yields other index values for the same address."""
    a, b = KeyRing.generate(), KeyRing.generate()
    assert a.blind_index(EMAIL) == a.blind_index(EMAIL.upper())
    assert a.blind_index(EMAIL) != b.blind_index(EMAIL)


async def test_swapped_ciphertexts_fail_to_decrypt(
    client: AsyncTestClient[Any], support: dict[str, str], direct: StoryVault
) -> None:
    """A ciphertext moved to another field or another customer does not decrypt."""
    a = await _create(client, support, name="Alpha Customer", email="alpha@example.org")
    b = await _create(client, support, name="Beta Customer", email="beta@example.org")
    vault: StoryVault = direct
    async with vault.db.session() as session:
        # another customer's sealed name, with its key id, copied into a's row
        await session.execute(
            text(
                "UPDATE profile_values SET sealed = (SELECT sealed FROM profile_values "
                "WHERE customer_id = :b AND field = 'name'), dek_id = (SELECT dek_id FROM "
                "profile_values WHERE customer_id = :b AND field = 'name') "
                "WHERE customer_id = :a AND field = 'name'"
            ),
            {"a": a, "b": b},
        )
        await session.commit()
    async with vault.db.session() as session:
        with pytest.raises(KeyRingError, match="does not decrypt"):
            await vault.vault.read_story(session, a, ["identity.name"])
    async with vault.db.session() as session:
        # b's own e-mail moved into b's name field (same customer, other field)
        await session.execute(
            text(
                "UPDATE profile_values SET sealed = (SELECT sealed FROM profile_values "
                "WHERE customer_id = :b AND field = 'email') WHERE customer_id = :b AND field = 'name'"
            ),
            {"b": b},
        )
        await session.commit()
    async with vault.db.session() as session:
        with pytest.raises(KeyRingError):
            await vault.vault.read_story(session, b, ["identity.name"])


async def test_wrong_key_ring_fails_clearly(tmp_path: Path, database_url: str) -> None:
    """Opening a database with another deployment's key ring fails with a clear error."""
    settings = make_settings(tmp_path, database_url)
    vault = StoryVault(settings)
    await vault.start()
    async with vault.db.session() as session:
        cid = await vault.vault.create_customer(
            session, external_ref=None, profile={"name": "Kim Wrongkey"}
        )
        await session.commit()
    await vault.stop()
    other = KeyRing.generate()
    wrong = StoryVault(
        make_settings(tmp_path / "other", database_url, keyring_json=other.to_json())
    )
    await wrong.start()
    try:
        async with wrong.db.session() as session:
            with pytest.raises(KeyRingError, match="does not unwrap with KEK version 1"):
                await wrong.vault.read_story(session, cid)
    finally:
        await wrong.stop()
