"""Keeping lookup entries in step with what a ShardedSession writes, without two-phase commit.

The order of events is the whole consistency argument:

1. After a flush wrote owning rows (inside the session's still open transaction), the entries for
   their new values are written and **committed** on the lookup shards, each value's advisory lock
   taken first and held until the session transaction ends.
2. The session transaction commits (or rolls back).
3. Only then are entries of deleted rows and of old values removed, each after checking under its
   exclusive lock that no committed owning row still has that value and key.
4. The locks are released.

So a committed owning row always has its entry (written before it committed, removed only once no
committed row needs it); a crash at any point leaves at most an entry without an owning row, which
reads ignore (they filter on the column anyway) and ``shardkit lookups repair`` removes. Unique
lookups are checked at step 1 under the value's exclusive lock: an entry naming another key is a
duplicate if that key's committed row holds the value, otherwise it is stale and taken over.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.orm.base import instance_state

from ..errors import DuplicateKeyError, LookupIndexError
from ..routing import _insert_rows, shards_for_key
from .declaration import LookupIndex, lookup_for_column, lookups_of
from .store import (
    Entry,
    LookupConnections,
    delete_entries,
    insert_entries,
    lock_values,
    other_holders,
    owner_has,
    take_over,
)

if TYPE_CHECKING:
    from ..manager import ShardManager

log = logging.getLogger("sa_shardkit.lookups")

WORK_KEY = "_shardkit_lookups"


@dataclass
class TransactionWork:
    """What one session transaction did to lookups, to finish after it ends."""

    conns: LookupConnections
    written: dict[tuple[str, Any], Any] = field(default_factory=dict)
    """(lookup, value) -> key of the unique entries this transaction relies on."""
    created: list[Entry] = field(default_factory=list)
    """Unique entries this transaction created or took over: removed again if it rolls back."""
    removals: list[Entry] = field(default_factory=list)
    """Entries to remove after commit, if no committed owning row needs them then."""
    committed: bool = False
    early: dict[tuple[int, str], tuple[Any, Any]] = field(default_factory=dict)
    """(id(obj), lookup) -> (value, key) of the entries :func:`before_flush` is writing."""
    pending: Future[None] | None = None
    """Those entries' write, running alongside the flush (waited for before anything else)."""

    def wait(self) -> None:
        """Finish the early write (raising its error, e.g. DuplicateKeyError) before the next step."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


_writers: ThreadPoolExecutor | None = None
_writers_lock = threading.Lock()
WRITER_THREADS = 8


def _writer_pool() -> ThreadPoolExecutor:
    global _writers
    with _writers_lock:
        if _writers is None:
            _writers = ThreadPoolExecutor(
                max_workers=WRITER_THREADS, thread_name_prefix="shardkit-lookup-write"
            )
        return _writers


def before_flush(session: Session, manager: ShardManager) -> None:
    """Start writing the entries of new rows whose values are already known (most are: set by
    the application or a sequence) on a worker thread, so that their round trip to the lookup
    shard overlaps the flush's own; :func:`after_flush` waits for it, before anything commits.
    Called once the sequences assigned their ids, before the flush routes and writes the rows."""
    if not session.new or not any(lookups_of(instance_state(obj).mapper) for obj in session.new):
        return
    inserts: dict[LookupIndex, list[Entry]] = {}
    early: dict[tuple[int, str], tuple[Any, Any]] = {}
    for obj in session.new:
        state = instance_state(obj)
        for index in lookups_of(state.mapper):
            value, key = state.dict.get(index.attribute), state.dict.get(index.key_attribute)
            if value is not None and key is not None:
                inserts.setdefault(index, []).append(Entry(index, value, key))
                early[(id(obj), index.name)] = (value, key)
    if not inserts:
        return
    work = _work(session, manager)
    work.wait()
    work.early = early
    work.pending = _writer_pool().submit(_write_all, manager, work, inserts)


def _write_all(manager: ShardManager, work: TransactionWork, inserts: dict[LookupIndex, list[Entry]]) -> None:
    for index, entries in inserts.items():
        write_entries(manager, work, index, entries)


def _work(session: Session, manager: ShardManager) -> TransactionWork:
    work = session.info.get(WORK_KEY)
    if work is None:
        work = session.info[WORK_KEY] = TransactionWork(LookupConnections(manager))
    return work  # type: ignore[no-any-return]


def after_flush(session: Session, flush_context: Any) -> None:
    """Step 1 (and the locks of step 3) for the rows this flush wrote."""
    manager = getattr(session, "manager", None)
    if manager is None:
        return
    early: dict[tuple[int, str], tuple[Any, Any]] = {}
    found: TransactionWork | None = session.info.get(WORK_KEY)
    if found is not None:
        found.wait()  # the entries before_flush started are committed (or their error raised)
        early, found.early = found.early, {}
    inserts: dict[LookupIndex, list[Entry]] = {}
    removals: list[Entry] = []
    for obj in session.new:
        state = instance_state(obj)
        for index in lookups_of(state.mapper):
            value, key = state.dict.get(index.attribute), state.dict.get(index.key_attribute)
            if value is not None and key is not None and early.get((id(obj), index.name)) != (value, key):
                inserts.setdefault(index, []).append(Entry(index, value, key))
    for obj in session.dirty:
        state = instance_state(obj)
        if state.key is None:
            continue
        for index in lookups_of(state.mapper):
            _changed(state, index, inserts, removals)
    for obj in session.deleted:
        state = instance_state(obj)
        for index in lookups_of(state.mapper):
            value = _committed(state, index.attribute)
            key = _committed(state, index.key_attribute)
            if value is not None and key is not None:
                removals.append(Entry(index, value, key))
    if not inserts and not removals:
        return
    work = _work(session, manager)
    for index, entries in inserts.items():
        write_entries(manager, work, index, entries)
    by_index: dict[LookupIndex, list[Any]] = {}
    for entry in removals:
        by_index.setdefault(entry.index, []).append(entry.value)
    for index, values in by_index.items():
        lock_values(work.conns, index, values, shared=False)
    work.removals.extend(removals)


def _committed(state: Any, attribute: str) -> Any:
    history = state.attrs[attribute].history
    if history.deleted:
        return history.deleted[0]
    return state.dict.get(attribute) if not history.added else None


def _changed(
    state: Any, index: LookupIndex, inserts: dict[LookupIndex, list[Entry]], removals: list[Entry]
) -> None:
    value_history = state.attrs[index.attribute].history
    key_history = state.attrs[index.key_attribute].history
    if not (value_history.added or key_history.added):
        return
    new = (state.dict.get(index.attribute), state.dict.get(index.key_attribute))
    old = (_committed(state, index.attribute), _committed(state, index.key_attribute))
    if new == old:
        return
    if new[0] is not None and new[1] is not None:
        inserts.setdefault(index, []).append(Entry(index, *new))
    if old[0] is not None and old[1] is not None:  # an unloaded old value leaves a stale entry: harmless
        removals.append(Entry(index, *old))


def write_entries(
    manager: ShardManager, work: TransactionWork, index: LookupIndex, entries: list[Entry]
) -> None:
    """Lock, insert and commit the entries; for a unique lookup, refuse values another row holds."""
    if not index.unique:
        insert_entries(work.conns, entries, shared=True)
        return
    seen: dict[Any, Any] = {}
    for entry in entries:
        prior = seen.setdefault(entry.value, entry.key)
        mine = work.written.get((index.name, entry.value))
        for other in (prior, mine):
            if other is not None and other != entry.key:
                raise _duplicate(manager, index, entry, other, True)
    old_holders: dict[Any, Any] = {}  # entries at the old position of values a move changes
    created = insert_entries(work.conns, entries, shared=False, old_holders=old_holders)
    work.created.extend(created)
    for entry in created:
        work.written[(index.name, entry.value)] = entry.key
    done = {e.value for e in created}
    for entry, holder in other_holders(work.conns, entries, created, old_holders):
        if owner_has(manager, index, entry.value, holder):
            raise _duplicate(manager, index, entry, holder, False)
        take_over(work.conns, entry, holder)  # a stale entry: its row never committed or is gone
        if entry.value not in done:
            work.created.append(entry)
    for entry in entries:
        work.written[(index.name, entry.value)] = entry.key


def _duplicate(
    manager: ShardManager, index: LookupIndex, entry: Entry, holder: Any, within: bool
) -> DuplicateKeyError:
    if within:
        whose = "by another row of this transaction"
    else:
        shards = ", ".join(repr(s) for s in shards_for_key(manager, holder))
        whose = f"by the row with {index.key_attribute}={holder!r} (shard {shards})"
    return DuplicateKeyError(
        f"{index.describe()} = {entry.value!r} is already taken {whose}: {index.describe()} is unique across "
        "the fleet; nothing of this transaction was committed",
        column=index.describe(),
        value=entry.value,
    )


def after_commit(session: Session) -> None:
    """Step 3: remove the entries no committed row needs any more (failures only leave stale entries)."""
    work: TransactionWork | None = session.info.get(WORK_KEY)
    if work is None:
        return
    work.wait()  # (already done by after_flush; a no-op then)
    work.committed = True
    try:
        gone = [e for e in work.removals if not owner_has(work.conns.manager, e.index, e.value, e.key)]
        delete_entries(work.conns, gone)
    except Exception as error:  # noqa: BLE001 - the commit stands; repair removes what is left
        log.warning("lookup entries of deleted rows left for `shardkit lookups repair`: %s", error)


def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """Step 4; after a rollback, first remove the unique entries this transaction created."""
    if transaction._parent is not None or "info" not in session.__dict__:
        return  # (Session.info is made on first use: no work was noted without it)
    work: TransactionWork | None = session.info.pop(WORK_KEY, None)
    if work is None:
        return
    try:
        try:
            work.wait()  # a flush that failed before after_flush: its early write must end first
        except Exception:  # noqa: BLE001, S110 - the flush already failed; what it wrote is removed below
            pass
        if not work.committed and work.created:
            delete_entries(work.conns, work.created)
    except Exception as error:  # noqa: BLE001 - stale entries are harmless
        log.warning("lookup entries of a rolled-back transaction left for repair: %s", error)
    finally:
        work.conns.release(background=True)


def before_execute(orm_context: ORMExecuteState) -> None:
    """INSERT statements with rows get their entries first; UPDATEs of a looked-up column are refused."""
    session = orm_context.session
    manager = getattr(session, "manager", None)
    statement: Any = orm_context.statement
    if manager is None or not (orm_context.is_insert or orm_context.is_update):
        return
    table = getattr(statement, "table", None)
    indexes = list(_indexes_of(table))
    if not indexes:
        return
    if orm_context.is_update:
        names = {getattr(c, "key", c) for c in (statement._values or {})}
        touched = [i for i in indexes if i.column.key in names or i.key_column.key in names]
        if touched:
            raise LookupIndexError(
                f"an UPDATE statement setting {touched[0].describe()} (or its shard key) would leave the lookup "
                "behind: load the objects and change the attribute (the flush maintains the lookup)"
            )
        return
    rows = _insert_rows(statement, orm_context.parameters)
    work = _work(session, manager)
    work.wait()
    for index in indexes:
        entries = [
            Entry(index, row[index.column.key], row[index.key_column.key])
            for row in rows
            if row.get(index.column.key) is not None and row.get(index.key_column.key) is not None
        ]
        if entries:
            write_entries(manager, work, index, entries)


def _indexes_of(table: Any) -> Iterable[LookupIndex]:
    columns = getattr(table, "c", None)
    if columns is None:
        return []
    return [i for i in (lookup_for_column(c) for c in columns) if i is not None]
