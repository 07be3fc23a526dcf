"""Reading and writing lookup rows on the shards that hold them.

Lookup rows are written outside the application's transaction, on connections of their own in
autocommit mode, so they are committed before the owning row's transaction commits. Every write of
an entry for a value first takes a PostgreSQL advisory lock for that value (session-level, on that
connection) and keeps it until the owning transaction has ended: writers of a unique value
(exclusive) and removers of an entry (exclusive) therefore never overlap an unfinished writer of the
same value, which is what lets them trust what they read of the owning rows.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from sqlalchemy import and_, delete, func, literal_column, select, text, tuple_, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from xxhash import xxh3_64_intdigest

from ..errors import LookupIndexError, ShardUnavailableError, StaleRingError
from ..faults import bounded_driver_call, unavailable
from ..ring import HashRing
from ..ring_state import STATE_TABLE, RingState
from ..routing import ring_shards, shards_for_key
from .declaration import LookupIndex, lookup_state_table

if TYPE_CHECKING:
    from ..manager import ShardManager

T = TypeVar("T")

LOCK_TIMEOUT_MS = 10_000
"""How long a write waits for another transaction's hold on the same value (then LookupIndexError)."""

READY_RECHECK_SECONDS = 5.0
"""A lookup not built yet is re-checked at most this often (reads scatter until it is built)."""


def lookup_shards(
    manager: ShardManager, values: Iterable[Any], *, write: bool, state: RingState | None = None
) -> dict[str, list[Any]]:
    """Lookup shard -> the values whose entries it holds (a lookup row lives at its value's ring
    position). ``write``: where new entries go (the target ring's position while a move is in
    flight); else every position an entry may be at (old first)."""
    return value_groups(manager, values, "write" if write else "lock", state)


def value_groups(
    manager: ShardManager, values: Iterable[Any], mode: str, state: RingState | None = None
) -> dict[str, list[Any]]:
    """Shard -> values, for :meth:`~sa_shardkit.placement.Placement.value_shards` ``mode``."""
    placement = manager.placement
    groups: dict[str, list[Any]] = {}
    for value in values:
        for shard in placement.value_shards(value, mode=mode, state=state):
            groups.setdefault(shard, []).append(value)
    return groups


def current_state(manager: ShardManager) -> RingState:
    """The ring state routing uses now (re-read first when due): one answer for one operation."""
    placement = manager.placement
    placement.maybe_refresh()
    return placement.state


def sql_type(column: Any) -> str:
    return str(column.type.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]


def resolve(manager: ShardManager, index: LookupIndex, values: Sequence[Any]) -> dict[Any, set[Any]]:
    """value -> the shard keys its entries name (one query per lookup shard, committed data).

    While a move changes a value's position, its old shard is read before its new one (the mover
    copies, then deletes), so an entry committed before the call is seen on one of them. Each query
    also reads the shard's stored ring version: a newer one than routing used means entries may
    have moved under it, so the ring is re-read and the lookup read again.
    """
    for _ in range(MAX_REREADS):
        state = current_state(manager)
        first: dict[str, list[Any]] = {}
        then: dict[str, list[Any]] = {}
        for value in values:
            shards = manager.placement.value_shards(value, mode="read", state=state)
            first.setdefault(shards[0], []).append(value)
            if len(shards) > 1:
                then.setdefault(shards[1], []).append(value)
        found: dict[Any, set[Any]] = {}
        newer = False
        for groups in (first, then):
            for shard, group in groups.items():
                try:
                    rows = autocommit_sql(manager, shard, *_entries_query(index, group, state))
                except Exception as error:
                    if not (_no_ring_table(error) and shard not in state.ring):
                        raise
                    continue  # a joining shard before its start bump: no writer wrote there yet
                for row in rows:
                    if state.version and row[0] is not None and int(row[0]) > state.version:
                        newer = True
                    if row[1] is not None:
                        found.setdefault(row[1], set()).add(row[2])
                if newer:
                    break
            if newer:
                break
        if not newer:
            return found
        manager.placement.refresh(log_failures=False)
    raise StaleRingError(f"lookup {index.describe()}: the ring kept changing while it was read; retry")


