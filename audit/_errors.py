"""Domain errors of the audit log.

Every error carries a stable snake_case ``code`` and a ``kind`` from a closed set
(``invalid``, ``not_found``, ``conflict``, ``unavailable``); the HTTP layer maps the
kind to a status generically, so adding an error needs no edit there. Messages name
indexes and sizes only, never personal data.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base of every audit-log error."""

    code: str = "audit_error"
    kind: str = "unavailable"


class InvalidEntry(AuditError):
    """An entry cannot be encoded as a leaf (e.g. a naive timestamp, a float in detail)."""

    code = "invalid_audit_entry"
    kind = "invalid"


class InvalidProofRequest(AuditError):
    """A proof was asked for indexes or sizes outside the current tree."""

    code = "invalid_proof_request"
    kind = "invalid"


class EntryNotFound(AuditError):
    """No entry at this leaf index."""

    code = "audit_entry_not_found"
    kind = "not_found"


class TreeHeadNotFound(AuditError):
    """No signed tree head for this tree size."""

    code = "tree_head_not_found"
    kind = "not_found"


class LogStateConflict(AuditError):
    """The stored tree state is not what an append expects (missing edge nodes)."""

    code = "audit_log_state_conflict"
    kind = "conflict"


class AuditUnavailable(AuditError):
    """The entry could not be made durable; callers must fail closed."""

    code = "audit_unavailable"
    kind = "unavailable"


class InvalidQuery(AuditError):
    """A listing was asked for with an out-of-range page size."""

    code = "invalid_audit_query"
    kind = "invalid"
