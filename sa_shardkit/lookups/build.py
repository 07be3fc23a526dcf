"""Creating, backfilling and repairing lookups (``shardkit lookups build|repair``).

A lookup declared on a table that already has rows is *building* until :func:`build_lookup` has
scanned every owning row: writes maintain it from the moment the code declaring it runs, reads
ignore it (they scatter) until the build marks it *ready*. The build walks each shard's owning table
in primary-key order, in batches, recording the last key per shard in ``shardkit_lookup_state``,
so an interrupted build resumes where it stopped.

:func:`repair_lookup` removes stale entries (no committed owning row): each candidate is re-checked
under its value's exclusive lock, which waits out any writer between its entry and its commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from ..errors import DuplicateKeyError, LookupIndexError
from ..ring import HashRing
from ..routing import ring_shards, shards_for_key
from .declaration import LookupIndex, declared_lookups, lookup_metadata, lookup_state_table
from .store import (
    RING_KEY,
    RINGS_KEY,
    Entry,
    LookupConnections,
    delete_entries,
    forget_readiness,
    insert_entries,
    lock_values,
    other_holders,
    owner_has,
    ring_fingerprint,
    take_over,
    trusted_rings,
)

if TYPE_CHECKING:
    from ..manager import ShardManager

Progress = Callable[[str, int, int], None]
"""``progress(shard_id, rows_done, rows_total)`` after each batch."""


@dataclass
class BuildReport:
    lookup: str
    rows: dict[str, int] = field(default_factory=dict)
    """Owning rows scanned per shard (in this run)."""
    entries: int = 0
    """Entries created (the others existed)."""
    duplicates: list[tuple[Any, Any, Any]] = field(default_factory=list)
    """(value, key kept, key refused) of a unique lookup whose existing rows share a value."""
    resumed: bool = False


@dataclass
class RepairReport:
    lookup: str
    checked: int = 0
    removed: int = 0


def create_lookup_tables(manager: ShardManager, indexes: list[LookupIndex] | None = None) -> None:
    """Create the state table and the lookup tables (default: every declared lookup) on every shard."""
    chosen = declared_lookups() if indexes is None else indexes
    for shard_id in manager.shard_ids:
        engine = manager.engine(shard_id)
        lookup_metadata.create_all(engine, checkfirst=True)
        for index in chosen:
            index.table.create(engine, checkfirst=True)


def build_lookup(
    manager: ShardManager,
    index: LookupIndex,
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
    restart: bool = False,
) -> BuildReport:
    """Backfill ``index`` from the owning rows of every shard, then mark it ready (resumable)."""
    create_lookup_tables(manager, [index])
    report = BuildReport(index.describe())
    ring = ring_fingerprint(manager.ring)
    done = {} if restart else _progress_of(manager, index)
    if done.get(RING_KEY) not in (None, ring):
        done = {}  # begun under another ring: its entries sit at that ring's positions
    done[RING_KEY] = ring
    report.resumed = any(k != RING_KEY for k in done)
    _store_state(manager, index, "building", done)
    pk = list(index.owner.primary_key.columns)
    for shard in ring_shards(manager):
        if done.get(shard) == "done":
            continue
        with manager.connect(shard) as conn:
            total = int(conn.execute(select(func.count()).select_from(index.owner)).scalar() or 0)
        last = done.get(shard)
        scanned = 0
        while True:
            query = select(*pk, index.column, index.key_column).order_by(*pk).limit(batch_size)
            if last is not None:
                query = query.where(tuple_(*pk) > tuple_(*last))
            with manager.connect(shard) as conn:
                rows = conn.execute(query).all()
            if not rows:
                break
            entries = [Entry(index, r[-2], r[-1]) for r in rows if r[-2] is not None and r[-1] is not None]
            report.entries += _backfill(manager, index, entries, report)
            scanned += len(rows)
            last = [_jsonable(v) for v in rows[-1][: len(pk)]]
            done[shard] = last
            if report.duplicates:  # kept across an interruption: re-checked at the end
                _remember(done, [value for value, _, _ in report.duplicates])
            _store_state(manager, index, "building", done)
            if progress is not None:
                progress(shard, scanned, total)
        report.rows[shard] = scanned
        done[shard] = "done"
        _store_state(manager, index, "building", done)
    if ring_fingerprint(manager.ring) != ring:
        raise LookupIndexError(
            f"lookup {index.describe()}: the ring changed while it was built; run the build again"
        )
    if index.unique and done.get(DUPLICATES_KEY):
        held = _still_duplicated(manager, index, list(done[DUPLICATES_KEY]), report)
        if held:
            done[DUPLICATES_KEY] = []
            _remember(done, [value for value, _ in held])
            _store_state(manager, index, DUPLICATES_STATE, done)
            forget_readiness()
            raise _duplicates_error(manager, index, held)
        done.pop(DUPLICATES_KEY)
    _store_state(manager, index, "ready", done)
    forget_readiness()
    return report


DUPLICATES_KEY = "_duplicates"
"""The values a unique build found held by more than one row (in the state row's progress)."""
DUPLICATES_STATE = "duplicates"
"""A unique lookup whose existing rows share values: not trusted by reads until a build finds none."""


def _remember(done: dict[str, Any], values: list[Any]) -> None:
    known = list(done.get(DUPLICATES_KEY) or [])
    for value in values:
        if _jsonable(value) not in known:
            known.append(_jsonable(value))
    done[DUPLICATES_KEY] = known


def _still_duplicated(
    manager: ShardManager, index: LookupIndex, values: list[Any], report: BuildReport
) -> list[tuple[Any, list[tuple[Any, str]]]]:
    """The values more than one shard key's committed rows still hold, with (key, shard) of each.

    A value only one key holds now (the data was fixed) gets its entry (again: the entry may have
    named a row since deleted), so marking the lookup ready afterwards hides no row.
    """
    holders: dict[Any, list[tuple[Any, Any, str]]] = {}
    for start in range(0, len(values), 1000):
        chunk = values[start : start + 1000]
        query = select(index.column, index.key_column).where(index.column.in_(chunk))
        for shard in ring_shards(manager):
            with manager.connect(shard) as conn:
                for value, key in conn.execute(query):
                    holders.setdefault(_jsonable(value), []).append((value, key, shard))
    held: list[tuple[Any, list[tuple[Any, str]]]] = []
    for found in holders.values():
        keys = sorted({(key, shard) for _, key, shard in found}, key=repr)
        if len({key for key, _ in keys}) > 1:
            held.append((found[0][0], keys))
        else:
            value, key, _ = found[0]
            report.entries += _backfill(
                manager, index, [Entry(index, value, key)], BuildReport(report.lookup)
            )
    return held


def _duplicates_error(
    manager: ShardManager, index: LookupIndex, held: list[tuple[Any, list[tuple[Any, str]]]]
) -> DuplicateKeyError:
    def holders(keys: list[tuple[Any, str]]) -> str:
        return " and ".join(f"{index.key_attribute}={key!r} (shard {shard!r})" for key, shard in keys)

    shown = "; ".join(f"{value!r} by {holders(keys)}" for value, keys in held[:5])
    more = f"; and {len(held) - 5} more (shardkit lookups status)" if len(held) > 5 else ""
    return DuplicateKeyError(
        f"{index.describe()} is declared unique, but {len(held)} value(s) are held by more than one existing "
        f"row: {shown}{more}. The lookup is marked '{DUPLICATES_STATE}': reads do not use it (they read every "
        f"shard) and new writes of these values are refused; make them unique (change {index.describe()} "
        f"of all but one row through the session) and run `shardkit lookups build {index.describe()}` again",
        column=index.describe(),
        value=held[0][0],
        holders=held,
    )


def _backfill(manager: ShardManager, index: LookupIndex, entries: list[Entry], report: BuildReport) -> int:
    if not entries:
        return 0
    conns = LookupConnections(manager)
    try:
        old_holders: dict[Any, Any] = {}
        created = insert_entries(conns, entries, shared=not index.unique, old_holders=old_holders)
        if index.unique:
            for entry, holder in other_holders(conns, entries, created, old_holders):
                if owner_has(manager, index, entry.value, holder):
                    report.duplicates.append((entry.value, holder, entry.key))
                else:
                    take_over(conns, entry, holder)
        return len(created)
    finally:
        conns.release()


def repair_lookup(manager: ShardManager, index: LookupIndex, *, batch_size: int = 1000) -> RepairReport:
    """Remove the entries of ``index`` that no committed owning row needs (safe while writes run)."""
    report = RepairReport(index.describe())
    table = index.table
    for shard in manager.shard_ids:
        last: tuple[Any, Any] | None = None
        while True:
            query = select(table.c.value, table.c.shard_key).order_by(table.c.value, table.c.shard_key)
            if last is not None:
                query = query.where(tuple_(table.c.value, table.c.shard_key) > tuple_(*last))
            with manager.connect(shard) as conn:
                rows = [(v, k) for v, k in conn.execute(query.limit(batch_size))]
            if not rows:
                break
            report.checked += len(rows)
            last = rows[-1]
            owned = _owned(manager, index, rows)
            stale = [Entry(index, v, k) for v, k in rows if (v, k) not in owned]
            if stale:
                report.removed += _remove_if_still_stale(manager, index, stale)
    return report


def _owned(manager: ShardManager, index: LookupIndex, pairs: list[tuple[Any, Any]]) -> set[tuple[Any, Any]]:
    """Which (value, key) pairs a committed owning row holds (one query per owner shard)."""
    by_shard: dict[str, list[tuple[Any, Any]]] = {}
    for value, key in pairs:
        for shard in shards_for_key(manager, key):
            by_shard.setdefault(shard, []).append((value, key))
    found: set[tuple[Any, Any]] = set()
    for shard, group in by_shard.items():
        query = select(index.column, index.key_column).where(
            and_(index.column.in_({v for v, _ in group}), index.key_column.in_({k for _, k in group}))
        )
        with manager.connect(shard) as conn:
            found.update((v, k) for v, k in conn.execute(query))
    return found


def _remove_if_still_stale(manager: ShardManager, index: LookupIndex, stale: list[Entry]) -> int:
    conns = LookupConnections(manager)
    try:
        lock_values(conns, index, [e.value for e in stale], shared=False)
        owned = _owned(manager, index, [(e.value, e.key) for e in stale])
        return delete_entries(conns, [e for e in stale if (e.value, e.key) not in owned])
    finally:
        conns.release()


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, str, float)) or value is None else str(value)


