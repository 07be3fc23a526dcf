"""The flat fan-out: one checkout per shard, bounded by the connect timeout, then the work on it.

``manager.query_all_shards`` and ``manager.run_on_all`` use this. Each shard's task checks out a
connection (the pool's pre-ping is the reachability check) and runs the work on that same
connection, so a latency-bound scatter costs one round trip per shard besides the query itself; with
one thread per shard in flight (the shared scatter pool grows to the fan-out, up to
``SHARDKIT_SCATTER_WORKERS``, default 256) N shards cost about one shard's latency.

A frozen server never answers a pooled connection's ping and no socket timeout ends that wait, so
the caller stops waiting for a checkout after the given timeout (the manager passes the connect
timeout, plus ``pool_timeout`` when a connection budget may make it wait for a slot) and reports the shard unavailable; the stuck task later closes
its connection without running anything, and at most one such task per engine is kept.
With ``limit`` (the connection budget) at most that many shards are in flight at once: the rest
queue for a connection instead of failing.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import copy_context
from typing import TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

from ..errors import ShardUnavailableError
from ..multiplex import Hub, is_cooperative
from .fanout import FanOut, runs_in_threads, scatter_pool
from .lean import LeanRun, LeanStatement

T = TypeVar("T")


class _Attempt:
    """One shard's task: ``connected`` is set once its checkout ended (either way)."""

    def __init__(self) -> None:
        self.started = threading.Event()  # set once the task holds its place (``limit``)
        self.connected = threading.Event()
        self.started_at = 0.0
        self.abandoned = False
        self.lock = threading.Lock()

    def abandon(self) -> bool:
        """Give up waiting; False when the checkout finished meanwhile (its result counts)."""
        with self.lock:
            if self.connected.is_set():
                return False
            self.abandoned = True
            return True


HUB_SHARDS = 16
"""Shards per hub. One thread's Python work for 256 shards outlasts their 50 ms round trip on a busy
machine, so a fan-out runs one hub per 16 warm shards: the caller's thread and, for more than 16,
threads of the shared scatter pool (256 shards: 16 threads, not 256)."""

_stuck_lock = threading.Lock()
_stuck: dict[int, _Attempt] = {}  # id(engine) -> an abandoned checkout that has not returned yet


def fan_out_connected(
    engines: Mapping[str, Engine],
    timeouts: Mapping[str, float],
    work: Callable[[str, Connection], T],
    *,
    limit: int | None = None,
    cooperative: bool = False,
    lean: LeanStatement[T] | None = None,
) -> FanOut[T]:
    """Run ``work(shard, connection)`` on every shard concurrently; wait for all, collect errors.

    ``cooperative``: ``work`` is the library's own (it holds no lock across a round trip), so
    shards with a warm pooled connection run as greenlets, :data:`HUB_SHARDS` to a thread, each
    thread's waits for the servers sharing one selector (:mod:`sa_shardkit.multiplex`); the others
    (no idle connection: a connect blocks) get a worker thread each.

    ``lean`` (SQL text, without a budget): the warm shards it can serve run first of all, on the
    calling thread's one loop at the libpq level (:mod:`.lean`), while the others run as above.
    """
    outcome: FanOut[T] = FanOut()
    if not engines:
        return outcome
    if not all(runs_in_threads(e) for e in engines.values()):
        for shard, engine in engines.items():  # one thread's connections: one shard after another
            try:
                with engine.connect() as conn:
                    outcome.results[shard] = work(shard, conn)
            except Exception as error:  # noqa: BLE001 - collected, the policy decides
                outcome.errors[shard] = error
        return outcome
    lean_run = LeanRun(lean, engines) if lean is not None and limit is None else None
    if lean_run is not None:
        engines = {s: engines[s] for s in lean_run.rest}
    slots = threading.BoundedSemaphore(limit) if limit is not None else None
    pool = scatter_pool()
    attempts: dict[str, tuple[_Attempt, float]] = {}
    futures = {}
    warm = {s for s, e in engines.items() if cooperative and limit is None and _warm(e)}
    together = [s for s in engines if s in warm]
    groups = [together[i : i + HUB_SHARDS] for i in range(0, len(together), HUB_SHARDS)]
    # the calling thread's work: the lean loop when it serves any shard, else the first hub
    here = groups[:1] if lean_run is None or not lean_run.serves else []
    hubs = [pool.submit(copy_context().run, _run_hub, g, engines, work) for g in groups[len(here) :]]
    for shard, engine in engines.items():
        if shard in warm:
            continue
        waited = _wait_for_stuck(engine, timeouts.get(shard, 4.0))
        if waited is not None:
            outcome.errors[shard] = _frozen(shard, waited)
            continue
        attempt = _Attempt()
        attempts[shard] = (attempt, timeouts.get(shard, 4.0))
        # in a copy of the caller's contextvars context, as fan_out does (tracing spans join its trace)
        futures[shard] = pool.submit(copy_context().run, _run, shard, engine, work, attempt, slots)
    # the first group's hub (or the lean loop) runs here; a BaseException in another hub's thread
    # is raised by result()
    for results, errors in [_run_hub(group, engines, work) for group in here]:
        outcome.results.update(results)
        outcome.errors.update(errors)
    late: FanOut[T] | None = None
    if lean_run is not None and lean is not None:
        lean_outcome = lean_run.drive()
        outcome.results.update((s, lean.finish(a)) for s, a in lean_outcome.answers.items())
        outcome.errors.update(lean_outcome.errors)
        if lean_outcome.rest:  # their pooled connection was dead: reconnect on the usual path
            late = fan_out_connected(
                {s: lean_run.engines[s] for s in lean_outcome.rest}, timeouts, work, cooperative=cooperative
            )
    for hub in hubs:
        results, errors = hub.result()
        outcome.results.update(results)
        outcome.errors.update(errors)
    for shard, (attempt, wait) in attempts.items():
        attempt.started.wait()  # queued behind ``limit``: not the shard's fault
        if not attempt.connected.wait(max(0.0, attempt.started_at + wait - time.monotonic())) and (
            attempt.abandon()
        ):
            with _stuck_lock:
                _stuck[id(engines[shard])] = attempt
            if slots is not None:
                slots.release()  # the stuck task gives its place to the others
            outcome.errors[shard] = _frozen(shard, wait)
            del futures[shard]
    for shard, future in futures.items():
        try:
            outcome.results[shard] = future.result()
        except Exception as error:  # noqa: BLE001 - collected, the policy decides
            outcome.errors[shard] = error
    if late is not None:
        outcome.results.update(late.results)
        outcome.errors.update(late.errors)
    return outcome


