"""The application's one owner of shard connections and routing: engines, pools, replicas, the
ring the shards store (followed by itself, :mod:`sa_shardkit.placement`), health, shutdown.

Module order (imports go one way): ring -> ring_state -> placement -> routing -> scatter ->
session -> manager -> aio / saga / rebalance / CLI. The modules below the manager take it as an
argument and never import it at run time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .budget import ConnectionBudget, PoolStats
from .config import ShardConfig, ShardSettings, settings_from_env, settings_from_file
from .errors import ConfigError, DuplicateShardError, UnknownShardError
from .events import QueryEvents
from .faults import guard, unavailable
from .fused_write import install as install_fused_write
from .multiplex import make_cooperative
from .placement import REFRESH_SECONDS, Placement
from .replicas import ReplicaRouter
from .ring import HashRing, ShardKey
from .routing import route_statement
from .scatter.connected import fan_out_connected
from .scatter.core import query_all_shards
from .scatter.fanout import raise_for_errors
from .scatter.lean import Answer, LeanStatement, as_result
from .sessionmaker import ShardedSessionmaker, sessionmaker_for

if TYPE_CHECKING:
    from sqlalchemy.sql import Executable

    from .scatter.result import ScatterResult
    from .sequences import SequenceAllocator

log = logging.getLogger("sa_shardkit.manager")

T = TypeVar("T")


@dataclass(frozen=True)
class ShardHealth:
    """One shard's answer to a health check."""

    shard_id: str
    reachable: bool
    latency_ms: float | None
    error: str | None = None
    role: str = "primary"


def _engine_for(config: ShardConfig, url: Any) -> Engine:
    options: dict[str, Any] = dict(config.engine_options)
    backend = url.get_backend_name()
    if backend == "sqlite":
        options.setdefault("connect_args", {})
    else:
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("connect_timeout", max(1, round(config.connect_timeout)))
        if config.pgbouncer and url is not config.direct_url:
            # transaction pooling hands each transaction any server connection: a statement
            # prepared on one is missing (or another one) on the next
            connect_args.setdefault("prepare_threshold", None)
        options["connect_args"] = connect_args
        options.setdefault("pool_size", config.pool_size)
        options.setdefault("max_overflow", config.max_overflow)
        options.setdefault("pool_timeout", config.pool_timeout)
    options.setdefault("pool_recycle", config.pool_recycle)
    options.setdefault("pool_pre_ping", config.pool_pre_ping)
    engine = create_engine(url, **options)
    make_cooperative(engine)  # its waits for the server can share one thread in a fan-out
    guard(engine, config.id, connect_timeout=config.connect_timeout, query_timeout=config.query_timeout)
    return install_fused_write(engine)  # outside guard's bound: the statement it runs stays bounded


