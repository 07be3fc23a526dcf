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
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, literal_column, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from xxhash import xxh3_64_intdigest

from ..errors import LookupIndexError, ShardUnavailableError
from ..faults import unavailable
from ..ring import HashRing
from ..routing import ring_shards, shards_for_key
from .declaration import LookupIndex, lookup_state_table

if TYPE_CHECKING:
    from ..manager import ShardManager

LOCK_TIMEOUT_MS = 10_000
"""How long a write waits for another transaction's hold on the same value (then LookupIndexError)."""

READY_RECHECK_SECONDS = 5.0
"""A lookup not built yet is re-checked at most this often (reads scatter until it is built)."""


def lookup_shards(manager: ShardManager, values: Iterable[Any], *, write: bool) -> dict[str, list[Any]]:
    """Lookup shard -> the values whose entries it holds (a lookup row lives at its value's ring position)."""
    groups: dict[str, list[Any]] = {}
    for value in values:
        for shard in shards_for_key(manager, value, write=write):
            groups.setdefault(shard, []).append(value)
    return groups


def sql_type(column: Any) -> str:
    return str(column.type.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]


def resolve(manager: ShardManager, index: LookupIndex, values: Sequence[Any]) -> dict[Any, set[Any]]:
    """value -> the shard keys its entries name (one query per lookup shard, committed data)."""
    found: dict[Any, set[Any]] = {}
    table = index.table
    groups = lookup_shards(manager, values, write=False)
    for shard, group in lookup_shards(manager, values, write=True).items():  # mid-move: both places
        groups[shard] = list({*groups.get(shard, []), *group})
    for shard, group in groups.items():
        query = select(table.c.value, table.c.shard_key).where(table.c.value.in_(group))
        for value, key in autocommit_rows(manager, shard, query):
            found.setdefault(value, set()).add(key)
    return found


def autocommit_rows(manager: ShardManager, shard: str, query: Any) -> list[Any]:
    """Run a read on a pooled connection in autocommit mode: one round trip, no BEGIN/ROLLBACK.

    The lookup read sits in front of every lookup-routed query, so it is kept to the statement itself.
    """
    engine = manager.engine(shard)
    compiled = query.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
    try:
        raw = engine.raw_connection()
    except (OperationalError, DBAPIError) as error:
        raise unavailable(shard, engine.url, error) from error
    driver: Any = raw.dbapi_connection
    try:
        driver.autocommit = True
        try:
            cursor = raw.cursor()
            cursor.execute(str(compiled), compiled.params)
            return list(cursor.fetchall())
        finally:
            driver.autocommit = False
    except Exception:
        raw.invalidate()
        raise
    finally:
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

_ready: weakref.WeakKeyDictionary[ShardManager, dict[str, tuple[str | None, float]]] = (
    weakref.WeakKeyDictionary()
)
"""manager -> lookup -> (the ring fingerprint it was built for, when that was read)."""
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
    """Whether reads may trust ``index``: built (``shardkit lookups build``) under the current ring.

    Before it is built a missing entry could hide a row; after the ring changed (a rebalance) the
    entries sit at the old ring's positions. Both read every shard until the next build; the stored
    state is re-read at most every READY_RECHECK_SECONDS.
    """
    current = ring_fingerprint(manager.ring)
    known = _ready.setdefault(manager, {})
    cached = known.get(index.name)
    now = time.monotonic()
    if cached is not None and (cached[0] == current or now - cached[1] < READY_RECHECK_SECONDS):
        return cached[0] == current
    state, built_for = read_state(manager, index)
    known[index.name] = (built_for if state == "ready" else None, now)
    return state == "ready" and built_for == current


def forget_readiness() -> None:
    """Drop cached readiness (tests, and a process that rebuilt a lookup)."""
    _ready.clear()


def read_state(manager: ShardManager, index: LookupIndex) -> tuple[str | None, str | None]:
    """(state, ring fingerprint it was built for) on the catalog shard (the first ring shard)."""
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
        return None, None
    if row is None:
        return None, None
    progress = row.progress if isinstance(row.progress, dict) else {}
    return row.state, progress.get(RING_KEY)


RING_KEY = "_ring"
"""The key of the build's ring fingerprint in the state row's progress."""


# -- writes ---------------------------------------------------------------------------------------


@dataclass
class Entry:
    index: LookupIndex
    value: Any
    key: Any


@dataclass
class LookupConnections:
    """The autocommit connections (and so the advisory locks) one session transaction holds."""

    manager: ShardManager
    conns: dict[str, Connection] = field(default_factory=dict)

    def conn(self, shard: str) -> Connection:
        found = self.conns.get(shard)
        if found is None:
            found = self.manager.connect(shard).execution_options(isolation_level="AUTOCOMMIT")
            self.conns[shard] = found
        return found

    def release(self, *, background: bool = False) -> None:
        """Drop every advisory lock and return the connections (after the owning transaction ended).

        ``background``: on the releaser thread, off the caller's commit path. Holding a lock a little
        longer is always safe; it only delays the next writer of the same value.
        """
        conns, self.conns = self.conns, {}
        if not conns:
            return
        if background:
            _releaser().submit(_unlock_all, list(conns.values()))
        else:
            _unlock_all(list(conns.values()))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _releaser() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-lookup-unlock")
        return _pool