MAX_REREADS = 20


def _no_ring_table(error: BaseException) -> bool:
    """The shard has no ``shardkit_ring_state`` (a joining shard before the move's start bump)."""
    orig = getattr(error, "orig", error)
    return getattr(orig, "sqlstate", None) == "42P01" and STATE_TABLE in str(orig)


def _entries_query(index: LookupIndex, values: Sequence[Any], state: RingState) -> tuple[str, tuple[Any]]:
    """(shard's ring version, value, key) of the values' entries; the version row comes even when
    none matches. Without a stored ring, (None, value, key). One SQL string per lookup and shape,
    built once: one value is one scalar parameter (the common ``==`` and ``get()``; an array
    parameter costs its adaptation on both sides, 0.15-0.25 ms a read), several are one array."""
    versioned = bool(state.version)
    one = len(values) == 1
    sql = _entries_sql.get((index.name, versioned, one))
    if sql is None:
        kind = sql_type(index.column)
        match = f"l.value = CAST(%s AS {kind})" if one else f"l.value = ANY(CAST(%s AS {kind}[]))"
        if versioned:
            sql = f"SELECT s.version, l.value, l.shard_key FROM {STATE_TABLE} AS s LEFT JOIN {index.table.name} AS l ON {match}"
        else:
            sql = f"SELECT NULL, l.value, l.shard_key FROM {index.table.name} AS l WHERE {match}"
        _entries_sql[(index.name, versioned, one)] = sql
    return sql, (values[0] if one else list(values),)


_entries_sql: dict[tuple[str, bool, bool], str] = {}


def autocommit_rows(manager: ShardManager, shard: str, query: Any) -> list[Any]:
    """Run a read on a connection in autocommit mode: one round trip, no BEGIN/ROLLBACK.

    The lookup read sits in front of every lookup-routed query, so it is kept to the statement
    itself: the connection is one kept from an earlier lookup read when there is one (no checkout
    ping; a dead one is replaced and the read run again).
    """
    engine = manager.engine(shard)
    compiled = query.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
    return autocommit_sql(manager, shard, str(compiled), compiled.params)


def autocommit_sql(manager: ShardManager, shard: str, sql: str, params: Any) -> list[Any]:
    """:func:`autocommit_rows` of a driver-level SQL string and its parameters."""
    engine = manager.engine(shard)
    limit = manager.config(shard).query_timeout
    kept = _idle_take(manager, shard, READS)
    if kept is not None:
        try:
            rows = _fetch(kept, sql, params, limit)
        except Exception:  # noqa: BLE001 - a kept connection may have died while idle: a fresh one
            _discard_read(kept)
        else:
            _idle_give(manager, shard, kept, READS)
            return rows
    try:
        raw = engine.raw_connection()
    except (OperationalError, DBAPIError, psycopg.OperationalError) as error:  # raw_connection: unwrapped
        raise unavailable(shard, engine.url, error) from error
    try:
        raw.dbapi_connection.autocommit = True  # type: ignore[union-attr]
        rows = _fetch(raw, sql, params, limit)
    except psycopg.OperationalError as error:  # lost, or cut short by the watchdog: name the shard
        _discard_read(raw)
        raise unavailable(shard, engine.url, error) from error
    except Exception:
        _discard_read(raw)
        raise
    _idle_give(manager, shard, raw, READS)
    return rows


def _fetch(raw: Any, sql: str, params: Any, limit: float | None) -> list[Any]:
    """The rows of one driver-level read, bounded like a guarded engine's statement (``limit``)."""
    cursor = raw.cursor()

    def run() -> list[Any]:
        cursor.execute(sql, params)
        return list(cursor.fetchall())

    try:
        return bounded_driver_call(raw.dbapi_connection, limit, run)
    finally:
        cursor.close()


def _discard_read(raw: Any) -> None:
    raw.invalidate()
    raw.close()


