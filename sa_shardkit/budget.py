"""A per-process cap on open connections across every shard, and idle pools that shrink to zero.

At 64 shards x (primary + replica) x ``pool_size + max_overflow`` a process could open thousands of
connections. :class:`ConnectionBudget` (``ShardManager(max_connections=...)``) counts every open
DBAPI connection of every engine it is attached to. A pool that needs a new connection while the
budget is spent first closes an idle connection of another shard's pool (so a scatter over more
shards than the budget queues instead of failing), else waits up to the shard's ``pool_timeout``
and raises :class:`~sa_shardkit.errors.ConnectionBudgetError`.

Without a cap the budget still counts connections (``manager.connection_stats()``) and closes
connections idle for ``idle_timeout`` seconds, so a shard the process stopped using holds none.
An idle connection closed early leaves an empty slot in its pool; the next checkout reconnects.

Connections the library keeps checked out between uses (lookup and saga connections, see
:func:`sa_shardkit.lookups.store.take_kept`) are counted like any other, and their keeper is
registered with :meth:`ConnectionBudget.add_keeper`: the reaper and a capped checkout close kept
connections idle as long as pooled ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.util import queue as sqla_queue

from .errors import ConfigError, ConnectionBudgetError

_IDLE_SINCE = "shardkit_idle_since"

Keeper = Callable[[int | None, float], int]
"""``keeper(count, idle_for)``: close up to ``count`` (None: all) of the connections it keeps
checked out that were idle for ``idle_for`` seconds; returns how many it closed."""


@dataclass(frozen=True)
class PoolStats:
    """One engine's connections as the budget sees them."""

    shard_id: str
    role: str
    open: int
    in_use: int

    @property
    def idle(self) -> int:
        return self.open - self.in_use


