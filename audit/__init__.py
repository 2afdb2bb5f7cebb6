"""Story Vault's audit log: an RFC 9162 transparency log of audit entries.

Layers, bottom up:

* ``_merkle``: RFC 9162 hashing, proof generation and verification (pure).
* ``_entry``: audit entries and their RFC 8785 canonical leaf bytes.
* ``_tree_head``: Ed25519 signed tree heads over RFC 9162 ``TreeHeadDataV2``.
* ``_store``: the ``audit_*`` tables; ``_append_only``: triggers refusing edits;
  ``_pg_append``: PostgreSQL's function that appends a batch or returns the newest state.
* ``_log``: ``TransparencyLog``, sequenced batch appends, reads and proofs.
* ``_writer``: ``AuditWriter``, group commit with a durability contract.
* ``_verify``: ``verify_log``, streaming recomputation finding the first divergence.

A plain library: it takes an ``AsyncEngine`` and its signing key as arguments and
imports nothing from the web or application layers.
"""

from audit._append_only import append_only_ddl, drop_append_only_ddl
from audit._entry import (
    LEAF_VERSION,
    AuditEntry,
    DetailValue,
    EncodedEntry,
    EntryKind,
    Withheld,
    decode_leaf,
    encode_leaf,
    format_timestamp,
)
from audit._errors import (
    AuditError,
    AuditUnavailable,
    EntryNotFound,
    InvalidEntry,
    InvalidProofRequest,
    InvalidQuery,
    LogStateConflict,
    TreeHeadNotFound,
)
from audit._log import (
    DEFAULT_LOCK_ID,
    AppendResult,
    ConsistencyProof,
    EntryPage,
    InclusionProof,
    StoredEntry,
    TransparencyLog,
)
from audit._merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    consistency_proof,
    consistency_proof_ranges,
    inclusion_path_ranges,
    inclusion_proof,
    leaf_hash,
    merkle_tree_hash,
    node_hash,
    perfect_subtrees,
    subtree_hash_from,
    verify_consistency,
    verify_inclusion,
)
from audit._pg_append import append_function_ddl, drop_append_function_ddl
from audit._remote import LogServer, RemoteLog
from audit._sql import Batched, Prepared
from audit._store import TABLE_NAMES, TABLES, entries, nodes, tree_heads
from audit._tree_head import (
    SignedTreeHead,
    sign_tree_head,
    tree_head_signing_input,
    verify_tree_head,
)
from audit._verify import Divergence, LogVerification, ProgressCallback, verify_log
from audit._writer import AuditWriter, BatchLog

__all__ = [
    "DEFAULT_LOCK_ID",
    "EMPTY_ROOT",
    "HASH_SIZE",
    "LEAF_VERSION",
    "TABLES",
    "TABLE_NAMES",
    "AppendResult",
    "AuditEntry",
    "AuditError",
    "AuditUnavailable",
    "AuditWriter",
    "BatchLog",
    "Batched",
    "CompactRange",
    "ConsistencyProof",
    "DetailValue",
    "Divergence",
    "EncodedEntry",
    "EntryKind",
    "EntryNotFound",
    "EntryPage",
    "InclusionProof",
    "InvalidEntry",
    "InvalidProofRequest",
    "InvalidQuery",
    "LogServer",
    "LogStateConflict",
    "LogVerification",
    "Prepared",
    "ProgressCallback",
    "RemoteLog",
    "SignedTreeHead",
    "StoredEntry",
    "TransparencyLog",
    "TreeHeadNotFound",
    "Withheld",
    "append_function_ddl",
    "append_only_ddl",
    "consistency_proof",
    "consistency_proof_ranges",
    "decode_leaf",
    "drop_append_function_ddl",
    "drop_append_only_ddl",
    "encode_leaf",
    "entries",
    "format_timestamp",
    "inclusion_path_ranges",
    "inclusion_proof",
    "leaf_hash",
    "merkle_tree_hash",
    "node_hash",
    "nodes",
    "perfect_subtrees",
    "sign_tree_head",
    "subtree_hash_from",
    "tree_head_signing_input",
    "tree_heads",
    "verify_consistency",
    "verify_inclusion",
    "verify_log",
    "verify_tree_head",
]