def _close_read(raw: Any) -> None:
    """Back to the engine's pool, as the pool expects it (not in autocommit)."""
    try:
        raw.dbapi_connection.autocommit = False
    except Exception:  # noqa: BLE001 - a broken connection: the pool discards it
        raw.invalidate()
    raw.close()


def owner_has(manager: ShardManager, index: LookupIndex, value: Any, key: Any) -> bool:
    """Does a committed owning row with ``column == value`` and shard key ``key`` exist?"""
    query: Any = (
        select(literal_column("1"))
        .select_from(index.owner)
        .where(and_(index.column == value, index.key_column == key))
        .limit(1)
    )
    for shard in shards_for_key(manager, key):
        with manager.connect(shard) as conn:
            if conn.execute(query).first() is not None:
                return True
    return False


# -- readiness ------------------------------------------------------------------------------------

_ready: weakref.WeakKeyDictionary[ShardManager, dict[str, tuple[tuple[str, ...], float, str]]] = (
    weakref.WeakKeyDictionary()
)
"""manager -> lookup -> (the ring fingerprints it is trusted under, when that was read, the
fingerprint of the ring routing used then)."""
_fingerprints: dict[int, tuple[HashRing, str]] = {}


def ring_fingerprint(ring: HashRing) -> str:
    """Identifies a ring's placement: entries built under one ring sit at that ring's positions."""
    cached = _fingerprints.get(id(ring))
    if cached is not None and cached[0] is ring:
        return cached[1]
    fingerprint = f"{xxh3_64_intdigest(ring.to_json().encode()):016x}"
    if len(_fingerprints) > 32:  # rings are few; a process that makes many keeps only recent ones
        _fingerprints.clear()
    _fingerprints[id(ring)] = (ring, fingerprint)
    return fingerprint


def is_ready(manager: ShardManager, index: LookupIndex) -> bool:
    """Whether reads may trust ``index``: built (``shardkit lookups build``) and its entries at the
    positions of the ring routing uses.

    Before it is built a missing entry could hide a row. A rebalance moves the entries with their
    values' positions (:mod:`sa_shardkit.rebalance.lookup_tables`) and then adds the new ring to
    the rings the lookup is trusted under, before the final version bump; a ring it was not moved
    to (a ring changed some other way) reads every shard until the next build. The stored state
    is re-read at most every READY_RECHECK_SECONDS.
    """
    current = ring_fingerprint(manager.ring)
    known = _ready.setdefault(manager, {})
    cached = known.get(index.name)
    now = time.monotonic()
    if cached is not None and (
        current in cached[0] or (cached[2] == current and now - cached[1] < READY_RECHECK_SECONDS)
    ):
        return current in cached[0]
    state, trusted = read_state(manager, index)  # also at once when the ring changed (a move ended)
    known[index.name] = (trusted if state == "ready" else (), now, current)
    return state == "ready" and current in trusted


def forget_readiness() -> None:
    """Drop cached readiness (tests, and a process that rebuilt a lookup)."""
    _ready.clear()


def read_state(manager: ShardManager, index: LookupIndex) -> tuple[str | None, tuple[str, ...]]:
    """(state, ring fingerprints it is trusted under) on the catalog shard (the first ring shard)."""
    shard = ring_shards(manager)[0]
    query = select(lookup_state_table.c.state, lookup_state_table.c.progress).where(
        lookup_state_table.c.name == index.name
    )
    try:
        with manager.connect(shard) as conn:
            row = conn.execute(query).first()
    except ShardUnavailableError:
        raise
    except DBAPIError:  # no state table yet: not built
        return None, ()
    if row is None:
        return None, ()
    progress = row.progress if isinstance(row.progress, dict) else {}
    return row.state, trusted_rings(progress)


def trusted_rings(progress: dict[str, Any]) -> tuple[str, ...]:
    """The ring fingerprints a state row's progress says the entries are placed for."""
    rings = progress.get(RINGS_KEY)
    if isinstance(rings, list):
        return tuple(str(r) for r in rings)
    built = progress.get(RING_KEY)
    return (str(built),) if built else ()


