"""Backups and restores: ``storyvault backup`` / ``storyvault restore`` as real
processes, on SQLite (online backup API) and PostgreSQL (pg_dump/pg_restore).

The promise under test: a restore never resurrects erased data. A backup taken
before an erasure still holds the customer's ciphertexts, blind index and live
status (and, in a key-store backup, the customer's live data keys); after the
restore the erasure journal re-applies the erasure, so the customer is as erased
as before while everyone else is intact and the audit log verifies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, text

from api.app import create_app
from audit import verify_log
from governance.models import (
    CHAPTERS,
    DATA_KEYS,
    EMAIL_INDEX,
    PROFILE_VALUES,
    ChapterRow,
    DataKeyRow,
    EmailIndexRow,
    ProfileValueRow,
)
from governance.service import StoryVault
from governance.settings import Settings
from tests.conftest import remember_personal
from tests.integration.mailbox import sign_in
from tests.integration.procs import cli

P = "?purpose=service.support"
GONE = ("Berenice.Backup@example.org", "Berenice Backupwell")
KEPT = ("Casimir.Kept@example.org", "Casimir Keptmore")
TICKET = "the backup tape smelled of ozone"


async def _customer(
    client: AsyncTestClient[Any], support: dict[str, str], who: tuple[str, str]
) -> str:
    email, name = who
    remember_personal(email, name, TICKET)
    resp = await client.post(
        f"/v1/customers{P}",
        headers=support,
        json={"profile": {"name": name, "email": email, "phone": "+44 20 7946 0111"}},
    )
    assert resp.status_code == 201, resp.text
    cid = str(resp.json()["id"])
    for i in range(2):
        r = await client.post(
            f"/v1/customers/{cid}/chapters{P}",
            headers=support,
            json={
                "category": "support.ticket",
                "kind": "ticket",
                "occurred_at": f"2026-04-0{i + 1}T10:00:00Z",
                "body": {"subject": TICKET, "n": i},
            },
        )
        assert r.status_code == 201, r.text
    return cid


async def _held_by(vault: StoryVault, cid: str) -> dict[str, int]:
    """What the story database and the key store still hold of one customer."""
    async with vault.db.session() as s:
        values = (
            await s.execute(
                select(func.count())
                .select_from(ProfileValueRow)
                .where(PROFILE_VALUES.customer_id == cid)
            )
        ).scalar_one()
        chapters = (
            await s.execute(
                select(func.count()).select_from(ChapterRow).where(CHAPTERS.customer_id == cid)
            )
        ).scalar_one()
        index = (
            await s.execute(
                select(func.count())
                .select_from(EmailIndexRow)
                .where(EMAIL_INDEX.customer_id == cid)
            )
        ).scalar_one()
    async with vault.keystore.session() as s:
        keys = (
            await s.execute(
                select(func.count())
                .select_from(DataKeyRow)
                .where(DATA_KEYS.customer_id == cid, DATA_KEYS.wrapped.is_not(None))
            )
        ).scalar_one()
    return {"values": values, "chapters": chapters, "blind_index": index, "live_keys": keys}


async def _decrypted(vault: StoryVault, cid: str) -> int:
    """How many of the customer's sealed values open with the live ring and key store."""
    from governance.keys import open_value, value_aad

    async with vault.db.session() as s:
        rows = [
            (r.field, r.field, r.dek_id, r.sealed)
            for r in (
                await s.execute(
                    select(
                        PROFILE_VALUES.field, PROFILE_VALUES.dek_id, PROFILE_VALUES.sealed
                    ).where(PROFILE_VALUES.customer_id == cid)
                )
            ).all()
        ]
        rows += [
            (r.id, r.category, r.dek_id, r.sealed)
            for r in (
                await s.execute(
                    select(CHAPTERS.id, CHAPTERS.category, CHAPTERS.dek_id, CHAPTERS.sealed).where(
                        CHAPTERS.customer_id == cid
                    )
                )
            ).all()
        ]
    keys = await vault.keys.for_read({r[2] for r in rows})
    opened = 0
    for record, fld, dek_id, sealed in rows:
        if dek_id in keys:
            open_value(keys[dek_id], sealed, value_aad(cid, record, fld, dek_id))
            opened += 1
    return opened


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "with_keystore"),
    [("sqlite", True), ("sqlite", False), ("postgresql", True)],
    ids=["sqlite-story+keystore", "sqlite-story-only", "postgresql-story+keystore"],
    indirect=["backend"],
)
async def test_restore_never_resurrects_an_erasure(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
    tmp_path: Path,
    with_keystore: bool,
) -> None:
    gone = await _customer(client, org["support"], GONE)
    kept = await _customer(client, org["support"], KEPT)

    # 1. the backup, taken by the CLI while the service runs
    args = ["backup", "--output", str(tmp_path / "bk")]
    if with_keystore:
        args += ["--keystore-output", str(tmp_path / "bk-keys")]
    out = cli(settings, *args).stdout
    assert "story backup" in out
    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    assert manifest["kind"] == "story"
    assert manifest["backend"] == ("sqlite" if settings.is_sqlite else "postgresql")

    # 2. the customer erases everything
    me = await sign_in(client, Path(settings.mail_url.removeprefix("file://")), GONE[0])
    r = await client.post("/v1/me/erasure", json={"categories": None}, headers=me)
    assert r.status_code == 202, r.text
    request = r.json()["request_id"]
    before = await _held_by(direct, gone)
    assert before["live_keys"] == 0
    assert before["values"] == 0
    assert before["blind_index"] == 0

    # 3. restore the backup taken before the erasure
    args = ["restore", "--input", str(tmp_path / "bk")]
    if with_keystore:
        args += ["--keystore-input", str(tmp_path / "bk-keys")]
    out = cli(settings, *args).stdout
    print(out.strip())
    assert "re-applied: 1" in out, out
    # the backup brought back ciphertexts and the blind index (and, with the key
    # store, live keys): the re-applied erasure took them away again
    m = re.search(r"\((\d+) keys destroyed, (\d+) values deleted\)", out)
    assert m is not None, out
    keys_destroyed, values_deleted = int(m.group(1)), int(m.group(2))
    assert values_deleted >= 3 + 2 + 1  # name, email, phone, 2 tickets, blind index
    assert (keys_destroyed > 0) is with_keystore
    if not settings.is_sqlite:
        # the restored tables have planner statistics (pg_restore brings none)
        async with direct.db.engine.connect() as conn:
            analyzed = set(
                (
                    await conn.execute(
                        text("SELECT DISTINCT tablename FROM pg_stats WHERE schemaname = 'public'")
                    )
                ).scalars()
            )
        assert {"customers", "chapters", "audit_entries", "audit_nodes"} <= analyzed, analyzed

    # 4. a fresh instance on the restored databases (as after a restart)
    after = StoryVault(settings)
    try:
        held = await _held_by(after, gone)
        assert held == {"values": 0, "chapters": 0, "blind_index": 0, "live_keys": 0}, held
        assert await _decrypted(after, gone) == 0
        assert await _decrypted(after, kept) == 3 + 2
        requests = await after.rights.list_requests(gone)
        assert [(q.id, q.type, q.status) for q in requests] == [(request, "erasure", "completed")]
    finally:
        await after.stop()

    app = create_app(settings)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as fresh:
        support = org["support"]
        r = await fresh.get(f"/v1/customers/{gone}/story{P}", headers=support)
        assert r.status_code == 404, r.text
        r = await fresh.get(
            "/v1/customers",
            params={"email": GONE[0], "purpose": "service.support"},
            headers=support,
        )
        assert r.json() == {"items": []}
        r = await fresh.get(f"/v1/customers/{kept}/story{P}", headers=support)
        assert r.status_code == 200, r.text
        story = r.json()
        assert story["profile"]["name"] == KEPT[1]
        assert [c["body"]["subject"] for c in story["chapters"]] == [TICKET, TICKET]
        r = await fresh.get(
            "/v1/customers",
            params={"email": KEPT[0], "purpose": "service.support"},
            headers=support,
        )
        assert r.json() == {"items": [{"id": kept}]}
        # the erased customer cannot sign in again either
        r = await fresh.post("/v1/me/login", json={"email": GONE[0]})
        assert r.status_code == 202

    # 5. the restored log, with the re-applied erasure appended, verifies
    verified = await verify_log(direct.db.engine, dict(direct.ring.public_jwks()))
    assert verified.ok, verified.divergence


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_backup_refuses_what_it_cannot_do_well(
    settings: Settings, direct: StoryVault, tmp_path: Path
) -> None:
    await direct.start()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    done = cli(settings, "backup", "--output", str(tmp_path / "full"), check=False)
    assert done.returncode == 1
    assert "not empty" in done.stderr
    same = str(tmp_path / "same")
    done = cli(settings, "backup", "--output", same, "--keystore-output", same, check=False)
    assert done.returncode == 1
    assert "apart" in done.stderr
    # a corrupted backup is refused before anything is overwritten
    cli(settings, "backup", "--output", str(tmp_path / "ok"))
    with (tmp_path / "ok" / "storyvault.db").open("r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00garbage\x00")
    done = cli(settings, "restore", "--input", str(tmp_path / "ok"), check=False)
    assert done.returncode == 1
    assert "checksum" in done.stderr
    # the journal can be re-applied on its own (after a point-in-time recovery)
    assert "journalled: 0" in cli(settings, "erasures", "reapply").stdout
