"""Where a key's rows are now: the ring the shards store, followed by every process by itself.

Every :class:`~sa_shardkit.ShardManager` owns one :class:`Placement` (``manager.placement``), and
every key -> shard decision asks it (sessions, ``shard_for``/``engine_for``, scatters, sagas, 2PC,
the CLI). It reads the stored ring (:mod:`sa_shardkit.ring_state`) on first use and checks it again
at most every ``refresh_seconds``, and after a keyed read found nothing. A periodic check is O(1):
one shard's row (:meth:`Placement.refresh`), every shard only after that row showed a change. A fleet
that stores no ring (never rebalanced) routes by the configured ring; its write transactions pay
one small query per shard (below), sent with the transaction's BEGIN on psycopg (no round trip of
its own, :mod:`sa_shardkit.fused_begin`), and by a session flush in one pipeline with the BEGIN and
its first statement (:mod:`sa_shardkit.fused_write`); SQLite files pay nothing.

A stored ring may name a shard this process's configuration lacks (the fleet grew after the
process was configured): routing a key there raises :class:`~sa_shardkit.UnknownShardError`
naming the shard and the ring version; the old shard is never used instead.

Every write transaction on a shard first reads that shard's state row with a lock (the fence; for a
key that is not moving, on psycopg, in the BEGIN's round trip, :mod:`sa_shardkit.fused_begin`, or a
flush's first statement's, :mod:`sa_shardkit.fused_write`):

* a key that is not moving: ``FOR KEY SHARE``. Only a version bump (a key update, preceded by
  ``FOR UPDATE``) conflicts, so after a bump no writer of the older version is still in flight, and
  a writer that arrives later sees the newer version and re-routes;
* a key that is moving: ``FOR SHARE`` on the *source* shard's row, which conflicts with the
  ``FOR NO KEY UPDATE`` the mover holds while it cuts a batch over. If the source's watermark has
  passed the key (or the source is drained), the key lives on the target now and the write goes
  there; otherwise it stays on the source, and the batch that moves the key waits for the commit.

Before any ring is stored there is no row to lock. A write transaction that routes by the
configured ring (version 0) checks instead, once per transaction and shard, whether the state table
exists in its statement's snapshot (:func:`~sa_shardkit.ring_state.state_table_committed`, in
the BEGIN's round trip on psycopg). If it does, the stored ring is read and adopted and the fence above applies. If it does
not, the statement began before the first install committed on that shard, so the transaction did
too; the install then waits, on each shard, for every transaction that began before it committed
there (read from ``pg_stat_activity`` against that server's own clock,
:func:`sa_shardkit.rebalance.catalog.wait_out_unstored_writers`) before any move may start. No step of
that argument depends on how often a process looks for a stored ring: a process that never looks
is as safe as one that looks often (``refresh_seconds`` and ``SHARDKIT_RING_RECHECK_SECONDS`` only
say how soon it routes by a new ring without first meeting it in a fence).

Reads are validated afterwards (a seqlock): read where the state says, then re-read the state; if
the version changed or the key was cut over meanwhile, read again. So a key-routed reader sees each
committed row exactly once, on the shard that holds it at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.util.concurrency import await_only, in_greenlet

from .errors import StaleRingError, UnknownShardError
from .fused_write import can_defer, defer_check, pending_check, stored_check, unstored_check
from .replicas import INTERNAL
from .ring import HashRing, ShardKey
from .ring_state import (
    FenceRow,
    RingState,
    SourceMarks,
    bound_ms,
    bounded_fence,
    fence_timeout_error,
    fence_version_with_begin,
    read_any_state,
    read_fence,
    read_shard_state,
    read_value_fence,
    row_to_state,
    state_table_committed,
)
from .scatter.connected import fan_out_connected
from .scatter.fanout import FanOut

if TYPE_CHECKING:
    from .manager import ShardManager

T = TypeVar("T")
log = logging.getLogger("sa_shardkit.placement")

MovingRead = tuple[ShardKey, str, RingState]
"""A read routing answer that a cut-over may invalidate: (key, shard answered, state it was under)."""

_UNSTORED = "shardkit_unstored_in"
"""``conn.info`` key: the transaction that found no stored ring on this connection's shard."""

_watched_reads: ContextVar[list[MovingRead] | None] = ContextVar("shardkit_watched_reads", default=None)

MAX_REROUTES = 20
REFRESH_SECONDS = 5.0
"""How often (at most) a process re-reads the stored ring before routing (``refresh_seconds``)."""
STICKY_SECONDS = 0.5
"""How long a session write keeps a moving key's routing answer (see ``shard_for_write``)."""
RECHECK_ENV = "SHARDKIT_RING_RECHECK_SECONDS"
REFRESH_WAIT_SECONDS = 0.5
CURRENT_MARGIN = 0.8
"""A scatter re-reads the stored ring first when the last read began this share of the recheck
horizon ago or more (:meth:`Placement.ensure_current`)."""
"""How long a routing call waits for a due re-read of the stored ring before using the current one."""
PROBE_FALLBACKS = 2
"""Further shards a stored-ring check tries, one after another, when the probed one fails."""
"""How long a routing call waits for a due re-read of the stored ring before using the current one."""


def unstored_recheck_seconds() -> float:
    """How often (at most) any process re-reads the stored ring (or looks for one, none stored):
    ``refresh_seconds`` is capped at it.

    ``SHARDKIT_RING_RECHECK_SECONDS`` (default 5). Before a ring is stored it is only how soon such
    a process routes by a newly stored ring without first meeting it in a write's fence: safety does
    not depend on it (the unstored-ring check in every write transaction, see the module
    docstring). After a move's start bump the mover waits it out before it commits a copy
    (:func:`sa_shardkit.rebalance.catalog.wait_out_move_start`): a process that has not seen the move
    scatters unfiltered. So set it the same for every process of a fleet.
    """
    value = os.environ.get(RECHECK_ENV)
    return REFRESH_SECONDS if not value else max(0.0, float(value))