RING_KEY = "_ring"
"""The key of the build's ring fingerprint in the state row's progress."""
RINGS_KEY = "_rings"
"""The rings (fingerprints) a rebalance moved the entries to, the build's first."""


# -- writes ---------------------------------------------------------------------------------------


@dataclass
class Entry:
    index: LookupIndex
    value: Any
    key: Any


@dataclass
class LookupConnections:
    """The autocommit connections (and so the advisory locks) one session transaction holds.

    They are direct connections (session-level advisory locks cannot go through a transaction-mode
    PgBouncer), kept for the next transaction once their locks are released (:data:`IDLE_KEEP` per
    shard, for at most :data:`IDLE_SECONDS`), so a lookup write costs its statement, not also a
    checkout's liveness ping. A kept connection that turns out dead on its first statement is
    replaced and the statement run again (it took no lock and wrote nothing).
    """

    manager: ShardManager
    conns: dict[str, Connection] = field(default_factory=dict)
    untested: set[str] = field(default_factory=set)

    def conn(self, shard: str) -> Connection:
        found = self.conns.get(shard)
        if found is None:
            found = _idle_take(self.manager, shard)
            if found is None:
                found = self.manager.connect_direct(shard).execution_options(isolation_level="AUTOCOMMIT")
            else:
                self.untested.add(shard)
            self.conns[shard] = found
        return found

    def call(self, shard: str, work: Callable[[Connection], T]) -> T:
        """``work(conn)`` on the shard's connection (replaced once if a kept one was dead)."""
        try:
            return self._call(shard, work)
        except _LockWaitTimeout as timeout:
            raise timeout.error(shard) from timeout.__cause__

    def _call(self, shard: str, work: Callable[[Connection], T]) -> T:
        conn = self.conn(shard)
        if shard not in self.untested:
            return work(conn)
        self.untested.discard(shard)
        try:
            return work(conn)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            self.conns.pop(shard, None)
            conn.close()
            return work(self.conn(shard))

    def release(self, *, background: bool = False) -> None:
        """Drop every advisory lock and return the connections (after the owning transaction ended).

        ``background``: on the releaser thread, off the caller's commit path. Holding a lock a little
        longer is always safe; it only delays the next writer of the same value.
        """
        conns, self.conns = self.conns, {}
        self.untested = set()
        if not conns:
            return
        if background:
            _releaser().submit(_unlock_all, self.manager, conns)
        else:
            _unlock_all(self.manager, conns)


IDLE_KEEP = 4
"""Lookup connections kept per shard between transactions."""
IDLE_SECONDS = 10.0
"""A kept lookup connection idle longer than this is returned to its pool (pinged on next checkout)."""

WRITES, READS = "writes", "reads"
"""The two kinds of kept connections: SQLAlchemy ones of lookup writes (holding advisory locks
while in use), raw DBAPI ones of lookup reads."""

_idle: weakref.WeakKeyDictionary[ShardManager, dict[tuple[str, str], list[tuple[Any, float]]]] = (
    weakref.WeakKeyDictionary()
)
_idle_lock = threading.Lock()
_keeping: weakref.WeakSet[ShardManager] = weakref.WeakSet()
"""Managers whose budget has this store's keeper (:func:`_close_idle_kept`)."""


def _close_kept(kind: str, conn: Any) -> None:
    if kind == READS:
        _close_read(conn)
    else:
        conn.close()


def _idle_take(manager: ShardManager, shard: str, kind: str = WRITES) -> Any:
    now = time.monotonic()
    expired: list[Any] = []
    found = None
    with _idle_lock:
        stack = _idle.get(manager, {}).get((shard, kind))
        while stack:
            conn, since = stack.pop()
            if now - since < IDLE_SECONDS:
                found = conn
                break
            expired.append(conn)
    for conn in expired:
        _close_kept(kind, conn)
    return found


