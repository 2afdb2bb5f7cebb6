"""PolicyEngine: compiled tables, masks, deny override, swaps, explain, no enforce on lookups."""

from __future__ import annotations

import time
from typing import Any

import pytest
from casbin.core_enforcer import CoreEnforcer

from policies import (
    Action,
    DecisionEffect,
    Mask,
    PolicyCatalog,
    PolicyEngine,
    PolicyError,
    PolicyStore,
    RuleSpec,
    most_restrictive,
)


def spec(
    team: str,
    category: str,
    purpose: str,
    effect: str = "allow",
    mask: str | None = None,
    action: str = "read",
) -> RuleSpec:
    return RuleSpec(team, category, action, purpose, effect, mask)


async def add(store: PolicyStore, catalog: PolicyCatalog, *specs: RuleSpec) -> list[str]:
    return [(await store.add_rule(s, catalog)).id for s in specs]


def test_most_restrictive_order() -> None:
    assert most_restrictive([]) is Mask.NONE
    assert most_restrictive([Mask.NONE, Mask.PARTIAL]) is Mask.PARTIAL
    assert most_restrictive([Mask.PARTIAL, Mask.HASH, Mask.NONE]) is Mask.HASH
    assert most_restrictive([Mask.HASH, Mask.REDACT, Mask.YEAR_ONLY]) is Mask.REDACT
    assert most_restrictive([Mask.YEAR_ONLY, Mask.NONE]) is Mask.YEAR_ONLY
    # incomparable: each reveals what the other hides, so neither may win
    assert most_restrictive([Mask.PARTIAL, Mask.YEAR_ONLY]) is Mask.HASH


async def test_most_restrictive_mask_among_matching_allows(
    store: PolicyStore, catalog: PolicyCatalog
) -> None:
    narrow_partial, _broad, contact_hash, _ = await add(
        store,
        catalog,
        spec("support", "contact.email", "service.support", mask="partial"),
        spec("support", "*", "service.support"),
        spec("support", "contact.*", "*", mask="hash"),
        spec("support", "demographic.birthday", "service.support", mask="year_only"),
    )
    engine = await PolicyEngine.open(store, catalog)
    table = engine.table("support", "service.support")
    assert table["identity.name"].mask is Mask.NONE
    assert table["contact.email"].mask is Mask.HASH  # hash beats partial and none
    assert table["contact.email"].rule_id == contact_hash
    assert table["contact.phone"].mask is Mask.HASH
    assert table["demographic.birthday"].mask is Mask.YEAR_ONLY
    assert engine.table("support", "marketing.email")["contact.email"].mask is Mask.HASH

    # a later, broader rule with no mask never undoes the narrow mask
    await add(store, catalog, spec("support", "*", "*"))
    await engine.reload()
    assert engine.table("support", "service.support")["contact.email"].mask is Mask.HASH
    # a redact anywhere wins
    await add(store, catalog, spec("support", "contact.email", "*", mask="redact"))
    await engine.reload()
    assert engine.table("support", "service.support")["contact.email"].mask is Mask.REDACT
    # partial + year_only on one category: neither reveals its part, hash applies
    await add(
        store, catalog, spec("support", "demographic.birthday", "service.support", mask="partial")
    )
    await engine.reload()
    assert engine.table("support", "service.support")["demographic.birthday"].mask is Mask.HASH
    assert narrow_partial in engine.snapshot.rules


async def test_inherited_mask_applies(store: PolicyStore, catalog: PolicyCatalog) -> None:
    await add(
        store,
        catalog,
        spec("marketing", "contact.*", "marketing.email", mask="partial"),
        spec("sales", "contact.*", "marketing.email"),
    )
    await store.set_roles("sales", ["marketing"], catalog)
    engine = await PolicyEngine.open(store, catalog)
    assert engine.table("sales", "marketing.email")["contact.phone"].mask is Mask.PARTIAL


