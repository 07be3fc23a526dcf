"""The ring state the shards store: the row format, and reading it (one shard, or the fleet).

Every shard holds a one-row table ``shardkit_ring_state`` with the ring every application process
routes by (``ring``), the ring being moved to while a rebalance is in flight (``target_ring``),
and, for the rebalance, this shard's own progress as a *source*: ``watermark`` (every moving key
``<=`` it, in the shard-key column's SQL order, has been cut over) and ``drained`` (all of them).
The row holds shard ids and weights only: never a URL or a password (each process's own
configuration says where a shard is).

This module sits below the manager: :mod:`sa_shardkit.placement` (which every
:class:`~sa_shardkit.ShardManager` routes through) reads the row here; :mod:`sa_shardkit.rebalance`
writes it (:mod:`sa_shardkit.rebalance.catalog`). Locking rules: see :mod:`sa_shardkit.placement`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from .errors import FenceTimeoutError, RebalanceError
from .fused_begin import LockWaitTimedOut, first_value_with_begin
from .ring import HashRing, ShardKey, moved_arcs

if TYPE_CHECKING:
    from .manager import ShardManager

STATE_TABLE = "shardkit_ring_state"

STATE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
    " version bigint PRIMARY KEY,"
    " ring text NOT NULL,"
    " target_ring text,"
    " key_type text,"
    " watermark text,"
    " drained boolean NOT NULL DEFAULT false,"
    # per table moved by fenced cut-over (rows placed by a column other than the shard key: the saga
    # log by saga id): {"<table>": {"watermark": text, "drained": bool}} of this shard as a source
    " carried jsonb,"
    " updated_at timestamptz NOT NULL DEFAULT now())",
    # one row per shard: a unique index on a constant
    f"CREATE UNIQUE INDEX IF NOT EXISTS {STATE_TABLE}_one_row ON {STATE_TABLE} ((true))",
    # a table made before ``carried`` existed: the ALTER (an exclusive lock, which would queue every
    # writer's fence behind in-flight ones) runs only when the column is missing
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass("
    f"'{STATE_TABLE}') AND attname = 'carried' AND NOT attisdropped) THEN"
    f" ALTER TABLE {STATE_TABLE} ADD COLUMN carried jsonb; END IF; END $$",
)

MOVED_KEYS_TABLE = "shardkit_moved_keys"
"""Keys a move copied to this shard (as a target) and committed here before their source cut them
over: ``(k, version, source)``, ``k`` the key as text. A key listed for ``(version, source)`` whose
source has not cut it over yet (above the source's watermark, source not drained) is a copy no reader
may see: scatters during a move hide its rows (:mod:`sa_shardkit.scatter.ownership`)."""

MOVED_KEYS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {MOVED_KEYS_TABLE} ("
    " k text NOT NULL, version bigint NOT NULL, source text NOT NULL,"
    " PRIMARY KEY (k, version, source))"
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

    @cached_property
    def sources(self) -> tuple[str, ...]:
        """The shards that lose keys in the move in flight (none without one), in ring order."""
        if self.target is None:
            return ()
        losing = {arc.source for arc in moved_arcs(self.ring, self.target)}
        return tuple(s for s in self.ring.shard_ids if s in losing)

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


@dataclass(frozen=True)
class SourceMarks:
    """How far each source of the move at ``version`` has cut over, read from the sources
    themselves: ``(source, watermark, drained)`` per source. A scatter during the move hides the
    journaled copies (:data:`MOVED_KEYS_TABLE`) of keys its sources have not cut over by these
    marks; it is valid if the marks read after it are the same (no cut-over committed meanwhile)."""

    version: int
    key_type: str | None
    marks: tuple[tuple[str, str | None, bool], ...]

    @property
    def pending(self) -> tuple[tuple[str, str | None], ...]:
        """``(source, watermark)`` of the sources not drained yet (their copies may be hidden)."""
        return tuple((s, wm) for s, wm, drained in self.marks if not drained)


def create_state_table(conn: Connection) -> None:
    for ddl in STATE_DDL:
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


T = TypeVar("T")

_BOUND_LOCKS = text(
    "WITH p AS MATERIALIZED (SELECT current_setting('lock_timeout') AS prev,"
    " extract(epoch FROM CAST(current_setting('lock_timeout') AS interval)) * 1000 AS ms),"
    " b AS (SELECT prev, CAST(round(CASE WHEN ms > 0 AND ms < :ms THEN ms ELSE :ms END) AS bigint) AS ms FROM p)"
    " SELECT prev, ms, set_config('lock_timeout', CAST(ms AS text) || 'ms', true) FROM b"
)
_RESTORE_LOCKS = text("SELECT set_config('lock_timeout', :t, true)")
LOCK_NOT_AVAILABLE = "55P03"
"""SQLSTATE of a lock wait that ran out of ``lock_timeout``."""


def fence_timeout_error(shard_id: str, seconds: float, *, own: bool = False) -> FenceTimeoutError:
    """The error of a fence on ``shard_id`` that waited ``seconds`` (its lock timeout) for a
    rebalance step holding the shard's state row (``own``: or the transaction's own shorter one)."""
    bound = f"{seconds:g} s (fence_timeout" + (", or the transaction's shorter lock_timeout)" if own else ")")
    return FenceTimeoutError(
        f"shard {shard_id!r}: a rebalance step on it (a cut-over or a ring version bump) has held the "
        f"fence for longer than {bound}; the mover may be stuck: `shardkit rebalance --status`",
        shard_id=shard_id,
        seconds=seconds,
    )


def _lock_not_available(error: DBAPIError) -> bool:
    return getattr(error.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE


def bounded_fence(conn: Connection, shard_id: str, seconds: float | None, read: Callable[[], T]) -> T:
    """``read()`` (a fence: a locking read of ``shard_id``'s state row) with its lock wait bounded
    by ``seconds`` (the shard's ``fence_timeout``; None: unbounded).

    ``lock_timeout`` (or the caller's own, if shorter) is set for the transaction just before (``set_config(..., true)``: transaction
    scope, so PgBouncer's transaction pooling is fine) and put back right after, so the caller's
    own statements keep their setting. On expiry raises :class:`FenceTimeoutError` naming the
    shard; the transaction is then aborted and must be rolled back. (Three statements: the
    ``FOR KEY SHARE`` fence of every write is bounded in its own statement, :func:`bounded_lock_sql`.)
    """
    if seconds is None:
        return read()
    previous, bound, _ = conn.execute(_BOUND_LOCKS, {"ms": max(1, round(seconds * 1000))}).one()
    try:
        result = read()
    except DBAPIError as error:
        if not _lock_not_available(error):
            raise
        raise fence_timeout_error(shard_id, float(bound) / 1000) from error
    conn.execute(_RESTORE_LOCKS, {"t": previous})
    return result


def bound_ms(seconds: float) -> int:
    """A ``fence_timeout`` in whole milliseconds (at least 1) as the lock timeout it sets."""
    return max(1, round(seconds * 1000))


@lru_cache(maxsize=256)
def bounded_lock_sql(columns: str, lock: str, ms: int) -> str:
    """One statement: ``SELECT {columns} FROM`` the state row (aliased ``st``) locked ``lock``, the
    lock wait bounded by ``ms`` milliseconds (or the transaction's own shorter ``lock_timeout``),
    which is put back in the same statement once the row is locked. Always one row: its columns
    are NULL when the table has no row.

    The order is the plan's, not an assumption about evaluation order: the timeout is set in a
    materialized CTE that the locked scan joins (a row lock is taken by the ``LockRows`` node above
    that join, so after the CTE ran), and put back in the outer target list, computed only from the
    locked CTE's output row. On expiry the statement fails with ``lock_not_available`` (55P03) and
    the transaction is aborted (``set_config(..., true)`` is transaction-scoped: nothing leaks,
    under PgBouncer's transaction pooling too).
    """
    current = "current_setting('lock_timeout')"
    return (
        f"WITH shardkit_bound AS MATERIALIZED (SELECT {current} AS prev_lock_timeout,"
        f" set_config('lock_timeout', CASE WHEN ms > 0 AND ms < {ms} THEN {current} ELSE '{ms}ms' END, true)"
        f" AS lock_timeout FROM (SELECT extract(epoch FROM CAST({current} AS interval)) * 1000 AS ms) AS c),"
        f" shardkit_locked AS MATERIALIZED (SELECT {columns} FROM {STATE_TABLE} AS st, shardkit_bound"
        f" {lock} OF st)"
        " SELECT shardkit_locked.*, set_config('lock_timeout', shardkit_bound.prev_lock_timeout, true)"
        " AS restored_lock_timeout FROM shardkit_bound LEFT JOIN shardkit_locked ON true"
    )


def _locked_row(
    conn: Connection, columns: str, lock: str, params: dict[str, Any], shard_id: str, bound: float | None
) -> Any:
    """The state row's ``columns`` (read ``lock``; the wait bounded by ``bound`` seconds when
    given: :func:`bounded_lock_sql`), or None without a row. A bounded wait that expires raises
    :class:`FenceTimeoutError` naming ``shard_id`` (the transaction is aborted)."""
    if bound is None or not lock:
        return conn.execute(text(f"SELECT {columns} FROM {STATE_TABLE} AS st {lock}"), params).first()
    ms = bound_ms(bound)
    try:
        row = conn.execute(text(bounded_lock_sql(columns, lock, ms)), params).first()
    except DBAPIError as error:
        if not _lock_not_available(error):
            raise
        raise fence_timeout_error(shard_id, ms / 1000, own=True) from error
    return None if row is None or row.version is None else row


_COLUMNS = "version, ring, target_ring, key_type, watermark, drained"


def read_shard_state(
    conn: Connection, shard_id: str, *, lock: str = "", check_table: bool = True, bound: float | None = None
) -> ShardState | None:
    """This shard's row (``lock``: '', 'FOR KEY SHARE', 'FOR SHARE', 'FOR NO KEY UPDATE', 'FOR
    UPDATE'; ``bound``: seconds the lock may wait, :func:`bounded_lock_sql`)."""
    if check_table and not state_table_exists(conn):
        return None
    row = _locked_row(conn, _COLUMNS, lock, {}, shard_id, bound)
    return None if row is None else row_to_state(shard_id, row)


FENCE_VERSION_SQL = f"SELECT version FROM {STATE_TABLE} FOR KEY SHARE"
_FENCE_VERSION = FENCE_VERSION_SQL.encode()


def fence_version_with_begin(conn: Connection, shard_id: str = "", bound: float | None = None) -> int | None:
    """The ring version this shard stores, its state row locked ``FOR KEY SHARE`` (the fence of a
    key that is not moving), read as the first statement of ``conn``'s transaction together with its
    BEGIN (:mod:`.fused_begin`); None when that was not possible (the transaction has begun, no
    row, another driver, any error): then read the row the ordinary way (:func:`read_fence`).

    ``bound`` (the shard's ``fence_timeout``) bounds the lock wait in the same statement
    (:func:`bounded_lock_sql`: still one round trip); a wait that runs out (a version bump held by
    a frozen mover) raises :class:`FenceTimeoutError` naming ``shard_id``, the transaction rolled back."""
    if bound is None:
        name, sql = b"shardkit_fence_version", _FENCE_VERSION
    else:
        ms = bound_ms(bound)
        name, sql = (
            b"shardkit_fence_version_%d" % ms,
            bounded_lock_sql("version", "FOR KEY SHARE", ms).encode(),
        )
    try:
        value = first_value_with_begin(conn, name, sql)
    except LockWaitTimedOut as timed_out:
        raise fence_timeout_error(shard_id, bound_ms(bound or 0) / 1000, own=True) from timed_out
    return None if value is None else int(value)


def read_fleet_state(manager: ShardManager, shard_ids: Iterable[str] | None = None) -> dict[str, ShardState]:
    """Every reachable shard's row, read in parallel (shards without the table, or not on
    PostgreSQL, are left out)."""
    ids = list(manager.shard_ids if shard_ids is None else shard_ids)
    rows = manager.run_on_all(lambda conn: read_any_state(conn), shard_ids=ids)
    return {s: row_to_state(s, r) for s, r in rows.items() if r is not None}


_COMMITTED_TABLE = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    f" WHERE c.relname = '{STATE_TABLE}' AND n.nspname = ANY (current_schemas(false)))"
)


_COMMITTED_BYTES = _COMMITTED_TABLE.encode()


def state_table_committed(conn: Connection) -> bool:
    """Whether the state table exists in this statement's snapshot (PostgreSQL).

    Unlike ``to_regclass`` (the backend's catalog cache, which a transaction that began before the
    table was created may not have refreshed), this reads ``pg_class`` under the statement's own
    MVCC snapshot: False means the table's creation had not committed when the statement began.
    The unstored-ring fence relies on that (:meth:`sa_shardkit.placement.Placement.fence_write`).
    As a transaction's first statement it rides on the BEGIN's round trip (:mod:`.fused_begin`).
    """
    # the transaction's first statement; a catalog read under MVCC never waits for a lock
    fused = first_value_with_begin(conn, b"shardkit_state_table_committed", _COMMITTED_BYTES, lock_free=True)
    if fused is not None:
        return fused == b"t"
    return bool(conn.exec_driver_sql(_COMMITTED_TABLE).scalar())  # a fixed string: no compile step


def read_any_state(conn: Connection, *, check_table: bool = True) -> Any:
    """This shard's raw state row, or None (no table, or not PostgreSQL).

    ``check_table=False``: one statement, for a fleet known to store a ring (no table raises).
    """
    if conn.dialect.name != "postgresql" or (check_table and not state_table_exists(conn)):
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


def check_key_type(key_type: str) -> str:
    """Guard the SQL type name that fence queries splice into ``CAST(... AS <type>)``."""
    if not _SQL_TYPE.match(key_type):
        raise RebalanceError(f"unsupported shard-key SQL type {key_type!r}")
    return key_type


@dataclass(frozen=True)
class FenceRow:
    """A shard's state row as a writer or reader sees it, with the key's cut-over status."""

    state: RingState | None
    moved: bool


def read_fence(
    conn: Connection,
    key: ShardKey | None,
    key_type: str | None,
    lock: str = "",
    *,
    installed: bool = True,
    shard_id: str = "",
    bound: float | None = None,
) -> FenceRow:
    """The shard's state row (locked as asked) and whether ``key`` was cut over from this shard.

    ``installed=False`` first checks that the state table exists (a fleet without a stored ring).
    ``bound``: seconds the lock may wait (FenceTimeoutError naming ``shard_id``), in the same statement.
    """
    if not installed and not state_table_exists(conn):
        return FenceRow(None, False)
    if key is None or key_type is None:
        row = _locked_row(conn, _COLUMNS, lock, {}, shard_id, bound)
        return FenceRow(None if row is None else row_to_state(shard_id, row).state, False)
    sql_type = check_key_type(key_type)
    moved = (
        f"(drained OR (watermark IS NOT NULL AND CAST(:k AS {sql_type}) <= CAST(watermark AS {sql_type})))"
    )
    result = _locked_row(conn, f"{_COLUMNS}, {moved} AS moved", lock, {"k": key}, shard_id, bound)
    if result is None:
        return FenceRow(None, False)
    return FenceRow(row_to_state(shard_id, result).state, bool(result.moved))


def value_text(value: ShardKey) -> str:
    """A value (a saga id) as the text its ring position and its watermark order are taken from
    (``str`` of an int, a str or a UUID: the bytes :func:`sa_shardkit.ring.key_bytes` hashes)."""
    return value if isinstance(value, str) else str(value)


def read_value_fence(
    conn: Connection,
    table: str,
    value: ShardKey,
    lock: str = "",
    *,
    shard_id: str = "",
    bound: float | None = None,
) -> FenceRow:
    """The shard's state row (locked as asked) and whether the rows of ``table`` placed at
    ``value`` were cut over from this shard (its progress in ``carried``, compared as text in
    the "C" collation, which is the order the mover walks them in)."""
    progress = "to_jsonb(st) -> 'carried' -> CAST(:t AS text)"
    moved = (
        f"(COALESCE(CAST({progress} ->> 'drained' AS boolean), false)"
        f' OR ({progress} ->> \'watermark\') COLLATE "C" >= CAST(:v AS text) COLLATE "C")'
    )
    params = {"t": table, "v": value_text(value)}
    result = _locked_row(
        conn, f"{_COLUMNS}, COALESCE({moved}, false) AS moved", lock, params, shard_id, bound
    )
    if result is None:
        return FenceRow(None, False)
    return FenceRow(row_to_state(shard_id, result).state, bool(result.moved))


__all__ = [
    "MOVED_KEYS_DDL",
    "MOVED_KEYS_TABLE",
    "STATE_DDL",
    "STATE_TABLE",
    "LOCK_NOT_AVAILABLE",
    "FenceRow",
    "SourceMarks",
    "RingState",
    "ShardState",
    "bound_ms",
    "bounded_fence",
    "bounded_lock_sql",
    "check_key_type",
    "create_state_table",
    "load_ring_state",
    "fence_timeout_error",
    "FENCE_VERSION_SQL",
    "fence_version_with_begin",
    "read_fence",
    "read_value_fence",
    "value_text",
    "read_any_state",
    "read_fleet_state",
    "read_shard_state",
    "ring_from_json",
    "row_to_state",
    "state_table_committed",
    "state_table_exists",
]