def _idle_give(manager: ShardManager, shard: str, conn: Any, kind: str = WRITES) -> None:
    with _idle_lock:
        stack = _idle.setdefault(manager, {}).setdefault((shard, kind), [])
        if manager not in _keeping:
            _keeping.add(manager)
            manager.budget.add_keeper(partial(_close_idle_kept, weakref.ref(manager)))
        if len(stack) < IDLE_KEEP and not getattr(manager, "_disposed", False):
            stack.append((conn, time.monotonic()))
            return
    _close_kept(kind, conn)


def _close_idle_kept(ref: weakref.ref[ShardManager], count: int | None, idle_for: float) -> int:
    """The connection budget's keeper (:meth:`~sa_shardkit.budget.ConnectionBudget.add_keeper`):
    really close (not return to the pool) up to ``count`` kept connections idle for ``idle_for``
    seconds, the longest idle first; those idle past :data:`IDLE_SECONDS` go back to their pool.
    Closing one fires its pool's ``close`` event, which frees its slot in the budget."""
    manager = ref()
    if manager is None:
        return 0
    now = time.monotonic()
    closing: list[tuple[str, Any]] = []
    expired: list[tuple[str, Any]] = []
    with _idle_lock:
        stacks = _idle.get(manager, {})
        idle = sorted(
            ((since, key, conn) for key, stack in stacks.items() for conn, since in stack),
            key=lambda item: item[0],
        )
        for since, (_, kind), conn in idle:
            if now - since >= idle_for and (count is None or len(closing) < count):
                closing.append((kind, conn))
            elif now - since >= IDLE_SECONDS:
                expired.append((kind, conn))
        gone = {id(conn) for _, conn in closing + expired}
        for stack in stacks.values():
            stack[:] = [(conn, since) for conn, since in stack if id(conn) not in gone]
    for kind, conn in expired:
        _close_kept(kind, conn)
    for _, conn in closing:
        try:
            conn.invalidate()
        finally:
            conn.close()
    return len(closing)


def take_kept(manager: ShardManager, shard: str, kind: str) -> Any:
    """A connection of ``kind`` kept idle for ``shard`` (None when there is none): the one store of
    connections kept between uses, which :func:`drop_idle` empties when the manager is disposed
    (saga steps keep their autocommit connections here too, kind ``"saga"``)."""
    return _idle_take(manager, shard, kind)


def give_kept(manager: ShardManager, shard: str, conn: Any, kind: str) -> None:
    """Keep ``conn`` for the next :func:`take_kept` (closed instead when enough are kept)."""
    _idle_give(manager, shard, conn, kind)


def drop_idle(manager: ShardManager) -> None:
    """Return every kept lookup connection of ``manager`` to its pool."""
    with _idle_lock:
        stacks = _idle.pop(manager, {})
    for (_, kind), stack in stacks.items():
        for conn, _ in stack:
            _close_kept(kind, conn)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _releaser() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-lookup-unlock")
        return _pool


def _unlock_all(manager: ShardManager, conns: dict[str, Connection]) -> None:
    for shard, conn in conns.items():
        try:
            conn.execute(text("SELECT pg_advisory_unlock_all()"))
        except DBAPIError:
            conn.invalidate()  # a broken connection holds no lock anymore either
            conn.close()
        else:
            _idle_give(manager, shard, conn)


def lock_values(conns: LookupConnections, index: LookupIndex, values: Sequence[Any], *, shared: bool) -> None:
    """Take the advisory lock of each value at every position it has (old shard first, values
    sorted per shard), held until release()."""
    state = current_state(conns.manager)
    for groups in _lock_phases(conns.manager, values, state):
        for shard in sorted(groups):
            conns.call(shard, partial(_lock, index=index, values=groups[shard], shared=shared, state=state))


def _lock_phases(
    manager: ShardManager, values: Iterable[Any], state: RingState
) -> list[dict[str, list[Any]]]:
    """The values by shard, old positions (of values a move changes) first, then current/new ones."""
    old: dict[str, list[Any]] = {}
    new: dict[str, list[Any]] = {}
    for value in values:
        shards = manager.placement.value_shards(value, mode="lock", state=state)
        if len(shards) > 1:
            old.setdefault(shards[0], []).append(value)
        new.setdefault(shards[-1], []).append(value)
    return [old, new]


