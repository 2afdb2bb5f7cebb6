"""The policy vocabulary: actions, effects, masks, rules, the catalog, validation.

Validation happens here, before any string reaches casbin (its model or its
role manager): a rule or role assignment that passes :func:`validate_rule` /
:func:`validate_roles` only holds names from the caller's catalog or strictly
shaped role names, so no caller string can smuggle a comma, a matcher
expression or an unbounded value into casbin.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from policies._errors import (
    InvalidRoleError,
    InvalidRuleError,
    UnknownCategoryError,
    UnknownPurposeError,
    UnknownTeamError,
    echo,
)

WILDCARD = "*"

# Role names that are not teams (e.g. "admin"): short, lowercase, no separators
# casbin could misread.
_ROLE_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,62}")

# casbin's default role manager (max_hierarchy_level=10) reaches names at most
# 9 hops away (CASBIN_ROLE_REACH); the engine's own closure uses the same reach.
# Validation refuses hierarchies deeper than MAX_ROLE_DEPTH, so the cut-off never
# decides an answer for rules stored through PolicyStore.
MAX_ROLE_DEPTH = 8
CASBIN_ROLE_REACH = 9


class Action(StrEnum):
    READ = "read"
    WRITE = "write"


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Mask(StrEnum):
    NONE = "none"
    PARTIAL = "partial"
    HASH = "hash"
    REDACT = "redact"
    YEAR_ONLY = "year_only"


# Restrictiveness: redact > hash > partial = year_only > none.
MASK_RANK: Mapping[Mask, int] = {
    Mask.NONE: 0,
    Mask.PARTIAL: 1,
    Mask.YEAR_ONLY: 1,
    Mask.HASH: 2,
    Mask.REDACT: 3,
}


def most_restrictive(masks: Iterable[Mask]) -> Mask:
    """The join of ``masks`` in the restrictiveness order.

    ``partial`` and ``year_only`` are incomparable (each reveals something the
    other hides), so when both apply the result is ``hash``, the least mask that
    reveals neither: a broad rule can never undo part of a narrower rule's mask.
    """
    result = Mask.NONE
    for mask in masks:
        if MASK_RANK[mask] > MASK_RANK[result]:
            result = mask
        elif MASK_RANK[mask] == MASK_RANK[result] and mask != result:
            result = Mask.HASH
    return result


@dataclass(frozen=True, slots=True)
class PolicyCatalog:
    """The names a rule may use; the caller (governance) owns the catalog."""

    teams: frozenset[str]
    categories: frozenset[str]
    purposes: frozenset[str]

    @classmethod
    def of(
        cls, *, teams: Iterable[str], categories: Iterable[str], purposes: Iterable[str]
    ) -> PolicyCatalog:
        return cls(frozenset(teams), frozenset(categories), frozenset(purposes))

    def category_prefixes(self) -> frozenset[str]:
        """Every dotted prefix of a known category: ``a.b.c`` gives ``a`` and ``a.b``."""
        prefixes: set[str] = set()
        for category in self.categories:
            parts = category.split(".")
            prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
        return frozenset(prefixes)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A rule as a caller proposes it; nothing in it is trusted until validated."""

    team: str
    category: str
    action: str
    purpose: str
    effect: str = "allow"
    mask: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A validated, stored rule with its stable id."""

    id: str
    team: str
    category: str
    action: Action
    purpose: str
    effect: Effect
    mask: Mask

    def line(self) -> tuple[str, str, str, str, str, str]:
        """The casbin policy line (sub, obj, act, purpose, eft, mask)."""
        return (
            self.team,
            self.category,
            self.action.value,
            self.purpose,
            self.effect.value,
            self.mask.value,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "team": self.team,
            "category": self.category,
            "action": self.action.value,
            "purpose": self.purpose,
            "effect": self.effect.value,
            "mask": None if self.mask is Mask.NONE else self.mask.value,
        }


def category_matches(category: str, pattern: str) -> bool:
    """Does a concrete ``category`` fall under a validated rule ``pattern``?

    ``*`` matches all; ``a.*`` matches every category below ``a.`` at any depth;
    anything else matches only itself.
    """
    if pattern == WILDCARD:
        return True
    if pattern.endswith(".*"):
        return category.startswith(pattern[:-1])
    return category == pattern


def purpose_matches(purpose: str, pattern: str) -> bool:
    return pattern in (WILDCARD, purpose)


def _require_str(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRuleError(f"field {field!r} must be a string", field=field)
    return value


def _enum(field: str, value: object, enum: type[StrEnum]) -> Any:
    text = _require_str(field, value)
    try:
        return enum(text)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise InvalidRuleError(
            f"field {field!r}: {echo(text)} is not one of {allowed}", field=field
        ) from None


def validate_team(team: object, catalog: PolicyCatalog, *, field: str = "team") -> str:
    text = _require_str(field, team)
    if text not in catalog.teams:
        raise UnknownTeamError(f"field {field!r}: unknown team {echo(text)}", field=field)
    return text


def validate_category(category: object, catalog: PolicyCatalog, *, pattern: bool) -> str:
    """A known category, or (when ``pattern``) ``*`` / ``prefix.*`` over a known prefix."""
    text = _require_str("category", category)
    if text in catalog.categories:
        return text
    if pattern and (
        text == WILDCARD or (text.endswith(".*") and text[:-2] in catalog.category_prefixes())
    ):
        return text
    what = "category or wildcard" if pattern else "category"
    raise UnknownCategoryError(f"field 'category': unknown {what} {echo(text)}", field="category")


def validate_purpose(purpose: object, catalog: PolicyCatalog, *, pattern: bool) -> str:
    text = _require_str("purpose", purpose)
    if text in catalog.purposes or (pattern and text == WILDCARD):
        return text
    raise UnknownPurposeError(f"field 'purpose': unknown purpose {echo(text)}", field="purpose")


def validate_action(action: object) -> Action:
    result: Action = _enum("action", action, Action)
    return result


def validate_rule(spec: RuleSpec, catalog: PolicyCatalog, *, rule_id: str) -> Rule:
    """Check every field of ``spec`` against the catalog; raise before storing anything."""
    team = validate_team(spec.team, catalog)
    category = validate_category(spec.category, catalog, pattern=True)
    action = validate_action(spec.action)
    purpose = validate_purpose(spec.purpose, catalog, pattern=True)
    effect: Effect = _enum("effect", spec.effect, Effect)
    mask: Mask = Mask.NONE if spec.mask is None else _enum("mask", spec.mask, Mask)
    if effect is Effect.DENY and mask is not Mask.NONE:
        # A deny withholds the part entirely; a mask on it would suggest otherwise.
        raise InvalidRuleError("field 'mask': a deny rule takes no mask", field="mask")
    return Rule(rule_id, team, category, action, purpose, effect, mask)


def validate_role_name(role: object, catalog: PolicyCatalog) -> str:
    text = _require_str("role", role)
    if text in catalog.teams or _ROLE_NAME.fullmatch(text):
        return text
    raise InvalidRoleError(f"field 'roles': invalid role name {echo(text)}", field="roles")


def role_closure(
    team: str, links: Mapping[str, Iterable[str]], *, max_depth: int | None = MAX_ROLE_DEPTH
) -> dict[str, int]:
    """Breadth-first: every name ``team`` inherits, with its shortest distance (team: 0)."""
    depth = {team: 0}
    queue = deque([team])
    while queue:
        name = queue.popleft()
        if max_depth is not None and depth[name] >= max_depth:
            continue
        for role in links.get(name, ()):
            if role not in depth:
                depth[role] = depth[name] + 1
                queue.append(role)
    return depth


def check_role_depth(links: Mapping[str, Iterable[str]]) -> None:
    """Refuse hierarchies where some name is more than MAX_ROLE_DEPTH hops away."""
    for team in links:
        if max(role_closure(team, links, max_depth=None).values()) > MAX_ROLE_DEPTH:
            raise InvalidRoleError(
                f"field 'roles': role hierarchy deeper than {MAX_ROLE_DEPTH} levels",
                field="roles",
            )
