"""Query events for metrics: every statement a shard (or replica) runs, with its duration.

A listener is any callable taking a :class:`QueryEvent` (the :class:`QueryListener` protocol), so a
plain function is a valid hook::

    manager.events.add(lambda e: histogram.labels(e.shard_id, e.role).observe(e.duration))

    metrics = QueryMetrics()            # a ready-made listener: count and latency per shard
    manager.events.add(metrics)
    metrics.snapshot()["shard-1", "primary"].count

The engine listeners (``before_cursor_execute`` / ``after_cursor_execute`` / ``handle_error``) are
installed only when the first listener is added, so a manager without listeners pays nothing.
Listeners run in the thread that ran the statement (scatter threads included) and must be quick; an
exception from a listener is logged, never raised into the query.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext

from .replicas import INTERNAL

log = logging.getLogger("sa_shardkit.events")

_STARTED = "shardkit_started"
SHARD_COUNT = "shardkit_shard_count"
"""Execution option the sharded session sets on a statement it runs on several shards."""


@dataclass(frozen=True)
class QueryEvent:
    """One statement run on one server."""

    shard_id: str
    role: str
    """``"primary"`` or ``"replica"``."""
    statement: str
    duration: float
    """Seconds from sending the statement to its cursor result (not counting row fetching)."""
    error: BaseException | None = None
    shard_count: int = 1
    """Shards the session statement this execution belongs to ran on: > 1 for a multi-shard
    statement (a scatter, or DML on several shards); each of its shards reports one event."""

    @property
    def multi_shard(self) -> bool:
        return self.shard_count > 1


class QueryListener(Protocol):
    def __call__(self, event: QueryEvent, /) -> None: ...


EngineSource = Callable[[], Iterable[tuple[str, str, Engine]]]
"""Returns the manager's current ``(shard_id, role, engine)`` triples."""


class QueryEvents:
    """The listeners of one :class:`~sa_shardkit.manager.ShardManager` (``manager.events``)."""

    def __init__(self, engines: EngineSource) -> None:
        self._sources: tuple[EngineSource, ...] = (engines,)
        self._listeners: tuple[QueryListener, ...] = ()
        self._attached: set[int] = set()
        self._lock = threading.Lock()

    def add(self, listener: QueryListener) -> None:
        """Call ``listener`` after every statement on every shard and replica of the manager."""
        with self._lock:
            self._listeners = (*self._listeners, listener)
        self.attach_new_engines()

    def remove(self, listener: QueryListener) -> None:
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x != listener)  # bound methods: ==

    def include(self, engines: EngineSource) -> None:
        """Report the statements of more engines too (``AsyncShardManager`` adds its async engines)."""
        with self._lock:
            self._sources = (*self._sources, engines)
        self.attach_new_engines()

    def exclude(self, engines: EngineSource) -> None:
        """Forget a source given to :meth:`include` (its engines were disposed)."""
        with self._lock:
            self._sources = tuple(s for s in self._sources if s != engines)

    def attach_new_engines(self) -> None:
        """Install the engine hooks on engines added since (``ShardManager.add_shard`` calls this)."""
        if not self._listeners:
            return
        with self._lock:
            for shard_id, role, engine in (e for source in self._sources for e in source()):
                if id(engine) not in self._attached:
                    self._attach(engine, shard_id, role)
                    self._attached.add(id(engine))

    def _attach(self, engine: Engine, shard_id: str, role: str) -> None:
        def before(
            conn: Connection, cursor: Any, statement: str, params: Any, context: Any, *args: Any
        ) -> None:
            if not conn.get_execution_options().get(INTERNAL):
                conn.info[_STARTED] = time.perf_counter()

        def after(
            conn: Connection, cursor: Any, statement: str, params: Any, context: Any, *args: Any
        ) -> None:
            started = conn.info.pop(_STARTED, None)
            if started is not None:
                count = _shard_count(context)
                self._emit(QueryEvent(shard_id, role, statement, time.perf_counter() - started, None, count))

        def failed(context: ExceptionContext) -> None:
            conn = context.connection
            started = conn.info.pop(_STARTED, None) if conn is not None else None
            if started is not None:
                duration = time.perf_counter() - started
                statement = context.statement or ""
                count = _shard_count(context.execution_context)
                self._emit(QueryEvent(shard_id, role, statement, duration, context.original_exception, count))

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        event.listen(engine, "handle_error", failed)

    def _emit(self, query: QueryEvent) -> None:
        for listener in self._listeners:
            try:
                listener(query)
            except Exception:  # a broken metrics hook must not break the application's query
                log.exception("query listener %r failed", listener)


def _shard_count(context: Any) -> int:
    options = getattr(context, "execution_options", None)
    return int(options.get(SHARD_COUNT, 1)) if options is not None else 1


@dataclass(frozen=True)
class QueryStats:
    """Totals for one ``(shard_id, role)``."""

    count: int = 0
    errors: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0
    multi_shard: int = 0
    """Of ``count``: statements that were one shard's part of a multi-shard statement."""

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.count if self.count else 0.0


class QueryMetrics:
    """A ready-made listener: query count, errors and latency per ``(shard_id, role)``; thread-safe."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], QueryStats] = {}
        self._lock = threading.Lock()

    def __call__(self, query: QueryEvent, /) -> None:
        key = (query.shard_id, query.role)
        with self._lock:
            old = self._stats.get(key, QueryStats())
            self._stats[key] = QueryStats(
                old.count + 1,
                old.errors + (query.error is not None),
                old.total_seconds + query.duration,
                max(old.max_seconds, query.duration),
                old.multi_shard + query.multi_shard,
            )

    def snapshot(self) -> dict[tuple[str, str], QueryStats]:
        """A copy of the totals so far."""
        with self._lock:
            return dict(self._stats)

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()
