"""Running one piece of work per shard concurrently, and the failure policy.

A process-wide pool (``SHARDKIT_SCATTER_WORKERS`` threads, default 256, started as needed) bounds
the threads that scatters use: enough for one thread per shard, so a latency-bound scatter over N
shards costs about one shard's latency. Every task is waited for before anything is raised, so no worker is still using a
connection when the caller sees the error (a Session and its connections are not thread-safe).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextvars import copy_context
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool
from sqlalchemy.util.concurrency import await_only, greenlet_spawn, in_greenlet

from ..errors import ShardUnavailableError, UnknownShardError
from ..multiplex import Hub

T = TypeVar("T")

_lock = threading.Lock()


class DaemonPool:
    """Futures run on daemon threads, started as needed up to ``max_workers``.

    Unlike ``ThreadPoolExecutor`` (whose workers the interpreter joins at exit), a worker blocked
    on a server that froze never keeps the process from exiting.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._max = max(1, max_workers)
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._guard = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, fn, args))
        with self._guard:
            if self._idle == 0 and self._threads < self._max:
                self._threads += 1
                name = f"{self._name}_{self._threads}"
                threading.Thread(target=self._work, name=name, daemon=True).start()
            elif self._idle > 0:
                self._idle -= 1  # an idle worker takes it (at the limit: the next one free does)
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
                    future.set_exception(error)
            del future, fn, args
            with self._guard:
                self._idle += 1


_pool: DaemonPool | None = None


def scatter_pool() -> DaemonPool:
    """The shared, bounded pool of scatter worker threads (daemon threads, created on first use)."""
    global _pool
    with _lock:
        if _pool is None:
            workers = int(os.environ.get("SHARDKIT_SCATTER_WORKERS", "256"))
            _pool = DaemonPool(workers, "shardkit-scatter")
        return _pool


THREAD_SAFE_POOLS = (QueuePool, AsyncAdaptedQueuePool, NullPool)
"""Pools that hand each checkout its own DBAPI connection, usable from whichever thread holds it."""


def runs_in_threads(bind: object) -> bool:
    """Whether a scatter may use ``bind``'s connections from other threads (or greenlets).

    Only an Engine whose pool is one of :data:`THREAD_SAFE_POOLS` (exactly: a subclass may pin
    connections to threads) over a driver declaring DB-API ``threadsafety >= 1``; never SQLite
    (its connections refuse other threads), a Connection, ``SingletonThreadPool``, ``StaticPool``
    or anything unknown. Those run shard after shard in the calling thread, as stock does.
    """
    if not isinstance(bind, Engine) or type(bind.pool) not in THREAD_SAFE_POOLS:
        return False
    dialect = bind.dialect
    if dialect.name == "sqlite":
        return False
    if dialect.is_async:  # an AsyncEngine's sync side: fanned out on its event loop, not threads
        return in_greenlet()
    return int(getattr(dialect.loaded_dbapi, "threadsafety", 0)) >= 1


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means the shard could not be reached or dropped the connection."""
    if isinstance(error, (ShardUnavailableError, PoolTimeoutError, OperationalError)):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def name_shard(error: BaseException, shard_id: str) -> BaseException:
    """Attach the shard to an error raised by that shard (attribute and traceback note)."""
    if getattr(error, "shard_id", None) is None:
        try:
            error.shard_id = shard_id  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - exotic exception types with slots
            pass
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(f"raised by shard {shard_id!r}")
    return error


@dataclass
class FanOut(Generic[T]):
    """The outcome per shard: results of the shards that answered, errors of those that did not."""

    results: dict[str, T] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)


def fan_out(tasks: Mapping[str, Callable[[], T]]) -> FanOut[T]:
    """Run every shard's task concurrently (one in the calling thread) and wait for all of them."""
    outcome: FanOut[T] = FanOut()
    items = list(tasks.items())
    if not items:
        return outcome
    if in_greenlet():  # under an AsyncSession: the connections only work on its event loop
        return _fan_out_on_event_loop(items)
    pool = scatter_pool()
    # each task runs in a copy of the caller's context (contextvars: tracing spans, request-scoped state)
    futures: list[tuple[str, Future[T]]] = [
        (shard, pool.submit(copy_context().run, task)) for shard, task in items[1:]
    ]
    first_shard, first_task = items[0]
    try:
        outcome.results[first_shard] = first_task()
    except Exception as error:  # noqa: BLE001 - collected, the policy decides
        outcome.errors[first_shard] = error
    for shard, future in futures:
        try:
            outcome.results[shard] = future.result()
        except Exception as error:  # noqa: BLE001 - collected, the policy decides
            outcome.errors[shard] = error
    return outcome


