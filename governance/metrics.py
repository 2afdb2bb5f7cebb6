"""Prometheus metrics of the core (request metrics come from the HTTP edge).

Served at ``/metrics`` from prometheus_client's default registry. Labels carry
reason codes, event types and operation names only — never an id or a value.

- ``storyvault_decisions_total{action, reason}``: one per category decided by the
  gate; ``reason`` is ``disclosed`` (read) / ``allowed`` (write) or the reason code
  of the withholding (``no_policy``, ``no_consent``, ``erased``, …).
- ``storyvault_audit_batch_size`` / ``storyvault_audit_batch_seconds``: entries per
  group commit and the commit's latency; ``storyvault_audit_batch_failures_total``.
- ``storyvault_pg_lookup_batch_size``: on PostgreSQL, gated reads whose lookups went
  to the server as one statement, per statement.
- ``storyvault_consent_events_total{event_type}``: consent ledger events recorded.
- ``storyvault_key_cache_hits_total`` / ``storyvault_key_cache_misses_total``: the
  unwrapped data-key cache of every live StoryVault in the process.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from audit import AppendResult, AuditEntry, BatchLog, EncodedEntry

if TYPE_CHECKING:
    from governance.datakeys import DataKeys
    from governance.vault import StoryCache

__all__ = [
    "AUDIT_BATCH_FAILURES",
    "AUDIT_BATCH_SECONDS",
    "AUDIT_BATCH_SIZE",
    "AUDIT_BATCH_WAYS",
    "CONSENT_EVENTS",
    "DECISIONS",
    "PG_LOOKUP_BATCH_SIZE",
    "SQLITE_CHECKPOINT_HOLD",
    "SQLITE_COMMITS",
    "MeasuredBatchLog",
    "count_decisions",
    "watch_key_cache",
    "watch_story_cache",
]

DECISIONS = Counter(
    "storyvault_decisions_total",
    "Gate decisions per category: disclosed/allowed, or the reason code it was withheld for",
    ["action", "reason"],
)
AUDIT_BATCH_SIZE = Histogram(
    "storyvault_audit_batch_size",
    "Audit entries per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
AUDIT_BATCH_SECONDS = Histogram(
    "storyvault_audit_batch_seconds",
    "Latency of one audit group commit (append, tree update, signed head, commit)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
AUDIT_BATCH_FAILURES = Counter(
    "storyvault_audit_batch_failures_total", "Audit group commits that failed (fail closed)"
)
AUDIT_BATCH_WAYS = Counter(
    "storyvault_audit_batches_total",
    "Audit group commits on PostgreSQL by how they were written: alone (one call that "
    "takes the log's lock itself and extends the log's newest state as this process "
    "last saw it), locked (in a transaction under the log's lock, after three "
    "refusals), alone_refused (each lone call that found another writer's batch, wrote "
    "nothing and brought back the newest state; the batch then tried again)",
    ["way"],
)
SQLITE_COMMITS = Counter(
    "storyvault_sqlite_commits_total",
    "Commits of the event loop's own SQLite writer (the audit group commit) by where "
    "they ran: in_place (on the loop, while commits average under a millisecond) or "
    "thread (in a worker thread, on a slower disk)",
    ["where"],
)
PG_LOOKUP_BATCH_SIZE = Histogram(
    "storyvault_pg_lookup_batch_size",
    "PostgreSQL: gated reads whose key, customer and consent lookups went to the server "
    "together, per statement (reads that wait for their lookups at the same time)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
SQLITE_CHECKPOINT_HOLD = Histogram(
    "storyvault_sqlite_checkpoint_hold_seconds",
    "How long the SQLite checkpointer held this process's writers back, each time, to "
    "copy the last of the write-ahead log so that it starts over (every request waiting "
    "on the audit group commit waits this out)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
CONSENT_EVENTS = Counter(
    "storyvault_consent_events_total", "Consent ledger events recorded", ["event_type"]
)


_DECISION_SERIES: dict[tuple[str, str], Any] = {}
"""``DECISIONS`` children by (action, reason): ``labels()`` costs more than ``inc()``,
and a gated read counts several reasons. Both are closed sets (actions, reason codes)."""


def _decisions(action: str, reason: str) -> Any:
    series = _DECISION_SERIES.get((action, reason))
    if series is None:
        series = _DECISION_SERIES[(action, reason)] = DECISIONS.labels(action=action, reason=reason)
    return series


def count_decisions(action: str, outcome: str, count: int = 1) -> None:
    if count > 0:
        _decisions(action, outcome).inc(count)


def count_withheld(action: str, withheld: Iterable[tuple[str, str]]) -> None:
    for _, reason in withheld:
        _decisions(action, reason).inc()


class MeasuredBatchLog:
    """The audit writer's log, measured: batch size and commit latency per append."""

    def __init__(self, log: BatchLog) -> None:
        self._log = log

    async def append(self, batch: Sequence[AuditEntry | EncodedEntry]) -> AppendResult:
        start = time.perf_counter()
        try:
            result = await self._log.append(batch)
        except BaseException:
            AUDIT_BATCH_FAILURES.inc()
            raise
        AUDIT_BATCH_SECONDS.observe(time.perf_counter() - start)
        AUDIT_BATCH_SIZE.observe(len(batch))
        return result


class _CacheCollector(Collector):
    """Reads the hit/miss counts of every live cache of one kind when scraped."""

    def __init__(self, prefix: str, hits_help: str, misses_help: str) -> None:
        self.caches: weakref.WeakSet[DataKeys | StoryCache] = weakref.WeakSet()
        self._prefix = prefix
        self._help = (hits_help, misses_help)

    def collect(self) -> Iterator[CounterMetricFamily]:
        caches = list(self.caches)
        hits = CounterMetricFamily(f"{self._prefix}_hits", self._help[0])
        hits.add_metric([], float(sum(c.hits for c in caches)))
        misses = CounterMetricFamily(f"{self._prefix}_misses", self._help[1])
        misses.add_metric([], float(sum(c.misses for c in caches)))
        yield hits
        yield misses


_KEY_CACHE = _CacheCollector(
    "storyvault_key_cache",
    "Data-key lookups served from the in-memory cache",
    "Data-key lookups that had to unwrap from the key store",
)
_STORY_CACHE = _CacheCollector(
    "storyvault_story_cache",
    "Gated reads whose story came from the story cache (story unchanged)",
    "Gated reads that loaded the story's sealed rows from the database",
)
REGISTRY.register(_KEY_CACHE)
REGISTRY.register(_STORY_CACHE)


def watch_key_cache(keys: DataKeys) -> None:
    """Include ``keys``' cache counts in ``/metrics`` for as long as it lives."""
    _KEY_CACHE.caches.add(keys)


def watch_story_cache(cache: StoryCache) -> None:
    """Include the story cache's counts in ``/metrics`` for as long as it lives."""
    _STORY_CACHE.caches.add(cache)
