"""Story Vault policies: who may read or write which data category for which purpose.

A plain library (no web framework, no global settings): give it an SQLAlchemy
AsyncEngine, the catalog of known names and, for masks, a pseudonym key.

- PolicyStore: rules and role assignments as rows (``policy_rule``,
  ``policy_role``) with a version counter (``policy_version``) bumped in the
  same transaction as every change.
- PolicyEngine: compiles the stored policy (casbin model ``model.conf``) into
  immutable DecisionTables per (team, purpose, action); lookups are dict reads.
- PolicyWatcher: reloads engines when the version changes (PostgreSQL
  LISTEN/NOTIFY, or polling).
- apply_mask: partial / hash / redact / year_only on strings and JSON values.
"""

from policies._compile import (
    MODEL_PATH,
    NO_POLICY,
    REASON_DENIED,
    REASON_NO_POLICY,
    Decision,
    DecisionEffect,
    DecisionTable,
    PolicySnapshot,
    build_enforcer,
    compile_snapshot,
)
from policies._engine import Explanation, PolicyEngine
from policies._errors import (
    DuplicateRuleError,
    InvalidRoleError,
    InvalidRuleError,
    PolicyCompileError,
    PolicyError,
    RuleNotFoundError,
    UnknownCategoryError,
    UnknownPurposeError,
    UnknownTeamError,
)
from policies._masks import JsonValue, apply_mask, pseudonym
from policies._model import (
    WILDCARD,
    Action,
    Effect,
    Mask,
    PolicyCatalog,
    Rule,
    RuleSpec,
    category_matches,
    most_restrictive,
)
from policies._store import POLICY_CHANNEL, PolicyState, PolicyStore
from policies._tables import POLICY_TABLES, PolicyRoleRow, PolicyRuleRow, PolicyVersionRow
from policies._watcher import (
    PolicyWatcher,
    PollingPolicyWatcher,
    PostgresPolicyWatcher,
    create_policy_watcher,
)

__all__ = [
    "MODEL_PATH",
    "NO_POLICY",
    "POLICY_CHANNEL",
    "POLICY_TABLES",
    "REASON_DENIED",
    "REASON_NO_POLICY",
    "WILDCARD",
    "Action",
    "Decision",
    "DecisionEffect",
    "DecisionTable",
    "DuplicateRuleError",
    "Effect",
    "Explanation",
    "InvalidRoleError",
    "InvalidRuleError",
    "JsonValue",
    "Mask",
    "PolicyCatalog",
    "PolicyCompileError",
    "PolicyEngine",
    "PolicyError",
    "PolicyRoleRow",
    "PolicyRuleRow",
    "PolicySnapshot",
    "PolicyState",
    "PolicyStore",
    "PolicyVersionRow",
    "PolicyWatcher",
    "PollingPolicyWatcher",
    "PostgresPolicyWatcher",
    "Rule",
    "RuleNotFoundError",
    "RuleSpec",
    "UnknownCategoryError",
    "UnknownPurposeError",
    "UnknownTeamError",
    "apply_mask",
    "build_enforcer",
    "category_matches",
    "compile_snapshot",
    "create_policy_watcher",
    "most_restrictive",
    "pseudonym",
]
