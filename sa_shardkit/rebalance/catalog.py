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
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..errors import RebalanceError
from ..manager import ShardManager
from ..ring import HashRing, ShardKey
from .record import MOVE_DDL

STATE_TABLE = "shardkit_ring_state"

_DDL = (
    f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
    " version bigint PRIMARY KEY,"
    " ring text NOT NULL,"
    " target_ring text,"
    " key_type text,"
    " watermark text,"
    " drained boolean NOT NULL DEFAULT false,"
    " updated_at timestamptz NOT NULL DEFAULT now())",
    # one row per shard: a unique index on a constant
    f"CREATE UNIQUE INDEX IF NOT EXISTS {STATE_TABLE}_one_row ON {STATE_TABLE} ((true))",
)

_SQL_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_ ]*(\(\d+(,\s*\d+)?\))?$")


@dataclass(frozen=True)
class RingState:
    """The ring the fleet routes by at one version, and the ring it is moving to (if any)."""

    version: int
    ring: HashRing
    target: HashRing | None = None
    key_type: str | None = None
    """SQL type of the shard-key column (e.g. ``BIGINT``): the watermark is compared in that type."""

    @property
    def in_flight(self) -> bool:
        return self.target is not None

    def move_of(self, key: ShardKey) -> tuple[str, str] | None:
        """``(source, target)`` when ``key`` changes shard in the move in flight, else None."""
        if self.target is None:
            return None
        source = self.ring.get_shard(key)
        target = self.target.get_shard(key)
        return None if source == target else (source, target)

    def owner(self, key: ShardKey) -> str:
        """The key's shard when it is not moving (the ring; it equals the target ring then)."""
        return self.ring.get_shard(key)

    @property
    def shard_ids(self) -> tuple[str, ...]:
        """Every shard that holds a state row at this version: old and new members."""
        ids = dict.fromkeys(self.ring.shard_ids)
        if self.target is not None:
            ids.update(dict.fromkeys(self.target.shard_ids))
        return tuple(ids)


@dataclass(frozen=True)
class ShardState:
    """One shard's row: the fleet state it has seen, and its own progress as a source."""

    shard_id: str
    state: RingState
    watermark: str | None
    drained: bool


def create_state_table(conn: Connection) -> None:
    for ddl in _DDL:
        conn.execute(text(ddl))


@lru_cache(maxsize=64)
def ring_from_json(data: str) -> HashRing:
    """Parse a stored ring once: building one hashes every virtual node (~0.1 s); rings are immutable."""
    return HashRing.from_json(data)


@lru_cache(maxsize=64)
def _state(version: int, ring: str, target: str | None, key_type: str | None) -> RingState:
    return RingState(version, ring_from_json(ring), ring_from_json(target) if target else None, key_type)


def row_to_state(shard_id: str, row: Any) -> ShardState:
    state = _state(int(row.version), row.ring, row.target_ring, row.key_type)
    return ShardState(shard_id, state, row.watermark, bool(row.drained))


def state_table_exists(conn: Connection) -> bool:
    return conn.execute(text("SELECT to_regclass(:t)"), {"t": STATE_TABLE}).scalar() is not None


def read_shard_state(
    conn: Connection, shard_id: str, *, lock: str = "", check_table: bool = True
) -> ShardState | None:
    """This shard's row (``lock``: '', 'FOR KEY SHARE', 'FOR SHARE', 'FOR NO KEY UPDATE', 'FOR UPDATE')."""
    if check_table and not state_table_exists(conn):
        return None
    row = conn.execute(
        text(f"SELECT version, ring, target_ring, key_type, watermark, drained FROM {STATE_TABLE} {lock}")
    ).first()
    return None if row is None else row_to_state(shard_id, row)


def read_fleet_state(manager: ShardManager, shard_ids: Iterable[str] | None = None) -> dict[str, ShardState]:
    """Every reachable shard's row, read in parallel (shards without the table are left out)."""
    ids = list(manager.shard_ids if shard_ids is None else shard_ids)
    rows = manager.run_on_all(lambda conn: _read_any(conn), shard_ids=ids)
    return {s: row_to_state(s, r) for s, r in rows.items() if r is not None}


def _read_any(conn: Connection) -> Any:
    if not state_table_exists(conn):
        return None
    return conn.execute(
        text(f"SELECT version, ring, target_ring, key_type, watermark, drained FROM {STATE_TABLE}")
    ).first()


def load_ring_state(manager: ShardManager) -> RingState | None:
    """The fleet's newest state (the highest version any shard holds), or None before ``install``."""
    states = read_fleet_state(manager)
    if not states:
        return None
    return max((s.state for s in states.values()), key=lambda st: st.version)


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
    manager.set_ring(ring)
    return state


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

    # the state table and the move record's table, which cut-overs update (.record), in one round trip
    ddl = text("; ".join((*_DDL, MOVE_DDL)))

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
                    " drained = false, updated_at = now()"
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


def check_key_type(key_type: str) -> str:
    """Guard the SQL type name that fence queries splice into ``CAST(... AS <type>)``."""
    if not _SQL_TYPE.match(key_type):
        raise RebalanceError(f"unsupported shard-key SQL type {key_type!r}")
    return key_type


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
    "write_state",
]
