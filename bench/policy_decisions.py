"""Authorization cost per gated read of a 12-category story: the compiled decision
table (what the gate does) against one casbin ``enforce`` per category, same run,
same rules (the demo starter policy, governance/demo_policy.toml).

    .venv/bin/python -m bench.policy_decisions [--number 2000] [--repeat 7]

Compiled: ``engine.table(team, purpose, "read")``, the no-rule check, then
``table.decide(category)`` for each of the 12 categories (granted -> mask,
withheld -> reason), exactly the loop of ``Gate.decide``.
Enforce: ``enforcer.enforce(team, category, "read", purpose)`` for each of the 12
categories on the snapshot's casbin Enforcer (all rules, as a per-request
casbin check would run), and, kinder to casbin, on per-team enforcers holding
only the team's rules. ``enforce`` gives only allow/deny, no mask and no reason,
so the baseline is, if anything, generous to casbin.
Both run over the seven (team, purpose) pairs of the demo policy; each figure is
the best of ``--repeat`` runs, divided per read. Results: bench/results/policy_decisions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import timeit
from pathlib import Path
from typing import Any

from bench.common import base_settings, write_result
from governance.service import StoryVault
from policies import Action, Mask, PolicyEngine, build_enforcer

GOAL = 50.0
PAIRS = (
    ("support", "service.support"),
    ("sales", "sales.outreach"),
    ("marketing", "marketing.email"),
    ("marketing", "sharing.partners"),
    ("product", "personalization"),
    ("product", "analytics.profiling"),
    ("compliance", "legal.retention"),
)


async def demo_engine() -> tuple[StoryVault, PolicyEngine]:
    """A StoryVault on a fresh SQLite file with the demo teams and starter policy."""
    tmp = Path(tempfile.mkdtemp(prefix="sv-bench-policy-"))
    vault = StoryVault(base_settings(tmp, f"sqlite+aiosqlite:///{tmp / 'bench.db'}"))
    await vault.start()
    for team in ("sales", "marketing", "support", "product"):
        await vault.create_team(team, roles=[], description="")
    await vault.seed_demo_policy()
    return vault, vault.policy


def compiled_read(
    engine: PolicyEngine, team: str, purpose: str, categories: tuple[str, ...]
) -> Any:
    table = engine.table(team, purpose, Action.READ)
    if not table.has_any_rule:
        raise PermissionError("no_policy")
    granted: dict[str, Mask] = {}
    withheld: list[tuple[str, str]] = []
    for category in categories:
        d = table.decide(category)
        if d.allowed:
            granted[category] = d.mask
        else:
            withheld.append((category, d.reason or "no_policy"))
    return granted, withheld


def enforce_read(enforcer: Any, team: str, purpose: str, categories: tuple[str, ...]) -> Any:
    granted: list[str] = []
    withheld: list[str] = []
    for category in categories:
        if enforcer.enforce(team, category, "read", purpose):
            granted.append(category)
        else:
            withheld.append(category)
    return granted, withheld


def per_read_us(fn: Any, number: int, repeat: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=repeat))
    return best / (number * len(PAIRS)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000, help="compiled reads per pair per run")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(measure(args.number, args.repeat))


async def measure(number: int, repeat: int) -> None:
    # One event loop for the vault's whole life; the timed code itself is synchronous.
    vault, engine = await demo_engine()
    try:
        categories = tuple(sorted(vault.catalog.categories))
        assert len(categories) == 12, categories
        enforcer = engine.enforcer
        # Same answers (the differential property test checks this for random rules).
        for team, purpose in PAIRS:
            granted, _ = compiled_read(engine, team, purpose, categories)
            allowed, _ = enforce_read(enforcer, team, purpose, categories)
            assert set(granted) == set(allowed), (team, purpose)

        def run_compiled() -> None:
            for team, purpose in PAIRS:
                compiled_read(engine, team, purpose, categories)

        def run_enforce() -> None:
            for team, purpose in PAIRS:
                enforce_read(enforcer, team, purpose, categories)

        # A kinder baseline: per-team enforcers holding only that team's rules (what
        # the compiler itself uses), so casbin scans fewer policy lines per call.
        snapshot = engine.snapshot
        small = {
            team: build_enforcer(
                [r for r in snapshot.rules.values() if r.team in snapshot.subjects(team)],
                snapshot.roles,
            )
            for team, _ in PAIRS
        }

        def run_enforce_small() -> None:
            for team, purpose in PAIRS:
                enforce_read(small[team], team, purpose, categories)

        enforce_number = max(1, number // 50)  # enforce is slow: fewer loops, same repeat
        compiled_us = per_read_us(run_compiled, number, repeat)
        enforce_us = per_read_us(run_enforce, enforce_number, repeat)
        small_us = per_read_us(run_enforce_small, enforce_number, repeat)
        single_enforce_us = enforce_us / len(categories)
    finally:
        await vault.stop()

    ratio = enforce_us / compiled_us
    result = {
        "categories_per_read": len(categories),
        "rules": len(engine.snapshot.rules),
        "policy_version": engine.version,
        "pairs": [f"{t}/{p}" for t, p in PAIRS],
        "compiled_table_us_per_read": round(compiled_us, 3),
        "enforce_per_category_us_per_read": round(enforce_us, 3),
        "enforce_us_per_call": round(single_enforce_us, 3),
        "ratio": round(ratio, 1),
        "enforce_per_category_team_enforcer_us_per_read": round(small_us, 3),
        "ratio_team_enforcer": round(small_us / compiled_us, 1),
        "goal_ratio": GOAL,
        "goal_met": ratio >= GOAL and small_us / compiled_us >= GOAL,
        "method": (
            f"timeit best of {repeat}; compiled {number} and enforce "
            f"{enforce_number} loops over {len(PAIRS)} (team, purpose) pairs per run"
        ),
    }
    print(
        f"authorization per gated read of a {len(categories)}-category story "
        f"({result['rules']} demo rules):"
    )
    print(f"  compiled table lookup : {compiled_us:9.2f} µs")
    print(
        f"  casbin enforce x {len(categories)}   : {enforce_us:9.2f} µs "
        f"({single_enforce_us:.1f} µs per enforce)"
    )
    print(
        f"  ratio                 : {ratio:9.1f}x  (goal >= {GOAL:.0f}x: "
        f"{'met' if ratio >= GOAL else 'NOT met'})"
    )
    print(
        f"  (per-team enforcers   : {small_us:9.2f} µs, {small_us / compiled_us:.1f}x; "
        "casbin holding only the team's rules)"
    )
    print("written to", write_result("policy_decisions", result))


if __name__ == "__main__":
    main()
