"""PolicyStore: validation before storage, versions, roles."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from policies import (
    DuplicateRuleError,
    InvalidRoleError,
    Mask,
    PolicyCatalog,
    PolicyError,
    PolicyStore,
    RuleNotFoundError,
    RuleSpec,
)

GOOD: dict[str, Any] = {
    "team": "marketing",
    "category": "contact.email",
    "action": "read",
    "purpose": "marketing.email",
    "effect": "allow",
    "mask": None,
}


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("team", "hackers", "unknown_team"),
        ("team", "", "unknown_team"),
        ("category", "contact.fax", "unknown_category"),
        ("category", "nope.*", "unknown_category"),
        ("category", "con*", "unknown_category"),
        ("category", "*.email", "unknown_category"),
        ("category", "contact.email.*", "unknown_category"),
        ("category", "preference.*", "unknown_category"),
        ("category", "contact.*.x", "unknown_category"),
        ("purpose", "spam", "unknown_purpose"),
        ("purpose", "marketing.*", "unknown_purpose"),
        ("action", "delete", "invalid_rule"),
        ("action", "READ", "invalid_rule"),
        ("effect", "maybe", "invalid_rule"),
        ("mask", "scramble", "invalid_rule"),
        ("team", 42, "invalid_rule"),
        ("category", None, "invalid_rule"),
        ("team", "x" * 100_000, "unknown_team"),
        ("team", "sales, admin", "unknown_team"),
        ("category", "contact.email) || (1 == 1", "unknown_category"),
    ],
)
async def test_invalid_rules_store_nothing(
    store: PolicyStore, catalog: PolicyCatalog, field: str, value: object, code: str
) -> None:
    spec = RuleSpec(**{**GOOD, field: value})
    with pytest.raises(PolicyError) as info:
        await store.add_rule(spec, catalog)
    error = info.value
    assert error.kind == "invalid"
    assert error.code == code
    assert error.field == field
    assert field in str(error)
    assert len(str(error)) < 200  # huge input is never echoed
    assert await store.list_rules() == []
    assert await store.current_version() == 0


async def test_deny_with_mask_is_invalid(store: PolicyStore, catalog: PolicyCatalog) -> None:
    spec = RuleSpec(**{**GOOD, "effect": "deny", "mask": "hash"})
    with pytest.raises(PolicyError) as info:
        await store.add_rule(spec, catalog)
    assert (info.value.kind, info.value.field) == ("invalid", "mask")
    assert await store.current_version() == 0


@pytest.mark.parametrize("category", ["*", "contact.*", "insight.*", "preference"])
async def test_valid_wildcards(store: PolicyStore, catalog: PolicyCatalog, category: str) -> None:
    rule = await store.add_rule(RuleSpec(**{**GOOD, "category": category}), catalog)
    assert rule.category == category


async def test_add_list_remove_bump_the_version(store: PolicyStore, catalog: PolicyCatalog) -> None:
    assert await store.current_version() == 0
    first = await store.add_rule(RuleSpec(**GOOD), catalog)
    second = await store.add_rule(RuleSpec(**{**GOOD, "purpose": "*", "mask": "partial"}), catalog)
    assert await store.current_version() == 2
    assert [r.id for r in await store.list_rules()] == [first.id, second.id]
    assert second.mask is Mask.PARTIAL
    assert first.mask is Mask.NONE
    assert first.as_dict()["mask"] is None
    uuid.UUID(first.id)

    removed = await store.remove_rule(first.id)
    assert removed == first
    assert await store.current_version() == 3
    assert [r.id for r in await store.list_rules()] == [second.id]


async def test_duplicate_is_a_conflict_and_changes_nothing(
    store: PolicyStore, catalog: PolicyCatalog
) -> None:
    await store.add_rule(RuleSpec(**GOOD), catalog)
    with pytest.raises(DuplicateRuleError) as info:
        await store.add_rule(RuleSpec(**GOOD), catalog)
    assert (info.value.code, info.value.kind) == ("duplicate_rule", "conflict")
    assert await store.current_version() == 1
    assert len(await store.list_rules()) == 1


@pytest.mark.parametrize(
    "rule_id", ["6c76e8f2-f398-4f3b-94db-632f2f272b01", "not-a-uuid", "x" * 5000]
)
async def test_remove_unknown_rule(
    store: PolicyStore, catalog: PolicyCatalog, rule_id: str
) -> None:
    await store.add_rule(RuleSpec(**GOOD), catalog)
    with pytest.raises(RuleNotFoundError) as info:
        await store.remove_rule(rule_id)
    assert (info.value.code, info.value.kind) == ("rule_not_found", "not_found")
    assert await store.current_version() == 1
    assert len(str(info.value)) < 100


async def test_roles(store: PolicyStore, catalog: PolicyCatalog) -> None:
    assert await store.set_roles("compliance", ["admin"], catalog) == {"admin"}
    await store.set_roles("sales", ["marketing", "support"], catalog)
    assert await store.current_version() == 2
    assert await store.list_roles() == {
        "compliance": frozenset({"admin"}),
        "sales": frozenset({"marketing", "support"}),
    }
    await store.set_roles("sales", [], catalog)
    assert await store.list_roles() == {"compliance": frozenset({"admin"})}
    assert await store.current_version() == 3


@pytest.mark.parametrize(
    ("team", "roles", "code"),
    [
        ("nobody", ["admin"], "unknown_team"),
        ("sales", ["Admin Role"], "invalid_role"),
        ("sales", ["a, b"], "invalid_role"),
        ("sales", ["sales"], "invalid_role"),
        ("sales", "admin", "invalid_role"),
        ("sales", [7], "invalid_rule"),
        ("sales", [f"r{i}" for i in range(40)], "invalid_role"),
    ],
)
async def test_invalid_roles_store_nothing(
    store: PolicyStore, catalog: PolicyCatalog, team: str, roles: object, code: str
) -> None:
    with pytest.raises(PolicyError) as info:
        await store.set_roles(team, roles, catalog)  # type: ignore[arg-type]
    assert (info.value.code, info.value.kind) == (code, "invalid")
    assert await store.list_roles() == {}
    assert await store.current_version() == 0


async def test_role_hierarchy_depth_is_bounded(store: PolicyStore) -> None:
    teams = [f"t{i}" for i in range(11)]
    catalog = PolicyCatalog.of(teams=teams, categories=["a.b"], purposes=["p"])
    for i in range(8):
        await store.set_roles(teams[i], [teams[i + 1]], catalog)
    with pytest.raises(InvalidRoleError):
        await store.set_roles(teams[8], [teams[9]], catalog)
    assert await store.current_version() == 8
    # cycles are harmless (casbin and the engine both stop at visited names)
    await store.set_roles(teams[8], [teams[0]], catalog)