def insert_entries(
    conns: LookupConnections,
    entries: Sequence[Entry],
    *,
    shared: bool,
    old_holders: dict[Any, Any] | None = None,
) -> list[Entry]:
    """Lock each value and insert its entry (existing entries are left alone): one statement per
    lookup shard. Returns the entries that were not there before (for a unique lookup: the
    values whose entry already names some key, to be checked by the caller, are not among them).

    Each insert checks the shard's stored ring version in the same statement (``FOR KEY SHARE``
    of its state row, so a version bump waits for it): a newer version than routing used makes
    it insert nothing, re-read the ring and start again. While a move changes a value's
    position, the value is first locked at its old shard, which also tells that shard's version:
    once the move's start bump reached it, the entry goes to the new position (the mover copies
    the old shard's entries after every shard was bumped); before, to the old shard, fenced so
    that the bump waits for it (the mover copies it then). Either way a reader of either version
    finds it. A shard that is both such a value's old position and another value's position
    gets one insert of both under the older version's fence (bumped meanwhile: written again).
    Nothing waits for a bump. ``old_holders`` (unique lookups) receives value -> key of
    the entries found at old positions.
    """
    if not entries:
        return []
    index = entries[0].index
    manager = conns.manager
    inserted: set[tuple[Any, Any]] = set()
    for _ in range(MAX_REREADS):
        state = current_state(manager)
        old, new = _lock_phases(manager, [e.value for e in entries], state)
        newer = False
        # shard -> (values to write there, the newest stored version the write may find there)
        targets: dict[str, tuple[set[Any], int | None]] = {}
        pre_bump: set[Any] = set()
        for shard in sorted(old):
            version = conns.call(
                shard, partial(_lock, index=index, values=old[shard], shared=shared, state=state)
            )
            if version is not None and version > state.version:
                newer = True
                break
            if version is not None and version < state.version:  # not bumped yet: a write of before
                pre_bump.update(old[shard])
                targets[shard] = (set(old[shard]), state.version - 1)
            if old_holders is not None:
                old_holders.update(_read_entries(conns.conn(shard), index, old[shard]))
        if not newer:
            for shard in sorted(new):
                wanted = {v for v in new[shard] if v not in pre_bump}
                if wanted and shard in targets:  # also the old shard of values written before its bump:
                    targets[shard][0].update(wanted)  # one insert, under their stricter fence
                elif wanted:
                    targets[shard] = (wanted, state.version or None)
            for shard in sorted(targets):
                wanted, limit = targets[shard]
                mine = [e for e in entries if e.value in wanted]
                insert = partial(_insert, index=index, entries=mine, shared=shared, limit=limit)
                rows, version = conns.call(shard, insert)
                inserted.update(rows)
                if version is not None and limit is not None and version > limit:
                    newer = version > state.version  # else the old shard was just bumped: again
                    break
            else:
                return [e for e in entries if (e.value, e.key) in inserted]
        if newer:
            manager.placement.refresh(log_failures=False)
    raise StaleRingError(f"lookup {index.describe()}: the ring kept changing while it was written; retry")


def _lock_sql(index: LookupIndex, shared: bool) -> str:
    """CTEs taking the advisory locks ``:ids`` (sorted) in the statement that uses them.

    ``set_config(..., true)`` bounds the wait for this statement only: the pooled connection keeps
    its own settings for whoever uses it next.
    """
    function = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
    return (
        f"WITH cfg AS (SELECT set_config('lock_timeout', '{LOCK_TIMEOUT_MS}', true) AS s), "
        f"locked AS (SELECT count({function}(id)) AS n FROM (SELECT unnest(CAST(:ids AS bigint[])) AS id "
        "ORDER BY 1) AS ordered, cfg) "
    )


