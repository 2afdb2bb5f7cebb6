"""The governance core's error vocabulary.

Every domain error carries a stable ``code`` (snake_case, part of the HTTP
contract) and a ``kind`` that the HTTP layer maps to a status in one place.
Messages never contain a personal value: they name fields, never echo them.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "Conflict",
    "Forbidden",
    "GovernanceError",
    "InvalidInput",
    "NotFound",
    "SettingsError",
    "Unauthorized",
    "Unavailable",
]


class GovernanceError(Exception):
    """Base of all governance errors."""

    code: ClassVar[str] = "governance_error"
    kind: ClassVar[str] = "invalid"

    def __init__(self, message: str, *, code: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # instance override of the class default
        self.extra = extra


class InvalidInput(GovernanceError):
    code = "invalid_input"
    kind = "invalid"


class NotFound(GovernanceError):
    code = "not_found"
    kind = "not_found"


class Conflict(GovernanceError):
    code = "conflict"
    kind = "conflict"


class Forbidden(GovernanceError):
    code = "forbidden"
    kind = "forbidden"


class Unauthorized(GovernanceError):
    code = "unauthorized"
    kind = "unauthorized"


class Unavailable(GovernanceError):
    code = "unavailable"
    kind = "unavailable"


class SettingsError(Exception):
    """A configuration value is wrong; the message names the variable."""
