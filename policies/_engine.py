"""PolicyEngine: the current compiled snapshot, reloads, lookups and explanations.

Invariants:
- The request path (``table``, ``decide``, ``has_any_rule``, ``has_role``,
  ``explain``) only reads ``self._snapshot`` with dict lookups; it never calls
  casbin.  Tests count enforce calls to prove it.
- A snapshot is immutable and replaced by one assignment, so a reader sees
  either the old policy or the new one, never a mix.
- Reloads are serialized by a lock and never install an older version over a
  newer one.  A failed reload (database error, compile mismatch) keeps the
  previous snapshot in force and re-raises.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies._compile import (
    MODEL_PATH,
    NO_POLICY,
    Decision,
    DecisionTable,
    PolicySnapshot,
    compile_snapshot,
    matching_rules,
)
from policies._model import (
    Action,
    PolicyCatalog,
    Rule,
    validate_action,
    validate_category,
    validate_purpose,
    validate_team,
)
from policies._store import PolicyState, PolicyStore
from policies._watcher import PolicyWatcher, create_policy_watcher


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why (team, category, action, purpose) gets its decision."""

    team: str
    category: str
    action: Action
    purpose: str
    decision: Decision
    rule: Rule | None  # the rule that made the decision (None: no rule matched)
    matched: tuple[Rule, ...]  # every rule that matched, allow and deny
    version: int

    @property
    def reason(self) -> str | None:
        return self.decision.reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "team": self.team,
            "category": self.category,
            "action": self.action.value,
            "purpose": self.purpose,
            "decision": self.decision.effect.value,
            "allowed": self.decision.allowed,
            "mask": self.decision.mask.value if self.decision.allowed else None,
            "reason": self.decision.reason,
            "rule": None if self.rule is None else self.rule.as_dict(),
            "matched_rules": [rule.as_dict() for rule in self.matched],
            "policy_version": self.version,
        }


class PolicyEngine:
    """Compiled policy of one database, kept current by ``reload``.

    Build with ``await PolicyEngine.open(store, catalog)``; keep it current with
    a watcher (``engine.watcher()``) and/or by calling ``reload()`` after a
    change committed by this instance.
    """

    def __init__(
        self, store: PolicyStore, catalog: PolicyCatalog, *, model_path: Path = MODEL_PATH
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._model_path = model_path
        self._lock = asyncio.Lock()
        self._snapshot = compile_snapshot(
            PolicyState(version=-1, rules=(), roles=()), catalog, model_path=model_path
        )

    @classmethod
    async def open(
        cls, store: PolicyStore, catalog: PolicyCatalog, *, model_path: Path = MODEL_PATH
    ) -> PolicyEngine:
        engine = cls(store, catalog, model_path=model_path)
        await engine.reload()
        return engine

    @property
    def store(self) -> PolicyStore:
        return self._store

    @property
    def catalog(self) -> PolicyCatalog:
        return self._snapshot.catalog

    @property
    def snapshot(self) -> PolicySnapshot:
        return self._snapshot

    @property
    def version(self) -> int:
        """The policy version of the snapshot in force (-1 before the first load)."""
        return self._snapshot.version

    @property
    def enforcer(self) -> Any:
        """The casbin Enforcer of the current snapshot (compile-time only)."""
        return self._snapshot.enforcer

    # -- reloading (off the request path) ------------------------------------------

    async def reload(self, *, force: bool = False) -> bool:
        """Load and compile the stored policy if its version differs; True if swapped."""
        async with self._lock:
            if not force and await self._store.current_version() == self._snapshot.version:
                return False
            state = await self._store.load()
            if state.version < self._snapshot.version:
                return False  # never go back in time (a stale read racing a newer one)
            return await self._install(state, self._catalog)

    async def set_catalog(self, catalog: PolicyCatalog) -> None:
        """Recompile for a changed catalog (a team, category or purpose was added)."""
        async with self._lock:
            self._catalog = catalog
            await self._install(await self._store.load(), catalog)

    async def _install(self, state: PolicyState, catalog: PolicyCatalog) -> bool:
        snapshot = await asyncio.to_thread(
            compile_snapshot, state, catalog, model_path=self._model_path
        )
        self._snapshot = snapshot  # the atomic swap: one reference assignment
        return True

    def watcher(self, *, dsn: str | None = None, poll_interval: float = 0.25) -> PolicyWatcher:
        """A watcher that reloads this engine on change (LISTEN/NOTIFY on PostgreSQL,
        polling elsewhere); ``dsn`` defaults to the store engine's URL."""
        return create_policy_watcher(self, dsn=dsn, poll_interval=poll_interval)

    # -- the request path: dict lookups only ------------------------------------------

    def table(self, team: str, purpose: str, action: Action | str = Action.READ) -> DecisionTable:
        """The decisions of (team, purpose, action); unknown names get an all-withheld table."""
        snapshot = self._snapshot
        # Action is a StrEnum: "read" and Action.READ are the same dict key.
        table = snapshot.tables.get((team, purpose, action))
        if table is None:
            return DecisionTable(
                team=team,
                purpose=purpose,
                action=validate_action(action),
                version=snapshot.version,
                decisions={},
                has_any_rule=False,
            )
        return table

    def decide(self, team: str, category: str, action: Action | str, purpose: str) -> Decision:
        return self.table(team, purpose, action).decide(category)

    def has_any_rule(self, team: str, purpose: str, action: Action | str | None = None) -> bool:
        """Does any rule (own or inherited, allow or deny) apply to ``team`` for ``purpose``?"""
        actions = list(Action) if action is None else [action]
        return any(self.table(team, purpose, a).has_any_rule for a in actions)

    def has_role(self, team: str, role: str) -> bool:
        """Does ``team`` carry ``role`` (directly or inherited), e.g. ``admin``?"""
        return role in self._snapshot.subjects(team)

    def explain(self, team: str, category: str, action: str, purpose: str) -> Explanation:
        """The decision for one concrete request and the rule that made it.

        Inputs are validated against the catalog (PolicyError kind "invalid").
        """
        snapshot = self._snapshot
        catalog = snapshot.catalog
        team = validate_team(team, catalog)
        category = validate_category(category, catalog, pattern=False)
        act = validate_action(action)
        purpose = validate_purpose(purpose, catalog, pattern=False)
        decision = snapshot.tables.get((team, purpose, act))
        result = NO_POLICY if decision is None else decision.decide(category)
        matched = matching_rules(
            snapshot.rules.values(), snapshot.subjects(team), category, act, purpose
        )
        rule = None if result.rule_id is None else snapshot.rules.get(result.rule_id)
        return Explanation(
            team=team,
            category=category,
            action=act,
            purpose=purpose,
            decision=result,
            rule=rule,
            matched=tuple(matched),
            version=snapshot.version,
        )
