"""Compile rules into decision tables, off the request path.

For every (team, purpose, action) of the catalog, a DecisionTable maps every
known category to a Decision.  casbin decides the effect (``enforce_ex``, which
also names a deciding rule); the engine's own matcher finds *all* matching
rules, because the mask is the most restrictive among all matching allow rules
and casbin reports only one.  The two must agree on every cell, or the compile
fails (PolicyCompileError) and the previous snapshot stays in force; the
differential tests check they always agree.

Cells where the own matcher finds no rule need no casbin call: with nothing to
match, casbin's answer is "deny, no rule", which is what NO_POLICY says.  (The
differential property test compares every cell, these included, with a fresh
enforcer, so the shortcut cannot hide a disagreement between the matchers.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import casbin
from casbin import persist

from policies._errors import PolicyCompileError
from policies._model import (
    CASBIN_ROLE_REACH,
    Action,
    Effect,
    Mask,
    PolicyCatalog,
    Rule,
    category_matches,
    most_restrictive,
    purpose_matches,
    role_closure,
)
from policies._store import PolicyState

MODEL_PATH = Path(__file__).with_name("model.conf")

REASON_NO_POLICY = "no_policy"
REASON_DENIED = "denied_by_policy"


class DecisionEffect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    NONE = "none"  # no rule matched


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one category: effect, mask to apply, deciding rule, reason code.

    ``reason`` is None exactly when the effect is allow.  Withheld decisions
    carry ``Mask.REDACT`` so that a caller who masks instead of dropping still
    discloses nothing.
    """

    effect: DecisionEffect
    mask: Mask
    rule_id: str | None
    reason: str | None

    @property
    def allowed(self) -> bool:
        return self.effect is DecisionEffect.ALLOW


NO_POLICY = Decision(DecisionEffect.NONE, Mask.REDACT, None, REASON_NO_POLICY)


class DecisionTable(Mapping[str, Decision]):
    """Immutable decisions of one (team, purpose, action) for every known category."""

    __slots__ = ("_allowed", "_decisions", "action", "has_any_rule", "purpose", "team", "version")

    def __init__(
        self,
        *,
        team: str,
        purpose: str,
        action: Action,
        version: int,
        decisions: Mapping[str, Decision],
        has_any_rule: bool,
    ) -> None:
        self.team = team
        self.purpose = purpose
        self.action = action
        self.version = version
        self.has_any_rule = has_any_rule
        self._decisions: Mapping[str, Decision] = MappingProxyType(dict(decisions))
        self._allowed = frozenset(c for c, d in self._decisions.items() if d.allowed)

    def __getitem__(self, category: str) -> Decision:
        return self._decisions[category]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decisions)

    def __len__(self) -> int:
        return len(self._decisions)

    def decide(self, category: str) -> Decision:
        """The decision for ``category``; an unknown category is never allowed (fail closed)."""
        return self._decisions.get(category, NO_POLICY)

    @property
    def allowed(self) -> frozenset[str]:
        """Categories this table discloses (each with ``self[category].mask``)."""
        return self._allowed

    def withheld(self) -> list[tuple[str, str]]:
        """(category, reason code) for every category this table withholds, sorted."""
        return sorted(
            (category, decision.reason or REASON_NO_POLICY)
            for category, decision in self._decisions.items()
            if not decision.allowed
        )

    def __repr__(self) -> str:
        return (
            f"DecisionTable(team={self.team!r}, purpose={self.purpose!r}, "
            f"action={self.action.value!r}, version={self.version}, "
            f"allowed={sorted(self._allowed)})"
        )


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """Everything the request path reads, built once per policy version; never mutated.

    ``enforcer`` is the casbin Enforcer the tables were checked against; the
    request path never calls it.
    """

    version: int
    catalog: PolicyCatalog
    rules: Mapping[str, Rule]
    roles: tuple[tuple[str, str], ...]
    inherited: Mapping[str, frozenset[str]]
    tables: Mapping[tuple[str, str, str], DecisionTable]
    enforcer: Any

    def subjects(self, team: str) -> frozenset[str]:
        """``team`` and every name it inherits."""
        return self.inherited.get(team, frozenset((team,)))


class _SnapshotAdapter(persist.Adapter):  # type: ignore[misc]
    """A read-only casbin adapter over rows already read from the database.

    The database is read asynchronously by PolicyStore.load; casbin's adapter
    interface is synchronous, so it is handed the finished rows.  Writes never go
    through casbin: PolicyStore validates, stores and bumps the version itself.
    """

    def __init__(self, rules: Iterable[Rule], roles: Iterable[tuple[str, str]]) -> None:
        self._rules = tuple(rules)
        self._roles = tuple(roles)

    def load_policy(self, model: Any) -> None:
        for rule in self._rules:
            model.add_policy("p", "p", list(rule.line()))
        for team, role in self._roles:
            model.add_policy("g", "g", [team, role])


