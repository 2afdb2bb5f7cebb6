"""Data-subject rights: erasure by crypto-shredding (backups included), legal holds,
export against its schema, deadlines, rectification and key rotation."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
import uuid
import zipfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import insert, text

from governance.export import export_schema
from governance.keys import open_value, seal_value, value_aad
from governance.models import ChapterRow
from governance.service import StoryVault
from governance.settings import Settings
from tests.conftest import remember_personal
from tests.integration.mailbox import sign_in

P = "?purpose=service.support"
EMAIL = "Rosalind.Erasure@example.org"
TICKET = "the heated jacket caught fire on the balcony"


def outbox(settings: Settings) -> Path:
    return Path(settings.mail_url.removeprefix("file://"))


async def _customer_with_story(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    *,
    chapters: int = 3,
    email: str = EMAIL,
) -> str:
    remember_personal(email, TICKET, "Rosalind Erasure")
    resp = await client.post(
        f"/v1/customers{P}",
        headers=org["support"],
        json={"profile": {"name": "Rosalind Erasure", "email": email, "phone": "+44 20 7946 0958"}},
    )
    assert resp.status_code == 201, resp.text
    cid = resp.json()["id"]
    for i in range(chapters):
        r = await client.post(
            f"/v1/customers/{cid}/chapters{P}",
            headers=org["support"],
            json={
                "category": "support.ticket",
                "kind": "ticket",
                "occurred_at": f"2026-03-{i % 28 + 1:02d}T10:00:00Z",
                "body": {"subject": TICKET, "n": i},
            },
        )
        assert r.status_code == 201, r.text
    r = await client.post(
        f"/v1/customers/{cid}/chapters{P}",
        headers=org["sales"],
        json={
            "category": "commerce.invoice",
            "kind": "invoice",
            "occurred_at": "2026-02-01T09:00:00Z",
            "body": {"invoice": "INV-0042", "total": 99.5},
        },
    )
    assert r.status_code == 201, r.text
    return str(cid)


def _decryptable(db_file: Path, vault: StoryVault, keys_db: Path) -> dict[str, int]:
    """Try to decrypt every sealed value of a database file with the live key ring and
    the live key store; count what opens, by category."""
    opened: dict[str, int] = {}
    con = sqlite3.connect(db_file)
    kcon = sqlite3.connect(keys_db)
    wrapped = {
        r[0]: r
        for r in kcon.execute(
            "SELECT id, customer_id, scope, kek_version, wrapped FROM data_keys WHERE wrapped IS NOT NULL"
        )
    }
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from governance.datakeys import dek_aad

    rows = [
        (cid, field, field, cat, dek, sealed)
        for cid, field, cat, dek, sealed in con.execute(
            "SELECT customer_id, field, category, dek_id, sealed FROM profile_values"
        )
    ]
    rows += [
        (cid, rid, cat, cat, dek, sealed)
        for cid, rid, cat, dek, sealed in con.execute(
            "SELECT customer_id, id, category, dek_id, sealed FROM chapters"
        )
    ]
    for cid, record, field, category, dek_id, sealed in rows:
        w = wrapped.get(dek_id)
        if w is None:
            continue
        raw = vault.ring.unwrap(w[3], w[4], dek_aad(w[1], w[2], w[0]))
        open_value(AESGCM(raw), sealed, value_aad(cid, record, field, dek_id))
        opened[category] = opened.get(category, 0) + 1
    con.close()
    kcon.close()
    return opened


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_erasure_reaches_a_backup_copy_while_invoices_stay_for_their_legal_purpose(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
) -> None:
    """A file copy taken before erasure cannot be decrypted with the live key ring and key
    store afterwards, except the invoice, which stays readable for legal.retention only."""
    cid = await _customer_with_story(client, org, direct)
    db_file = Path(settings.database_url.split(":///", 1)[1])
    keys_file = Path(settings.effective_keystore_url.split(":///", 1)[1])
    backup = db_file.with_name("backup.db")
    src = sqlite3.connect(db_file)
    dst = sqlite3.connect(backup)
    src.backup(dst)  # SQLite's online backup: a consistent copy
    src.close()
    dst.close()
    assert _decryptable(backup, direct, keys_file) == {
        "identity.name": 1,
        "contact.email": 1,
        "contact.phone": 1,
        "support.ticket": 3,
        "commerce.invoice": 1,
    }

    me = await sign_in(client, outbox(settings), EMAIL)
    resp = await client.post("/v1/me/erasure", json={"categories": None}, headers=me)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["categories_held"][0]["category"] == "commerce.invoice"
    assert body["categories_held"][0]["legal_ground"] == "legal.retention"
    assert "support.ticket" in body["categories_erased"]

    # the backup copy, read with the live key ring and key store: only the invoice opens
    assert _decryptable(backup, direct, keys_file) == {"commerce.invoice": 1}
    # the live service: 404 for every purpose but the legal one, which sees the invoice only
    r = await client.get(f"/v1/customers/{cid}/story{P}", headers=org["support"])
    assert r.status_code == 404
    r = await client.get(
        f"/v1/customers/{cid}/story?purpose=legal.retention", headers=org["compliance"]
    )
    assert r.status_code == 200, r.text
    story = r.json()
    assert [c["kind"] for c in story["chapters"]] == ["invoice"]
    assert story["profile"] == {}
    assert {"category": "identity.name", "reason": "erased"} in story["withheld"]
    # e-mail lookup no longer finds the customer
    r = await client.get(
        "/v1/customers",
        params={"email": EMAIL, "purpose": "service.support"},
        headers=org["support"],
    )
    assert r.json() == {"items": []}


async def test_erasure_certificate_verifies_and_names_what_was_destroyed(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
) -> None:
    """The certificate is a JWS verifiable with the published JWKS, naming keys and log index."""
    import jwt

    await _customer_with_story(client, org, direct)
    me = await sign_in(client, outbox(settings), EMAIL)
    body = (await client.post("/v1/me/erasure", json={"categories": None}, headers=me)).json()
    jwks = (await client.get("/.well-known/jwks.json")).json()
    header = jwt.get_unverified_header(body["certificate"])
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims = jwt.decode(body["certificate"], jwt.PyJWK(key).key, algorithms=["EdDSA"])
    assert claims["sub"].startswith("sp_")
    assert claims["audit_index"] == body["audit_index"]
    assert len(claims["keys_destroyed"]) >= 3
    assert claims["categories_held"][0]["category"] == "commerce.invoice"
    entry = (
        await client.get(f"/v1/audit/entries/{body['audit_index']}", headers=org["compliance"])
    ).json()
    assert entry["kind"] == "erasure"
    # the erased customer's session may still read its register, nothing else
    reqs = (await client.get("/v1/me/requests", headers=me)).json()["items"]
    assert reqs[0]["type"] == "erasure"
    assert reqs[0]["status"] == "completed"
    assert reqs[0]["certificate"] == body["certificate"]
    assert (await client.get("/v1/me/story", headers=me)).status_code == 401


async def test_partial_erasure_withholds_the_category_as_erased(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
) -> None:
    """Erasing one category removes it for every purpose; the rest of the story stays."""
    cid = await _customer_with_story(client, org, direct)
    me = await sign_in(client, outbox(settings), EMAIL)
    r = await client.post("/v1/me/erasure", json={"categories": ["support.ticket"]}, headers=me)
    assert r.status_code == 202
    story = (await client.get(f"/v1/customers/{cid}/story{P}", headers=org["support"])).json()
    assert {"category": "support.ticket", "reason": "erased"} in story["withheld"]
    assert all(c["category"] != "support.ticket" for c in story["chapters"])
    assert story["profile"]["name"] == "Rosalind Erasure"
    bad = await client.post("/v1/me/erasure", json={"categories": ["astrology"]}, headers=me)
    assert bad.status_code == 422


async def _erase_time(client: AsyncTestClient[Any], settings: Settings, email: str) -> float:
    me = await sign_in(client, outbox(settings), email)
    t0 = time.perf_counter()
    r = await client.post("/v1/me/erasure", json={"categories": None}, headers=me)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 202
    return elapsed


async def test_erasure_time_does_not_grow_with_the_story(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
    backend: str,
) -> None:
    """Erasing a 10,000-chapter story takes about as long as a 10-chapter one (O(keys))."""
    await _customer_with_story(client, org, direct, chapters=10, email="small.story@example.org")
    big = await _customer_with_story(client, org, direct, chapters=0, email="big.story@example.org")
    body = direct.vault.validate_chapter("support.ticket", "ticket", {"subject": "x" * 200})
    # 10,000 chapters sealed exactly as add_chapter does, inserted in one statement
    dek_id, aead = await direct.keys.for_write(big, "support.ticket")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(10_000):
        chapter_id = str(uuid.uuid4())
        rows.append(
            {
                "id": chapter_id,
                "customer_id": big,
                "category": "support.ticket",
                "kind": "ticket",
                "occurred_at": start + timedelta(seconds=i),
                "author_team": "support",
                "dek_id": dek_id,
                "created_at": start,
                "sealed": seal_value(
                    aead, body, value_aad(big, chapter_id, "support.ticket", dek_id)
                ),
            }
        )
    async with direct.db.write_session() as session:
        await session.execute(insert(ChapterRow), rows)
        await session.commit()
    t_small = min([await _erase_time(client, settings, "small.story@example.org")])
    t_big = await _erase_time(client, settings, "big.story@example.org")
    assert t_big < max(3 * t_small, t_small + 0.25), (t_small, t_big)
    # the shredded chapters are purged later by the sweep
    async with direct.db.session() as session:
        left = (
            await session.execute(
                text(
                    "SELECT count(*) FROM chapters WHERE customer_id = :c AND category = 'support.ticket'"
                ),
                {"c": big},
            )
        ).scalar_one()
    assert left == 10_000
    counts = await direct.rights.sweep()
    assert counts["shredded_purged"] >= 10_000


async def test_export_validates_against_the_published_schema(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
) -> None:
    """JSON and ZIP exports hold everything, and the JSON validates against its schema."""
    cid = await _customer_with_story(client, org, direct)
    await client.get(f"/v1/customers/{cid}/story{P}", headers=org["support"])
    me = await sign_in(client, outbox(settings), EMAIL)
    await client.put("/v1/me/consents/marketing.email", json={"granted": True}, headers=me)
    schema = (await client.get("/v1/schemas/export.json")).json()
    assert schema == export_schema()
    resp = await client.get("/v1/me/export?format=json", headers=me)
    assert resp.status_code == 200
    doc = resp.json()
    jsonschema.validate(doc, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert {p["field"] for p in doc["profile"]} == {"name", "email", "phone"}
    assert len(doc["chapters"]) == 4
    assert doc["access_log"][0]["team"] == "support"
    assert any(h["purpose"] == "marketing.email" for h in doc["consent_history"])
    ticket = next(c for c in doc["categories"] if c["category"] == "support.ticket")
    assert any("support" in u["recipients"] for u in ticket["purposes"])
    resp = await client.get("/v1/me/export?format=zip", headers=me)
    assert resp.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(resp.content))
    assert {
        "export.json",
        "chapters.csv",
        "profile.csv",
        "consent_history.csv",
        "access_log.csv",
        "categories.csv",
        "README.txt",
    } <= set(zf.namelist())
    jsonschema.validate(json.loads(zf.read("export.json")), schema)
    assert zf.read("chapters.csv").decode().count("\n") == 5


async def test_requests_register_deadlines_and_extension(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
) -> None:
    """A request received elsewhere is due in a month; an extension needs and shows a reason."""
    cid = await _customer_with_story(client, org, direct)
    r = await client.post(
        f"/v1/customers/{cid}/requests",
        json={"type": "access", "channel": "letter"},
        headers=org["support"],
    )
    assert r.status_code == 201, r.text
    req = r.json()
    from datetime import datetime, timedelta

    received = datetime.fromisoformat(req["received_at"])
    assert datetime.fromisoformat(req["due_at"]) - received == timedelta(days=30)
    bad = await client.post(
        f"/v1/admin/requests/{req['id']}/extend",
        json={"reason": "", "days": 30},
        headers=org["compliance"],
    )
    assert bad.status_code == 400
    ext = await client.post(
        f"/v1/admin/requests/{req['id']}/extend",
        json={"reason": "scanning paper archives", "days": 60},
        headers=org["compliance"],
    )
    assert ext.status_code == 200, ext.text
    assert ext.json()["extended_reason"] == "scanning paper archives"
    assert datetime.fromisoformat(ext.json()["due_at"]) - received == timedelta(days=90)
    me = await sign_in(client, outbox(settings), EMAIL)
    mine = (await client.get("/v1/me/requests", headers=me)).json()["items"]
    assert mine[0]["extended_reason"] == "scanning paper archives"
    assert (
        await client.post(
            f"/v1/customers/{cid}/requests", json={"type": "nonsense"}, headers=org["support"]
        )
    ).status_code == 422


async def test_rectification_updates_profile_and_blind_index(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
) -> None:
    """PATCH /v1/me/profile corrects the e-mail: lookups find the new one, not the old."""
    await _customer_with_story(client, org, direct)
    me = await sign_in(client, outbox(settings), EMAIL)
    remember_personal("rosalind.new@example.org")
    r = await client.patch("/v1/me/profile", json={"email": "rosalind.new@example.org"}, headers=me)
    assert r.status_code == 200, r.text

    def find(e: str) -> Any:
        return client.get(
            "/v1/customers",
            params={"email": e, "purpose": "service.support"},
            headers=org["support"],
        )

    assert (await find(EMAIL)).json() == {"items": []}
    assert len((await find("rosalind.new@example.org")).json()["items"]) == 1
    assert (
        await client.patch("/v1/me/profile", json={"shoe": "42"}, headers=me)
    ).status_code == 422


async def test_key_rotation_under_concurrent_reads(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
) -> None:
    """Rotating the KEK while reads go on: no failed read, every key re-wrapped, old KEK gone.

    Reads and rotation run on one event loop through the service (the HTTP test client
    serializes requests, so it cannot overlap them)."""
    ids = [
        await _customer_with_story(client, org, direct, chapters=1, email=f"rot{i}@example.org")
        for i in range(8)
    ]
    direct.keys.forget(list(direct.keys._cache or {}))  # cold cache: reads unwrap during rotation
    stop = asyncio.Event()
    failures: list[str] = []
    reads = 0

    async def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            for cid in ids:
                direct.keys.forget(list(direct.keys._cache or {}))
                try:
                    async with direct.db.session() as session:
                        story = await direct.vault.read_story(session, cid)
                    if story.profile.get("name") != "Rosalind Erasure" or not story.chapters:
                        failures.append("incomplete")
                except Exception as exc:
                    failures.append(type(exc).__name__)
                reads += 1
                await asyncio.sleep(0)

    tasks = [asyncio.create_task(reader()) for _ in range(3)]
    await asyncio.sleep(0.05)
    await direct.audit_writer.start()
    result = await direct.rights.rotate_keys(batch=5)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    assert result["kek_version"] == 2
    assert result["rewrapped"] >= 8 * 4
    assert result["retired"] == 1
    assert failures == []
    assert reads > 20
    async with direct.keystore.session() as session:
        versions = set(
            (
                await session.execute(
                    text("SELECT DISTINCT kek_version FROM data_keys WHERE wrapped IS NOT NULL")
                )
            ).scalars()
        )
    assert versions == {2}
    assert set(direct.ring.keks) == {2}
    assert direct.ring.retired_keks == {1}
    # a new process with the rotated key ring file reads everything
    fresh = StoryVault(replace(direct.settings))
    try:
        assert set(fresh.ring.keks) == {2}
        async with fresh.db.session() as session:
            story = await fresh.vault.read_story(session, ids[0])
        assert story.profile["name"] == "Rosalind Erasure"
    finally:
        await fresh.stop()


async def test_rotation_over_http_refuses_an_external_key_ring(
    tmp_path: Path, database_url: str, admin: dict[str, str]
) -> None:
    """A key ring supplied by the environment is rotated where it is stored, not by the API."""
    from api.app import create_app
    from governance.keys import KeyRing
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, database_url, keyring_json=KeyRing.generate().to_json())
    async with AsyncTestClient(app=create_app(settings)) as c:
        r = await c.post("/v1/admin/keys/rotate", headers=admin)
        assert r.status_code == 409
        assert r.json()["code"] == "keyring_external"