async def test_scenario_three_teams_five_purposes(
    store: PolicyStore, catalog: PolicyCatalog
) -> None:
    ids = dict(
        zip(
            [
                "mkt_contact",
                "mkt_no_phone",
                "mkt_name",
                "mkt_birthday",
                "sup_all",
                "sup_no_insight",
                "sup_email",
                "sales_commerce",
                "sales_no_sharing",
                "sup_write_ticket",
            ],
            await add(
                store,
                catalog,
                spec("marketing", "contact.*", "marketing.email"),
                spec("marketing", "contact.phone", "marketing.email", "deny"),
                spec("marketing", "identity.name", "*"),
                spec("marketing", "demographic.birthday", "personalization", mask="year_only"),
                spec("support", "*", "service.support"),
                spec("support", "insight.*", "service.support", "deny"),
                spec("support", "contact.email", "service.support", mask="partial"),
                spec("sales", "commerce.*", "sales.outreach"),
                spec("sales", "*", "sharing.partners", "deny"),
                spec("support", "support.ticket", "service.support", action="write"),
            ),
            strict=True,
        )
    )
    await store.set_roles("sales", ["marketing"], catalog)  # sales inherits marketing's rules
    await store.set_roles("compliance", ["admin"], catalog)
    engine = await PolicyEngine.open(store, catalog)

    mkt = engine.table("marketing", "marketing.email")
    assert mkt.allowed == {"contact.email", "contact.address", "identity.name"}
    phone = mkt["contact.phone"]
    assert (phone.effect, phone.reason, phone.rule_id) == (
        DecisionEffect.DENY,
        "denied_by_policy",
        ids["mkt_no_phone"],
    )
    assert mkt["commerce.purchase"].reason == "no_policy"
    assert mkt["contact.email"].reason is None
    assert mkt["contact.email"].rule_id == ids["mkt_contact"]
    assert ("contact.phone", "denied_by_policy") in mkt.withheld()

    pers = engine.table("marketing", "personalization")
    assert pers.allowed == {"identity.name", "demographic.birthday"}
    assert pers["demographic.birthday"].mask is Mask.YEAR_ONLY

    sup = engine.table("support", "service.support")
    assert sup.allowed == set(catalog.categories) - {"insight.sentiment", "insight.motivation"}
    assert sup["insight.sentiment"].rule_id == ids["sup_no_insight"]
    assert sup["contact.email"].mask is Mask.PARTIAL
    assert sup["contact.email"].rule_id == ids["sup_email"]
    assert engine.table("support", "service.support", "write").allowed == {"support.ticket"}
    assert engine.table("support", "service.support", Action.WRITE).allowed == {"support.ticket"}
    assert engine.table("support", "marketing.email").allowed == frozenset()

    # sales: own commerce rules plus marketing's, marketing's deny included
    assert engine.table("sales", "sales.outreach").allowed == {
        "commerce.purchase",
        "commerce.invoice",
        "identity.name",
    }
    assert engine.table("sales", "marketing.email")["contact.phone"].reason == "denied_by_policy"
    sharing = engine.table("sales", "sharing.partners")
    assert sharing.allowed == frozenset()
    assert sharing["identity.name"].rule_id == ids["sales_no_sharing"]  # deny beats inherited allow

    assert engine.has_any_rule("sales", "sharing.partners")
    assert engine.has_any_rule("marketing", "analytics.profiling")  # identity.name for "*"
    assert not engine.has_any_rule("support", "marketing.email")
    assert engine.has_any_rule("support", "service.support", "write")
    assert not engine.has_any_rule("product", "service.support")
    assert engine.has_role("compliance", "admin")
    assert not engine.has_role("support", "admin")
    assert engine.has_role("sales", "marketing")

    # unknown names fail closed
    assert engine.table("ghosts", "service.support").allowed == frozenset()
    assert engine.table("support", "no.such.purpose").decide("contact.email").reason == "no_policy"
    assert sup.decide("no.such.category").allowed is False


async def test_explain(store: PolicyStore, catalog: PolicyCatalog) -> None:
    allow_id, deny_id = await add(
        store,
        catalog,
        spec("marketing", "contact.*", "marketing.email", mask="partial"),
        spec("marketing", "contact.phone", "*", "deny"),
    )
    await store.set_roles("sales", ["marketing"], catalog)
    engine = await PolicyEngine.open(store, catalog)

    denied = engine.explain("sales", "contact.phone", "read", "marketing.email")
    assert denied.decision.effect is DecisionEffect.DENY
    assert denied.reason == "denied_by_policy"
    assert denied.rule is not None
    assert denied.rule.id == deny_id
    assert {r.id for r in denied.matched} == {allow_id, deny_id}
    body = denied.as_dict()
    assert body["rule"]["effect"] == "deny"
    assert body["policy_version"] == engine.version

    allowed = engine.explain("marketing", "contact.email", "read", "marketing.email")
    assert allowed.decision.allowed
    assert allowed.reason is None
    assert allowed.rule is not None
    assert allowed.rule.id == allow_id
    assert allowed.as_dict()["mask"] == "partial"

    nothing = engine.explain("support", "contact.email", "write", "legal.retention")
    assert (nothing.reason, nothing.rule, nothing.matched) == ("no_policy", None, ())

    for args, code in [
        (("nobody", "contact.email", "read", "marketing.email"), "unknown_team"),
        (("sales", "contact.*", "read", "marketing.email"), "unknown_category"),
        (("sales", "contact.email", "read", "*"), "unknown_purpose"),
        (("sales", "contact.email", "erase", "marketing.email"), "invalid_rule"),
    ]:
        with pytest.raises(PolicyError) as info:
            engine.explain(*args)
        assert (info.value.code, info.value.kind) == (code, "invalid")