def fan_out_on_hub(tasks: Mapping[str, Callable[[], T]]) -> FanOut[T]:
    """Every shard's task as a greenlet of the calling thread, their waits for the servers sharing
    one selector (:class:`~sa_shardkit.multiplex.Hub`): no thread hand-off, and still one slow
    shard's latency for all of them. Only for tasks whose connections are cooperative and held
    already (a task must not block the thread: no checkout, no connect)."""
    results, errors = Hub().run(tasks.items())
    return FanOut(results, dict(errors))


def _fan_out_on_event_loop(items: list[tuple[str, Callable[[], T]]]) -> FanOut[T]:
    """asyncio fan-out: each task in its own greenlet, awaited together on the session's loop."""

    async def all_tasks() -> list[T | BaseException]:
        return await asyncio.gather(*(greenlet_spawn(task) for _, task in items), return_exceptions=True)

    outcome: FanOut[T] = FanOut()
    for (shard, _), result in zip(items, await_only(all_tasks()), strict=True):
        if isinstance(result, Exception):
            outcome.errors[shard] = result
        elif isinstance(result, BaseException):  # cancellation, KeyboardInterrupt: not a shard failure
            raise result
        else:
            outcome.results[shard] = result
    return outcome


def raise_for_errors(
    errors: Mapping[str, BaseException],
    *,
    allow_partial: bool,
    any_result: bool,
    describe: Callable[[str, BaseException], BaseException],
) -> None:
    """Apply the failure policy: raise the first error naming its shard, unless partial is allowed.

    ``allow_partial`` tolerates only unreachable shards (never a SQL error, which would hide a
    schema difference), and needs at least one shard that answered.
    """
    for shard, error in errors.items():
        if allow_partial and any_result and (is_unavailable(error) or isinstance(error, UnknownShardError)):
            continue  # reported in missing_shards (a ring member the configuration lacks, too)
        if isinstance(error, UnknownShardError):
            raise error
        if is_unavailable(error) and not isinstance(error, ShardUnavailableError):
            raise describe(shard, error) from error
        raise name_shard(error, shard)


_probes: dict[int, Future[None]] = {}  # id(engine) -> the last reachability probe


def _check_out(engine: Engine) -> None:
    with engine.connect():  # a pool checkout pre-pings a pooled connection, or connects anew
        pass


def probe(engines: Mapping[str, Engine], timeouts: Mapping[str, float]) -> dict[str, BaseException]:
    """Check every shard answers within its connect timeout, all at once; the failures by shard.

    A stopped server refuses at once, but a frozen one never answers a pooled connection's ping,
    and no socket timeout would end that wait. The probe runs in a worker, so the caller stops
    waiting after the connect timeout; a probe still stuck is reused (at most one thread per shard).
    """
    if in_greenlet():  # under an AsyncSession: worker threads cannot use its connections
        return _probe_on_event_loop(engines, timeouts)
    pool = scatter_pool()
    errors: dict[str, BaseException] = {}
    futures: dict[str, Future[None]] = {}
    with _lock:
        for shard, engine in engines.items():
            running = _probes.get(id(engine))
            if running is None or running.done():
                running = _probes[id(engine)] = pool.submit(_check_out, engine)
            futures[shard] = running
    started = time.monotonic()
    for shard, future in futures.items():
        limit = timeouts.get(shard, 3.0) + 1.0
        try:
            future.result(timeout=max(0.0, started + limit - time.monotonic()))
        except FutureTimeoutError:
            errors[shard] = ShardUnavailableError(
                f"shard {shard!r} did not answer within {limit:g}s (server frozen or unreachable)",
                shard_id=shard,
            )
        except Exception as error:  # noqa: BLE001 - reported by shard, the policy decides
            errors[shard] = error
    return errors


def _probe_on_event_loop(
    engines: Mapping[str, Engine], timeouts: Mapping[str, float]
) -> dict[str, BaseException]:
    """:func:`probe` for an AsyncSession: every check-out in its own greenlet, bounded by asyncio."""

    async def one(shard: str, engine: Engine) -> BaseException | None:
        limit = timeouts.get(shard, 3.0) + 1.0
        try:
            await asyncio.wait_for(greenlet_spawn(_check_out, engine), limit)
        except asyncio.TimeoutError:
            return ShardUnavailableError(
                f"shard {shard!r} did not answer within {limit:g}s (server frozen or unreachable)",
                shard_id=shard,
            )
        except Exception as error:  # noqa: BLE001 - reported by shard, the policy decides
            return error
        return None

    async def all_probes() -> list[BaseException | None]:
        return await asyncio.gather(*(one(shard, engine) for shard, engine in engines.items()))

    outcomes = await_only(all_probes())
    return {shard: error for shard, error in zip(engines, outcomes, strict=True) if error is not None}