class ShardManager:
    """Owns one engine (and pool) per shard and replica, and the routing of keys to shards.

    Routing follows the ring the shards store (``manager.placement``, no set-up needed): read on
    first use, re-read at most every ``refresh_seconds`` and after a keyed read found nothing.
    Without a stored ring it is the configured ring (``ring=``, or one built from the shards).
    ``max_connections`` caps the connections this process opens across every shard and replica;
    connections idle for ``idle_timeout`` seconds are closed (:mod:`sa_shardkit.budget`).
    """

    def __init__(
        self,
        shards: ShardSettings | Iterable[ShardConfig],
        *,
        ring: HashRing | None = None,
        vnodes: int | None = None,
        max_connections: int | None = None,
        idle_timeout: float | None = 60.0,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self.budget = ConnectionBudget(max_connections, idle_timeout=idle_timeout)
        """The per-process connection cap and idle-connection reaper (:mod:`sa_shardkit.budget`)."""
        settings = shards if isinstance(shards, ShardSettings) else ShardSettings(tuple(shards))
        if vnodes is not None:
            settings = ShardSettings(settings.shards, vnodes=vnodes)
        self.settings = settings
        self._configs: dict[str, ShardConfig] = {c.id: c for c in settings.shards}
        self.has_replicas: bool = any(c.replica is not None for c in settings.shards)
        """Whether any configured shard has a replica (kept up to date; read on every read, so an
        attribute, not a property)."""
        self._lock = threading.Lock()
        # engines (and their pools) are created on a shard's first use, copy-on-write under _lock:
        # a process that never touches a shard holds no engine, pool or connection for it
        self._engines: dict[str, Engine] = {}
        self._replicas: dict[str, Engine] = {}
        self._direct: dict[str, Engine] = {}  # direct_url engines
        self.events = QueryEvents(self._all_engines)
        """Query listeners for metrics (:mod:`sa_shardkit.events`): ``manager.events.add(fn)``."""
        if ring is None:
            ring = HashRing(
                self._configs, vnodes=settings.vnodes, weights={c.id: c.weight for c in settings.shards}
            )
        self._check_ring(ring)
        self.placement = Placement(self, ring, refresh_seconds=refresh_seconds)
        """Where keys live now: the stored ring, followed as it changes (:mod:`sa_shardkit.placement`)."""
        self.replicas = ReplicaRouter(
            lambda shard_id: self.replica_engine(shard_id) if self.has_shard(shard_id) else None,
            lambda shard_id: self.config(shard_id).max_replica_lag,
        )
        """Decides per shard whether reads may use the replica (lag and reachability checks)."""
        self._disposed = False

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kw: Any) -> ShardManager:
        """Shards from ``SHARD_<N>_URL`` environment variables (ids ``shard-<N>``)."""
        return cls(settings_from_env(environ), **kw)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], section: str = "shardkit", **kw: Any) -> ShardManager:
        """Shards from a ``[shardkit]`` section of an ini file (``alembic.ini``) or a TOML file."""
        return cls(settings_from_file(path, section), **kw)

    @classmethod
    def from_urls(
        cls,
        urls: Mapping[str, str] | Sequence[str],
        *,
        max_connections: int | None = None,
        idle_timeout: float | None = 60.0,
        refresh_seconds: float = REFRESH_SECONDS,
        **options: Any,
    ) -> ShardManager:
        """Shards from URLs: a mapping id -> url, or a list (ids ``shard-1``, ...); ``options`` per shard."""
        items = (
            urls.items() if isinstance(urls, Mapping) else ((f"shard-{i}", u) for i, u in enumerate(urls, 1))
        )
        configs = [ShardConfig(id=shard_id, url=url, **options) for shard_id, url in items]
        return cls(
            configs,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            refresh_seconds=refresh_seconds,
        )

    def _check_ring(self, ring: HashRing) -> None:
        for shard_id in ring.shard_ids:
            if shard_id not in self._configs:
                raise UnknownShardError(f"ring names shard {shard_id!r}, which has no configured URL")

    # -- routing -------------------------------------------------------------------------------

    @property
    def ring(self) -> HashRing:
        """The ring keys are routed by: the stored ring when the shards store one, else the configured."""
        return self.placement.ring

    @property
    def configured_ring(self) -> HashRing:
        """The ring of this process's configuration (used while the shards store none)."""
        return self.placement.configured_ring

    def set_ring(self, ring: HashRing) -> None:
        """Route by ``ring`` while the shards store none; a stored ring is re-read and wins."""
        self._check_ring(ring)
        self.placement.configure(ring)

    def has_shard(self, shard_id: str) -> bool:
        """Whether this process's configuration lists ``shard_id``."""
        return shard_id in self._configs

    @property
    def shard_ids(self) -> tuple[str, ...]:
        """Every configured shard, in configuration order (including shards not on the ring)."""
        return tuple(self._configs)

    def shard_for(self, key: ShardKey) -> str:
        """The shard that holds ``key``'s rows now (by the stored ring; mid-move, where it is).

        Raises :class:`UnknownShardError` naming the shard and ring version when the stored ring
        places the key on a shard this configuration does not list.
        """
        return self.placement.shard_for(key)

    def shards_for(self, statement: Any, params: Any = None) -> tuple[str, ...]:
        """The shards ``statement`` (with execute ``params``) would run on, without running it.

        Delegates to :func:`sa_shardkit.routing.route_statement`, which also gives the reason.
        """
        return route_statement(self, statement, params).shard_ids

    def next_id(self, name: str) -> int:
        """The next id of the fleet-wide sequence ``name`` (see :mod:`sa_shardkit.sequences`)."""
        return self.sequences.next_id(name)

    @property
    def sequences(self) -> SequenceAllocator:
        """This process's allocator of fleet-wide ids; replace it to pick the shard or block size."""
        allocator = self.__dict__.get("_sequences")
        if allocator is None:
            from .sequences import SequenceAllocator

            with self._lock:
                allocator = self.__dict__.setdefault("_sequences", SequenceAllocator(self))
        return allocator  # type: ignore[no-any-return]

    @sequences.setter
    def sequences(self, allocator: SequenceAllocator) -> None:
        self.__dict__["_sequences"] = allocator

    @contextmanager
    def transaction(self, key: ShardKey) -> Iterator[Connection]:
        """``with manager.transaction(key) as conn:`` a Core transaction on ``key``'s shard.

        Routed like the session and fenced like a session flush: a key whose range is moving
        (or moved) is written where it lives; commits when the block ends, rolls back on error.
        A plain ``engine.connect()`` bypasses both routing and the fence.
        """
        with self.placement.begin_write(key) as conn:
            yield conn

    def add_shard(self, config: ShardConfig) -> None:
        """Configure one more shard at run time (its engine is created on first use); the ring is
        unchanged (see rebalance)."""
        with self._lock:
            if config.id in self._configs:
                raise DuplicateShardError(f"shard id {config.id!r} is already configured")
            self.settings = ShardSettings((*self.settings.shards, config), vnodes=self.settings.vnodes)
            # copy-on-write: threads iterating the old dict are not disturbed
            self._configs = {**self._configs, config.id: config}
            self.has_replicas = self.has_replicas or config.replica is not None

    def _created(self, shard_id: str, role: str) -> Engine:
        """The shard's engine for ``role`` (primary or replica), created now if it was not yet."""
        config = self.config(shard_id)
        with self._lock:
            engines = self._engines if role == "primary" else self._replicas
            engine = engines.get(shard_id)
            if engine is None:
                url = config.primary_url if role == "primary" else config.replica
                engine = self._budgeted(config, role, url)
                if role == "primary":  # copy-on-write: threads iterating the old dict are not disturbed
                    self._engines = {**self._engines, shard_id: engine}
                else:
                    self._replicas = {**self._replicas, shard_id: engine}
        self.events.attach_new_engines()
        return engine

    def _budgeted(self, config: ShardConfig, role: str, url: Any) -> Engine:
        engine = _engine_for(config, url)
        self.budget.attach(config.id, role, engine, config.pool_timeout)
        return engine

    def connection_stats(self) -> list[PoolStats]:
        """This process's open and in-use connections per shard and role (see ``max_connections``)."""
        return self.budget.stats()

    def scatter_timeouts(self, shard_ids: Iterable[str]) -> dict[str, float]:
        """How long a scatter waits for each shard's checkout before calling it unavailable."""
        queued = self.budget.limit is not None
        return {
            s: self._configs[s].connect_timeout + 1.0 + (self._configs[s].pool_timeout if queued else 0.0)
            for s in shard_ids
        }

    def _all_engines(self) -> list[tuple[str, str, Engine]]:
        primaries = [(shard_id, "primary", engine) for shard_id, engine in self._engines.items()]
        return primaries + [(shard_id, "replica", engine) for shard_id, engine in self._replicas.items()]

    def config(self, shard_id: str) -> ShardConfig:
        try:
            return self._configs[shard_id]
        except KeyError:
            raise UnknownShardError(
                f"unknown shard {shard_id!r}; configured shards: {', '.join(self._configs)}"
            ) from None

    def engine(self, shard_id: str, *, write: bool = True) -> Engine:
        """The shard's primary engine; with ``write=False`` its replica's while that one is usable.

        A replica that is down, not in recovery or lagging past ``max_replica_lag`` is skipped
        (reads go to the primary, a warning is logged): see :mod:`sa_shardkit.replicas`. The
        engine is created on the shard's first use (raises :class:`UnknownShardError` for a
        shard this configuration does not list).
        """
        if not write:
            replica = self.replicas.usable_replica(shard_id)
            if replica is not None:
                return replica
        engine = self._engines.get(shard_id)
        return engine if engine is not None else self._created(shard_id, "primary")

    def replica_engine(self, shard_id: str) -> Engine | None:
        """The shard's replica engine (created on first use), or None when it has no replica."""
        replica = self._replicas.get(shard_id)
        if replica is not None:
            return replica
        return None if self.config(shard_id).replica is None else self._created(shard_id, "replica")

    def engine_for(self, key: ShardKey, *, write: bool = True) -> Engine:
        """The engine of the shard that holds ``key`` now (see :meth:`shard_for`).

        Its connections are not fenced: a move that starts later is not seen by them. Use
        :meth:`transaction` to write by key.
        """
        return self.engine(self.shard_for(key), write=write)

    @property
    def engines(self) -> Mapping[str, Engine]:
        """Primary engine per shard id: looking a shard up creates its engine if needed (iterating
        the ids creates none; ``values()``/``items()`` create every shard's)."""
        return _Engines(self)

    def created_engines(self) -> dict[str, Engine]:
        """The primary engines created so far, by shard id (a copy; creates none)."""
        return dict(self._engines)

    def connect(self, shard_id: str, *, write: bool = True) -> Connection:
        """A connection to a shard; a connect failure becomes :class:`ShardUnavailableError`."""
        engine = self.engine(shard_id, write=write)
        try:
            return engine.connect()
        except (OperationalError, PoolTimeoutError, DBAPIError) as error:
            raise unavailable(shard_id, engine.url, error) from error

    def connect_direct(self, shard_id: str) -> Connection:
        """A connection for session-level state (advisory locks, ``SET``), bypassing any PgBouncer.

        A shard configured with ``pgbouncer=True`` needs ``direct_url`` (else :class:`ConfigError`);
        other shards use their primary engine. Used by migrations and the rebalance mover's lock.
        """
        config = self.config(shard_id)
        if config.direct_url is None and not config.pgbouncer:
            return self.connect(shard_id)
        url = config.direct
        with self._lock:
            engine = self._direct.get(shard_id)
            if engine is None:
                engine = self._direct[shard_id] = self._budgeted(config, "direct", url)
        try:
            return engine.connect()
        except (OperationalError, PoolTimeoutError, DBAPIError) as error:
            raise unavailable(shard_id, url, error) from error

    def safe_url(self, shard_id: str) -> str:
        return self.config(shard_id).safe_url()

    # -- fleet-wide work -------------------------------------------------------------------------

    def run_on_all(
        self,
        work: Callable[[Connection], T] | str,
        params: Mapping[str, Any] | None = None,
        *,
        shard_ids: Iterable[str] | None = None,
        write: bool = True,
    ) -> dict[str, Any]:
        """Run ``work`` on every shard in parallel; results keyed by shard id.

        ``work`` is either SQL text (its rows are returned; it runs as one autocommitted
        statement, or an implicit transaction when it holds several) or a callable taking a
        :class:`Connection` inside a transaction that commits when it returns. The first failure
        is raised after every shard has finished (no half-run threads remain); a shard whose
        checkout does not finish within its connect timeout is reported unavailable.
        Every configured shard by default; when the stored ring has a member the configuration
        lacks, :class:`UnknownShardError` first (nothing runs).
        """
        if shard_ids is None:
            self.placement.require_listed()
        targets = list(self.shard_ids if shard_ids is None else shard_ids)
        for shard_id in targets:
            self.config(shard_id)

        def one(shard_id: str, conn: Connection) -> Any:
            if isinstance(work, str):  # one round trip: autocommit is atomic for one SQL string
                result = conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                    text(work), dict(params or {})
                )
                return list(result) if result.returns_rows else result.rowcount
            with conn.begin():
                return work(conn)

        lean = None
        if isinstance(work, str):  # warm shards: one loop, no SQLAlchemy per shard
            lean = LeanStatement(
                text(work),
                params,
                {s: self._configs[s].connect_timeout for s in targets},
                {s: self._configs[s].query_timeout for s in targets},
                _rows_or_count,
            )
        outcome = fan_out_connected(
            {s: self.engine(s, write=write) for s in targets},
            self.scatter_timeouts(targets),
            one,
            limit=self.budget.limit,
            cooperative=isinstance(work, str),  # a callable may hold locks: it gets a thread
            lean=lean,
        )
        raise_for_errors(
            {s: outcome.errors[s] for s in targets if s in outcome.errors},
            allow_partial=False,
            any_result=bool(outcome.results),
            describe=lambda shard, error: unavailable(shard, self.safe_url(shard), error),
        )
        return {s: outcome.results[s] for s in targets}

    def query_all_shards(
        self,
        statement: str | Executable,
        params: Mapping[str, Any] | None = None,
        *,
        shard_ids: Iterable[str] | None = None,
        with_shard_id: bool = False,
        allow_partial: bool = False,
        per_shard_results: bool = False,
        write: bool = True,
    ) -> ScatterResult:
        """Query every shard in parallel and merge into one result (the design's queryAllShards).

        A ``select()`` is merged globally (ORDER BY, LIMIT/OFFSET, aggregates, DISTINCT; see
        :mod:`sa_shardkit.scatter`); SQL text is concatenated in shard order. ``with_shard_id``
        adds a ``shard_id`` column; ``allow_partial`` skips unreachable shards (``missing_shards``).
        By default the stored ring's shards; one the configuration lacks raises
        :class:`UnknownShardError` (with ``allow_partial``, it is reported missing).
        """
        return query_all_shards(
            self,
            statement,
            params,
            shard_ids=shard_ids,
            with_shard_id=with_shard_id,
            allow_partial=allow_partial,
            per_shard_results=per_shard_results,
            write=write,
        )

    def parallel(self, fn: Callable[[str], T], shard_ids: list[str]) -> dict[str, T]:
        """``fn(shard_id)`` for every shard at once; the first failure raised after all finished."""
        if len(shard_ids) <= 1:
            return {s: fn(s) for s in shard_ids}
        with ThreadPoolExecutor(max_workers=len(shard_ids), thread_name_prefix="shardkit") as pool:
            futures = {s: pool.submit(fn, s) for s in shard_ids}
            results: dict[str, T] = {}
            first_error: BaseException | None = None
            for shard_id, future in futures.items():
                try:
                    results[shard_id] = future.result()
                except BaseException as error:  # noqa: BLE001 - re-raised below
                    first_error = first_error or error
            if first_error is not None:
                raise first_error
            return results

    def health(self, *, timeout: float | None = None) -> dict[str, ShardHealth]:
        """Reachability and latency of every shard (and replica); bounded by the connect timeout."""
        checks: list[tuple[str, str, Engine, float]] = []
        for shard_id, config in self._configs.items():
            checks.append((shard_id, "primary", self.engine(shard_id), config.connect_timeout))
        for shard_id, config in self._configs.items():
            replica = self.replica_engine(shard_id)
            if replica is not None:
                checks.append((shard_id, "replica", replica, config.connect_timeout))

        def check(item: tuple[str, str, Engine, float]) -> ShardHealth:
            shard_id, role, engine, _ = item
            started = time.perf_counter()
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except Exception as error:  # noqa: BLE001 - reported, not raised
                return ShardHealth(shard_id, False, None, str(unavailable(shard_id, engine.url, error)), role)
            return ShardHealth(shard_id, True, (time.perf_counter() - started) * 1000, None, role)

        limit = timeout if timeout is not None else max(c[3] for c in checks) + 2
        report: dict[str, ShardHealth] = {}
        pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="shardkit-health")
        try:
            futures = [(item, pool.submit(check, item)) for item in checks]
            deadline = time.monotonic() + limit
            for item, future in futures:
                key = item[0] if item[1] == "primary" else f"{item[0]}:replica"
                try:
                    report[key] = future.result(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - timed out
                    report[key] = ShardHealth(item[0], False, None, f"no answer within {limit:g}s", item[1])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return report

    def sessionmaker(self, **kw: Any) -> ShardedSessionmaker:
        """A ``sessionmaker`` producing :class:`sa_shardkit.ShardedSession` bound to this manager."""
        return sessionmaker_for(self, **kw)

    def require_shards(self, shard_ids: Iterable[str]) -> list[str]:
        """Validate a list of shard ids before any work starts (see :func:`require_shards`)."""
        return require_shards(self, shard_ids)

    # -- shutdown --------------------------------------------------------------------------------

    def dispose(self) -> None:
        """Close every pooled connection of every shard and replica; idempotent."""
        from .lookups.store import drop_idle

        drop_idle(self)  # lookup connections kept between transactions go back to their pools first
        with self._lock:
            for engine in [*self._engines.values(), *self._replicas.values(), *self._direct.values()]:
                engine.dispose()
            self._disposed = True
        self.budget.close()

    def __enter__(self) -> ShardManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    def __repr__(self) -> str:
        shards = ", ".join(f"{c.id}={c.safe_url()}" for c in self._configs.values())
        return f"ShardManager({shards})"


def _rows_or_count(answer: Answer) -> Any:
    """``run_on_all(SQL)``'s value for one shard: its rows, or the rowcount of a statement without."""
    return list(as_result(answer)) if answer.keys is not None else answer.rowcount


class _Engines(Mapping[str, Engine]):
    """``manager.engines``: the configured shard ids, each one's engine created when looked up."""

    __slots__ = ("_manager",)

    def __init__(self, manager: ShardManager) -> None:
        self._manager = manager

    def __getitem__(self, shard_id: str) -> Engine:
        if not self._manager.has_shard(shard_id):
            raise KeyError(shard_id)
        return self._manager.engine(shard_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._manager.shard_ids)

    def __len__(self) -> int:
        return len(self._manager.shard_ids)

    def __contains__(self, shard_id: object) -> bool:
        return isinstance(shard_id, str) and self._manager.has_shard(shard_id)


def require_shards(manager: ShardManager, shard_ids: Iterable[str]) -> list[str]:
    """Validate a list of shard ids against ``manager`` before any work starts."""
    ids = list(shard_ids)
    unknown = [s for s in ids if s not in manager.shard_ids]
    if unknown:
        raise UnknownShardError(
            f"unknown shard(s) {', '.join(map(repr, unknown))}; configured: {', '.join(manager.shard_ids)}"
        )
    if not ids:
        raise ConfigError("no shards selected")
    return ids