async def test_version_bump_and_atomic_swap(store: PolicyStore, catalog: PolicyCatalog) -> None:
    engine = await PolicyEngine.open(store, catalog)
    assert engine.version == 0
    before = engine.snapshot
    old_table = engine.table("marketing", "marketing.email")
    assert old_table.allowed == frozenset()

    await add(store, catalog, spec("marketing", "contact.email", "marketing.email"))
    assert engine.version == 0  # nothing changes until a reload
    assert await engine.reload() is True
    assert engine.version == 1
    assert await engine.reload() is False  # same version: no recompile
    after = engine.snapshot
    assert after is not before
    new_table = engine.table("marketing", "marketing.email")
    assert new_table.allowed == {"contact.email"}
    assert new_table.version == 1
    # the old snapshot and its tables are immutable and unchanged
    assert old_table.allowed == frozenset()
    assert before.version == 0
    assert before.tables[("marketing", "marketing.email", "read")] is old_table
    with pytest.raises(TypeError):
        before.tables[("x", "y", "read")] = old_table  # type: ignore[index]

    rule_id = (await store.list_rules())[0].id
    await store.remove_rule(rule_id)
    assert await engine.reload() is True
    assert engine.version == 2
    assert engine.table("marketing", "marketing.email").allowed == frozenset()


async def test_set_catalog_recompiles(store: PolicyStore, catalog: PolicyCatalog) -> None:
    engine = await PolicyEngine.open(store, catalog)
    bigger = PolicyCatalog.of(
        teams=catalog.teams | {"research"},
        categories=catalog.categories | {"contact.fax"},
        purposes=catalog.purposes,
    )
    await store.add_rule(spec("research", "contact.*", "analytics.profiling"), bigger)
    await engine.reload()
    # a team named by a stored rule is compiled even before this instance's catalog
    # knows it (it was created through another instance); unknown categories are not
    before = engine.table("research", "analytics.profiling").allowed
    assert "contact.email" in before
    assert "contact.fax" not in before
    await engine.set_catalog(bigger)
    assert "contact.fax" in engine.table("research", "analytics.profiling").allowed


class _EnforceCounter:
    def __init__(self) -> None:
        self.calls = 0


@pytest.fixture
def enforce_counter(monkeypatch: pytest.MonkeyPatch) -> _EnforceCounter:
    """Counts every casbin enforce/enforce_ex call on any Enforcer."""
    counter = _EnforceCounter()
    for name in ("enforce", "enforce_ex"):
        original = getattr(CoreEnforcer, name)

        def counted(self: Any, *args: Any, _original: Any = original) -> Any:
            counter.calls += 1
            return _original(self, *args)

        monkeypatch.setattr(CoreEnforcer, name, counted)
    return counter


async def test_no_enforce_on_the_request_path(
    store: PolicyStore, catalog: PolicyCatalog, enforce_counter: _EnforceCounter
) -> None:
    await add(
        store,
        catalog,
        spec("marketing", "contact.*", "*", mask="partial"),
        spec("marketing", "contact.phone", "sales.outreach", "deny"),
    )
    await store.set_roles("sales", ["marketing"], catalog)
    engine = await PolicyEngine.open(store, catalog)
    assert enforce_counter.calls > 0  # compiling does use casbin...
    enforce_counter.calls = 0

    granted = 0
    for _ in range(50):
        for team in catalog.teams:
            for purpose in catalog.purposes:
                table = engine.table(team, purpose, "read")
                engine.has_any_rule(team, purpose)
                for category in catalog.categories:
                    granted += table.decide(category).allowed
                    engine.decide(team, category, "write", purpose)
                    engine.explain(team, category, "read", purpose)
    assert granted > 0
    assert enforce_counter.calls == 0  # ...lookups never do


async def test_compile_cost_is_off_the_hot_path_and_bounded(
    store: PolicyStore, catalog: PolicyCatalog
) -> None:
    """A realistic policy (60 rules) compiles well within the 1 s sync budget."""
    categories = [*sorted(catalog.categories), "contact.*", "insight.*", "commerce.*", "*"]
    purposes = [*sorted(catalog.purposes), "*"]
    teams = sorted(catalog.teams)
    n = 0
    for i, team in enumerate(teams):
        for j in range(12):
            category = categories[(i * 5 + j) % len(categories)]
            purpose = purposes[(i + j * 3) % len(purposes)]
            effect = "deny" if j % 5 == 4 else "allow"
            mask = None if effect == "deny" else [None, "partial", "hash", None][j % 4]
            await store.add_rule(spec(team, category, purpose, effect, mask), catalog)
            n += 1
    assert n == 60
    engine = PolicyEngine(store, catalog)
    started = time.perf_counter()
    await engine.reload()
    elapsed = time.perf_counter() - started
    assert elapsed < 0.7, elapsed
