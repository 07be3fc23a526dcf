"""Read replicas: reads go to a shard's streaming replica only while it answers and is fresh enough.

A replica is *usable* when it accepts a connection, is in recovery (a promoted or misconfigured
"replica" would serve stale data forever) and its replay lag is within the shard's
``max_replica_lag`` seconds. Otherwise reads fall back to the primary and a warning is logged once
per change of state (not once per query). The check costs one small query on the replica and runs at
most every ``check_interval`` seconds per shard; between checks the last verdict is reused, so a
replica that dies in that window fails the reads that were already sent to it.

Lag is the age of the last replayed transaction (``pg_last_xact_replay_timestamp()``), counted as
zero while the replica streams and has replayed all it received: an idle primary sends nothing, and
an old replay timestamp then means "nothing new", not "behind".
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("sa_shardkit.replicas")

DEFAULT_MAX_REPLICA_LAG = 5.0
"""Seconds a replica may trail its primary before reads fall back to the primary."""
DEFAULT_CHECK_INTERVAL = 1.0
"""Seconds between two measurements of one replica."""
INTERNAL = "shardkit_internal"
"""Execution option marking sa_shardkit's own statements (query listeners do not see them)."""

_LAG_SQL = text(
    "SELECT pg_is_in_recovery(), "
    "pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() "
    "AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'), "
    "EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8, "
    "pg_last_wal_receive_lsn()::text"
)
_REPLAYED_SQL = text("SELECT pg_last_wal_replay_lsn() >= CAST(:received AS pg_lsn)")
_REPLAY_RECHECKS = 5
_REPLAY_RECHECK_DELAY = 0.01


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica's last measurement: may reads use it, how far behind is it, and if not, why."""

    shard_id: str
    usable: bool
    lag_seconds: float | None
    reason: str | None = None
    checked_at: float = 0.0
    """``time.monotonic()`` of the measurement."""


def measure_lag(conn: Connection) -> tuple[bool, float]:
    """``(in_recovery, lag_seconds)`` of the server behind ``conn``; ``inf`` when nothing was replayed."""
    in_recovery, caught_up, age, received = conn.execute(_LAG_SQL).one()
    if not in_recovery:
        return False, 0.0
    if caught_up:
        return True, 0.0
    # WAL received but not replayed: usually a record being applied right now (an idle primary
    # still sends checkpoint records, and the last *transaction* may be hours old), so give replay
    # a moment to reach what had arrived before calling the replica behind.
    for _ in range(_REPLAY_RECHECKS):
        time.sleep(_REPLAY_RECHECK_DELAY)
        if conn.execute(_REPLAYED_SQL, {"received": received}).scalar():
            return True, 0.0
    return True, math.inf if age is None else max(0.0, float(age))


class ReplicaRouter:
    """Chooses, per shard, between the replica and the primary for reads.

    Built by :class:`~sa_shardkit.manager.ShardManager`; use ``manager.engine(shard_id, write=False)``
    or ``manager.replicas.status(shard_id)`` rather than constructing one.
    """

    def __init__(
        self,
        replica_for: Callable[[str], Engine | None],
        max_lag_for: Callable[[str], float],
        *,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        # callables, not dicts: the manager may add shards at run time (copy-on-write dicts)
        self._replica_for = replica_for
        self._max_lag_for = max_lag_for
        self.check_interval = check_interval
        self._status: dict[str, ReplicaStatus] = {}
        self._probing: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def usable_replica(self, shard_id: str) -> Engine | None:
        """The replica's engine while it is usable; None means "read from the primary"."""
        replica = self._replica_for(shard_id)
        if replica is None or not self.status(shard_id).usable:
            return None
        return replica

    def cached_status(self, shard_id: str) -> ReplicaStatus | None:
        """The last verdict while younger than ``check_interval``; None when a measurement is due.

        Lets an event loop use the verdict without blocking, and measure in a thread only when due.
        """
        current = self._status.get(shard_id)
        if current is None or time.monotonic() - current.checked_at >= self.check_interval:
            return None
        return current

    def status(self, shard_id: str, *, refresh: bool = False) -> ReplicaStatus:
        """The replica's last verdict, measured again when older than ``check_interval`` (or ``refresh``)."""
        replica = self._replica_for(shard_id)
        if replica is None:
            return ReplicaStatus(shard_id, False, None, "no replica configured")
        current = self._status.get(shard_id)
        stale = current is None or time.monotonic() - current.checked_at >= self.check_interval
        if not (refresh or stale):
            assert current is not None
            return current
        with self._lock:
            lock = self._probing.setdefault(shard_id, threading.Lock())
        # one thread measures; the others keep using the last verdict instead of queueing up
        if not lock.acquire(blocking=current is None or refresh):
            assert current is not None
            return current
        try:
            fresh = self._probe(shard_id, replica)
        finally:
            lock.release()
        self._record(fresh, current)
        return fresh

    def mark_unusable(self, shard_id: str, reason: str) -> None:
        """Send reads to the primary until the next check (e.g. after a read on the replica failed)."""
        if self._replica_for(shard_id) is not None:
            self._record(
                ReplicaStatus(shard_id, False, None, reason, time.monotonic()), self._status.get(shard_id)
            )

    def _probe(self, shard_id: str, engine: Engine) -> ReplicaStatus:
        now = time.monotonic()
        try:
            with engine.connect() as conn:
                conn.execution_options(**{INTERNAL: True})  # not a query of the application
                in_recovery, lag = measure_lag(conn)
        except Exception as error:  # noqa: BLE001 - any failure means "do not read from it"
            reason = getattr(error, "orig", None) or error
            lines = str(reason).strip().splitlines()
            return ReplicaStatus(
                shard_id, False, None, f"unreachable: {lines[0] if lines else type(reason).__name__}", now
            )
        if not in_recovery:
            return ReplicaStatus(shard_id, False, None, "not in recovery (promoted or not a replica)", now)
        limit = self._max_lag_for(shard_id)
        if lag > limit:
            return ReplicaStatus(shard_id, False, lag, f"lagging {lag:.1f}s > {limit:g}s", now)
        return ReplicaStatus(shard_id, True, lag, None, now)

    def _record(self, fresh: ReplicaStatus, previous: ReplicaStatus | None) -> None:
        self._status[fresh.shard_id] = fresh
        replica = self._replica_for(fresh.shard_id)
        safe = replica.url.render_as_string(hide_password=True) if replica is not None else "?"
        if not fresh.usable and (previous is None or previous.usable or _kind(previous) != _kind(fresh)):
            log.warning(
                "shard %r: replica %s not used, reads go to the primary: %s",
                fresh.shard_id,
                safe,
                fresh.reason,
            )
        elif fresh.usable and previous is not None and not previous.usable:
            log.info(
                "shard %r: replica %s is usable again (lag %.1fs)", fresh.shard_id, safe, fresh.lag_seconds
            )


def _kind(status: ReplicaStatus) -> str:
    """The reason's first word: a growing lag is one state, not a new warning per check."""
    return (status.reason or "").split(" ", 1)[0]