class ConnectionBudget:
    """Counts the open connections of the engines attached to it, and caps them at ``limit``."""

    def __init__(self, limit: int | None = None, *, idle_timeout: float | None = 60.0) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"max_connections must be an integer >= 1 (or None), got {limit!r}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ConfigError(f"idle_timeout must be > 0 seconds (or None), got {idle_timeout!r}")
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._cond = threading.Condition()
        self._open = 0
        self.peak = 0
        """The most connections open at once so far (the budget's high-water mark)."""
        self._held: dict[int, tuple[str, str]] = {}  # id(dbapi connection) -> (shard, role)
        self._engines: dict[tuple[str, str], Engine] = {}
        self._keepers: tuple[Keeper, ...] = ()
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

    # -- wiring ------------------------------------------------------------------------------------

    def attach(self, shard_id: str, role: str, engine: Engine, wait: float) -> None:
        """Count ``engine``'s connections; a new one waits at most ``wait`` seconds for a slot."""
        if not isinstance(engine.pool, QueuePool):  # SQLite's single-connection pools: nothing to cap
            return
        key = (shard_id, role)
        self._engines = {**self._engines, key: engine}

        @event.listens_for(engine, "do_connect")
        def connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
            self._acquire(shard_id, wait)
            try:
                connection = dialect.connect(*cargs, **cparams)
            except BaseException:
                self._release(None)
                raise
            with self._cond:
                self._held[id(connection)] = key
            self._start_reaper()
            return connection

        @event.listens_for(engine, "checkin")
        def checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            record.info[_IDLE_SINCE] = time.monotonic()
            if self.limit is not None:
                with self._cond:
                    self._cond.notify()  # a waiter may now close this idle connection

        @event.listens_for(engine, "close")
        def close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            self._release(dbapi_connection)

        @event.listens_for(engine, "close_detached")
        def close_detached(dbapi_connection: Any) -> None:
            self._release(dbapi_connection)

    def add_keeper(self, keeper: Keeper) -> None:
        """Have :meth:`close_idle` (the reaper, and a checkout waiting for a slot) also close the
        idle connections ``keeper`` keeps checked out of the attached engines' pools."""
        with self._cond:
            if keeper not in self._keepers:
                self._keepers = (*self._keepers, keeper)
            self._cond.notify()
        self._start_reaper()

    # -- accounting --------------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return self._open

    def stats(self) -> list[PoolStats]:
        """Open and checked-out connections per attached engine, in attach order."""
        with self._cond:
            held = list(self._held.values())
        result = []
        for (shard_id, role), engine in self._engines.items():
            pool = engine.pool
            in_use = pool.checkedout() if isinstance(pool, QueuePool) else 0
            result.append(PoolStats(shard_id, role, held.count((shard_id, role)), in_use))
        return result

    def _acquire(self, shard_id: str, wait: float) -> None:
        if self.limit is None:
            with self._cond:
                self._open += 1
                self.peak = max(self.peak, self._open)
            return
        deadline = time.monotonic() + wait
        while True:
            with self._cond:
                if self._open < self.limit:
                    self._open += 1
                    self.peak = max(self.peak, self._open)
                    return
            if self.close_idle(count=1):
                continue
            with self._cond:
                remaining = deadline - time.monotonic()
                if self._open < self.limit:
                    continue
                if remaining <= 0:
                    raise ConnectionBudgetError(
                        f"shard {shard_id!r}: all {self.limit} connections of this process's budget "
                        f"(max_connections) stayed in use for {wait:g}s; raise max_connections or "
                        "hold fewer connections at once (see README: connection budget)",
                        shard_id=shard_id,
                    )
                self._cond.wait(min(remaining, 0.5))

    def _release(self, dbapi_connection: Any) -> None:
        with self._cond:
            if dbapi_connection is not None:
                if self._held.pop(id(dbapi_connection), None) is None:
                    return  # not one of ours, or already counted as closed
            self._open -= 1
            self._cond.notify()

    # -- shrinking ---------------------------------------------------------------------------------

    def close_idle(self, *, count: int | None = None, idle_for: float = 0.0) -> int:
        """Close up to ``count`` (default: all) connections idle for ``idle_for`` seconds: pooled
        ones first, then those the keepers keep (:meth:`add_keeper`)."""
        closed = self._close_pooled(count, idle_for)
        for keeper in self._keepers:
            if count is not None and closed >= count:
                break
            closed += keeper(None if count is None else count - closed, idle_for)
        return closed

    def _close_pooled(self, count: int | None, idle_for: float) -> int:
        closed = 0
        now = time.monotonic()
        for engine in list(self._engines.values()):
            pool = engine.pool
            if not isinstance(pool, QueuePool):
                continue
            queue = pool._pool  # the pool's idle records; taking one out makes it ours alone
            for _ in range(pool.checkedin()):
                if count is not None and closed >= count:
                    return closed
                try:
                    record = queue.get(False)
                except sqla_queue.Empty:  # taken by a checkout meanwhile
                    break
                try:
                    opened = record.dbapi_connection is not None
                    if opened and now - record.info.get(_IDLE_SINCE, now) >= idle_for:
                        record.close()  # fires "close": the slot is released
                        closed += 1
                finally:
                    put_back_idle(pool, record)
        return closed

    def _start_reaper(self) -> None:
        if self.idle_timeout is None or self._reaper is not None:
            return
        with self._cond:
            if self._reaper is not None:
                return
            self._reaper = threading.Thread(target=self._reap, name="shardkit-idle-reaper", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        assert self.idle_timeout is not None
        period = min(max(self.idle_timeout / 4, 0.05), 5.0)
        while not self._closed.wait(period):
            self.close_idle(idle_for=self.idle_timeout)

    def close(self) -> None:
        """Stop the idle reaper (the manager disposes the engines themselves)."""
        self._closed.set()
        reaper = self._reaper
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(timeout=5)


def put_back_idle(pool: QueuePool, record: ConnectionPoolEntry) -> None:
    """Return a record taken out of the idle queue (an emptied one: the next checkout reconnects)."""
    try:
        pool._pool.put(record, False)
    except sqla_queue.Full:  # a checkin took its place meanwhile: drop it, as QueuePool does
        try:
            record.close()
        finally:
            pool._dec_overflow()
