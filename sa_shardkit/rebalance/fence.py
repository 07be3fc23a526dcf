"""Routing by the stored ring state, with the fence that keeps stale writers off moved ranges.

Every write transaction on a shard first reads that shard's state row with a lock (the fence):

* a key that is not moving: ``FOR KEY SHARE``. Only a version bump (a key update, preceded by
  ``FOR UPDATE``) conflicts, so after a bump no writer of the older version is still in flight, and
  a writer that arrives later sees the newer version and re-routes;
* a key that is moving: ``FOR SHARE`` on the *source* shard's row, which conflicts with the
  ``FOR NO KEY UPDATE`` the mover holds while it cuts a batch over. If the source's watermark has
  passed the key (or the source is drained), the key lives on the target now and the write goes
  there; otherwise it stays on the source, and the batch that moves the key waits for the commit.

Reads are validated afterwards (a seqlock): read where the state says, then re-read the state; if
the version changed or the key was cut over meanwhile, read again. So a key-routed reader sees each
committed row exactly once, on the shard that holds it at that moment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..errors import StaleRingError
from ..manager import ShardManager
from ..ring import ShardKey
from .catalog import (
    STATE_TABLE,
    RingState,
    check_key_type,
    load_ring_state,
    read_shard_state,
    row_to_state,
)

T = TypeVar("T")
log = logging.getLogger("sa_shardkit.rebalance")

MovingRead = tuple[ShardKey, str, "RingState"]
"""A read routing answer that a cut-over may invalidate: (key, shard answered, state it was under)."""

_watched_reads: ContextVar[list[MovingRead] | None] = ContextVar("shardkit_watched_reads", default=None)

MAX_REROUTES = 20
REFRESH_SECONDS = 5.0
"""How often (at most) session reads re-read the stored ring before routing (see ``maybe_refresh``)."""
STICKY_SECONDS = 0.5
"""How long a session write keeps a moving key's routing answer (see ``shard_for_write``)."""


@dataclass(frozen=True)
class FenceRow:
    """A shard's state row as a writer or reader sees it, with the key's cut-over status."""

    state: RingState | None
    moved: bool


def read_fence(
    conn: Connection, key: ShardKey | None, key_type: str | None, lock: str = "", *, installed: bool = True
) -> FenceRow:
    """The shard's state row (locked as asked) and whether ``key`` was cut over from this shard.

    ``installed=False`` first checks that the state table exists (a fleet without a stored ring).
    """
    if key is None or key_type is None:
        row = read_shard_state(conn, "", lock=lock, check_table=not installed)
        return FenceRow(row.state if row else None, False)
    sql_type = check_key_type(key_type)
    moved = (
        f"(drained OR (watermark IS NOT NULL AND CAST(:k AS {sql_type}) <= CAST(watermark AS {sql_type})))"
    )
    result = conn.execute(
        text(
            f"SELECT version, ring, target_ring, key_type, watermark, drained, {moved} AS moved "
            f"FROM {STATE_TABLE} {lock}"
        ),
        {"k": key},
    ).first()
    if result is None:
        return FenceRow(None, False)
    return FenceRow(row_to_state("", result).state, bool(result.moved))