def _state_row(manager: ShardManager, index: LookupIndex) -> Any:
    """The lookup's state row as reads consult it: on the first shard of the ring (None: never built)."""
    with manager.connect(ring_shards(manager)[0]) as conn:
        row = conn.execute(
            select(lookup_state_table.c.state, lookup_state_table.c.progress).where(
                lookup_state_table.c.name == index.name
            )
        ).first()
        conn.rollback()
    return row


def _progress_of(manager: ShardManager, index: LookupIndex) -> dict[str, Any]:
    row = _state_row(manager, index)
    if row is None or row.state == "ready":
        return {}
    progress = row.progress
    return dict(json.loads(progress) if isinstance(progress, str) else progress)


def _store_state(manager: ShardManager, index: LookupIndex, state: str, progress: dict[str, Any]) -> None:
    """The state row on every shard (reads consult the first ring shard's)."""
    stmt = pg_insert(lookup_state_table).values(name=index.name, state=state, progress=progress)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], set_={"state": state, "progress": progress, "updated_at": func.now()}
    )
    targets = manager.shard_ids if state == "ready" else ring_shards(manager)[:1]
    for shard in targets:
        with manager.connect(shard) as conn:
            conn.execute(stmt)
            conn.commit()


# -- rebalancing (sa_shardkit.rebalance.lookup_tables) ---------------------------------------------


