"""The production shape, as ``make run-cluster`` starts it (docker/cluster.py): one
PostgreSQL, two ``storyvault serve`` instances sharing the key ring, nginx in front.

* A policy change and a consent withdrawal made through one instance are in force
  on the other instance and through nginx within one second (invariant 8).
* Both instances appending audit entries at once (parallel audited reads through
  each) make one log: indexes unique and dense, and ``storyvault audit verify``
  against the cluster's database passes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, remember_personal
from tests.integration.mailbox import code_for
from tests.integration.procs import REPO, STORYVAULT

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
EMAIL, NAME = "Clementine.Cluster@example.org", "Clementine Clusterby"
SUPPORT = "?purpose=service.support"
MARKETING = "?purpose=marketing.email"


def _load_cluster_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cluster", REPO / "docker" / "cluster.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster"] = module
    spec.loader.exec_module(module)
    return module


def _free_base_port() -> int:
    for _ in range(50):
        base = random.randint(20_000, 40_000)
        ok = True
        for port in range(base, base + 3):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise AssertionError("no three free consecutive ports")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is not installed (.ci/run installs it: apt-get install nginx)")
    mod = _load_cluster_module()
    # As root, PostgreSQL runs as the postgres user: every parent must be searchable.
    root = Path(tempfile.mkdtemp(prefix="storyvault-cluster-"))
    root.chmod(0o755)
    env = {"STORYVAULT_ADMIN_KEY": ADMIN_KEY, "STORYVAULT_DEMO_DATA": "false"}
    c = mod.start_cluster(root, base_port=_free_base_port(), env=env, ready_timeout=120)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _rule(team: str, category: str, action: str, purpose: str) -> dict[str, Any]:
    return {
        "team": team,
        "category": category,
        "action": action,
        "purpose": purpose,
        "effect": "allow",
        "mask": None,
    }


async def _until(check: Any, within: float) -> float:
    """Seconds until ``await check()`` is true; fails after ``within``."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"not visible within {within} s"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def org(cluster: Any) -> dict[str, Any]:
    """Teams, keys, base rules and a customer, all made through instance 1."""

    async def setup() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=cluster.urls[0], timeout=10) as http:
            keys = {}
            for team in ("support", "marketing"):
                r = await http.post("/v1/admin/teams", json={"name": team}, headers=ADMIN)
                assert r.status_code == 201, r.text
                r = await http.post(f"/v1/admin/teams/{team}/keys", json={}, headers=ADMIN)
                keys[team] = {"Authorization": f"Bearer {r.json()['key']}"}
            for rule in (
                _rule("support", "identity.name", "write", "service.support"),
                _rule("support", "contact.*", "write", "service.support"),
                _rule("support", "identity.name", "read", "service.support"),
                _rule("marketing", "identity.name", "read", "marketing.email"),
            ):
                r = await http.post("/v1/admin/policies", json=rule, headers=ADMIN)
                assert r.status_code == 201, r.text
            remember_personal(EMAIL, NAME)

            async def created() -> bool:
                r = await http.post(
                    f"/v1/customers{SUPPORT}",
                    json={"profile": {"name": NAME, "email": EMAIL}},
                    headers=keys["support"],
                )
                if r.status_code == 201:
                    keys["customer"] = r.json()["id"]
                return r.status_code == 201

            await _until(created, 5)
        return keys

    return asyncio.run(setup())