def _lock(
    conn: Connection, index: LookupIndex, values: Sequence[Any], shared: bool, state: RingState
) -> int | None:
    """Take the values' locks on ``conn``; returns the shard's stored ring version (None: no ring)."""
    ids = sorted({index.lock_id(v) for v in values})
    fenced = bool(state.version)
    tail = f"SELECT version FROM {STATE_TABLE}, locked" if fenced else "SELECT NULL FROM locked"
    try:
        rows = _run(conn, index, _lock_sql(index, shared) + tail, ids=ids)
    except DBAPIError as error:
        if fenced and _no_ring_table(error):
            return -1  # a joining shard before the move's start bump: behind
        raise
    return int(rows[0][0]) if fenced and rows else None


def _insert(
    conn: Connection, index: LookupIndex, entries: Sequence[Entry], shared: bool, limit: int | None
) -> tuple[set[tuple[Any, Any]], int | None]:
    """Lock and insert ``entries`` in one statement; returns the (value, key) pairs inserted and
    the shard's stored ring version. With ``limit`` (a stored ring), nothing is inserted when that
    version is newer than ``limit``; a joining shard that stores no ring yet (no state table, or
    one without its row) is written unfenced (nothing newer can be stored there)."""
    ids = sorted({index.lock_id(e.value) for e in entries})
    rows_sql = (
        f"SELECT v, k FROM unnest(CAST(:values AS {sql_type(index.column)}[]), "
        f"CAST(:keys AS {sql_type(index.key_column)}[])) AS u(v, k)"
    )
    insert = f"INSERT INTO {index.table.name} (value, shard_key) "
    params: dict[str, Any] = {
        "ids": ids,
        "values": [e.value for e in entries],
        "keys": [e.key for e in entries],
    }
    plain = f"{_lock_sql(index, shared)}{insert}{rows_sql}, locked ON CONFLICT DO NOTHING RETURNING value, shard_key"
    if limit is None:
        return {(v, k) for v, k in _run(conn, index, plain, **params)}, None
    sql = (
        f"{_lock_sql(index, shared)}, fence AS (SELECT version FROM {STATE_TABLE}, locked FOR KEY SHARE OF "
        f"{STATE_TABLE}), ins AS ({insert}{rows_sql}, fence WHERE fence.version <= :version "
        "ON CONFLICT DO NOTHING RETURNING value, shard_key) "
        "SELECT value, shard_key, NULL AS version FROM ins UNION ALL SELECT NULL, NULL, version FROM fence"
    )
    params["version"] = limit
    inserted: set[tuple[Any, Any]] = set()
    version: int | None = None
    try:
        rows = _run(conn, index, sql, **params)
    except DBAPIError as error:
        if not _no_ring_table(error):
            raise
        params.pop("version")  # a joining shard before the move's start bump
        return {(v, k) for v, k in _run(conn, index, plain, **params)}, None
    for value, key, stored in rows:
        if stored is not None:
            version = int(stored)
        else:
            inserted.add((value, key))
    if version is None:  # no version row: nothing was inserted (the insert joins it)
        # a joining shard whose state table is committed but not yet its row (a move commits the
        # tables on every shard before it stores the move on any, and bumps joining shards last):
        # it stores no ring, so nothing newer can be stored there, as without the table
        params.pop("version")
        return {(v, k) for v, k in _run(conn, index, plain, **params)}, None
    return inserted, version


def _run(conn: Connection, index: LookupIndex, sql: str, **params: Any) -> list[Any]:
    try:
        return list(conn.execute(text(sql), params))
    except OperationalError as error:
        if "lock timeout" in str(error.orig).lower():
            raise _LockWaitTimeout(index, fenced=STATE_TABLE in sql) from error
        raise