def _run_hub(
    shards: list[str], engines: Mapping[str, Engine], work: Callable[[str, Connection], T]
) -> tuple[dict[str, T], dict[str, Exception]]:
    """One greenlet per shard on this thread, all waiting through one selector."""
    return Hub().run((s, functools.partial(_checked_out, s, engines[s], work)) for s in shards)


def _warm(engine: Engine) -> bool:
    """Whether ``engine`` can serve a hub task: cooperative, an idle pooled connection, none stuck."""
    pool = engine.pool
    return (
        is_cooperative(engine)
        and isinstance(pool, QueuePool)
        and pool.checkedin() > 0
        and id(engine) not in _stuck
    )


def _checked_out(shard: str, engine: Engine, work: Callable[[str, Connection], T]) -> T:
    with engine.connect() as conn:  # the pre-ping waits through the hub; the watchdog bounds it
        return work(shard, conn)


def _run(
    shard: str,
    engine: Engine,
    work: Callable[[str, Connection], T],
    attempt: _Attempt,
    slots: threading.BoundedSemaphore | None,
) -> T:
    if slots is not None:
        slots.acquire()
    attempt.started_at = time.monotonic()
    attempt.started.set()
    try:
        try:
            conn = engine.connect()
        except BaseException:
            with attempt.lock:
                attempt.connected.set()
                abandoned = attempt.abandoned
            raise
        with attempt.lock:
            attempt.connected.set()
            abandoned = attempt.abandoned
        with conn:
            if abandoned:  # the caller gave up on this shard: run nothing
                raise ShardUnavailableError(f"shard {shard!r}: checkout finished after the caller gave up")
            return work(shard, conn)
    finally:
        if slots is not None and not attempt.abandoned:
            slots.release()
        if attempt.abandoned:
            with _stuck_lock:
                if _stuck.get(id(engine)) is attempt:
                    del _stuck[id(engine)]


def _wait_for_stuck(engine: Engine, wait: float) -> float | None:
    """Wait for an earlier abandoned checkout of ``engine``; the seconds waited if it is still stuck."""
    with _stuck_lock:
        stuck = _stuck.get(id(engine))
    if stuck is None or stuck.connected.wait(wait):
        return None
    return wait


def _frozen(shard: str, wait: float) -> ShardUnavailableError:
    return ShardUnavailableError(
        f"shard {shard!r} did not answer within {wait:g}s (server frozen or unreachable)", shard_id=shard
    )
