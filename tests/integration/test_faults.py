"""Faults: what Story Vault acknowledged survives, and what it cannot do it refuses cleanly.

* kill -9 of a real ``storyvault serve`` process (SQLite and PostgreSQL) in the
  middle of a load of consent changes and audited reads. The load client keeps
  every acknowledged (2xx) consent event (ledger index, receipt) and audited
  read (audit index, request id); after a restart each one is in the ledger /
  the audit log, and ``storyvault audit verify`` passes. Lost must be 0.
* PostgreSQL restarted under load: while it is down, reads fail closed (503 with
  Retry-After, never 500, never data without its audit entry); afterwards the
  service recovers by itself (pool pre-ping, the audit writer's next batch).
* A read-only database (SQLite ``PRAGMA query_only`` on the app's connections: the
  same SQLITE_READONLY refusal a read-only mount produces): a clear 503 for every
  write and every audited read, nothing half-written, and recovery when lifted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import event, func, select

from audit import verify_log
from consent import ConsentEvent, verify_chain
from governance.models import CustomerRow, ProfileValueRow
from governance.service import StoryVault
from governance.settings import Settings
from tests.conftest import ADMIN_KEY, make_settings, remember_personal
from tests.integration.mailbox import code_for
from tests.integration.procs import Server, cli
from tests.pgserver import PgServer, _start, start_server, stop_server

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PURPOSE = "marketing.email"
READ = "?purpose=service.support"
CUSTOMERS = 6


# --------------------------------------------------------------------------- load
@dataclass
class Acks:
    """What the service acknowledged (2xx), as the load client saw it."""

    consents: list[dict[str, Any]] = field(default_factory=list)
    reads: list[dict[str, Any]] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    leaked: list[str] = field(default_factory=list)
    """Non-2xx responses that carried story data (must stay empty)."""

    @property
    def acknowledged(self) -> int:
        return len(self.consents) + len(self.reads)


async def _setup(
    url: str, direct: StoryVault, outbox: Path
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Teams, keys and the starter policy; customers signed in through the real flow."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for team in ("sales", "marketing", "support", "product"):
            r = await http.post("/v1/admin/teams", json={"name": team}, headers=ADMIN)
            assert r.status_code == 201, r.text
        key = (await http.post("/v1/admin/teams/support/keys", json={}, headers=ADMIN)).json()
        support = {"Authorization": f"Bearer {key['key']}"}
        await direct.seed_demo_policy()
        customers = []
        for i in range(CUSTOMERS):
            email = f"fault.{i}.{uuid.uuid4().hex[:6]}@example.org"
            name = f"Faulty Customer{i}"
            remember_personal(email, name)
            r = await http.post(
                f"/v1/customers{READ}",
                json={"profile": {"email": email, "name": name}},
                headers=support,
            )
            if r.status_code == 403:  # the instance has not compiled the new policy yet
                await asyncio.sleep(0.5)
                r = await http.post(
                    f"/v1/customers{READ}",
                    json={"profile": {"email": email, "name": name}},
                    headers=support,
                )
            assert r.status_code == 201, r.text
            cid = r.json()["id"]
            assert (await http.post("/v1/me/login", json={"email": email})).status_code == 202
            r = await http.post(
                "/v1/me/verify", json={"email": email, "code": code_for(outbox, email)}
            )
            assert r.status_code == 200, r.text
            customers.append({"id": cid, "auth": f"Bearer {r.json()['token']}", "name": name})
    return support, customers


async def _load(
    url: str,
    support: dict[str, str],
    customers: list[dict[str, str]],
    acks: Acks,
    stop: asyncio.Event,
) -> None:
    """Consent writers (one per customer, toggling) and readers, until ``stop``."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, connect=1)) as http:

        async def writer(c: dict[str, str]) -> None:
            granted = True
            while not stop.is_set():
                try:
                    r = await http.put(
                        f"/v1/me/consents/{PURPOSE}",
                        json={"granted": granted},
                        headers={"Authorization": c["auth"]},
                    )
                except httpx.HTTPError as exc:
                    acks.statuses[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                acks.statuses[str(r.status_code)] += 1
                if 200 <= r.status_code < 300:
                    body = r.json()
                    acks.consents.append({"customer": c["id"], "granted": granted, **body})
                    granted = not granted
                else:
                    await asyncio.sleep(0.05)

        async def reader(n: int) -> None:
            i = n
            while not stop.is_set():
                c = customers[i % len(customers)]
                i += 1
                try:
                    r = await http.get(f"/v1/customers/{c['id']}/story{READ}", headers=support)
                except httpx.HTTPError as exc:
                    acks.statuses[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                acks.statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    body = r.json()
                    acks.reads.append(
                        {
                            "customer": c["id"],
                            "audit_index": body["audit_index"],
                            "request_id": r.headers.get("x-request-id"),
                        }
                    )
                else:
                    if c["name"] in r.text:
                        acks.leaked.append(str(r.status_code))
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(writer(c) for c in customers), *(reader(n) for n in range(4)))


async def _check(direct: StoryVault, acks: Acks, jwks: dict[str, Any]) -> dict[str, int]:
    """Every acknowledged consent event and audited read is in the ledger / audit log."""
    keys = jwt.PyJWKSet.from_dict(jwks)
    lost: list[str] = []
    checked = 0
    async with direct.db.session() as s:
        wanted = [a["ledger_index"] for a in acks.consents]
        rows = {
            e.ledger_index: e
            for e in (
                await s.execute(select(ConsentEvent).where(ConsentEvent.ledger_index.in_(wanted)))  # type: ignore[attr-defined]
            ).scalars()
        }
    for ack in acks.consents:
        checked += 1
        stored = rows.get(ack["ledger_index"])
        subject = direct.ring.pseudonym(ack["customer"])
        header = jwt.get_unverified_header(ack["receipt"])
        claims = jwt.decode(ack["receipt"], keys[header["kid"]].key, algorithms=["EdDSA"])
        if (
            stored is None
            or stored.subject != subject
            or stored.purpose != PURPOSE
            or stored.event_type != ack["event"]
            or claims.get("ledger_index") != ack["ledger_index"]
            or claims.get("event_id") != str(stored.event_id)
        ):
            lost.append(f"consent {ack['ledger_index']}")
    for ack in acks.reads:
        checked += 1
        try:
            stored_entry = await direct.audit_log.get_entry(ack["audit_index"])
        except Exception:  # missing: counted as lost
            lost.append(f"read {ack['audit_index']}")
            continue
        e = stored_entry.entry
        if (
            str(e.kind) != "disclosure"
            or e.subject != direct.ring.pseudonym(ack["customer"])
            or e.purpose != "service.support"
            or e.request_id != ack["request_id"]
        ):
            lost.append(f"read {ack['audit_index']}")
    async with direct.db.session() as s:
        assert await verify_chain(s) is None, "the consent ledger's hash chain is broken"
    assert not lost, f"lost {len(lost)} acknowledged writes: {lost[:5]}"
    return {"acknowledged": acks.acknowledged, "checked": checked, "lost": len(lost)}


def _jwks(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/.well-known/jwks.json", timeout=10).json()
    return body


# --------------------------------------------------------------------------- kill -9
async def test_kill9_under_load_loses_nothing_acknowledged(
    settings: Settings, direct: StoryVault, backend: str
) -> None:
    server = Server(settings).start()
    try:
        support, customers = await _setup(
            server.url, direct, Path(settings.mail_url.removeprefix("file://"))
        )
        acks = Acks()
        kills = 2 if backend == "sqlite" else 1  # each restart costs a few seconds
        for _ in range(kills):
            stop = asyncio.Event()
            load = asyncio.create_task(_load(server.url, support, customers, acks, stop))
            await asyncio.sleep(1.0)
            before = acks.acknowledged
            server.kill9()  # mid-flight: requests are in every stage of their transactions
            await asyncio.sleep(0.3)
            # same port, same data: the restart an orchestrator would do (the load goes on)
            await asyncio.to_thread(server.start)
            await asyncio.sleep(0.7)
            stop.set()
            await load
            assert acks.acknowledged > before, "the load made no progress after the restart"
        jwks = _jwks(server.url)
    finally:
        server.stop()
    figures = await _check(direct, acks, jwks)
    assert not acks.leaked
    assert not [s for s in acks.statuses if s.startswith("5") and s != "503"], acks.statuses
    verified = cli(settings, "audit", "verify").stdout
    assert "audit log intact" in verified
    print(
        f"\nkill -9 ({backend}): faults injected {kills}, acknowledged {figures['acknowledged']} "
        f"({len(acks.consents)} consent events, {len(acks.reads)} audited reads), "
        f"checked {figures['checked']}, lost {figures['lost']}; responses {dict(acks.statuses)}"
    )
    assert figures["lost"] == 0
    assert figures["checked"] == figures["acknowledged"] > 0


# --------------------------------------------------------------------------- PostgreSQL restart
def _pg_stop_fast(server: PgServer) -> None:
    """Fast shutdown (SIGINT to the postmaster): sessions are cut, as in a failover."""
    pid = int((server.root / "data" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)
    server.proc.wait(timeout=30)


async def test_postgres_restart_fails_closed_and_recovers(tmp_path: Path) -> None:
    pg = start_server()
    try:
        settings = make_settings(
            tmp_path,
            pg.create_database("faults"),
            keystore_url=pg.create_database("faults_keys"),
        )
        direct = StoryVault(settings)
        server = Server(settings).start()
        try:
            support, customers = await _setup(
                server.url, direct, Path(settings.mail_url.removeprefix("file://"))
            )
            acks = Acks()
            stop = asyncio.Event()
            load = asyncio.create_task(_load(server.url, support, customers, acks, stop))
            await asyncio.sleep(1.0)
            await direct.db.engine.dispose()
            _pg_stop_fast(pg)
            down_at = len(acks.reads) + len(acks.consents)
            statuses_before = Counter(acks.statuses)
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                ready = await http.get("/ready")
                read = await http.get(
                    f"/v1/customers/{customers[0]['id']}/story{READ}", headers=support
                )
            await asyncio.sleep(1.5)
            down = acks.statuses - statuses_before
            pg.proc = _start(pg.root, pg.port, pg.as_user)
            up = time.monotonic()
            recovered = None
            while time.monotonic() - up < 20:
                await asyncio.sleep(0.1)
                if len(acks.reads) + len(acks.consents) > down_at + 10:
                    recovered = time.monotonic() - up
                    break
            await asyncio.sleep(1.0)
            stop.set()
            await load
            jwks = _jwks(server.url)
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                ready_after = await http.get("/ready")
        finally:
            server.stop()
        # while the database was down: 503 with Retry-After, a problem document, no data
        assert ready.status_code == 503, ready.text
        assert read.status_code == 503, read.text
        assert read.headers["content-type"].startswith("application/problem+json")
        assert read.headers.get("retry-after")
        assert read.json()["code"] in {"unavailable", "audit_unavailable"}
        assert customers[0]["name"] not in read.text
        assert down["503"] > 0, down
        assert not acks.leaked
        assert not [s for s in acks.statuses if s.startswith("5") and s != "503"], acks.statuses
        # afterwards: recovered by itself, and every acknowledged write is there
        assert recovered is not None, f"no recovery in 20 s: {dict(acks.statuses)}\n{server.tail()}"
        assert ready_after.status_code == 200
        figures = await _check(direct, acks, jwks)
        verified = await verify_log(direct.db.engine, dict(direct.ring.public_jwks()))
        assert verified.ok, verified.divergence
        await direct.stop()
        print(
            f"\npostgres restart: faults injected 1, responses while down {dict(down)}, "
            f"recovered {recovered:.1f} s after the restart; acknowledged {figures['acknowledged']}, "
            f"checked {figures['checked']}, lost {figures['lost']}"
        )
        assert figures["lost"] == 0
    finally:
        with contextlib.suppress(Exception):
            stop_server(pg)


# --------------------------------------------------------------------------- read-only disk
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_read_only_database_answers_503_and_writes_nothing(
    client: AsyncTestClient[Any],
    org: dict[str, dict[str, str]],
    direct: StoryVault,
    settings: Settings,
) -> None:
    support = org["support"]
    name, email = "Rhoda Readonly", "Rhoda.Readonly@example.org"
    remember_personal(name, email)
    r = await client.post(
        f"/v1/customers{READ}", json={"profile": {"name": name, "email": email}}, headers=support
    )
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    me_code = await client.post("/v1/me/login", json={"email": email})
    assert me_code.status_code == 202
    r = await client.post(
        "/v1/me/verify",
        json={
            "email": email,
            "code": code_for(Path(settings.mail_url.removeprefix("file://")), email),
        },
    )
    me = {"Authorization": f"Bearer {r.json()['token']}"}

    async def counts() -> tuple[int, int, int, int]:
        async with direct.db.session() as s:
            customers = (
                await s.execute(select(func.count()).select_from(CustomerRow))
            ).scalar_one()
            values = (
                await s.execute(select(func.count()).select_from(ProfileValueRow))
            ).scalar_one()
            events = (await s.execute(select(func.count()).select_from(ConsentEvent))).scalar_one()
        head = await direct.audit_log.latest_tree_head()
        return customers, values, events, head.tree_size if head else 0

    db = client.app.state.vault.db
    mode: dict[str, bool] = {"read_only": False}

    def _read_only(dbapi_conn: Any, _record: Any) -> None:
        if mode["read_only"]:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA query_only=ON")
            cur.close()

    # Both engines on the file: the async one and the synchronous one that
    # serves the gated read and the audit group commit in place.
    event.listen(db.engine.sync_engine, "connect", _read_only)
    event.listen(db.sync_engine, "connect", _read_only)

    before = await counts()
    mode["read_only"] = True
    db.recycle()  # every new connection is read-only
    outcomes = {
        "consent": await client.put(
            f"/v1/me/consents/{PURPOSE}", json={"granted": True}, headers=me
        ),
        "create": await client.post(
            f"/v1/customers{READ}", json={"profile": {"name": "Never Written"}}, headers=support
        ),
        "read": await client.get(f"/v1/customers/{cid}/story{READ}", headers=support),
        "erase": await client.post("/v1/me/erasure", json={"categories": None}, headers=me),
    }
    for what, resp in outcomes.items():
        assert resp.status_code == 503, (what, resp.status_code, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json"), what
        assert resp.headers.get("retry-after"), what
        assert name not in resp.text, what
        assert email not in resp.text, what
    # the read never disclosed: the audit writer could not make its entry durable
    assert outcomes["read"].json()["code"] in {"unavailable", "audit_unavailable"}
    assert await counts() == before, "something was half-written while read-only"

    mode["read_only"] = False
    db.recycle()
    deadline = time.monotonic() + 10
    while True:  # the audit writer recovers with its next batch
        r = await client.get(f"/v1/customers/{cid}/story{READ}", headers=support)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert r.status_code == 200, r.text
    r = await client.put(f"/v1/me/consents/{PURPOSE}", json={"granted": True}, headers=me)
    assert r.status_code == 200, r.text
    after = await counts()
    assert after[2] == before[2] + 1
    verified = await verify_log(direct.db.engine, dict(direct.ring.public_jwks()))
    assert verified.ok, verified.divergence
    print(
        f"\nread-only database: faults injected 1, refused with 503: {sorted(outcomes)}; half-written: 0"
    )
