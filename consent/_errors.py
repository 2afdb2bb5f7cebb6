"""Domain errors of the consent ledger.

Every error carries a stable snake_case ``code`` and a ``kind`` that the HTTP
layer maps generically to a status (invalid→422, not_found→404, conflict→409,
unavailable→503). Messages never contain a subject pseudonym, evidence text or
any other per-person value: they may end up in logs and problem responses.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorKind = Literal["invalid", "not_found", "conflict", "unavailable"]


class ConsentError(Exception):
    """Base of every error the consent package raises on purpose."""

    code: ClassVar[str] = "consent_error"
    kind: ClassVar[ErrorKind] = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownPurpose(ConsentError):
    code = "unknown_purpose"
    kind = "not_found"


class NotConsentBased(ConsentError):
    """Grant/withdraw on a purpose whose legal basis is not consent."""

    code = "not_consent_based"
    kind = "invalid"


class InvalidSubject(ConsentError):
    """The subject is not an opaque pseudonym (empty, too long, looks like an e-mail)."""

    code = "invalid_subject"
    kind = "invalid"


class InvalidChannel(ConsentError):
    code = "invalid_channel"
    kind = "invalid"


class EvidenceRequired(ConsentError):
    """Consent captured elsewhere must name who imports it and what proves it."""

    code = "evidence_required"
    kind = "invalid"


class InvalidActor(ConsentError):
    code = "invalid_actor"
    kind = "invalid"


class InvalidCaptureTime(ConsentError):
    code = "invalid_capture_time"
    kind = "invalid"


class UniverseRequired(ConsentError):
    """An audience of a non-consent purpose needs the caller's set of subjects."""

    code = "universe_required"
    kind = "invalid"


class InvalidReceipt(ConsentError):
    code = "invalid_receipt"
    kind = "invalid"


class LedgerUnavailable(ConsentError):
    """The ledger could not be sequenced (lock timeout, database unreachable)."""

    code = "ledger_unavailable"
    kind = "unavailable"