def build_enforcer(
    rules: Iterable[Rule], roles: Iterable[tuple[str, str]], *, model_path: Path = MODEL_PATH
) -> Any:
    """A casbin Enforcer holding exactly ``rules`` and ``roles``."""
    return casbin.Enforcer(str(model_path), _SnapshotAdapter(rules, roles))


def inherited_names(
    teams: Iterable[str], roles: Iterable[tuple[str, str]]
) -> dict[str, frozenset[str]]:
    links: dict[str, list[str]] = {}
    for team, role in roles:
        links.setdefault(team, []).append(role)
    return {
        team: frozenset(role_closure(team, links, max_depth=CASBIN_ROLE_REACH)) for team in teams
    }


def matching_rules(
    rules: Iterable[Rule],
    subjects: frozenset[str],
    category: str,
    action: Action,
    purpose: str,
) -> list[Rule]:
    """Every rule that matches the request, by the engine's own matcher."""
    return [
        rule
        for rule in rules
        if rule.team in subjects
        and rule.action is action
        and purpose_matches(purpose, rule.purpose)
        and category_matches(category, rule.category)
    ]


def _decide(
    allowed: bool,
    explain: list[str],
    matched: list[Rule],
    by_line: Mapping[tuple[str, ...], Rule],
    cell: str,
) -> Decision:
    allows = [rule for rule in matched if rule.effect is Effect.ALLOW]
    denies = [rule for rule in matched if rule.effect is Effect.DENY]
    deciding = by_line.get(tuple(explain)) if explain else None
    if allowed:
        if denies or not allows or deciding is None or deciding.effect is not Effect.ALLOW:
            raise PolicyCompileError(f"casbin allows but own matching disagrees at {cell}")
        mask = most_restrictive(rule.mask for rule in allows)
        # Name the rule whose mask applies (casbin's pick when it is one of them).
        candidates = [rule for rule in allows if rule.mask is mask]
        rule = deciding if deciding in candidates or not candidates else candidates[0]
        return Decision(DecisionEffect.ALLOW, mask, rule.id, None)
    if denies:
        if deciding is None or deciding.effect is not Effect.DENY:
            raise PolicyCompileError(f"casbin did not report the deny rule at {cell}")
        return Decision(DecisionEffect.DENY, Mask.REDACT, deciding.id, REASON_DENIED)
    if allows or explain:
        raise PolicyCompileError(f"casbin denies but own matching found allow rules at {cell}")
    return NO_POLICY


def compile_snapshot(
    state: PolicyState, catalog: PolicyCatalog, *, model_path: Path = MODEL_PATH
) -> PolicySnapshot:
    """Build every decision table of ``state`` for ``catalog`` (CPU-bound; run it in a thread)."""
    rules = state.rules
    enforcer = build_enforcer(rules, state.roles, model_path=model_path)
    by_line: dict[tuple[str, ...], Rule] = {rule.line(): rule for rule in rules}
    # Teams named by stored rules count as known even if this instance's catalog
    # has not heard of them yet (a team created through another instance): rules
    # only ever name teams that were validated when the rule was added.
    teams = catalog.teams | {r.team for r in rules} | {team for team, _ in state.roles}
    inherited = inherited_names(teams, state.roles)
    categories = sorted(catalog.categories)
    empty = dict.fromkeys(categories, NO_POLICY)
    tables: dict[tuple[str, str, str], DecisionTable] = {}
    for team in sorted(teams):
        subjects = inherited[team]
        team_rules = [rule for rule in rules if rule.team in subjects]
        # casbin evaluates every policy line per call; a team's own enforcer holds only
        # the rules its subjects could match (any other line fails g(team, sub)), so
        # compile cost grows with rules per team, not rules overall.
        team_enforcer = build_enforcer(team_rules, state.roles, model_path=model_path)
        for purpose in sorted(catalog.purposes):
            purpose_rules = [r for r in team_rules if purpose_matches(purpose, r.purpose)]
            for action in Action:
                candidates = [r for r in purpose_rules if r.action is action]
                decisions = empty
                if candidates:
                    decisions = {}
                    for category in categories:
                        matched = matching_rules(candidates, subjects, category, action, purpose)
                        if not matched:
                            decisions[category] = NO_POLICY
                            continue
                        allowed, explain = team_enforcer.enforce_ex(
                            team, category, action.value, purpose
                        )
                        cell = f"({team}, {category}, {action.value}, {purpose})"
                        decisions[category] = _decide(
                            bool(allowed), list(explain), matched, by_line, cell
                        )
                tables[(team, purpose, action)] = DecisionTable(
                    team=team,
                    purpose=purpose,
                    action=action,
                    version=state.version,
                    decisions=decisions,
                    has_any_rule=bool(candidates),
                )
    return PolicySnapshot(
        version=state.version,
        catalog=catalog,
        rules=MappingProxyType({rule.id: rule for rule in rules}),
        roles=state.roles,
        inherited=MappingProxyType(inherited),
        tables=MappingProxyType(tables),
        enforcer=enforcer,
    )
