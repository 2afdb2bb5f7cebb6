"""The transparency log over HTTP, checked from the outside.

Proofs are verified by an independent RFC 9162 verifier written here (no import from
``audit/``), tree-head signatures with the JWKS key only, tampering through raw SQL is
found by ``storyvault audit verify`` at the right index, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from api.app import create_app
from api.cli import main as cli
from audit import TABLE_NAMES, AuditEntry, EntryKind, drop_append_only_ddl, verify_log
from governance.service import StoryVault
from governance.settings import Settings
from tests.integration.portal import new_customer, sign_in

EMAIL = "Thaddeus.Ledger@example.org"
NAME = "Thaddeus Ledgerwood"
READ = "/v1/customers/{}/story?purpose=service.support"


# --- an independent RFC 9162 verifier -------------------------------------------


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def rfc_leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def rfc_verify_inclusion(
    index: int, size: int, leaf_hash: bytes, path: list[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def rfc_verify_consistency(
    first: int, second: int, proof: list[bytes], first_root: bytes, second_root: bytes
) -> bool:
    """RFC 9162 §2.1.4.2."""
    if first == second:
        return not proof and first_root == second_root
    if not 0 < first < second or not proof:
        return False
    if first & (first - 1) == 0:
        proof = [first_root, *proof]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = _node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == first_root and sr == second_root


def _unb64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


async def _signed_head(client: AsyncTestClient[Any]) -> dict[str, Any]:
    """The current tree head, its Ed25519 signature checked over TreeHeadDataV2 bytes
    with the key the JWKS publishes under its key_id."""
    head: dict[str, Any] = (await client.get("/v1/audit/tree-head")).json()
    jwks = (await client.get("/.well-known/jwks.json")).json()
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == head["key_id"]]
    assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
    root = bytes.fromhex(head["root_hash"])
    message = (
        head["timestamp_ms"].to_bytes(8, "big")
        + head["tree_size"].to_bytes(8, "big")
        + b"\x20"
        + root
        + b"\x00\x00"
    )
    key = Ed25519PublicKey.from_public_bytes(_unb64url(jwk["x"]))
    key.verify(base64.b64decode(head["signature"]), message)  # raises if it does not verify
    return head


# --- helpers ----------------------------------------------------------------------


async def _reads(client: AsyncTestClient[Any], team: dict[str, str], cid: str, n: int) -> list[int]:
    indexes = []
    for _ in range(n):
        resp = await client.get(READ.format(cid), headers=team)
        assert resp.status_code == 200, resp.text
        indexes.append(resp.json()["audit_index"])
    return indexes


def _cli_verify(settings: Settings) -> Result:
    env = {
        "STORYVAULT_DATABASE_URL": settings.database_url,
        "STORYVAULT_DATA_DIR": str(settings.data_dir),
    }
    keystore = getattr(settings, "keystore_url", "")
    if keystore:
        env["STORYVAULT_KEYSTORE_URL"] = keystore
    return CliRunner().invoke(cli, ["audit", "verify", "--page-size", "7"], env=env)


async def _verify(settings: Settings) -> Result:
    # The command runs its own event loop (asyncio.run), so it gets a thread.
    return await asyncio.to_thread(_cli_verify, settings)


# --- tests ------------------------------------------------------------------------


async def test_a_read_is_in_the_audit_log_and_the_customers_access_log(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], settings: Settings
) -> None:
    """A team's gated read: one disclosure entry for admins (others 403) and for the
    customer in /v1/me/access-log, with purpose, categories and its index."""
    cid = await new_customer(client, org["support"], EMAIL, NAME)
    me = await sign_in(client, settings, EMAIL)
    (index,) = await _reads(client, org["support"], cid, 1)
    assert (await client.get("/v1/me/story", headers=me)).status_code == 200  # own read

    for team in ("support", "marketing", "sales"):
        resp = await client.get("/v1/audit/entries", headers=org[team])
        assert resp.status_code == 403, team
    assert (await client.get("/v1/audit/entries")).status_code == 401
    assert (await client.get("/v1/audit/entries", headers=me)).status_code in (401, 403)
    resp = await client.get(
        "/v1/audit/entries",
        params={"customer_id": cid, "team": "support"},
        headers=org["compliance"],
    )
    assert resp.status_code == 200, resp.text
    entries = {e["index"]: e for e in resp.json()["items"]}
    entry = entries[index]
    assert entry["kind"] == "disclosure"
    assert entry["purpose"] == "service.support"
    assert {"identity.name", "contact.email"} <= set(entry["categories"])
    assert entry["detail"] == {"operation": "story.read"}
    assert EMAIL not in resp.text
    assert NAME not in resp.text

    resp = await client.get("/v1/me/access-log", headers=me)
    assert resp.status_code == 200
    (item,) = [i for i in resp.json()["items"] if i["index"] == index]
    assert item["team"] == "support"
    assert item["purpose"] == "service.support"
    assert set(item["categories"]) == set(entry["categories"])
    assert item["at"]
    assert all(i["team"] != "customer" for i in resp.json()["items"])
    proof = await client.get(item["proof"])
    assert proof.status_code == 200
    assert proof.json()["leaf_index"] == index


async def test_leaf_bytes_proofs_and_tree_heads_verify_independently(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]]
) -> None:
    """Leaf bytes hash to the proof's leaf_hash; inclusion and consistency proofs from
    the endpoints verify with the verifier above; tree heads verify with the JWKS key."""
    cid = await new_customer(client, org["support"], EMAIL, NAME)
    first_indexes = await _reads(client, org["support"], cid, 3)
    old = await _signed_head(client)
    later_indexes = await _reads(client, org["support"], cid, 6)
    new = await _signed_head(client)
    assert old["tree_size"] < new["tree_size"]
    old_root, new_root = bytes.fromhex(old["root_hash"]), bytes.fromhex(new["root_hash"])

    for index in [0, *first_indexes, *later_indexes]:
        entry = (await client.get(f"/v1/audit/entries/{index}", headers=org["compliance"])).json()
        leaf = base64.b64decode(entry["leaf"])
        assert entry["leaf_text"].encode() == leaf
        proof = (
            await client.get(
                "/v1/audit/proofs/inclusion",
                params={"leaf_index": index, "tree_size": new["tree_size"]},
            )
        ).json()
        assert rfc_leaf_hash(leaf).hex() == proof["leaf_hash"] == entry["leaf_hash"]
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
        assert rfc_verify_inclusion(index, new["tree_size"], rfc_leaf_hash(leaf), path, new_root)
        if path:  # a flipped bit anywhere fails
            bad = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
            assert not rfc_verify_inclusion(
                index, new["tree_size"], rfc_leaf_hash(leaf), bad, new_root
            )
        assert not rfc_verify_inclusion(
            index, new["tree_size"], rfc_leaf_hash(leaf + b" "), path, new_root
        )

    resp = await client.get(
        "/v1/audit/proofs/consistency",
        params={"first": old["tree_size"], "second": new["tree_size"]},
    )
    assert resp.status_code == 200
    proof = [bytes.fromhex(h) for h in resp.json()["proof"]]
    assert rfc_verify_consistency(old["tree_size"], new["tree_size"], proof, old_root, new_root)
    assert not rfc_verify_consistency(
        old["tree_size"], new["tree_size"], proof, old_root, _node(new_root, new_root)
    )
    assert not rfc_verify_consistency(
        old["tree_size"], new["tree_size"], proof[:-1], old_root, new_root
    )
    refused = await client.get("/v1/audit/proofs/consistency", params={"first": 5, "second": 2})
    assert refused.status_code in (400, 422)
    assert refused.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize("how", ["writer_stopped", "append_fails"])
async def test_a_read_whose_audit_write_fails_discloses_nothing(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """Fail closed: no durable audit entry, no data; 503 problem."""
    cid = await new_customer(client, org["support"], EMAIL, NAME)
    vault: StoryVault = client.app.state.vault
    size = await direct.audit_log.size()
    if how == "writer_stopped":
        # The test client serves the app on its own loop: stop the writer there.
        app_loop = vault.audit_writer._task.get_loop()  # type: ignore[union-attr]
        stop = asyncio.run_coroutine_threadsafe(vault.audit_writer.stop(), app_loop)
        await asyncio.wrap_future(stop)
        assert not vault.audit_writer.running
    else:

        async def broken(*_: Any, **__: Any) -> Any:
            raise ConnectionError("database went away")

        def broken_sync(*_: Any, **__: Any) -> Any:
            raise ConnectionError("database went away")

        # The group commit appends on an asyncpg connection (PostgreSQL,
        # append_pg_alone or append_pg) or, on SQLite, on the loop's own
        # connection (append_sync); the async engine's append serves an in-memory
        # database: break them all.
        monkeypatch.setattr(vault.audit_log, "append", broken)
        monkeypatch.setattr(vault.audit_log, "append_pg_alone", broken)
        monkeypatch.setattr(vault.audit_log, "append_pg", broken)
        monkeypatch.setattr(vault.audit_log, "append_sync", broken_sync)
    resp = await client.get(READ.format(cid), headers=org["support"])
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "audit_unavailable"
    for value in (EMAIL, NAME, "Thaddeus", "profile"):
        assert value not in resp.text
    assert await direct.audit_log.size() == size
    if how == "append_fails":  # the writer survives a failed batch
        monkeypatch.undo()
        ok = await client.get(READ.format(cid), headers=org["support"])
        assert ok.status_code == 200
        assert ok.json()["profile"]["email"] == EMAIL


async def _sql(direct: StoryVault, *statements: str, **params: Any) -> None:
    async with direct.db.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement), params)


def _tampers(k: int, size: int, forged: bytes) -> list[tuple[str, list[str], dict[str, Any], str]]:
    """(name, statements, parameters, expected "<what> ... at <where>") per tampering."""
    at_k = f"at leaf index {k}: "
    return [
        (
            "edit-leaf",
            ["UPDATE audit_entries SET leaf = :leaf WHERE leaf_index = :k"],
            {"leaf": forged, "k": k},
            at_k + "leaf_hash_mismatch",
        ),
        (
            "edit-leaf-and-rehash",
            [
                "UPDATE audit_entries SET leaf = :leaf, leaf_hash = :h, actor = 'sales' "
                "WHERE leaf_index = :k"
            ],
            {"leaf": forged, "h": rfc_leaf_hash(forged), "k": k},
            at_k + "node_mismatch",
        ),
        (
            "edit-column",
            ["UPDATE audit_entries SET purpose = 'marketing.email' WHERE leaf_index = :k"],
            {"k": k},
            at_k + "filter_columns_mismatch",
        ),
        (
            "delete",
            ["DELETE FROM audit_entries WHERE leaf_index = :k"],
            {"k": k},
            at_k + "missing_entry",
        ),
        (
            "reorder",
            [
                "UPDATE audit_entries SET leaf_index = -1 WHERE leaf_index = :k",
                "UPDATE audit_entries SET leaf_index = :k WHERE leaf_index = :k + 1",
                "UPDATE audit_entries SET leaf_index = :k + 1 WHERE leaf_index = -1",
            ],
            {"k": k},
            at_k + "node_mismatch",
        ),
        (
            "insert-unsigned",
            [
                "INSERT INTO audit_entries (leaf_index, leaf, leaf_hash, kind, actor, subject, "
                "purpose, created_at) SELECT :size, leaf, leaf_hash, kind, actor, subject, "
                "purpose, created_at FROM audit_entries WHERE leaf_index = :k"
            ],
            {"k": k, "size": size},
            f"at leaf index {size}: unsigned_entry",
        ),
    ]


async def test_tampering_is_found_by_audit_verify_at_the_right_index(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    settings: Settings,
    direct: StoryVault,
) -> None:
    """Raw SQL edits, deletes, reorders and inserts (append-only triggers dropped) make
    `storyvault audit verify` exit 1 naming the first bad index; intact, it exits 0.
    Each tampering is undone from a backup copy before the next one."""
    cid = await new_customer(client, org["support"], EMAIL, NAME)
    indexes = await _reads(client, org["support"], cid, 10)
    intact = await _verify(settings)
    assert intact.exit_code == 0, intact.output
    assert "audit log intact" in intact.output
    k = indexes[5]
    size = (await client.get("/v1/audit/tree-head")).json()["tree_size"]
    entry = (await client.get(f"/v1/audit/entries/{k}", headers=org["compliance"])).json()
    leaf = base64.b64decode(entry["leaf"])
    forged = leaf.replace(b'"support"', b'"sales"')
    assert forged != leaf

    refused = await asyncio.gather(
        _sql(direct, "DELETE FROM audit_entries WHERE leaf_index = :k", k=k),
        return_exceptions=True,
    )
    assert isinstance(refused[0], Exception)  # the triggers refuse it while they exist
    await _sql(
        direct,
        *drop_append_only_ddl(direct.db.dialect, TABLE_NAMES),
        "CREATE TABLE audit_backup AS SELECT * FROM audit_entries",
    )
    for name, statements, params, expected in _tampers(k, size, forged):
        await _sql(direct, *statements, **params)
        result = await _verify(settings)
        assert result.exit_code == 1, (name, result.output)
        assert f"first divergence {expected}" in result.output, (name, result.output)
        await _sql(
            direct,
            "DELETE FROM audit_entries",
            "INSERT INTO audit_entries SELECT * FROM audit_backup",
        )
        restored = await _verify(settings)
        assert restored.exit_code == 0, (name, restored.output)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_two_instances_append_to_one_log(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], settings: Settings
) -> None:
    """Two app instances on one PostgreSQL reading at once: one total order of leaves
    and a log that verifies."""
    cid = await new_customer(client, org["support"], EMAIL, NAME)
    async with AsyncTestClient(app=create_app(settings), raise_server_exceptions=False) as b:
        reads = [
            (client if i % 2 else b).get(READ.format(cid), headers=org["support"])
            for i in range(40)
        ]
        answers = await asyncio.gather(*reads)
        assert all(r.status_code == 200 for r in answers)
        indexes = [r.json()["audit_index"] for r in answers]
        assert len(set(indexes)) == 40
        head_a, head_b = await _signed_head(client), await _signed_head(b)
        assert head_a["tree_size"] == head_b["tree_size"] > max(indexes)
    result = await _verify(settings)
    assert result.exit_code == 0, result.output
    assert f"{head_a['tree_size']} entries" in result.output
    assert os.environ.get("STORYVAULT_DATABASE_URL") != settings.database_url


async def test_two_instances_append_to_one_log_at_once_and_every_read_is_served(
    client: AsyncTestClient[Any], org: dict[str, dict[str, str]], direct: StoryVault
) -> None:
    """Two instances on one database (two workers on one SQLite file, or two nodes
    on PostgreSQL) commit audit batches at the same time: no read is refused for a
    busy database, every entry lands once, and the log verifies."""
    cid = await new_customer(client, org["support"], EMAIL, NAME)
    size = await direct.audit_log.size()
    await direct.audit_writer.start()
    try:

        async def other(n: int) -> int:
            return await direct.audit_writer_append(
                AuditEntry(
                    kind=EntryKind.KEY_EVENT,
                    actor="system",
                    detail={"operation": "test.concurrent", "n": n},
                )
            )

        reads = [client.get(READ.format(cid), headers=org["support"]) for _ in range(40)]
        done = await asyncio.gather(*reads, *(other(n) for n in range(40)))
    finally:
        await direct.audit_writer.stop()
    answers = done[:40]
    assert [r.status_code for r in answers] == [200] * 40, [r.text for r in answers][:3]
    indexes = [r.json()["audit_index"] for r in answers] + list(done[40:])
    assert sorted(indexes) == list(range(size, size + 80))
    verified = await verify_log(direct.db.engine, dict(direct.ring.public_jwks()))
    assert verified.ok, verified.divergence
