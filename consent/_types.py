"""Value types of the consent domain: legal bases, event types, DPV statuses, terms."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum


class LegalBasis(StrEnum):
    """GDPR Art. 6(1) bases this service distinguishes."""

    CONSENT = "consent"
    LEGITIMATE_INTEREST = "legitimate_interest"
    CONTRACT = "contract"
    LEGAL_OBLIGATION = "legal_obligation"


class EventType(StrEnum):
    GRANT = "grant"
    WITHDRAW = "withdraw"
    EXPIRE = "expire"
    OBJECTION = "objection"
    GPC_OPT_OUT = "gpc_opt_out"
    IMPORTED = "imported"


class Channel(StrEnum):
    """How the event reached us. ``system`` is used only for expiry sweeps."""

    PORTAL = "portal"
    API = "api"
    GPC = "gpc"
    IMPORT = "import"
    SYSTEM = "system"


class PurposeState(StrEnum):
    """Projected standing of one (subject, purpose) pair.

    ``expired`` exists because an expiry sweep writes ``expire`` events; a grant
    whose ``expires_at`` has passed without such an event is still stored as
    ``granted`` but :func:`consent.evaluate` refuses it at once.
    """

    NONE = "none"
    GRANTED = "granted"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"
    OBJECTED = "objected"
    GPC_OPTED_OUT = "gpc_opted_out"


class DpvStatus(StrEnum):
    """Status of each event, as a CURIE of the W3C Data Privacy Vocabulary (DPV 2).

    Mapping (event type → status):

    * grant on a consent purpose → ``dpv:ConsentGiven``; ``dpv:RenewedConsentGiven``
      when the pair had been granted before (re-grant, or grant after expiry).
    * withdraw → ``dpv:ConsentWithdrawn``.
    * expire → ``dpv:ConsentExpired``.
    * gpc_opt_out → ``dpv:ConsentWithdrawn`` if the purpose was granted at that
      moment, else ``dpv:ConsentRefused`` (a GPC signal is the person refusing the
      sale/sharing before being asked).
    * objection (legitimate interest) → ``eu-gdpr:A21`` (DPV's EU-GDPR extension
      concept for the Art. 21 right to object: the right was exercised).
    * grant on a legitimate-interest purpose (lifting an objection) →
      ``dpv:ConsentStatusValidForProcessing`` (processing is valid again).
    * imported → the status of the equivalent direct event (given / withdrawn /
      objection / valid-for-processing); replay reads the direction from it.
    """

    CONSENT_GIVEN = "dpv:ConsentGiven"
    RENEWED_CONSENT_GIVEN = "dpv:RenewedConsentGiven"
    CONSENT_WITHDRAWN = "dpv:ConsentWithdrawn"
    CONSENT_REFUSED = "dpv:ConsentRefused"
    CONSENT_EXPIRED = "dpv:ConsentExpired"
    OBJECTED = "eu-gdpr:A21"
    VALID_FOR_PROCESSING = "dpv:ConsentStatusValidForProcessing"


class Reason(StrEnum):
    """Denial reason codes of :func:`consent.evaluate` (shared with the HTTP contract).

    A GPC opt-out of a sale/sharing purpose is reported as ``consent_withdrawn``
    on a consent purpose and as ``objected`` on a legitimate-interest purpose:
    the contract's reason list has no GPC-specific code, and GPC is legally an
    opt-out (withdrawal / objection) signal.
    """

    NO_CONSENT = "no_consent"
    CONSENT_WITHDRAWN = "consent_withdrawn"
    CONSENT_EXPIRED = "consent_expired"
    OBJECTED = "objected"


CUSTOMER_ACTOR = "customer"
"""Actor of events the data subject made themself (portal, GPC)."""

SYSTEM_ACTOR = "system"
"""Actor of expiry sweeps."""


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class PurposeTerms:
    """What the consent ledger needs to know about one purpose.

    The caller (governance) builds these from its catalog. ``notice_text`` is the
    exact text shown to the person; its SHA-256 is stored on every event so a
    later dispute can prove which wording was consented to.
    """

    name: str
    legal_basis: LegalBasis
    notice_id: str
    notice_version: str
    notice_text: str
    sale_or_sharing: bool = False
    max_age: timedelta | None = None
    notice_hash: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("purpose name must not be empty")
        # Accept plain strings from a catalog file; keep the enum afterwards.
        object.__setattr__(self, "legal_basis", LegalBasis(self.legal_basis))
        if self.max_age is not None and self.max_age <= timedelta(0):
            raise ValueError("max_age must be positive")
        object.__setattr__(self, "notice_hash", sha256_hex(self.notice_text))