def _blocking(work: Callable[[], T]) -> T:
    """Run sync database work; inside an async session's greenlet, in a worker thread."""
    if in_greenlet():
        return await_only(asyncio.to_thread(work))  # type: ignore[no-any-return]
    return work()


def _connection_info(conn: Connection) -> dict[Any, Any]:
    """``conn.info`` (the pool record's info), read without its calls."""
    fairy = conn._dbapi_connection
    record = fairy._connection_record if fairy is not None else None
    info: dict[Any, Any] = record.info if record is not None else conn.info  # (memoized on the record)
    return info


class _DeferredCheck:
    """The fence check of one shard's write transaction, made by the connection's next statement
    (:class:`sa_shardkit.fused_write.PendingCheck`): with no ring stored (``version`` 0), that none
    is; with one, the state row locked ``FOR KEY SHARE`` at ``version`` (keys that are not moving)."""

    __slots__ = ("bound", "keys", "name", "placement", "shard", "sql", "transaction", "version")

    def __init__(
        self,
        transaction: Any,
        placement: Placement,
        shard: str,
        key: ShardKey,
        version: int,
        bound: float | None,
    ) -> None:
        self.transaction = transaction
        self.placement = placement
        self.shard = shard
        self.keys = [key]
        self.version = version
        self.bound = bound
        self.name, self.sql = (
            unstored_check()
            if version == 0
            else stored_check(version, None if bound is None else bound_ms(bound))
        )

    def checked(self, conn: Connection) -> None:
        """The check passed: with no ring stored, recorded as :meth:`Placement._unstored_here` does."""
        if self.version == 0:
            _connection_info(conn)[_UNSTORED] = self.transaction

    def timed_out(self, conn: Connection) -> None:
        raise fence_timeout_error(self.shard, bound_ms(self.bound or 0) / 1000, own=True)

    def fence_again(self, conn: Connection) -> None:
        """The fence the ordinary way, for every key deferred (it adopts a stored or newer ring)."""
        for key in self.keys:
            self.placement.fence_write(conn, self.shard, key, checked=True)


