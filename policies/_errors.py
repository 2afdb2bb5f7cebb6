"""Domain errors of the policy package.

Every error carries two class attributes the HTTP layer maps generically:
``code`` (stable snake_case, shown to clients) and ``kind`` (``invalid``,
``not_found`` or ``conflict``).  Messages name the offending field and never
echo more than a short, truncated excerpt of caller input.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorKind = Literal["invalid", "not_found", "conflict"]

_ECHO_LIMIT = 40


def echo(value: object) -> str:
    """A short, safe rendering of caller input for an error message."""
    text = value if isinstance(value, str) else type(value).__name__
    if len(text) > _ECHO_LIMIT:
        text = text[:_ECHO_LIMIT] + "…"
    return repr(text)


class PolicyError(Exception):
    """Base class of every error the policy package raises on purpose."""

    code: ClassVar[str] = "policy_error"
    kind: ClassVar[ErrorKind] = "invalid"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRuleError(PolicyError):
    """A rule, role or query field is malformed (bad action, effect, mask, type...)."""

    code = "invalid_rule"
    kind = "invalid"


class UnknownTeamError(InvalidRuleError):
    code = "unknown_team"


class UnknownCategoryError(InvalidRuleError):
    code = "unknown_category"


class UnknownPurposeError(InvalidRuleError):
    code = "unknown_purpose"


class InvalidRoleError(InvalidRuleError):
    code = "invalid_role"


class DuplicateRuleError(PolicyError):
    """An identical rule (all six fields equal) already exists."""

    code = "duplicate_rule"
    kind = "conflict"


class RuleNotFoundError(PolicyError):
    code = "rule_not_found"
    kind = "not_found"


class PolicyCompileError(PolicyError):
    """The compiled table disagreed with casbin: a bug, never caller input.

    A reload that raises this keeps the previous snapshot in force.
    """

    code = "policy_compile_error"
    kind = "conflict"
