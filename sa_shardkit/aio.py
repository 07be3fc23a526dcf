"""asyncio: SQLAlchemy's ``AsyncSession`` over the sharded session, with psycopg's async driver.

``AsyncShardManager(manager)`` opens one ``AsyncEngine`` per shard, on that shard's first use, from
the same configuration; the routing stays the manager's (the ring and the models' shard keys), so sync and async code agree on
where every row lives::

    shards = AsyncShardManager(manager)
    Session = shards.sessionmaker()
    async with Session() as session, session.begin():
        session.add(Customer(customer_id=42, name="Ada"))          # -> the ring's shard for 42
    async with Session() as session:
        total = await session.scalar(select(func.count()).select_from(Customer))  # every shard at once

A SELECT that targets several shards fans out on the event loop (one greenlet per shard, awaited
together), with the same global merge (ORDER BY, LIMIT, aggregates) as the sync session.
:meth:`AsyncShardManager.query_all_shards` is the session-less form, and
:meth:`AsyncShardManager.transaction` the fenced Core transaction by key.

Shard faults are named as in the sync session: a keyed get, select, flush or commit on a shard that
is down, frozen or rejects the password raises :class:`~sa_shardkit.ShardUnavailableError` naming
it, a new connection is bounded by ``connect_timeout`` and a statement by ``query_timeout``
(:func:`sa_shardkit.faults.guard` on each async engine's sync side).

Shards with a ``replica_url`` get an async replica engine too, and async sessions route reads
like the sync session (:mod:`sa_shardkit.replica_reads`): outside a transaction that used the
primary, without ``use_primary``/``primary_reads()``/``FOR UPDATE``, to a usable replica. Usable is
the manager's verdict (:mod:`sa_shardkit.replicas`); a due measurement runs in a worker thread, so
it never blocks the event loop. Query listeners (``manager.events``) see the async engines as well.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine, Result
from sqlalchemy.engine.url import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql import Executable
from sqlalchemy.sql.selectable import Select
from sqlalchemy.util.concurrency import await_only, in_greenlet

from .config import ShardConfig
from .errors import StaleRingError
from .faults import guard, unavailable
from .manager import ShardManager, require_shards
from .placement import MAX_REROUTES
from .ring import ShardKey
from .scatter.fanout import raise_for_errors
from .scatter.gather import gather
from .scatter.plan import AggregatePlan, ScatterPlan, plan_scatter
from .scatter.result import ScatterResult
from .session import BindFactory, ShardedSession


def _async_engine(config: ShardConfig, url: URL) -> AsyncEngine:
    options: dict[str, Any] = dict(config.engine_options)
    connect_args = dict(options.pop("connect_args", {}))
    connect_args.setdefault("connect_timeout", max(1, round(config.connect_timeout)))
    options.setdefault("pool_size", config.pool_size)
    options.setdefault("max_overflow", config.max_overflow)
    options.setdefault("pool_timeout", config.pool_timeout)
    options.setdefault("pool_recycle", config.pool_recycle)
    options.setdefault("pool_pre_ping", config.pool_pre_ping)
    engine = create_async_engine(url, connect_args=connect_args, **options)
    # the sync side is where SQLAlchemy runs the driver calls: named faults and the watchdog there
    guard(
        engine.sync_engine,
        config.id,
        connect_timeout=config.connect_timeout,
        query_timeout=config.query_timeout,
    )
    return engine


class AsyncShardManager:
    """Async engines for the shards of a :class:`ShardManager`, which keeps routing.

    Like the manager's, each shard's engines (and pools) are created on that shard's first use:
    an async process that touches 2 of 64 shards holds no engine or connection for the other 62.
    """

    def __init__(self, manager: ShardManager) -> None:
        self.manager = manager
        self._lock = threading.Lock()
        # created on a shard's first use, copy-on-write under _lock (iterating threads see a snapshot)
        self._engines: dict[str, AsyncEngine] = {}
        self._replicas: dict[str, AsyncEngine] = {}
        manager.events.include(self._sync_engines)

    def _sync_engines(self) -> list[tuple[str, str, Engine]]:
        """``(shard_id, role, engine)`` for the query listeners: they hook the sync side of each."""
        primaries = [(s, "primary", e.sync_engine) for s, e in self._engines.items()]
        return primaries + [(s, "replica", e.sync_engine) for s, e in self._replicas.items()]

    def _created(self, shard_id: str, role: str) -> AsyncEngine:
        """The shard's async engine for ``role``, created now if it was not yet."""
        config = self.manager.config(shard_id)
        with self._lock:
            engines = self._engines if role == "primary" else self._replicas
            engine = engines.get(shard_id)
            if engine is None:
                url = config.primary_url if role == "primary" else config.replica
                assert url is not None
                engine = _async_engine(config, url)
                if role == "primary":
                    self._engines = {**self._engines, shard_id: engine}
                else:
                    self._replicas = {**self._replicas, shard_id: engine}
        self.manager.events.attach_new_engines()
        return engine

    def engine(self, shard_id: str) -> AsyncEngine:
        """The shard's primary as an ``AsyncEngine``, created on first use (:class:`UnknownShardError`
        for a bad id)."""
        engine = self._engines.get(shard_id)
        return engine if engine is not None else self._created(shard_id, "primary")

    def replica_engine(self, shard_id: str) -> AsyncEngine | None:
        """The shard's replica as an ``AsyncEngine`` (created on first use), None when it has none."""
        replica = self._replicas.get(shard_id)
        if replica is not None:
            return replica
        return None if self.manager.config(shard_id).replica is None else self._created(shard_id, "replica")

    @property
    def engines(self) -> Mapping[str, AsyncEngine]:
        """Primary async engine per shard id: looking one up creates it if needed (iterating the ids
        creates none; ``values()``/``items()`` create every shard's)."""
        return _AsyncEngines(self)

    def created_engines(self) -> dict[str, AsyncEngine]:
        """The primary async engines created so far, by shard id (a copy; creates none)."""
        return dict(self._engines)

    def usable_replica(self, shard_id: str) -> Engine | None:
        """The sync side of the shard's async replica while the manager calls it usable, else None.

        Called by the session inside SQLAlchemy's greenlet: a measurement that is due runs in a
        worker thread (awaited), so a dead replica's connect timeout never stalls the event loop.
        """
        replica = self.replica_engine(shard_id)
        if replica is None:
            return None
        router = self.manager.replicas
        status = router.cached_status(shard_id)
        if status is None:
            if in_greenlet():
                status = await_only(asyncio.to_thread(router.status, shard_id))
            else:
                status = router.status(shard_id)
        return replica.sync_engine if status.usable else None

    def sessionmaker(self, **kw: Any) -> async_sessionmaker[AsyncSession]:
        """An ``async_sessionmaker`` whose sessions route like ``ShardedSession(manager=...)``.

        Keyword arguments go to the sharded session (``allow_cross_shard``, ``shard_id``, ...) and
        to ``AsyncSession`` (``expire_on_commit``, ...).
        """
        shards = BindFactory(self._sync_side)  # each shard's engine created on the session's first use
        kw.setdefault("expire_on_commit", False)  # attribute access after commit cannot await
        return async_sessionmaker(
            sync_session_class=ShardedSession,
            manager=self.manager,
            shards=shards,
            choose_replica=self.usable_replica,
            **kw,
        )

    def _sync_side(self, shard_id: str) -> Engine:
        return self.engine(shard_id).sync_engine

    @asynccontextmanager
    async def transaction(self, key: ShardKey) -> AsyncIterator[AsyncConnection]:
        """``async with shards.transaction(key) as conn:`` a Core transaction on ``key``'s shard.

        The same routing and fence as :meth:`ShardManager.transaction`: the key's shard by the
        stored ring, the rebalance fence taken in the transaction before the block runs (a key that
        moved meanwhile is routed again first; the block runs once); commits when the block ends,
        rolls back on error. A raw ``engine(shard_id).connect()`` bypasses routing and the fence.
        """
        placement = self.manager.placement
        for _ in range(MAX_REROUTES):
            shard_id = (await asyncio.to_thread(placement.shards_for_key, key, write=True))[0]
            async with self.engine(shard_id).connect() as conn:
                await conn.begin()
                try:
                    await conn.run_sync(placement.fence_write, shard_id, key)
                except StaleRingError:
                    await conn.rollback()
                    continue
                yield conn
                await conn.commit()
                return
        raise StaleRingError(f"could not find a stable shard for key {key!r}; retry")

    async def query_all_shards(
        self,
        statement: str | Executable,
        params: Mapping[str, Any] | None = None,
        *,
        shard_ids: Iterable[str] | None = None,
        with_shard_id: bool = False,
        allow_partial: bool = False,
    ) -> ScatterResult:
        """Every shard at once on the event loop, merged like ``ShardManager.query_all_shards``.

        While a move is in flight (every shard, ``shard_ids=None``), it runs as the sync one does,
        in a worker thread: each shard's not-yet-cut-over copies hidden, SQL text that reads a
        sharded table refused (:mod:`sa_shardkit.scatter.ownership`)."""
        manager = self.manager
        unlisted: dict[str, BaseException] = {}
        if shard_ids is None:  # the stored ring's shards (the first read of it off the event loop)
            await asyncio.to_thread(manager.placement.maybe_refresh)
            await asyncio.to_thread(manager.placement.ensure_current)
            if manager.placement.state.target is not None:
                return await asyncio.to_thread(
                    manager.query_all_shards,
                    statement,
                    params,
                    with_shard_id=with_shard_id,
                    allow_partial=allow_partial,
                )
            targets = list(manager.placement.scatter_shards())
            unlisted = {s: manager.placement.unlisted(s) for s in targets if not manager.has_shard(s)}
        else:
            targets = require_shards(manager, shard_ids)
        plan: ScatterPlan | None = None
        if isinstance(statement, str):
            statement = text(statement)
        elif isinstance(statement, Select):
            plan = plan_scatter(statement)
            if with_shard_id and isinstance(plan, AggregatePlan):
                from .scatter.analysis import unsupported

                raise unsupported("with_shard_id=True on an aggregate query, whose rows combine shards")
        shard_statement = statement if plan is None else plan.statement

        async def run(shard_id: str) -> Result[Any]:
            async with self.engine(shard_id).connect() as conn:
                result = await conn.execute(shard_statement, dict(params or {}))
                frozen = result.freeze()
                await conn.commit()
                return frozen()

        reachable = [s for s in targets if s not in unlisted]
        answers = await asyncio.gather(*(run(s) for s in reachable), return_exceptions=True)
        results: dict[str, Result[Any]] = {}
        errors: dict[str, BaseException] = dict(unlisted)
        for shard_id, answer in zip(reachable, answers, strict=True):
            if isinstance(answer, Exception):
                errors[shard_id] = answer
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results[shard_id] = answer
        raise_for_errors(
            errors,
            allow_partial=allow_partial,
            any_result=bool(results),
            describe=lambda shard, error: unavailable(shard, manager.safe_url(shard), error),
        )
        return gather(plan, results, targets, errors, with_shard_id=with_shard_id)

    async def dispose(self) -> None:
        """Close every pooled async connection (the sync manager is left to its owner)."""
        self.manager.events.exclude(self._sync_engines)
        engines = [*self._engines.values(), *self._replicas.values()]
        await asyncio.gather(*(engine.dispose() for engine in engines))

    async def __aenter__(self) -> AsyncShardManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.dispose()


class _AsyncEngines(Mapping[str, AsyncEngine]):
    """``AsyncShardManager.engines``: the configured shard ids, each one's engine created when looked up."""

    __slots__ = ("_shards",)

    def __init__(self, shards: AsyncShardManager) -> None:
        self._shards = shards

    def __getitem__(self, shard_id: str) -> AsyncEngine:
        if not self._shards.manager.has_shard(shard_id):
            raise KeyError(shard_id)
        return self._shards.engine(shard_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shards.manager.shard_ids)

    def __len__(self) -> int:
        return len(self._shards.manager.shard_ids)

    def __contains__(self, shard_id: object) -> bool:
        return isinstance(shard_id, str) and self._shards.manager.has_shard(shard_id)