class RingRouter:
    """The fleet's routing for one application process: the stored ring, followed as it changes.

    Create one per process next to the :class:`~sa_shardkit.ShardManager`; it keeps the manager's
    ring in step with the stored version (``manager.shard_for`` answers for keys that are not
    moving). Writers use :meth:`begin_write` (or :meth:`fence_write` in their own transaction);
    readers use :meth:`read`.
    """

    def __init__(
        self,
        manager: ShardManager,
        state: RingState | None = None,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self.manager = manager
        self.refresh_seconds = refresh_seconds
        """At most this often a session read re-reads the stored ring first (:meth:`maybe_refresh`)."""
        self._lock = threading.Lock()
        self._sticky: dict[Any, tuple[int, str, float]] = {}
        self._state = state or load_ring_state(manager) or RingState(0, manager.ring)
        self._refresh_at = time.monotonic() + refresh_seconds
        manager.set_ring(self._state.ring)
        from .session_fence import install

        install()
        manager.placement = self  # type: ignore[attr-defined]  # routing.shards_for_key asks us

    def detach(self) -> None:
        """Stop answering routing for the manager (it routes by its own ring again)."""
        if getattr(self.manager, "placement", None) is self:
            self.manager.placement = None  # type: ignore[attr-defined]

    def shards_for_key(self, key: ShardKey, *, write: bool = False) -> tuple[str, ...]:
        """For :func:`sa_shardkit.routing.shards_for_key`: where the key's rows are now.

        A read answer that a cut-over can invalidate (the key's old shard, or any answer given
        while the ring version changed) is recorded for the :meth:`watch_reads` in progress.
        """
        state = self._state
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

    @property
    def state(self) -> RingState:
        return self._state

    def refresh(self) -> RingState:
        """Re-read the stored state (normally not needed: every fenced operation follows it)."""
        newest = load_ring_state(self.manager)
        if newest is not None:
            self._adopt(newest)
        return self._state

    def maybe_refresh(self) -> None:
        """:meth:`refresh` at most every ``refresh_seconds`` (session reads call it), so a
        process that only reads follows a completed move even for reads that find rows (scatters too).

        When a shard cannot be reached, this refresh is skipped (logged): reads that need it fail on their own.
        """
        now = time.monotonic()
        if now < self._refresh_at:
            return
        self._refresh_at = now + self.refresh_seconds
        try:
            self.refresh()
        except SQLAlchemyError as exc:
            log.warning(
                "could not re-read the stored ring (%s); routing by version %s", exc, self._state.version
            )

    def ring_changed(self, shard_ids: Iterable[str]) -> bool:
        """After a keyed read found nothing: does one of ``shard_ids`` store a newer ring version?

        One small query per shard (its state row), adopting what it finds; True means the rows may
        have moved under a version this process had not seen yet: route and read again. Every
        source shard of a move stores the new version before any row leaves it, so asking the
        shard that was read is enough.
        """
        state = self._state
        for shard_id in shard_ids:
            with self.manager.connect(shard_id) as conn:
                row = read_fence(conn, None, None, installed=state.version > 0)
                conn.rollback()
            self._adopt(row.state)
        return self._state is not state

    def _adopt(self, state: RingState | None) -> bool:
        """Switch to ``state`` when it is newer; True when it was."""
        if state is None or state.version <= self._state.version:
            return False
        with self._lock:
            if state.version > self._state.version:
                self._state = state
                self.manager.set_ring(state.ring)
        return True

    # -- routing -------------------------------------------------------------------------------

    def _moved(self, source: str, key: ShardKey, state: RingState) -> bool:
        """Whether ``key`` has been cut over from ``source`` (an unlocked read; adopts newer state)."""
        with self.manager.connect(source) as conn:
            row = read_fence(conn, key, state.key_type)
            conn.rollback()
        if row.state is not None and row.state.version > state.version:
            self._adopt(row.state)
            raise _Reroute
        return row.moved and row.state is not None and row.state.version == state.version

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
                return state.owner(key)
            now = time.monotonic()
            if sticky:
                hit = self._sticky.get(key)
                if hit is not None and hit[0] == state.version and hit[2] > now:
                    return hit[1]
            try:
                shard = move[1] if self._moved(move[0], key, state) else move[0]
            except _Reroute:
                continue
            if sticky:
                if len(self._sticky) > 10_000:
                    self._sticky.clear()
                self._sticky[key] = (state.version, shard, now + STICKY_SECONDS)
            return shard
        raise StaleRingError(f"the ring kept changing while routing key {key!r}; retry")

    def fence_write(self, conn: Connection, shard_id: str, key: ShardKey) -> None:
        """Hold the fence for writing ``key`` on ``shard_id`` in ``conn``'s transaction.

        Call it before the transaction's first write of ``key``. Raises :class:`StaleRingError`
        (naming the right shard) when ``key`` does not belong on ``shard_id``; the transaction must
        then be rolled back and retried there.
        """
        try:
            self._fence_write(conn, shard_id, key)
        except StaleRingError:
            self._sticky.pop(key, None)
            raise

    def _fence_write(self, conn: Connection, shard_id: str, key: ShardKey) -> None:
        for _ in range(MAX_REROUTES):
            state = self._state
            move = state.move_of(key)
            lock = "FOR SHARE" if move is not None and move[0] == shard_id else "FOR KEY SHARE"
            row = read_fence(conn, key, state.key_type if move else None, lock, installed=state.version > 0)
            if row.state is not None and self._adopt(row.state):
                continue  # the shard knows a newer ring: decide again under it
            if move is None:
                owner = state.owner(key)
                if owner != shard_id:
                    raise StaleRingError(
                        f"key {key!r} belongs on {owner!r}, not {shard_id!r}", shard_id=owner
                    )
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

    @contextmanager
    def begin_write(self, key: ShardKey) -> Iterator[Connection]:
        """A connection in a transaction on ``key``'s shard with the fence held; commits on exit."""
        for _ in range(MAX_REROUTES):
            shard_id = self.shard_for_write(key)
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
            state = self._state
            move = state.move_of(key)
            try:
                shard_id = self.shard_for_write(key) if move else state.owner(key)
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
        with self.manager.connect(shard_id) as conn:
            row = read_fence(conn, None, None, installed=state.version > 0)
            conn.rollback()
        if row.state is not None and self._adopt(row.state):
            return False
        return self._state is state


class _Reroute(Exception):
    """Internal: the shard knows a newer ring; decide again."""


def describe_route(router: RingRouter, key: ShardKey) -> dict[str, Any]:
    """Where ``key`` lives now, for logs and the CLI."""
    state = router.state
    move = state.move_of(key)
    return {"version": state.version, "moving": move, "shard": router.shard_for_write(key)}
