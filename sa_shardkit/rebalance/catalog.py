"""The shared ring state: one row per shard, stored in the shard itself.

Every shard holds a one-row table ``shardkit_ring_state`` with the ring every application process
must route by (``ring``), the ring being moved to while a rebalance is in flight (``target_ring``),
and, for the rebalance, this shard's own progress as a *source*: ``watermark`` (every moving key
``<=`` it, in the shard-key column's SQL order, has been cut over) and ``drained`` (all of them).

Why a row on every shard and not a catalog server: the fence that stops a stale writer must be
checked in the writer's own transaction on the shard it writes to, so that shard must hold the state.
The fleet agrees on a version because a move bumps every shard before any row moves, and finishes
every copy before the final bump. Locking rules (see :mod:`.fence`):

* ``version`` is the primary key, so a version bump is a key update: it conflicts with the
  ``FOR KEY SHARE`` lock every writer takes, so no writer of the old version is in flight after it;
* cutting over a batch updates ``watermark`` (a non-key update, ``FOR NO KEY UPDATE``): it conflicts
  with the ``FOR SHARE`` lock that only writers of a moving key take, so other writers never wait.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from psycopg.rows import namedtuple_row
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..errors import RebalanceError
from ..manager import ShardManager
from ..placement import unstored_recheck_seconds
from ..ring import HashRing
from ..ring_state import (
    MOVED_KEYS_DDL,
    STATE_DDL,
    STATE_TABLE,
    RingState,
    ShardState,
    check_key_type,
    create_state_table,
    load_ring_state,
    read_fleet_state,
    read_shard_state,
    ring_from_json,
    row_to_state,
    state_table_exists,
)
from .parallel import for_shards
from .record import MOVE_DDL

log = logging.getLogger("sa_shardkit.rebalance")

INSTALL_WAIT_LIMIT = 60.0
"""How long a first install waits for transactions that began before it to end (then refuses)."""


def install_ring(manager: ShardManager, ring: HashRing | None = None) -> RingState:
    """Store ``ring`` (default: the manager's) as version 1 on its shards; a no-op when already stored.

    The first rebalance (``shardkit rebalance --add/--remove``, or :func:`add_shard`) calls it;
    call it yourself to store the configured ring before any move. Later changes go through a
    rebalance, which bumps the version.
    """
    ring = ring or manager.ring
    current = load_ring_state(manager)
    if current is not None:
        if current.ring != ring and not current.in_flight:
            raise RebalanceError(
                f"the shards already store ring version {current.version} ({current.ring!r}); "
                "change it with a rebalance, not by installing another ring"
            )
        return current
    state = RingState(1, ring)
    write_state(manager, state, ring.shard_ids)
    wait_out_unstored_writers(manager, ring.shard_ids)
    manager.set_ring(ring)
    return state


def wait_out_unstored_writers(manager: ShardManager, shard_ids: Iterable[str]) -> None:
    """Return once no write routed before the first ring was stored can still be in flight.

    Call it after the ring is stored on every shard of ``shard_ids``. A write transaction of a
    process that has seen no stored ring checks, on the shard it writes, whether the ring-state table
    exists in its statement's snapshot (:meth:`~sa_shardkit.placement.Placement.fence_write`); only
    when it does not does it write unfenced, and then its transaction began before the ring was
    stored on that shard. So on each shard it is enough to wait for every transaction that began
    before now (the server's own clock, read after the ring was stored there): after that, every
    write to the shard is fenced, whatever its process believes and however rarely it looks for a
    stored ring. Only then may a move (which relies on the fence) start.
    """
    wait_out_stale_routers(
        manager,
        shard_ids,
        since="the ring was stored",
        risk="they may write by the unstored ring; end them and run again (the stored ring is kept)",
    )


def wait_out_move_start(manager: ShardManager, state: RingState, started_at: float) -> None:
    """Return once every process must route by ``state`` (a move in flight): call it after the
    start bump, before any copy of the move is committed on a target.

    Writers need no wait (the fence checks the version on the shard they write). A scatter does
    not: a process that has not re-read the stored ring since the bump scatters without the
    ownership filter (:mod:`sa_shardkit.scatter.ownership`), so a committed copy on a target that is
    already a member of the old ring (a remove; an add after an add) would show twice. A process
    re-reads the ring at most every ``refresh_seconds``, which is capped at
    :func:`~sa_shardkit.placement.unstored_recheck_seconds`, so a routing decision made after
    ``started_at`` (every shard stored ``state`` by then) plus that interval sees the move; one made
    earlier belongs to a transaction or statement that began earlier: wait for that moment, then for
    every such transaction on each shard to end (the same wait as the first install's).
    """
    wait_out_stale_routers(
        manager,
        state.shard_ids,
        not_before=started_at + unstored_recheck_seconds(),
        since=f"the move to ring version {state.version} started",
        risk=(
            "they may read by the ring before the move (a scatter would see a copy twice); "
            "end them and run --resume (the move is kept)"
        ),
    )


def wait_out_stale_routers(
    manager: ShardManager,
    shard_ids: Iterable[str],
    *,
    since: str,
    risk: str,
    not_before: float | None = None,
) -> None:
    """Sleep until ``not_before`` (``time.time()`` scale; None: no sleep), then, on each shard of
    ``shard_ids``, wait for every transaction that began before that shard's clock read then to end
    (up to :data:`INSTALL_WAIT_LIMIT`, then :class:`~sa_shardkit.RebalanceError` naming the
    backends). ``since`` / ``risk``: the change waited out and what such a transaction may do."""
    if not_before is not None:
        time.sleep(max(0.0, not_before - time.time()))
    deadline = time.monotonic() + INSTALL_WAIT_LIMIT
    for shard_id in shard_ids:
        horizon: Any = None
        logged = False
        while True:
            with manager.connect(shard_id) as conn:
                if conn.dialect.name != "postgresql":
                    break
                if horizon is None:
                    horizon = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
                pids = (
                    conn.execute(
                        text(
                            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                            " AND datname = current_database() AND xact_start < :horizon"
                        ),
                        {"horizon": horizon},
                    )
                    .scalars()
                    .all()
                )
                conn.rollback()
            if not pids:
                break
            if not logged:
                log.info(
                    "shard %s: waiting for %d transaction(s) that began before %s (backend pids %s)",
                    shard_id,
                    len(pids),
                    since,
                    sorted(pids),
                )
                logged = True
            if time.monotonic() > deadline:
                raise RebalanceError(
                    f"shard {shard_id!r}: transactions that began before {since} are still "
                    f"open after {INSTALL_WAIT_LIMIT:g}s (backend pids {sorted(pids)}): {risk}"
                )
            time.sleep(0.05)


def move_started_at(manager: ShardManager, state: RingState) -> float:
    """When the last shard of ``state`` stored it (``time.time()`` scale), for a resumed move.

    Read from each shard's state row: the bump sets ``updated_at`` (cut-overs also do, later,
    which only makes this later: a longer wait, never a shorter one). Each age is measured by the
    shard's own clock, so clock skew between this host and the servers does not shorten it."""
    now = time.time()
    started = now - unstored_recheck_seconds()  # no row at this version readable: wait in full
    for shard_id in state.shard_ids:
        if not manager.has_shard(shard_id):
            continue
        with manager.connect(shard_id) as conn:
            if conn.dialect.name != "postgresql":
                continue
            age = conn.execute(
                text(
                    f"SELECT extract(epoch FROM clock_timestamp() - updated_at) FROM {STATE_TABLE}"
                    " WHERE version = :v"
                ),
                {"v": state.version},
            ).scalar()
            conn.rollback()
        started = max(started, now - float(age)) if age is not None else now
    return started


def write_state(manager: ShardManager, state: RingState, shard_ids: Iterable[str]) -> bool:
    """Bring every shard in ``shard_ids`` up to ``state`` (rows already at that version are kept);
    True when a shard was bumped (or its row created) by this call.

    Each shard's row is locked ``FOR UPDATE`` first, so writers of older versions that are still in
    flight finish before the bump, and later ones see the new version (or fail to serialize).
    Shards are bumped one after the other, in ``shard_ids`` order (a kill leaves a prefix bumped).
    """
    payload = {
        "version": state.version,
        "ring": state.ring.to_json(),
        "target_ring": state.target.to_json() if state.target is not None else None,
        "key_type": state.key_type,
    }

    # the state table, the move record's table, which cut-overs update (.record), and the moved-keys
    # journal that targets keep and scatters read (before any reader can see a move), in one round trip
    ddl = text("; ".join((*STATE_DDL, MOVE_DDL, MOVED_KEYS_DDL)))

    lock = f"SELECT version FROM {STATE_TABLE} FOR UPDATE"
    # only a row at an older version changes; sent right after the lock, in the same round trip
    update = (
        f"UPDATE {STATE_TABLE} SET version = %(version)s, ring = %(ring)s,"
        " target_ring = %(target_ring)s, key_type = %(key_type)s, watermark = NULL,"
        " drained = false, carried = NULL, updated_at = clock_timestamp() WHERE version < %(version)s"
    )

    def bump(conn: Connection, shard_id: str, *, create: bool) -> bool:
        row = _locked_then_updated(conn, ddl if create else None, lock, update, payload)
        if row is None:
            conn.execute(
                text(
                    f"INSERT INTO {STATE_TABLE} (version, ring, target_ring, key_type, updated_at) "
                    "VALUES (:version, :ring, :target_ring, :key_type, clock_timestamp())"
                ),
                payload,
            )
            return True
        if int(row.version) > state.version:
            raise RebalanceError(
                f"shard {shard_id!r} is at ring version {row.version}, newer than {state.version}: "
                "another rebalance ran meanwhile; re-read the state and plan again"
            )
        return int(row.version) < state.version

    shard_ids = list(shard_ids)
    created = state.target is not None
    if created:
        # A reader adopts the move from the first shard bumped and may scatter at once to a later
        # one (a joining shard, bumped last): the ownership filter reads that shard's journal, so
        # every shard's tables are committed before any shard stores the move (in parallel: the
        # order only matters for the bumps).

        def create(conn: Connection, _: str) -> None:
            conn.execute(ddl)

        for_shards(manager, create, shard_ids)
    bumped = False
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn, conn.begin():
            bumped = bump(conn, shard_id, create=not created) or bumped
    return bumped


def _locked_then_updated(conn: Connection, ddl: Any, lock: str, update: str, payload: dict[str, Any]) -> Any:
    """The state row locked ``FOR UPDATE`` (None when there is none), after ``ddl`` (if given) and
    before ``update`` ran: one round trip on psycopg (pipeline mode), three otherwise."""
    raw = conn.connection.driver_connection
    if ddl is not None:
        conn.execute(ddl)
    if raw is None or not hasattr(raw, "pipeline"):
        row = conn.execute(text(lock)).first()
        conn.exec_driver_sql(update, payload)
        return row
    locked, updated = raw.cursor(row_factory=namedtuple_row), raw.cursor()
    with raw.pipeline():
        locked.execute(lock)
        updated.execute(update, payload)
    return locked.fetchone()


def describe(state: RingState) -> dict[str, Any]:
    """A JSON-ready summary for CLI output and logs."""
    return {
        "version": state.version,
        "ring": json.loads(state.ring.to_json()),
        "target_ring": json.loads(state.target.to_json()) if state.target is not None else None,
    }


__all__ = [
    "STATE_TABLE",
    "RingState",
    "ShardState",
    "check_key_type",
    "create_state_table",
    "describe",
    "install_ring",
    "load_ring_state",
    "read_fleet_state",
    "read_shard_state",
    "ring_from_json",
    "row_to_state",
    "state_table_exists",
    "move_started_at",
    "wait_out_move_start",
    "wait_out_stale_routers",
    "wait_out_unstored_writers",
    "write_state",
]
