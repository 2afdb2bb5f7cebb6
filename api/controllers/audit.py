"""The transparency log over HTTP: entries (admin), tree heads, proofs and keys (public:
they hold hashes and signatures only, so anyone can check the log)."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, get
from litestar.params import Parameter

from api.auth import require_admin
from api.deps import VaultDep
from api.schemas import MAX_INT64
from audit import StoredEntry
from consent import jwks as build_jwks
from governance.errors import InvalidInput


def entry_json(stored: StoredEntry, *, with_leaf: bool = False) -> dict[str, Any]:
    e = stored.entry
    out: dict[str, Any] = {
        "index": stored.leaf_index,
        "kind": str(e.kind),
        "actor": e.actor,
        "actor_key_id": e.actor_key_id,
        "subject": e.subject,
        "purpose": e.purpose,
        "policy_version": e.policy_version,
        "categories": list(e.categories),
        "withheld": [{"category": w.category, "reason": w.reason} for w in e.withheld],
        "consent_index": e.consent_index,
        "request_id": e.request_id,
        "detail": e.detail,
        "timestamp": e.timestamp,
        "leaf_hash": stored.leaf_hash.hex(),
    }
    if with_leaf:
        out["leaf"] = base64.b64encode(stored.leaf).decode()
        out["leaf_text"] = stored.leaf.decode("utf-8")
    return out


class AuditEntriesController(Controller):
    path = "/v1/audit/entries"
    tags = ["audit"]
    guards = [require_admin]

    @get("/", operation_id="listAuditEntries")
    async def list_entries(
        self,
        vault: VaultDep,
        customer_id: Annotated[str | None, Parameter(max_length=64)] = None,
        team: Annotated[str | None, Parameter(max_length=64)] = None,
        purpose: Annotated[str | None, Parameter(max_length=120)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: Annotated[int | None, Parameter(ge=0, le=MAX_INT64)] = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        subject = None
        if customer_id is not None:
            from api.controllers.customers import parse_customer_id

            subject = vault.ring.pseudonym(parse_customer_id(customer_id))
        page = await vault.audit_log.list_entries(
            subject=subject,
            team=team,
            purpose=purpose,
            since=since,
            until=until,
            cursor=cursor,
            limit=limit,
        )
        return {"items": [entry_json(s) for s in page.items], "next_cursor": page.next_cursor}

    @get("/{index:int}", operation_id="getAuditEntry")
    async def get_entry(
        self, vault: VaultDep, index: Annotated[int, Parameter(ge=0, le=MAX_INT64)]
    ) -> dict[str, Any]:
        return entry_json(await vault.audit_log.get_entry(index), with_leaf=True)


class TransparencyController(Controller):
    path = "/"
    tags = ["audit"]
    # Public like the JWKS: a customer must be able to fetch the proof linked from
    # their access log, and any outside verifier the tree head.
    opt = {"exclude_from_auth": True}

    @get("/v1/audit/tree-head", operation_id="treeHead")
    async def tree_head(self, vault: VaultDep) -> dict[str, Any]:
        head = await vault.audit_log.latest_tree_head()
        if head is None:
            return {
                "tree_size": 0,
                "root_hash": None,
                "timestamp": None,
                "signature": None,
                "key_id": vault.ring.signing_key.kid,
            }
        return {
            "tree_size": head.tree_size,
            "root_hash": head.root_hash.hex(),
            "timestamp": head.timestamp,
            "timestamp_ms": head.timestamp_ms,
            "signature": base64.b64encode(head.signature).decode(),
            "key_id": head.key_id,
            "signed_data": "RFC 9162 TreeHeadDataV2: uint64 timestamp_ms || uint64 tree_size || "
            "0x20 || root_hash || 0x0000 (Ed25519)",
        }

    @get("/v1/audit/proofs/inclusion", operation_id="inclusionProof")
    async def inclusion(
        self,
        vault: VaultDep,
        leaf_index: Annotated[int, Parameter(ge=0, le=MAX_INT64)],
        tree_size: Annotated[int | None, Parameter(ge=1, le=MAX_INT64)] = None,
    ) -> dict[str, Any]:
        proof = await vault.audit_log.inclusion_proof(leaf_index, tree_size)
        return {
            "leaf_index": proof.leaf_index,
            "tree_size": proof.tree_size,
            "leaf_hash": proof.leaf_hash.hex(),
            "audit_path": [h.hex() for h in proof.audit_path],
        }

    @get("/v1/audit/proofs/consistency", operation_id="consistencyProof")
    async def consistency(
        self,
        vault: VaultDep,
        first: Annotated[int, Parameter(ge=1, le=MAX_INT64)],
        second: Annotated[int | None, Parameter(ge=1, le=MAX_INT64)] = None,
    ) -> dict[str, Any]:
        if second is not None and first > second:
            raise InvalidInput("first must not exceed second", code="invalid_proof_request")
        proof = await vault.audit_log.consistency_proof(first, second)
        return {
            "first": proof.first,
            "second": proof.second,
            "proof": [h.hex() for h in proof.proof],
        }

    @get("/.well-known/jwks.json", operation_id="jwks")
    async def jwks(self, vault: VaultDep) -> dict[str, Any]:
        return build_jwks(dict(vault.ring.public_jwks()))
