"""Cross-instance policy sync: tell every engine when the policy version changed.

A watcher calls an async ``on_change`` callback (normally ``engine.reload``);
the engine itself compares versions, so a spurious call costs one small query.

- PostgresPolicyWatcher: LISTEN on the channel PolicyStore notifies in the
  version-bump transaction, over a dedicated asyncpg connection (a pooled
  connection would lose its LISTEN when returned).  After every (re)connect it
  calls ``on_change`` once, since notifications sent while disconnected are
  lost; a slow safety poll (``safety_interval``) covers anything else.
- PollingPolicyWatcher: reads the version row every ``interval`` seconds
  (SQLite, or any database without LISTEN).

Both call ``on_change`` once right after ``start`` (a change committed between
the engine's load and the watcher's start is not missed), never run two
callbacks at once, and log (never propagate) callback errors: the previous
policy stays in force and the next change or poll retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.engine import make_url

from policies._store import POLICY_CHANNEL, PolicyStore

if TYPE_CHECKING:
    from policies._engine import PolicyEngine

logger = logging.getLogger("storyvault.policies.watcher")

OnPolicyChange = Callable[[], Awaitable[object]]


class PolicyWatcher(ABC):
    """Runs in the background between ``start()`` and ``stop()`` (or ``async with``)."""

    def __init__(self, on_change: OnPolicyChange) -> None:
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=type(self).__name__)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def __aenter__(self) -> PolicyWatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _notify(self) -> None:
        try:
            await self._on_change()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("policy reload failed; the previous policy stays in force")

    @abstractmethod
    async def _run(self) -> None: ...


class PollingPolicyWatcher(PolicyWatcher):
    """Compares the stored policy version every ``interval`` seconds."""

    def __init__(
        self, store: PolicyStore, on_change: OnPolicyChange, *, interval: float = 0.25
    ) -> None:
        super().__init__(on_change)
        self._store = store
        self._interval = interval

    async def _version(self) -> int | None:
        try:
            return await self._store.current_version()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("policy version poll failed", exc_info=True)
            return None

    async def _run(self) -> None:
        # Read the baseline before the first reload: a change committed after it
        # is either seen by that reload or differs from the baseline at the next poll.
        seen = await self._version()
        await self._notify()
        while True:
            await asyncio.sleep(self._interval)
            version = await self._version()
            if version is not None and version != seen:
                seen = version
                await self._notify()


def asyncpg_dsn(url: str) -> str:
    """A libpq-style DSN for asyncpg from a SQLAlchemy URL (drops ``+asyncpg``)."""
    parsed = make_url(url)
    if parsed.drivername.startswith("postgresql"):
        parsed = parsed.set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class PostgresPolicyWatcher(PolicyWatcher):
    """LISTEN/NOTIFY on ``channel`` over a dedicated asyncpg connection to ``dsn``."""

    def __init__(
        self,
        dsn: str,
        on_change: OnPolicyChange,
        *,
        channel: str = POLICY_CHANNEL,
        reconnect_delay: float = 1.0,
        safety_interval: float = 30.0,
    ) -> None:
        super().__init__(on_change)
        self._dsn = asyncpg_dsn(dsn)
        self._channel = channel
        self._reconnect_delay = reconnect_delay
        self._safety_interval = safety_interval
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()  # set while LISTEN is active (tests wait on it)

    def _on_notify(self, *_args: Any) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            conn: Any = None
            lost = asyncio.Event()

            def on_lost(_conn: Any, lost: asyncio.Event = lost) -> None:
                lost.set()
                self._wake.set()

            try:
                conn = await asyncpg.connect(self._dsn)
                conn.add_termination_listener(on_lost)
                await conn.add_listener(self._channel, self._on_notify)
                self.connected.set()
                self._wake.set()  # catch up on anything missed while not listening
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=self._safety_interval)
                    self._wake.clear()
                    if not lost.is_set():
                        await self._notify()
            except asyncio.CancelledError:
                raise
            except Exception:  # connection refused, server restart, ...
                logger.warning("policy listener disconnected; reconnecting", exc_info=True)
            finally:
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(self._reconnect_delay)


def create_policy_watcher(
    engine: PolicyEngine, *, dsn: str | None = None, poll_interval: float = 0.25
) -> PolicyWatcher:
    """The right watcher for ``engine``'s database, wired to ``engine.reload``."""
    store = engine.store
    url = store.engine.url
    if dsn is not None or url.get_backend_name() == "postgresql":
        target = dsn if dsn is not None else url.render_as_string(hide_password=False)
        return PostgresPolicyWatcher(target, engine.reload, channel=store.channel)
    return PollingPolicyWatcher(store, engine.reload, interval=poll_interval)