def carry_readiness(manager: ShardManager, index: LookupIndex, old: HashRing, new: HashRing) -> None:
    """Every entry was moved to its value's position in ``new``: trust the lookup under ``new`` as
    under ``old`` (a lookup not ready under ``old`` stays as it is; its build starts again)."""
    create_lookup_tables(manager, [index])  # joining shards get the state and lookup tables too
    row = _state_row(manager, index)
    if row is None or row.state != "ready":
        return
    progress = dict(json.loads(row.progress) if isinstance(row.progress, str) else row.progress)
    trusted = list(trusted_rings(progress))
    fingerprint = ring_fingerprint(new)
    if ring_fingerprint(old) not in trusted or fingerprint in trusted:
        return
    progress[RINGS_KEY] = [*trusted[-3:], fingerprint]
    _store_state(manager, index, "ready", progress)
    forget_readiness()


def settle_move_conflict(
    manager: ShardManager, index: LookupIndex, conn: Connection, source_key: Any, target_key: Any, value: Any
) -> bool:
    """A unique entry being moved meets another key's entry for ``value`` on the target (``conn``,
    in the mover's open target transaction). Under the value's lock, the entry whose owning row
    exists wins; True when the source's entry may be deleted, False when a writer holds the
    value (the mover retries). Two owning rows holding the value raise :class:`LookupIndexError`."""
    if not conn.execute(select(func.pg_try_advisory_xact_lock(index.lock_id(value)))).scalar():
        return False
    source_owned = owner_has(manager, index, value, source_key)
    if source_owned and owner_has(manager, index, value, target_key):
        raise LookupIndexError(
            f"lookup {index.describe()} is unique, but {index.describe()} = {value!r} is held by two rows "
            f"({index.key_attribute}={source_key!r} and {target_key!r}); make one of them unique and run "
            "the rebalance again (--resume): nothing was lost"
        )
    if source_owned:
        table = index.table
        conn.execute(
            update(table)
            .where(and_(table.c.value == value, table.c.shard_key == target_key))
            .values(shard_key=source_key)
        )
    return True