async def test_policy_change_reaches_the_other_instance_and_nginx_within_a_second(
    cluster: Any, org: dict[str, Any]
) -> None:
    cid, support = org["customer"], org["support"]
    one, two, lb = (
        httpx.AsyncClient(base_url=u, timeout=5) for u in (*cluster.urls, cluster.nginx_url)
    )
    async with one, two, lb:

        async def email_disclosed(client: httpx.AsyncClient) -> bool:
            r = await client.get(f"/v1/customers/{cid}/story{SUPPORT}", headers=support)
            assert r.status_code == 200, r.text
            return "email" in r.json()["profile"]

        assert not await email_disclosed(two)
        r = await one.post(
            "/v1/admin/policies",
            json=_rule("support", "contact.*", "read", "service.support"),
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        took_two = await _until(lambda: email_disclosed(two), 1.0)

        async def all_through_nginx() -> bool:  # both upstreams, round robin
            return all([await email_disclosed(lb) for _ in range(4)])

        took_lb = await _until(all_through_nginx, 1.0)

        # and back: removing the rule withholds the e-mail again everywhere
        r = await one.delete(f"/v1/admin/policies/{r.json()['id']}", headers=ADMIN)
        assert r.status_code == 204, r.text

        async def withheld_everywhere() -> bool:
            return not await email_disclosed(two) and not any(
                [await email_disclosed(lb) for _ in range(4)]
            )

        took_back = await _until(withheld_everywhere, 1.0)
    print(
        f"\npolicy change visible: instance 2 after {took_two:.3f} s, nginx after {took_lb:.3f} s; "
        f"removal everywhere after {took_back:.3f} s"
    )


async def test_consent_withdrawal_reaches_the_other_instance_and_nginx_within_a_second(
    cluster: Any, org: dict[str, Any]
) -> None:
    cid, marketing = org["customer"], org["marketing"]
    one, two, lb = (
        httpx.AsyncClient(base_url=u, timeout=5) for u in (*cluster.urls, cluster.nginx_url)
    )
    async with one, two, lb:
        assert (await one.post("/v1/me/login", json={"email": EMAIL})).status_code == 202
        code = code_for(cluster.data_dir / "app1" / "outbox", EMAIL)
        # the session is made on instance 2: sign-in state lives in the shared database
        r = await two.post("/v1/me/verify", json={"email": EMAIL, "code": code})
        assert r.status_code == 200, r.text
        me = {"Authorization": f"Bearer {r.json()['token']}"}

        async def name_for_marketing(client: httpx.AsyncClient) -> str | None:
            r = await client.get(f"/v1/customers/{cid}/story{MARKETING}", headers=marketing)
            assert r.status_code == 200, r.text
            body = r.json()
            if "name" in body["profile"]:
                return "disclosed"
            return {w["category"]: w["reason"] for w in body["withheld"]}.get("identity.name")

        r = await one.put("/v1/me/consents/marketing.email", json={"granted": True}, headers=me)
        assert r.status_code == 200, r.text

        async def granted() -> bool:
            return await name_for_marketing(two) == "disclosed"

        await _until(granted, 1.0)
        r = await one.put("/v1/me/consents/marketing.email", json={"granted": False}, headers=me)
        assert r.status_code == 200, r.text

        async def withdrawn_on_two() -> bool:
            return await name_for_marketing(two) == "consent_withdrawn"

        took_two = await _until(withdrawn_on_two, 1.0)

        async def withdrawn_through_nginx() -> bool:
            return all([await name_for_marketing(lb) == "consent_withdrawn" for _ in range(4)])

        took_lb = await _until(withdrawn_through_nginx, 1.0)
    print(
        f"\nconsent withdrawal visible: instance 2 after {took_two:.3f} s, nginx after {took_lb:.3f} s"
    )


def _batches(metrics: httpx.Response) -> dict[str, float]:
    """An instance's audit batches so far by way (alone, locked, alone_refused)."""
    assert metrics.status_code == 200
    found = {"alone": 0.0, "locked": 0.0, "alone_refused": 0.0}
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            if sample.name == "storyvault_audit_batches_total":
                found[sample.labels["way"]] = sample.value
    return found


async def test_two_instances_appending_at_once_make_one_log_that_verifies(
    cluster: Any, org: dict[str, Any], tmp_path: Path
) -> None:
    cid, support = org["customer"], org["support"]
    per_instance, parallel = 150, 12
    indexes: dict[str, list[int]] = {u: [] for u in cluster.urls}

    async def reads(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            sem = asyncio.Semaphore(parallel)

            async def one() -> None:
                async with sem:
                    r = await http.get(f"/v1/customers/{cid}/story{SUPPORT}", headers=support)
                assert r.status_code == 200, r.text
                indexes[url].append(r.json()["audit_index"])

            await asyncio.gather(*(one() for _ in range(per_instance)))

    async def ways() -> dict[str, float]:
        total = {"alone": 0.0, "locked": 0.0, "alone_refused": 0.0}
        for u in cluster.urls:
            async with httpx.AsyncClient(base_url=u, timeout=10) as http:
                for way, n in _batches(await http.get("/metrics")).items():
                    total[way] += n
        return total

    before_both = await ways()
    await asyncio.gather(*(reads(u) for u in cluster.urls))
    after_both = await ways()
    # Appending at the same time, the instances' batches still go as lone
    # statements (each after a read of the log's state), rarely under the lock.
    alone = after_both["alone"] - before_both["alone"]
    locked = after_both["locked"] - before_both["locked"]
    assert alone > 2 * locked, (before_both, after_both)
    every = [i for found in indexes.values() for i in found]
    assert len(set(every)) == len(every) == per_instance * len(cluster.urls), "an index was reused"
    async with httpx.AsyncClient(base_url=cluster.nginx_url, timeout=10) as http:
        head = (await http.get("/v1/audit/tree-head")).json()
    assert head["tree_size"] > max(every)
    # interleaved: both instances' entries are spread through the same range
    spans = {u: (min(v), max(v)) for u, v in indexes.items()}
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1, f"the instances did not append at the same time: {spans}"
    assert b0 < a1, f"the instances did not append at the same time: {spans}"

    # Alone again, an instance writes each batch as one statement (once a read of
    # the log's state finds it as the instance left it).
    url = cluster.urls[0]
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        before = _batches(await http.get("/metrics"))
        for _ in range(6):
            r = await http.get(f"/v1/customers/{cid}/story{SUPPORT}", headers=support)
            assert r.status_code == 200, r.text
        after = _batches(await http.get("/metrics"))
    assert after["alone"] - before["alone"] >= 4, (before, after)
    written = after["alone"] + after["locked"] - before["alone"] - before["locked"]
    assert written == 6, (before, after)

    env = {k: v for k, v in os.environ.items() if not k.startswith("STORYVAULT_")}
    env.update(
        STORYVAULT_DATABASE_URL=cluster.database_url,
        STORYVAULT_KEYRING=cluster.keyring_json,
        STORYVAULT_DATA_DIR=str(tmp_path),
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [STORYVAULT, "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit log intact" in done.stdout
    print(
        f"\ntwo instances, {len(every)} audited reads at once ({parallel} in flight per instance): "
        f"indexes unique, {done.stdout.strip()}"
    )