class Placement:
    """The fleet's routing for one process: the stored ring, followed as it changes.

    ``manager.shard_for`` answers through it. Writers that manage their own Core transactions use
    :meth:`begin_write` (``manager.transaction``) or :meth:`fence_write`; readers :meth:`read`.
    """

    def __init__(
        self, manager: ShardManager, configured: HashRing, *, refresh_seconds: float = REFRESH_SECONDS
    ) -> None:
        self.manager = manager
        self._refresh_seconds = REFRESH_SECONDS
        self.refresh_seconds = refresh_seconds
        self._configured = configured
        self._state = RingState(0, configured)
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._loaded = False
        self._unsure = False
        """The last fleet read failed somewhere: unstored-ring writes check for a ring themselves."""
        self._refresh_at = 0.0  # first use reads the stored ring
        self._current_since = -math.inf
        """``time.monotonic()`` when the last read that reached a shard began (:meth:`ensure_current`)."""
        self._sticky: dict[Any, tuple[int, str, float]] = {}
        self._scatter: tuple[RingState, tuple[str, ...], tuple[str, ...]] | None = None
        self._postgres = False
        self._postgres_for: object = None  # the manager's settings _postgres was computed for
        self._probe: str | None = None
        """The shard that answered the last probe (probed first next time)."""
        self.probes = 0
        """Stored-ring checks so far (one shard's row each)."""
        self.fleet_reads = 0
        """Of which read every shard (a version change was seen, or the probes failed)."""
        self._held: dict[int, list[Connection]] = {}

    @property
    def refresh_seconds(self) -> float:
        """At most this often routing re-reads the stored ring first (:meth:`maybe_refresh`), as
        configured; the interval used is capped at :func:`unstored_recheck_seconds`."""
        return self._refresh_seconds

    @refresh_seconds.setter
    def refresh_seconds(self, seconds: float) -> None:
        horizon = unstored_recheck_seconds()
        if seconds > horizon and seconds != REFRESH_SECONDS:  # asked for (the default is capped quietly)
            log.warning(
                "refresh_seconds=%g is longer than %s=%g: capped at %g s (a move waits that long after "
                "it starts for every process to see it; a process that re-read the ring less often "
                "would scatter by the old ring and see copies twice)",
                seconds,
                RECHECK_ENV,
                horizon,
                horizon,
            )
        self._refresh_seconds = seconds

    # -- the state -----------------------------------------------------------------------------

    @property
    def state(self) -> RingState:
        """The state routing uses now (version 0: no stored ring, the configured one)."""
        return self._state

    @property
    def ring(self) -> HashRing:
        """The ring keys are routed by (the stored one when there is one); refreshed when due."""
        self.maybe_refresh()
        return self._state.ring

    @property
    def configured_ring(self) -> HashRing:
        return self._configured

    def configure(self, ring: HashRing) -> None:
        """The ring to use while none is stored; the stored ring is re-read on next use."""
        with self._lock:
            self._configured = ring
            if self._state.version == 0:
                self._state = RingState(0, ring)
            self._refresh_at = 0.0

    def moving(self) -> bool:
        """Is a move in flight (reads of moving keys need re-checking)? Refreshes when due."""
        self.maybe_refresh()
        return self._state.target is not None

    def fences_writes(self) -> bool:
        """Do writes take the fence? Whenever the fleet has a PostgreSQL shard: with a stored ring
        the state row is locked; before one is stored, the transaction checks that none is (see
        the module docstring). SQLite files: never."""
        if self._state.version > 0:
            return True
        settings = self.manager.settings
        if self._postgres_for is not settings:
            self._postgres = bool(self._postgres_shards())
            self._postgres_for = settings
        return self._postgres

    def refresh(self, *, log_failures: bool = True) -> RingState:
        """Check the stored ring now, in O(1): one shard's state row; the whole fleet only when
        that row shows a version other than this process's (adopting the newest one found).

        The probed shard is the first member of the current state's ring that this configuration
        lists (the first shard configured while no ring is stored): every version bump of a move
        and the first install write the shards in ring order, so it is the first to show a new
        version. A probe that fails falls back to the next member (logged, naming the shard,
        unless ``log_failures=False``) and later probes start from the shard that answered.
        Routing never depends on the probe for safety: every fenced write and validated read
        checks the version stored on the shard it uses (see the module docstring).
        """
        started = time.monotonic()
        self._refresh_at = started + self._interval()
        candidates = self._probe_order()
        if not candidates:
            self._refresh_at = math.inf  # SQLite files and the like: nothing is ever stored
            self._loaded = True
            return self._state
        known = self._state.version
        errors: dict[str, BaseException] = {}
        probed: RingState | None = None
        answered: str | None = None
        for shard_id in candidates[: 1 + PROBE_FALLBACKS]:
            outcome = _blocking(lambda s=shard_id: self._read_fleet([s], check_table=known == 0))  # type: ignore[misc]
            if shard_id in outcome.results:
                row = outcome.results[shard_id]
                probed = None if row is None else row_to_state(shard_id, row).state
                answered = shard_id
                break
            errors[shard_id] = outcome.errors.get(shard_id) or RuntimeError("no answer")
        self.probes += 1
        if answered is not None:
            self._probe = answered
        if answered is not None:
            self._current_since = started
        if answered is None or (probed.version if probed is not None else 0) != known:
            self._refresh_fleet(errors, log_failures, started)  # a change (or no answer): read every shard
        else:
            self._unsure = bool(errors) and known == 0
            self._loaded = True
            if errors and log_failures:
                self._log_unread(errors, f"read it on {answered}")
        self._refresh_at = started + self._interval()
        return self._state

    def _refresh_fleet(self, errors: dict[str, BaseException], log_failures: bool, started: float) -> None:
        """Read every configured shard's state row; adopt the newest (rare: after a change)."""
        ids = self._postgres_shards()
        self.fleet_reads += 1
        outcome = _blocking(lambda: self._read_fleet(ids))
        if outcome.results:
            self._current_since = max(self._current_since, started)
        states = [row_to_state(s, r).state for s, r in outcome.results.items() if r is not None]
        if states:
            self._adopt(max(states, key=lambda st: st.version))
        self._unsure = bool(outcome.errors)
        self._loaded = True
        if outcome.errors and log_failures:
            self._log_unread(outcome.errors, f"routing by version {self._state.version}")
        elif errors and log_failures:
            self._log_unread(errors, f"read the other shards; routing by version {self._state.version}")

    @staticmethod
    def _log_unread(errors: dict[str, BaseException], then: str) -> None:
        error = next(iter(errors.values()))
        log.warning(
            "could not read the stored ring on %s (%s); %s",
            ", ".join(errors),
            str(error).splitlines()[0] if str(error) else type(error).__name__,
            then,
        )

    def _postgres_shards(self) -> list[str]:
        # by the configured URL: asking the engine would create every shard's
        return [
            s
            for s in self.manager.shard_ids
            if self.manager.config(s).primary_url.get_backend_name() == "postgresql"
        ]

    def _probe_order(self) -> list[str]:
        """Shards to probe, best first: the stored ring's members this configuration lists, in
        ring order (the order bumps are written), then the other configured shards; the shard
        that answered the last probe goes first."""
        listed = self._postgres_shards()
        if not listed:
            return []
        listed_set = set(listed)
        members = [s for s in self._state.shard_ids if s in listed_set]
        order = [*members, *(s for s in listed if s not in members)]
        preferred = self._probe
        if preferred is not None and preferred in members:
            order.remove(preferred)
            order.insert(0, preferred)
        return order

    def maybe_refresh(self) -> None:
        """:meth:`refresh` at most every ``refresh_seconds``; the first call waits for the first
        read; a later one re-reads in a worker thread and waits for it up to
        :data:`REFRESH_WAIT_SECONDS` (a slow or frozen shard never stalls routing); other threads
        route by the current state meanwhile."""
        if time.monotonic() < self._refresh_at:
            return
        if not self._loaded:
            if in_greenlet():  # a lock held across an await would stall the event loop: read too
                self.refresh()
                return
            with self._refreshing:
                if not self._loaded:
                    self.refresh()
            return
        if not self._refreshing.acquire(blocking=False):
            return  # another thread is re-reading it: route by the current state meanwhile
        if time.monotonic() < self._refresh_at:
            self._refreshing.release()
            return
        worker = threading.Thread(target=self._refresh_and_release, name="shardkit-ring", daemon=True)
        worker.start()
        if not in_greenlet():  # a quick answer is used now; a shard that is down never stalls routing
            worker.join(REFRESH_WAIT_SECONDS)

    def ensure_current(self) -> None:
        """Before a scatter goes by the current state: it must have been read less than the recheck
        horizon ago (:func:`unstored_recheck_seconds`, less a margin for the scatter to begin).

        A move's mover commits no copy before the horizon has passed since its start bump (and
        every transaction begun by then has ended), so a scatter by a state read after that bump
        or begun within the horizon of a read never sees a copy unfiltered. A process whose ring
        check is slow (a frozen probe shard: :meth:`maybe_refresh` stops waiting after
        :data:`REFRESH_WAIT_SECONDS` and routes by what it has) would scatter by an older state:
        here it waits for that check instead, and raises :class:`StaleRingError` when no shard
        answered it (nothing was run)."""
        if self._refresh_at == math.inf:
            return  # nothing is ever stored (SQLite files and the like)
        horizon = unstored_recheck_seconds()
        if time.monotonic() - self._current_since < horizon * CURRENT_MARGIN:
            return
        if in_greenlet():  # a lock held across an await would stall the event loop
            self.refresh()
        else:
            with self._refreshing:  # waits for a re-read in progress (a slow probe) to end
                if time.monotonic() - self._current_since >= horizon * CURRENT_MARGIN:
                    self.refresh()
        if time.monotonic() - self._current_since >= horizon:
            raise StaleRingError(
                f"could not re-read the stored ring on any shard within {RECHECK_ENV}={horizon:g} s: "
                "a scatter by the ring read before could see a move's copies twice; retry"
            )

    def _refresh_and_release(self) -> None:
        try:
            self.refresh()
        except Exception as error:  # noqa: BLE001 - logged; routing keeps the current state
            log.warning("could not re-read the stored ring: %s", error)
        finally:
            self._refreshing.release()

    def expire(self) -> None:
        """Re-read the stored ring before the next routing decision."""
        self._refresh_at = 0.0

    def _interval(self) -> float:
        # never longer than the horizon the first install and every move's start wait out
        # (sa_shardkit.rebalance.catalog.wait_out_stale_routers): a process that re-read less often
        # could route by a ring older than the one the mover relies on every process having seen
        return min(self._refresh_seconds, unstored_recheck_seconds())

    def _read_fleet(self, ids: list[str], *, check_table: bool = True) -> FanOut[Any]:
        """Every shard's state row at once; a shard that is down or frozen costs one connect
        timeout (it is skipped, and reported), never a hang. ``check_table=False``: one statement
        per shard (a shard without the table fails)."""

        def one(shard_id: str, conn: Connection) -> Any:
            conn.execution_options(**{INTERNAL: True})  # routing's own query, not the application's
            row = read_any_state(conn, check_table=check_table)
            conn.rollback()
            return row

        engines = {s: self.manager.engine(s) for s in ids}
        timeouts = self.manager.scatter_timeouts(ids)
        return fan_out_connected(engines, timeouts, one, limit=self.manager.budget.limit)

    def _adopt(self, state: RingState | None) -> bool:
        """Switch to ``state`` when it is newer; True when it was."""
        if state is None or state.version <= self._state.version:
            return False
        with self._lock:
            if state.version > self._state.version:
                self._state = state
        return True

    def _superseded(self, decided: RingState, found: RingState | None) -> bool:
        """Whether ``found`` (what a shard stores) is newer than ``decided``, the state the caller
        decides under (adopted too). Not :meth:`_adopt`'s answer: another thread may have adopted
        ``found`` in between, and the caller must still decide again under it."""
        if found is None or found.version <= decided.version:
            return False
        self._adopt(found)
        return True

    # -- shards the configuration lacks ----------------------------------------------------------

    def _require(self, shard_id: str, key: ShardKey, state: RingState) -> str:
        if not self.manager.has_shard(shard_id):
            raise UnknownShardError(
                f"ring version {state.version} places key {key!r} on {shard_id}, which this process's "
                f"configuration does not list: add {shard_id}.url",
                shard_id=shard_id,
            )
        return shard_id

    def unlisted(self, shard_id: str) -> UnknownShardError:
        """The error for a scatter that must reach ``shard_id``, a ring member the config lacks."""
        return UnknownShardError(
            f"ring version {self._state.version} places keys on {shard_id}, which this process's "
            f"configuration does not list: add {shard_id}.url",
            shard_id=shard_id,
        )

    def scatter_shards(self) -> tuple[str, ...]:
        """Every shard that may hold rows now: the stored ring's members (old and new while a move
        is in flight), in configuration order, then members the configuration lacks."""
        self.maybe_refresh()
        state, configured = self._state, self.manager.shard_ids
        cached = self._scatter
        if cached is not None and cached[0] is state and cached[1] == configured:
            return cached[2]
        members = state.shard_ids
        shards = (*(s for s in configured if s in members), *(s for s in members if s not in configured))
        self._scatter = (state, configured, shards)
        return shards

    def require_listed(self) -> None:
        """Raise :class:`UnknownShardError` when the stored ring has a member the config lacks."""
        for shard_id in self.scatter_shards():
            if not self.manager.has_shard(shard_id):
                raise self.unlisted(shard_id)

    # -- routing -------------------------------------------------------------------------------

    def shard_for(self, key: ShardKey) -> str:
        """The shard a write of ``key`` goes to now (for a key not moving: its owner)."""
        return self.shards_for_key(key, write=True)[0]

    def value_shards(
        self, value: ShardKey, *, mode: str = "read", state: RingState | None = None
    ) -> tuple[str, ...]:
        """Where rows *positioned* by ``value``'s ring position live (lookup rows, saga log rows):
        tables that the shard-key mover does not move, but :mod:`sa_shardkit.rebalance.positioned`
        does, after every key moved and before the final version bump.

        * ``"read"``: the value's shard in the ring, then, while a move changes it, its shard in
          the target ring: read them **in this order** (the mover copies, then deletes);
        * ``"write"``: where a new row goes: the target ring's shard while a move is in flight
          (first check that the old shard stores this version, so no reader of the older version
          reads the old shard alone);
        * ``"lock"``: both shards, old first (the order writers take per-value locks in).

        ``state`` (default: the current one) lets a caller keep one answer for a whole operation.
        """
        if state is None:
            if time.monotonic() >= self._refresh_at:
                self.maybe_refresh()
            state = self._state
        old = state.ring.get_shard(value)
        if state.target is None:
            return (self._require(old, value, state),)
        new = state.target.get_shard(value)
        if mode == "write":
            return (self._require(new, value, state),)
        if new == old:
            return (self._require(old, value, state),)
        return (self._require(old, value, state), self._require(new, value, state))

    def settled_shard(self, key: ShardKey) -> str | None:
        """The one shard holding ``key`` while no move is in flight (the stored ring refreshed when
        due, as :meth:`shards_for_key` does); None while a move is: ask :meth:`shards_for_key` and
        watch the reads. The session's keyed reads ask this first: one check, no tuple."""
        if time.monotonic() >= self._refresh_at:
            self.maybe_refresh()
        state = self._state
        if state.target is not None:
            return None
        shard = state.ring.get_shard(key)
        if shard not in self.manager._configs:  # the listed shards, without a call per key
            self._require(shard, key, state)
        return shard

    def shards_for_key(self, key: ShardKey, *, write: bool = False) -> tuple[str, ...]:
        """For :func:`sa_shardkit.routing.shards_for_key`: where the key's rows are now.

        A read answer that a cut-over can invalidate (the key's old shard, or any answer given
        while the ring version changed) is recorded for the :meth:`watch_reads` in progress.
        """
        if time.monotonic() >= self._refresh_at:
            self.maybe_refresh()
        state = self._state
        if state.target is None:
            return (self._require(state.ring.get_shard(key), key, state),)
        shard = self.shard_for_write(key, sticky=write)
        if not write:
            watched = _watched_reads.get()
            if watched is not None:
                move = state.move_of(key)
                if self._state is not state or (move is not None and shard == move[0]):
                    watched.append((key, shard, state))
        return (shard,)

    @contextmanager
    def watch_reads(self) -> Iterator[list[MovingRead]]:
        """Collect the read routing answers a concurrent cut-over may invalidate (this context
        only); check them with :meth:`reads_still_valid` after the read ran. Also the moment a
        due :meth:`maybe_refresh` runs, before the read is routed."""
        self.maybe_refresh()
        watched: list[MovingRead] = []
        token = _watched_reads.set(watched)
        try:
            yield watched
        finally:
            _watched_reads.reset(token)

    def reads_still_valid(self, reads: list[MovingRead]) -> bool:
        """After a read: are the rows of every watched key still on the shard it was read from?

        False when a key was cut over meanwhile (its rows left the old shard, maybe before the
        read) or the ring version changed: route and read again.
        """
        for key, shard, state in reads:
            if self._state is not state:
                return False
            try:
                if self._moved(shard, key, state) or self._state is not state:
                    return False
            except _Reroute:
                return False
        return True

    def ring_changed(self, shard_ids: Iterable[str]) -> bool:
        """After a keyed read found nothing: does one of ``shard_ids`` store a newer ring version?

        One small query per shard (its state row), adopting what it finds; True means the rows may
        have moved under a version this process had not seen yet: route and read again. Every
        source shard of a move stores the new version before any row leaves it, so asking the
        shard that was read is enough.
        """
        state = self._state
        for shard_id in shard_ids:
            if self.manager.engine(shard_id).dialect.name != "postgresql":
                continue
            row = _blocking(lambda s=shard_id: self._fence_row(s, None, None, state.version > 0))  # type: ignore[misc]
            self._adopt(row.state)
        return self._state is not state

    def _fence_row(self, shard_id: str, key: ShardKey | None, key_type: str | None, installed: bool) -> Any:
        with self.manager.connect(shard_id) as conn:
            conn.execution_options(**{INTERNAL: True})
            row = read_fence(conn, key, key_type, installed=installed)
            conn.rollback()
        return row

    def _moved(self, source: str, key: ShardKey, state: RingState) -> bool:
        """Whether ``key`` has been cut over from ``source`` (an unlocked read; adopts newer state)."""
        self._require(source, key, state)
        row = _blocking(lambda: self._fence_row(source, key, state.key_type, True))
        if row.state is not None and row.state.version > state.version:
            self._adopt(row.state)
            raise _Reroute
        return bool(row.moved) and row.state is not None and row.state.version == state.version

    def shard_for_write(self, key: ShardKey, *, sticky: bool = False) -> str:
        """Where a write of ``key`` goes now (the fence in the transaction confirms it).

        ``sticky=True`` (writes routed by the session) repeats the answer for a moving key for
        :data:`STICKY_SECONDS`, so the rows of one flush (an order and its items) cannot be split
        between the old and the new shard by a cut-over that lands between them. A stale answer
        is caught by the fence (:class:`StaleRingError`), which also forgets it.
        """
        for _ in range(MAX_REROUTES):
            state = self._state
            move = state.move_of(key)
            if move is None:
                return self._require(state.owner(key), key, state)
            now = time.monotonic()
            if sticky:
                hit = self._sticky.get(key)
                if hit is not None and hit[0] == state.version and hit[2] > now:
                    return hit[1]
            try:
                shard = move[1] if self._moved(move[0], key, state) else move[0]
            except _Reroute:
                continue
            self._require(shard, key, state)
            if sticky:
                if len(self._sticky) > 10_000:
                    self._sticky.clear()
                self._sticky[key] = (state.version, shard, now + STICKY_SECONDS)
            return shard
        raise StaleRingError(f"the ring kept changing while routing key {key!r}; retry")

    # -- the write fence -------------------------------------------------------------------------

    def fence_write(
        self,
        conn: Connection,
        shard_id: str,
        key: ShardKey,
        *,
        checked: bool = False,
        deferrable: bool = False,
    ) -> None:
        """Hold the fence for writing ``key`` on ``shard_id`` in ``conn``'s transaction.

        Call it before the transaction's first write of ``key``. Raises :class:`StaleRingError`
        (naming the right shard) when ``key`` does not belong on ``shard_id``; the transaction must
        then be rolled back and retried there. With no stored ring it is one small query per
        transaction (that none is stored yet); SQLite connections cost nothing. ``checked``: the
        caller asked :meth:`fences_writes` already (it said True). ``deferrable``: the caller's next
        statement on ``conn`` is its first write of ``key`` and goes through the connection's own
        execute (a session flush): the fence's check may ride on it, with the BEGIN, when the key
        is not moving (:mod:`sa_shardkit.fused_write`).
        """
        if (not checked and not self.fences_writes()) or conn.dialect.name != "postgresql":
            return
        try:
            # what _fence_write's first pass does, without its call and _unstored_fence's
            if deferrable and self._deferred_here(conn, shard_id, key):
                return
            if self._state.version == 0 and (self._unstored_here(conn) or self._stored_here(conn, shard_id)):
                return
            self._fence_write(conn, shard_id, key)
        except StaleRingError as stale:
            self._sticky.pop(key, None)
            if stale.shard_id is not None:  # where the key belongs now must be listed, or name it
                self._require(stale.shard_id, key, self._state)
            raise

    def _fence_write(self, conn: Connection, shard_id: str, key: ShardKey) -> None:
        for _ in range(MAX_REROUTES):
            state = self._state
            if state.version == 0:
                if self._unstored_fence(conn, shard_id):
                    return
                continue  # the shard's ring was adopted: fence under it
            move = state.move_of(key)
            if (
                move is None
                and state.version > 0
                and fence_version_with_begin(conn, shard_id, self._fence_timeout(shard_id)) == state.version
            ):
                # the fence, in the BEGIN's round trip: the row is locked under the ring routed by
                self._require_owner(state, key, shard_id)
                return
            lock = "FOR SHARE" if move is not None and move[0] == shard_id else "FOR KEY SHARE"
            row = self._bounded(
                conn,
                shard_id,
                lock,
                partial(
                    read_fence,
                    conn,
                    key,
                    state.key_type if move else None,
                    lock,
                    installed=state.version > 0,
                    shard_id=shard_id,
                ),
            )
            if self._superseded(state, row.state):
                continue  # the shard knows a newer ring: decide again under it
            if move is None:
                self._require_owner(state, key, shard_id)
                return
            source, target = move
            current = row.state is not None and row.state.version == state.version
            if shard_id == source:
                if current and row.moved:
                    raise StaleRingError(f"key {key!r} was moved to {target!r}", shard_id=target)
                return  # not cut over, and the batch that moves it now waits for our commit
            if shard_id == target:
                try:
                    if self._moved(source, key, state):
                        return  # cut over, and a cut-over is never undone within a version
                except _Reroute:
                    continue
                raise StaleRingError(f"key {key!r} has not moved to {target!r} yet", shard_id=source)
            raise StaleRingError(f"key {key!r} belongs on {source!r}, not {shard_id!r}", shard_id=source)
        raise StaleRingError(f"the ring kept changing while fencing key {key!r}; retry")

    @staticmethod
    def _require_owner(state: RingState, key: ShardKey, shard_id: str) -> None:
        """A key that is not moving must be written on the shard ``state``'s ring owns it to."""
        owner = state.owner(key)
        if owner != shard_id:
            raise StaleRingError(f"key {key!r} belongs on {owner!r}, not {shard_id!r}", shard_id=owner)

    # -- rows placed by another column, moved by fenced cut-over (the saga log by saga id) --------

    def shard_for_value(self, table: str, value: ShardKey) -> str:
        """The shard holding ``table``'s rows positioned at ``value`` now (rows placed by the ring
        position of a column other than the shard key: the saga log by saga id, see
        :mod:`sa_shardkit.rebalance.saga_log`). While a move is in flight they stay on the
        value's old shard until the mover cut ``table`` over past ``value`` on that shard."""
        if time.monotonic() >= self._refresh_at:
            self.maybe_refresh()
        for _ in range(MAX_REROUTES):
            state = self._state
            move = state.move_of(value)
            if move is None:
                return self._require(state.owner(value), value, state)
            try:
                shard = move[1] if self._value_moved(move[0], table, value, state) else move[0]
            except _Reroute:
                continue
            return self._require(shard, value, state)
        raise StaleRingError(f"the ring kept changing while routing {table} row {value!r}; retry")

    def _value_moved(self, source: str, table: str, value: ShardKey, state: RingState) -> bool:
        self._require(source, value, state)

        def read() -> Any:
            with self.manager.connect(source) as conn:
                conn.execution_options(**{INTERNAL: True})
                row = read_value_fence(conn, table, value)
                conn.rollback()
            return row

        row = _blocking(read)
        if row.state is not None and row.state.version > state.version:
            self._adopt(row.state)
            raise _Reroute
        return bool(row.moved) and row.state is not None and row.state.version == state.version

    def fence_value(self, conn: Connection, shard_id: str, table: str, value: ShardKey) -> None:
        """:meth:`fence_write` for ``table``'s rows placed at ``value`` (see
        :meth:`shard_for_value`): raises :class:`StaleRingError` naming the right shard when they
        do not live on ``shard_id``; while it is held, the mover cannot cut them over."""
        if not self.fences_writes() or conn.dialect.name != "postgresql":
            return
        if self._state.version == 0 and self._unstored_fence(conn, shard_id):
            return
        for _ in range(MAX_REROUTES):
            state = self._state
            move = state.move_of(value)
            if move is None or move[0] == shard_id:
                lock = "FOR KEY SHARE" if move is None else "FOR SHARE"
                row = self._bounded(
                    conn,
                    shard_id,
                    lock,
                    partial(read_value_fence, conn, table, value, lock, shard_id=shard_id)
                    if move
                    else partial(
                        read_fence, conn, None, None, lock, installed=state.version > 0, shard_id=shard_id
                    ),
                )
                if self._superseded(state, row.state):
                    continue
                if move is None:
                    owner = state.owner(value)
                    if owner != shard_id:
                        raise StaleRingError(
                            f"{table} row {value!r} belongs on {owner!r}, not {shard_id!r}", shard_id=owner
                        )
                    return
                if row.state is not None and row.state.version == state.version and row.moved:
                    raise StaleRingError(f"{table} row {value!r} was moved to {move[1]!r}", shard_id=move[1])
                return  # not cut over; the batch that moves it waits for our commit
            if move[1] == shard_id:
                row = self._key_share(conn, shard_id)
                if self._superseded(state, row.state):
                    continue
                try:
                    if self._value_moved(move[0], table, value, state):
                        return  # cut over, and a cut-over is never undone within a version
                except _Reroute:
                    continue
                raise StaleRingError(
                    f"{table} row {value!r} has not moved to {shard_id!r} yet", shard_id=move[0]
                )
            raise StaleRingError(
                f"{table} row {value!r} belongs on {move[0]!r}, not {shard_id!r}", shard_id=move[0]
            )
        raise StaleRingError(f"the ring kept changing while fencing {table} row {value!r}; retry")

    def fence(
        self,
        conn: Connection,
        shard_id: str,
        keys: Iterable[ShardKey] = (),
        values: Iterable[tuple[str, ShardKey]] = (),
    ) -> None:
        """:meth:`fence_write` for each of ``keys`` and :meth:`fence_value` for each ``(table,
        value)`` in one transaction; with no move in flight all of it is one read of the state row."""
        if not self.fences_writes() or conn.dialect.name != "postgresql":
            return
        if self._state.version == 0 and self._unstored_fence(conn, shard_id):
            return
        keys, values = list(keys), list(values)
        state = self._state
        if state.target is None:
            row = self._key_share(conn, shard_id, installed=state.version > 0)
            if not self._superseded(state, row.state):
                for item in [*keys, *(v for _, v in values)]:
                    owner = state.owner(item)
                    if owner != shard_id:
                        self._sticky.pop(item, None)
                        raise StaleRingError(
                            f"{item!r} belongs on {owner!r}, not {shard_id!r}", shard_id=owner
                        )
                return
        for key in keys:
            self.fence_write(conn, shard_id, key)
        for table, value in values:
            self.fence_value(conn, shard_id, table, value)

    def _unstored_fence(self, conn: Connection, shard: str) -> bool:
        """The fence while this process has seen no stored ring: True when none is stored on this
        shard in this transaction's check (write as routed: nothing moves before the first
        install, which waits for this transaction); else the shard's ring is adopted (False:
        fence under it)."""
        return self._unstored_here(conn) or self._stored_here(conn, shard)

    def _stored_here(self, conn: Connection, shard: str) -> bool:
        """:meth:`_unstored_fence` once the state table was found committed on ``shard``."""
        row = self._key_share(conn, shard)  # a ring is stored here
        if row.state is None:
            conn.info[_UNSTORED] = conn.get_transaction()  # a table without a ring: none stored
            return True
        self._adopt(row.state)
        self.expire()  # and the fleet's newest, on the next routing decision
        return False

    def _deferred_here(self, conn: Connection, shard: str, key: ShardKey) -> bool:
        """True when the fence for writing ``key`` is checked by ``conn``'s next statement (or, with
        no ring stored, was checked in this transaction already): :mod:`sa_shardkit.fused_write`.
        Raises :class:`StaleRingError` when the ring routed by puts ``key`` elsewhere."""
        transaction = conn._transaction
        if transaction is None:
            return False
        state = self._state
        version = state.version
        if version == 0:
            if _connection_info(conn).get(_UNSTORED) is transaction:
                return True
        elif state.move_of(key) is not None:
            return False  # a moving key's fence reads its source's watermark: the ordinary way
        pending = pending_check(conn)
        if isinstance(pending, _DeferredCheck) and pending.transaction is transaction:
            if pending.shard != shard or pending.version != version:
                return False  # the ordinary fence; the mark is then resolved the ordinary way too
            if version:
                self._require_owner(state, key, shard)
            pending.keys.append(key)
            return True
        if not can_defer(conn):
            return False
        if version:
            self._require_owner(state, key, shard)  # the check holds the row at this version
        defer_check(conn, _DeferredCheck(transaction, self, shard, key, version, self._fence_timeout(shard)))
        return True

    @staticmethod
    def _unstored_here(conn: Connection) -> bool:
        """No ring stored on this shard as of this transaction's check (made once per transaction)."""
        transaction = conn._transaction  # what get_transaction() returns
        info = _connection_info(conn)
        if transaction is not None and info.get(_UNSTORED) is transaction:
            return True
        if state_table_committed(conn):
            return False
        info[_UNSTORED] = transaction
        return True

    @contextmanager
    def begin_write(self, key: ShardKey) -> Iterator[Connection]:
        """A connection in a transaction on ``key``'s shard with the fence held; commits on exit.

        A key that moved meanwhile is re-routed before the block runs (the block runs once).
        """
        for _ in range(MAX_REROUTES):
            shard_id = self.shards_for_key(key, write=True)[0]
            conn = self.manager.connect(shard_id)
            try:
                conn.begin()
                try:
                    self.fence_write(conn, shard_id, key)
                except StaleRingError:
                    conn.rollback()
                    continue
                yield conn
                conn.commit()
                return
            finally:
                conn.close()
        raise StaleRingError(f"could not find a stable shard for key {key!r}; retry")

    def read(self, key: ShardKey, work: Callable[[Connection], T]) -> T:
        """Run ``work`` on the shard holding ``key``'s rows, validated against concurrent moves."""
        for _ in range(MAX_REROUTES):
            self.maybe_refresh()
            state = self._state
            move = state.move_of(key)
            try:
                shard_id = self.shard_for_write(key) if move else self._require(state.owner(key), key, state)
                with self.manager.connect(shard_id) as conn:
                    result = work(conn)
                    conn.rollback()
                if self._still_valid(state, key, shard_id, move):
                    return result
            except _Reroute:
                continue
        raise StaleRingError(f"the ring kept changing while reading key {key!r}; retry")

    def _still_valid(self, state: RingState, key: ShardKey, shard_id: str, move: Any) -> bool:
        """After a read: did the rows of ``key`` stay on ``shard_id`` while we read?"""
        if move is not None and shard_id == move[0]:
            return not self._moved(shard_id, key, state) and self._state is state
        if self.manager.engine(shard_id).dialect.name != "postgresql":
            return True
        row = self._fence_row(shard_id, None, None, state.version > 0)
        if self._superseded(state, row.state):
            return False
        return self._state is state

    # -- scatters during a move -----------------------------------------------------------------

    def source_marks(self, *, hold: bool = False) -> SourceMarks | None:
        """How far each source of the move in flight has cut over, read from the sources now
        (in parallel); None when no move is in flight. Version -1 when the state changed (a
        source stores a newer one, which is adopted): route again.

        ``hold=True`` keeps every source's fence (``FOR SHARE``, as a writer of a moving key
        does) until :meth:`release_marks`: no cut-over commits meanwhile, so the marks hold for
        the whole scatter (it waits for a cut-over in progress, at most one batch's fence)."""
        state = self._state
        if state.target is None:
            return None
        sources = [s for s in state.sources if self.manager.has_shard(s)]
        if hold:
            return self._hold_marks(state, sources)
        outcome = _blocking(lambda: self._read_marks(sources))
        if outcome.errors:
            raise next(iter(outcome.errors.values()))
        rows = {s: row_to_state(s, r) for s, r in outcome.results.items() if r is not None}
        return self._marks(state, sources, rows)

    def _read_marks(self, sources: list[str]) -> FanOut[Any]:
        def one(shard_id: str, conn: Connection) -> Any:
            conn.execution_options(**{INTERNAL: True})
            row = read_any_state(conn)
            conn.rollback()
            return row

        engines = {s: self.manager.engine(s) for s in sources}
        return fan_out_connected(engines, self.manager.scatter_timeouts(sources), one)

    def _hold_marks(self, state: RingState, sources: list[str]) -> SourceMarks:
        held: list[Connection] = []
        rows: dict[str, Any] = {}
        try:
            for shard_id in sources:
                conn = self.manager.connect(shard_id)
                held.append(conn)
                conn.execution_options(**{INTERNAL: True})
                conn.begin()
                rows[shard_id] = self._held_state(conn, shard_id)
        except BaseException:
            _close(held)
            raise
        marks = self._marks(state, sources, rows)
        if marks.version < 0:
            _close(held)
            return marks
        self._held[id(marks)] = held
        return marks

    def fence_sources(self, connection: Callable[[str], Connection]) -> SourceMarks | None:
        """Hold every source's fence in the caller's own transactions (``connection(shard)``;
        ``FOR SHARE``, as a writer of every moving key does) until they end, and return the marks
        read under it: no cut-over commits before then, so a write run on several shards and
        filtered by these marks (:func:`~sa_shardkit.scatter.ownership.own_rows_only`) changes each
        row once, where it lives. None when no move is in flight; version -1 when the state
        changed (a newer one is adopted: route again)."""
        state = self._state
        if state.target is None:
            return None
        sources = [s for s in state.sources if self.manager.has_shard(s)]
        rows = {s: self._held_state(connection(s), s) for s in sources}
        return self._marks(state, sources, rows)

    def _held_state(self, conn: Connection, shard_id: str) -> Any:
        """A source's state row under its fence (``FOR SHARE``), the wait bounded (fence_timeout)."""
        return self._bounded(
            conn,
            shard_id,
            "FOR SHARE",
            lambda: read_shard_state(conn, shard_id, lock="FOR SHARE", check_table=False),
        )

    def _bounded(self, conn: Connection, shard_id: str, lock: str, read: Callable[..., T]) -> T:
        """``read()`` (a fence on ``shard_id``) with its lock wait bounded by the shard's
        ``fence_timeout`` (FenceTimeoutError naming the shard). ``FOR SHARE`` (a moving key's
        writer; it waits for a cut-over): :func:`~sa_shardkit.ring_state.bounded_fence`, which
        reports the effective bound. ``FOR KEY SHARE`` (every write transaction; it waits only for
        a version bump): ``read(bound=...)``, bounded inside the fence's own statement
        (:func:`~sa_shardkit.ring_state.bounded_lock_sql`), so it costs no round trip."""
        seconds = self._fence_timeout(shard_id)
        if lock != "FOR SHARE":
            return read(bound=seconds)
        return bounded_fence(conn, shard_id, seconds, read)

    def _fence_timeout(self, shard_id: str) -> float | None:
        """The shard's ``fence_timeout`` (None for a shard this process has no config for)."""
        return self.manager.config(shard_id).fence_timeout if self.manager.has_shard(shard_id) else None

    def _key_share(self, conn: Connection, shard_id: str, *, installed: bool = True) -> FenceRow:
        """The shard's state row ``FOR KEY SHARE`` (the fence of keys that are not moving), the wait
        for a version bump bounded by the shard's ``fence_timeout`` in the same statement."""
        return read_fence(
            conn,
            None,
            None,
            "FOR KEY SHARE",
            installed=installed,
            shard_id=shard_id,
            bound=self._fence_timeout(shard_id),
        )

    def release_marks(self, marks: SourceMarks | None) -> None:
        """End the fences :meth:`source_marks` holds for ``marks`` (if any)."""
        if marks is not None:
            _close(self._held.pop(id(marks), []))

    def _marks(self, state: RingState, sources: list[str], rows: dict[str, Any]) -> SourceMarks:
        """The marks of ``state``'s sources; version -1 when a source is at another version (a
        newer state found is adopted): the caller routes again."""
        found = [r.state for r in rows.values() if r is not None]
        if found:
            self._adopt(max(found, key=lambda st: st.version))
        marks = tuple(
            (s, rows[s].watermark, rows[s].drained)
            for s in sources
            if rows.get(s) is not None and rows[s].state.version == state.version
        )
        current = len(marks) == len(sources) and self._state is state
        return SourceMarks(state.version if current else -1, state.key_type, marks)

    def describe(self, key: ShardKey) -> dict[str, Any]:
        """Where ``key`` lives now, for logs and the CLI."""
        state = self._state
        return {"version": state.version, "moving": state.move_of(key), "shard": self.shard_for_write(key)}


def _close(connections: list[Connection]) -> None:
    for conn in connections:
        try:
            conn.rollback()
        finally:
            conn.close()


class _Reroute(Exception):
    """Internal: the shard knows a newer ring; decide again."""
