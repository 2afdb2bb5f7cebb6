"""Differential property test: compiled tables agree with casbin's enforce everywhere.

For random rule sets (teams with role inheritance, cycles included, category
wildcards, purpose ``*``, both actions, allow/deny, masks) every
(team, category, action, purpose) of the catalog is checked against a fresh
casbin Enforcer over the full policy: the effect must be identical, a deny must
name a deny rule casbin reports, and the mask must be the most restrictive mask
among the allow rules that casbin itself says match (each rule checked alone).
"""

from __future__ import annotations

from typing import Any

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
role_links = st.lists(
    st.tuples(st.sampled_from(TEAMS), st.sampled_from([*TEAMS, "admin"])).filter(
        lambda link: link[0] != link[1]
    ),
    max_size=5,
    unique=True,
)


def _validated(specs: list[RuleSpec]) -> tuple[Rule, ...]:
    rules: dict[tuple[str, ...], Rule] = {}
    for i, spec in enumerate(specs):
        rule = validate_rule(spec, CATALOG, rule_id=f"r{i}")
        rules.setdefault(rule.line(), rule)  # the store refuses exact duplicates
    return tuple(rules.values())


def _as_allow(rule: Rule) -> Rule:
    return Rule(rule.id, rule.team, rule.category, rule.action, rule.purpose, Effect.ALLOW, Mask.NONE)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(rule_specs, max_size=10), roles=role_links)
def test_compiled_tables_agree_with_enforce(
    specs: list[RuleSpec], roles: list[tuple[str, str]]
) -> None:
    rules = _validated(specs)
    snapshot = compile_snapshot(PolicyState(1, rules, tuple(roles)), CATALOG)
    reference = build_enforcer(rules, roles)
    # one enforcer per rule (as an allow): casbin's own verdict on "does this rule match?"
    single: list[tuple[Rule, Any]] = [(r, build_enforcer([_as_allow(r)], roles)) for r in rules]
    by_id = {rule.id: rule for rule in rules}

    mismatches = []
    for team in TEAMS:
        for purpose in PURPOSES:
            for action in Action:
                table = snapshot.tables[(team, purpose, action)]
                for category in DEFAULT_CATEGORIES:
                    request = (team, category, action.value, purpose)
                    decision = table[category]
                    allowed, explain = reference.enforce_ex(*request)
                    matched = [r for r, enforcer in single if enforcer.enforce(*request)]
                    allows = [r for r in matched if r.effect is Effect.ALLOW]
                    denies = [r for r in matched if r.effect is Effect.DENY]
                    expected_effect = (
                        DecisionEffect.ALLOW
                        if allowed
                        else DecisionEffect.DENY
                        if denies
                        else DecisionEffect.NONE
                    )
                    ok = decision.allowed == allowed and decision.effect is expected_effect
                    if decision.effect is DecisionEffect.ALLOW:
                        ok = ok and decision.mask is most_restrictive(r.mask for r in allows)
                        ok = ok and by_id[decision.rule_id or ""] in allows
                        ok = ok and decision.reason is None
                    elif decision.effect is DecisionEffect.DENY:
                        ok = ok and decision.reason == "denied_by_policy"
                        ok = ok and by_id[decision.rule_id or ""].line() == tuple(explain)
                    else:
                        ok = ok and decision.reason == "no_policy" and decision.rule_id is None
                        ok = ok and not matched
                    ok = ok and table.has_any_rule == any(
                        r.action is action
                        and r.purpose in (purpose, "*")
                        and (r.team == team or reference.has_role_for_user(team, r.team))
                        for r in rules
                    )
                    if not ok:
                        mismatches.append((request, decision, allowed, explain))
    assert mismatches == []
