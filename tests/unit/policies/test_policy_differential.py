"""Differential property test: compiled tables agree with casbin's enforce everywhere.

For random rule sets (teams with role inheritance, cycles included, category
wildcards, purpose ``*``, both actions, allow/deny, masks) every
(team, category, action, purpose) of the catalog is checked against a fresh
casbin Enforcer over the full policy: the effect must be identical, a deny must
name the deny rule casbin reports, and the mask must be the most restrictive
among the matching allow rules.  Which rules match is the engine's own matcher,
so a second property checks that matcher against casbin one rule at a time.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import (
    Action,
    DecisionEffect,
    Effect,
    Mask,
    PolicyCatalog,
    PolicyState,
    Rule,
    RuleSpec,
    build_enforcer,
    compile_snapshot,
    most_restrictive,
)
from policies._compile import inherited_names, matching_rules
from policies._model import validate_rule

DEFAULT_CATEGORIES = (  # the API.md default catalog
    "identity.name",
    "contact.email",
    "contact.phone",
    "contact.address",
    "demographic.birthday",
    "commerce.purchase",
    "commerce.invoice",
    "support.ticket",
    "engagement.interaction",
    "preference",
    "insight.sentiment",
    "insight.motivation",
)

TEAMS = ("t0", "t1", "t2", "t3")
PURPOSES = ("marketing.email", "service.support", "sales.outreach", "analytics.profiling")
CATALOG = PolicyCatalog.of(teams=TEAMS, categories=DEFAULT_CATEGORIES, purposes=PURPOSES)
PATTERNS = (*DEFAULT_CATEGORIES, "*", "contact.*", "commerce.*", "insight.*", "identity.*")

rule_specs = st.builds(
    lambda team, category, action, purpose, effect, mask: RuleSpec(
        team, category, action, purpose, effect, None if effect == "deny" else mask
    ),
    st.sampled_from(TEAMS),
    st.sampled_from(PATTERNS),
    st.sampled_from(["read", "write"]),
    st.sampled_from([*PURPOSES, "*"]),
    st.sampled_from(["allow", "allow", "deny"]),
    st.sampled_from([None, "none", "partial", "hash", "redact", "year_only"]),
)
ROLE_PAIRS = [(team, role) for team in TEAMS for role in (*TEAMS, "admin") if team != role]
role_links = st.lists(st.sampled_from(ROLE_PAIRS), max_size=5, unique=True)


def _validated(specs: list[RuleSpec]) -> tuple[Rule, ...]:
    rules: dict[tuple[str, ...], Rule] = {}
    for i, spec in enumerate(specs):
        rule = validate_rule(spec, CATALOG, rule_id=f"r{i}")
        rules.setdefault(rule.line(), rule)  # the store refuses exact duplicates
    return tuple(rules.values())


def _cells() -> list[tuple[str, str, Action, str]]:
    return [
        (team, category, action, purpose)
        for team in TEAMS
        for purpose in PURPOSES
        for action in Action
        for category in DEFAULT_CATEGORIES
    ]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(rule_specs, max_size=12), roles=role_links)
def test_compiled_tables_agree_with_enforce(
    specs: list[RuleSpec], roles: list[tuple[str, str]]
) -> None:
    """Every cell: same effect as enforce, the deny rule casbin names, the right reason,
    the most restrictive mask among matching allows, has_any_rule as casbin's roles say."""
    rules = _validated(specs)
    snapshot = compile_snapshot(PolicyState(1, rules, tuple(roles)), CATALOG)
    reference = build_enforcer(rules, roles)  # fresh, holding the whole policy
    role_manager = reference.get_role_manager()
    by_id = {rule.id: rule for rule in rules}

    mismatches = []
    for team, category, action, purpose in _cells():
        request = (team, category, action.value, purpose)
        table = snapshot.tables[(team, purpose, action)]
        decision = table[category]
        allowed, explain = reference.enforce_ex(*request)
        subjects = frozenset(r.team for r in rules if role_manager.has_link(team, r.team))
        matched = matching_rules(rules, subjects, category, action, purpose)
        allows = [r for r in matched if r.effect is Effect.ALLOW]
        if allowed:
            ok = (
                decision.effect is DecisionEffect.ALLOW
                and decision.reason is None
                and decision.mask is most_restrictive(r.mask for r in allows)
                and by_id[decision.rule_id or ""] in allows
            )
        elif explain:  # casbin names the deny rule that decided
            ok = (
                decision.effect is DecisionEffect.DENY
                and decision.reason == "denied_by_policy"
                and by_id[decision.rule_id or ""].line() == tuple(explain)
            )
        else:
            ok = decision.effect is DecisionEffect.NONE and decision.reason == "no_policy"
            ok = ok and decision.rule_id is None
        ok = ok and table.has_any_rule == any(
            r.action is action and r.purpose in (purpose, "*") and r.team in subjects for r in rules
        )
        if not ok:
            mismatches.append((request, decision, allowed, explain))
    assert mismatches == []


def _as_allow(rule: Rule) -> Rule:
    return Rule(
        rule.id, rule.team, rule.category, rule.action, rule.purpose, Effect.ALLOW, Mask.NONE
    )


@settings(max_examples=40, deadline=None)
@given(spec=rule_specs, roles=role_links)
def test_own_matcher_agrees_with_casbin_rule_by_rule(
    spec: RuleSpec, roles: list[tuple[str, str]]
) -> None:
    """The engine's own matcher (which picks the masks) says "matches" exactly when
    casbin, holding only that rule, allows."""
    (rule,) = _validated([spec])
    alone = build_enforcer([_as_allow(rule)], roles)
    inherited = inherited_names(TEAMS, roles)
    mismatches = [
        cell
        for cell in _cells()
        if alone.enforce(cell[0], cell[1], cell[2].value, cell[3])
        != bool(matching_rules([rule], inherited[cell[0]], cell[1], cell[2], cell[3]))
    ]
    assert mismatches == []