def _unlock_all(conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.execute(text("SELECT pg_advisory_unlock_all()"))
        except DBAPIError:
            conn.invalidate()  # a broken connection holds no lock anymore either
        finally:
            conn.close()


def lock_values(conns: LookupConnections, index: LookupIndex, values: Sequence[Any], *, shared: bool) -> None:
    """Take the advisory lock of each value (sorted, on its lookup shard), held until release()."""
    for shard, group in lookup_shards(conns.manager, values, write=True).items():
        _locked(conns.conn(shard), index, sorted({index.lock_id(v) for v in group}), shared, "SELECT 1")


def insert_entries(conns: LookupConnections, entries: Sequence[Entry], *, shared: bool) -> list[Entry]:
    """Lock each value and insert its entry (existing entries are left alone): one statement per
    lookup shard. Returns the entries that were not there before (for a unique lookup: the
    values whose entry already names some key, to be checked by the caller, are not among them)."""
    if not entries:
        return []
    index = entries[0].index
    created: list[Entry] = []
    for shard, group in lookup_shards(conns.manager, [e.value for e in entries], write=True).items():
        mine = [e for e in entries if e.value in group]
        table = index.table
        sql = (
            f"INSERT INTO {table.name} (value, shard_key) "
            f"SELECT v, k FROM unnest(CAST(:values AS {sql_type(index.column)}[]), "
            f"CAST(:keys AS {sql_type(index.key_column)}[])) AS u(v, k), locked "
            "ON CONFLICT DO NOTHING RETURNING value, shard_key"
        )
        ids = sorted({index.lock_id(e.value) for e in mine})
        rows = _locked(
            conns.conn(shard),
            index,
            ids,
            shared,
            sql,
            values=[e.value for e in mine],
            keys=[e.key for e in mine],
        )
        inserted = {(value, key) for value, key in rows}
        created.extend(e for e in mine if (e.value, e.key) in inserted)
    return created


def _locked(
    conn: Connection, index: LookupIndex, ids: list[int], shared: bool, statement: str, **params: Any
) -> list[Any]:
    """Run ``statement`` after taking the advisory locks ``ids`` in the same round trip.

    ``set_config(..., true)`` bounds the wait for this statement only: the pooled connection keeps
    its own settings for whoever uses it next.
    """
    function = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
    sql = (
        f"WITH cfg AS (SELECT set_config('lock_timeout', '{LOCK_TIMEOUT_MS}', true) AS s), "
        f"locked AS (SELECT count({function}(id)) AS n FROM (SELECT unnest(CAST(:ids AS bigint[])) AS id "
        "ORDER BY 1) AS ordered, cfg) "
    )
    sql += statement if statement.startswith("INSERT") else f"{statement} FROM locked"
    try:
        return list(conn.execute(text(sql), {"ids": ids, **params}))
    except OperationalError as error:
        if "lock timeout" in str(error.orig).lower():
            raise LookupIndexError(
                f"lookup {index.describe()}: waited {LOCK_TIMEOUT_MS} ms for another transaction writing the "
                "same value; nothing of this transaction was committed, retry it"
            ) from error
        raise


def existing_keys(conns: LookupConnections, index: LookupIndex, values: Sequence[Any]) -> dict[Any, Any]:
    """value -> the key its (unique) entry names, read on the connections holding the values' locks."""
    out: dict[Any, Any] = {}
    table = index.table
    for shard, group in lookup_shards(conns.manager, values, write=True).items():
        query = select(table.c.value, table.c.shard_key).where(table.c.value.in_(group))
        out.update({value: key for value, key in conns.conn(shard).execute(query)})
    return out


def take_over(conns: LookupConnections, entry: Entry, stale_key: Any) -> None:
    """Point a unique entry whose owning row does not exist at ``entry.key`` (the value's lock is held)."""
    table = entry.index.table
    (shard,) = lookup_shards(conns.manager, [entry.value], write=True)
    conns.conn(shard).execute(
        update(table)
        .where(and_(table.c.value == entry.value, table.c.shard_key == stale_key))
        .values(shard_key=entry.key)
    )


def delete_entries(conns: LookupConnections, entries: Iterable[Entry]) -> int:
    """Delete these exact entries (their values' exclusive locks are held by the caller)."""
    removed = 0
    for entry in entries:
        table = entry.index.table
        for shard in lookup_shards(conns.manager, [entry.value], write=True):
            result = conns.conn(shard).execute(
                delete(table).where(and_(table.c.value == entry.value, table.c.shard_key == entry.key))
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