class _LockWaitTimeout(Exception):
    """A lookup statement ran out of :data:`LOCK_TIMEOUT_MS`; :meth:`LookupConnections.call` names
    the shard (:meth:`error`)."""

    def __init__(self, index: LookupIndex, *, fenced: bool) -> None:
        super().__init__(index.describe())
        self.index, self.fenced = index, fenced

    def error(self, shard: str | None) -> LookupIndexError:
        where = f" on shard {shard!r}" if shard else ""
        bump = (
            ", or for a ring version bump holding that shard's state row (a stuck mover: "
            "`shardkit rebalance --status`)"
            if self.fenced
            else ""
        )
        return LookupIndexError(
            f"lookup {self.index.describe()}: waited {LOCK_TIMEOUT_MS} ms{where} for another transaction "
            f"writing the same value{bump}; nothing of this transaction was committed, retry it"
        )


def _read_entries(conn: Connection, index: LookupIndex, values: Sequence[Any]) -> dict[Any, Any]:
    table = index.table
    query = select(table.c.value, table.c.shard_key).where(table.c.value.in_(list(values)))
    return {value: key for value, key in conn.execute(query)}


def existing_keys(conns: LookupConnections, index: LookupIndex, values: Sequence[Any]) -> dict[Any, set[Any]]:
    """value -> the keys its (unique) entries name at every position it has (one while no move
    changes it), read on the connections holding the values' locks."""
    out: dict[Any, set[Any]] = {}
    for shard, group in lookup_shards(conns.manager, values, write=False).items():
        for value, key in _read_entries(conns.conn(shard), index, group).items():
            out.setdefault(value, set()).add(key)
    return out


def other_holders(
    conns: LookupConnections, entries: Sequence[Entry], created: Sequence[Entry], old_holders: dict[Any, Any]
) -> list[tuple[Entry, Any]]:
    """For a unique lookup after :func:`insert_entries`: (entry, key) for every other key an entry
    of the entry's value names (values locked). An entry that was not inserted and whose value has
    no entry at all any more is inserted again."""
    if not entries:
        return []
    index = entries[0].index
    done = {e.value for e in created}
    pending = [e for e in entries if e.value not in done]
    current = existing_keys(conns, index, [e.value for e in pending]) if pending else {}
    found: list[tuple[Entry, Any]] = []
    for entry in entries:
        holders = set(current.get(entry.value, ()))
        if entry.value in old_holders:
            holders.add(old_holders[entry.value])
        if entry.value not in done and not holders:  # gone between the two statements: again
            insert_entries(conns, [entry], shared=False)
        found.extend((entry, holder) for holder in sorted(holders - {entry.key}, key=repr))
    return found


def take_over(conns: LookupConnections, entry: Entry, stale_key: Any) -> None:
    """Point a unique entry whose owning row does not exist at ``entry.key``, wherever it is (the
    value's lock is held)."""
    table = entry.index.table
    for shard in lookup_shards(conns.manager, [entry.value], write=False):
        conns.conn(shard).execute(
            update(table)
            .where(and_(table.c.value == entry.value, table.c.shard_key == stale_key))
            .values(shard_key=entry.key)
        )


def delete_entries(conns: LookupConnections, entries: Iterable[Entry]) -> int:
    """Delete these exact entries at every position they may be at (their values' exclusive locks
    are held by the caller): one statement per lookup and shard."""
    by_index: dict[LookupIndex, list[Entry]] = {}
    for entry in entries:
        by_index.setdefault(entry.index, []).append(entry)
    removed = 0
    for index, mine in by_index.items():
        table = index.table
        for shard, values in lookup_shards(conns.manager, [e.value for e in mine], write=False).items():
            wanted = set(values)
            pairs = list({(e.value, e.key) for e in mine if e.value in wanted})
            result = conns.conn(shard).execute(
                delete(table).where(tuple_(table.c.value, table.c.shard_key).in_(pairs))
            )
            removed += result.rowcount
    return removed


def count_entries(manager: ShardManager, index: LookupIndex) -> dict[str, int]:
    """Entries per shard (for reports and tests)."""
    query = select(func.count()).select_from(index.table)
    counts: dict[str, int] = {}
    for shard in manager.shard_ids:
        with manager.connect(shard) as conn:
            counts[shard] = int(conn.execute(query).scalar() or 0)
    return counts
