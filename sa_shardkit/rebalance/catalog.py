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

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..errors import RebalanceError
from ..manager import ShardManager
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
                    "shard %s: waiting for %d transaction(s) that began before the ring was stored "
                    "(backend pids %s)",
                    shard_id,
                    len(pids),
                    sorted(pids),
                )
                logged = True
            if time.monotonic() > deadline:
                raise RebalanceError(
                    f"shard {shard_id!r}: transactions that began before the ring was stored are still "
                    f"open after {INSTALL_WAIT_LIMIT:g}s (backend pids {sorted(pids)}): they may write "
                    "by the unstored ring; end them and run again (the stored ring is kept)"
                )
            time.sleep(0.05)


def write_state(manager: ShardManager, state: RingState, shard_ids: Iterable[str]) -> None:
    """Bring every shard in ``shard_ids`` up to ``state`` (rows already at that version are kept).

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

    def bump(conn: Connection, shard_id: str) -> None:
        conn.execute(ddl)
        row = conn.execute(text(f"SELECT version FROM {STATE_TABLE} FOR UPDATE")).first()
        if row is None:
            conn.execute(
                text(
                    f"INSERT INTO {STATE_TABLE} (version, ring, target_ring, key_type) "
                    "VALUES (:version, :ring, :target_ring, :key_type)"
                ),
                payload,
            )
        elif int(row.version) < state.version:
            conn.execute(
                text(
                    f"UPDATE {STATE_TABLE} SET version = :version, ring = :ring,"
                    " target_ring = :target_ring, key_type = :key_type, watermark = NULL,"
                    " drained = false, carried = NULL, updated_at = now()"
                ),
                payload,
            )
        elif int(row.version) > state.version:
            raise RebalanceError(
                f"shard {shard_id!r} is at ring version {row.version}, newer than {state.version}: "
                "another rebalance ran meanwhile; re-read the state and plan again"
            )

    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn, conn.begin():
            bump(conn, shard_id)


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
    "wait_out_unstored_writers",
    "write_state",
]
