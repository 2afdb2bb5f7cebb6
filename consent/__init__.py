"""Consent ledger of Story Vault: append-only events, current state, signed receipts.

A plain library: it takes an SQLAlchemy ``AsyncSession``, the purposes' terms
and its signing key as arguments, and imports neither the web layer nor the
application core.

* :class:`Ledger` appends sequenced, hash-chained :class:`ConsentEvent` rows and
  keeps the :class:`ConsentState` projection in the same transaction.
* :func:`evaluate` / :func:`allowed_condition` decide whether a purpose's legal
  basis is met (Python / SQL); :func:`audience_query` pages the audience.
* :func:`replay` rebuilds the projection from events; :func:`verify_chain`
  finds the first tampered ledger index.
* :class:`ReceiptSigner` issues Kantara/ISO 27560-shaped JWS receipts;
  :func:`jwks` publishes their keys.
"""

from ._errors import (
    ConsentError,
    ErrorKind,
    EvidenceRequired,
    InvalidActor,
    InvalidCaptureTime,
    InvalidChannel,
    InvalidReceipt,
    InvalidSubject,
    LedgerUnavailable,
    NotConsentBased,
    UniverseRequired,
    UnknownPurpose,
)
from ._ledger import CONSENT_LEDGER_LOCK_KEY, Ledger, chain_head, verify_chain
from ._models import (
    CONSENT_TABLES,
    GENESIS_HASH,
    LEAF_SCHEMA,
    ConsentEvent,
    ConsentState,
    append_only_ddl,
    chain_hash,
    leaf_bytes,
)
from ._projection import (
    Standing,
    allowed_condition,
    audience_query,
    evaluate,
    replay,
    state_after,
    transition,
)
from ._receipts import (
    RECEIPT_ALG,
    RECEIPT_TYPE,
    RECEIPT_VERSION,
    ReceiptSigner,
    jwks,
    verify_receipt,
)
from ._types import (
    CUSTOMER_ACTOR,
    SYSTEM_ACTOR,
    Channel,
    DpvStatus,
    EventType,
    LegalBasis,
    PurposeState,
    PurposeTerms,
    Reason,
)

__all__ = [
    "CONSENT_LEDGER_LOCK_KEY",
    "CONSENT_TABLES",
    "CUSTOMER_ACTOR",
    "GENESIS_HASH",
    "LEAF_SCHEMA",
    "RECEIPT_ALG",
    "RECEIPT_TYPE",
    "RECEIPT_VERSION",
    "SYSTEM_ACTOR",
    "Channel",
    "ConsentError",
    "ConsentEvent",
    "ConsentState",
    "DpvStatus",
    "ErrorKind",
    "EventType",
    "EvidenceRequired",
    "InvalidActor",
    "InvalidCaptureTime",
    "InvalidChannel",
    "InvalidReceipt",
    "InvalidSubject",
    "Ledger",
    "LedgerUnavailable",
    "LegalBasis",
    "NotConsentBased",
    "PurposeState",
    "PurposeTerms",
    "Reason",
    "ReceiptSigner",
    "Standing",
    "UniverseRequired",
    "UnknownPurpose",
    "allowed_condition",
    "append_only_ddl",
    "audience_query",
    "chain_hash",
    "chain_head",
    "evaluate",
    "jwks",
    "leaf_bytes",
    "replay",
    "state_after",
    "transition",
    "verify_chain",
    "verify_receipt",
]
