"""Tables positioned by a column other than the shard key, moved with their value's ring position.

A lookup table's row for value ``v`` lives on the shard the ring gives ``v`` (not the row's shard
key); so does a saga log row, positioned by its saga id. The shard-key mover (:mod:`.mover`) does
not move such rows; this module does, once every source's keys are drained and before the final
version bump. Each kind of table is described by a :class:`PositionedTable`, handed out by a
*provider* registered with :func:`register_positioned` (a module inside ``rebalance/`` that
rebalancer imports; ``lookups/`` and ``saga/`` cannot import ``rebalance`` without a cycle).

**The move** of one table from one source shard: walk the source's rows in primary-key order
(keyset, batches); a row whose value's shard in the target ring is another shard is inserted
there (``INSERT ... ON CONFLICT DO NOTHING``, committed), then deleted from the source only if the
target now holds an identical row (checked by primary key and ``xmin``, so a row changed meanwhile
stays). A primary key that holds a *different* row on the target is a conflict: the table's
``on_conflict`` hook decides (True: the source row may go), else it is retried until
``MoveOptions.lock_timeout`` and then :class:`~sa_shardkit.errors.RebalanceError`. Killed at any
point, a re-run scans again: copied rows conflict identically and are deleted, nothing is lost.

**The contract for writers and readers** of such a table while a move is in flight
(``manager.placement.value_shards(value, mode=...)``): a write goes to the value's shard in the
*target* ring, after checking that its old shard already stores the writer's ring version; a
read reads the old shard, then the new one, in that order, and re-reads the ring when a shard it
read stores a newer version. With copy-then-delete on the mover's side, a row committed before a
read began is seen by it on one of the two shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, delete, literal_column, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Row

from ..errors import RebalanceError
from ..manager import ShardManager
from ..ring import HashRing
from .catalog import RingState
from .tables import TableSet

log = logging.getLogger("sa_shardkit.rebalance")

ConflictHook = Callable[[ShardManager, Connection, Row[Any], Row[Any]], bool]
"""``on_conflict(manager, target_conn, source_row, target_row)``: the target holds another row
under the source row's primary key. Runs in the target's open transaction (which commits after
it); may change the target row. Returns True when the source row may be deleted (the target is
right now), False to keep it and retry later (e.g. a writer holds the value)."""

MovedHook = Callable[[ShardManager, HashRing, HashRing], None]
"""``on_moved(manager, old_ring, new_ring)``: every row of the table sits at its target-ring
position now (called once per move, before the final version bump; must be idempotent)."""


@dataclass(frozen=True)
class PositionedTable:
    """A table whose rows live on the shard the ring gives ``table.c[column]``'s value."""

    table: Table
    column: str
    """The column whose value's ring position places the row."""
    name: str | None = None
    """For messages and logs (default: the table's name)."""
    on_conflict: ConflictHook | None = None
    on_moved: MovedHook | None = None
    create_missing: bool = False
    """Create the table on a target that lacks it (else a missing table is an error)."""

    @property
    def label(self) -> str:
        return self.name or self.table.name


Provider = Callable[[ShardManager, TableSet], Iterable[PositionedTable]]
"""``provider(manager, tables)``: the positioned tables that move with the sharded ``tables``."""

PROVIDERS: list[Provider] = []

BATCH = 2000
"""Rows read from the source per batch."""
RETRY_SLEEP = 0.2


def register_positioned(provider: Provider) -> None:
    """Have every rebalance move the tables ``provider`` returns (idempotent)."""
    if provider not in PROVIDERS:
        PROVIDERS.append(provider)


def positioned_tables(manager: ShardManager, tables: TableSet) -> list[PositionedTable]:
    """Every registered positioned table for this move (each table once, by name)."""
    found: dict[str, PositionedTable] = {}
    for provider in PROVIDERS:
        for spec in provider(manager, tables):
            found.setdefault(spec.table.name, spec)
    return list(found.values())


@dataclass
class PositionedReport:
    rows: dict[str, int]
    """Rows moved per table label (this run)."""
    conflicts: int = 0


def move_positioned(
    manager: ShardManager,
    state: RingState,
    specs: Sequence[PositionedTable],
    sources: Sequence[str],
    *,
    timeout: float = 30.0,
    batch: int = BATCH,
) -> PositionedReport:
    """Move every positioned table's rows off ``sources`` to their target-ring shards."""
    if state.target is None:
        raise RebalanceError("no ring move is in flight")
    report = PositionedReport({})
    for spec in specs:
        for source in sources:
            moved = _TableMove(manager, state, spec, source, timeout, batch).run(report)
            if moved:
                report.rows[spec.label] = report.rows.get(spec.label, 0) + moved
                log.info("moved %d %s row(s) off %s", moved, spec.label, source)
    return report


def finish_positioned(manager: ShardManager, state: RingState, specs: Sequence[PositionedTable]) -> None:
    """Each table's ``on_moved`` hook (every row is at its target position)."""
    assert state.target is not None
    for spec in specs:
        if spec.on_moved is not None:
            spec.on_moved(manager, state.ring, state.target)


def prepare_positioned(manager: ShardManager, specs: Sequence[PositionedTable], shard_id: str) -> None:
    """Create the ``create_missing`` tables a joining shard lacks (before routing can reach it: a
    read of a value whose new position it is may come as soon as the move starts)."""
    with manager.connect(shard_id) as conn, conn.begin():
        for spec in specs:
            if spec.create_missing:
                spec.table.create(conn, checkfirst=True)


def table_exists(conn: Connection, table: Table) -> bool:
    name = f"{table.schema}.{table.name}" if table.schema else table.name
    return conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None


class _TableMove:
    def __init__(
        self,
        manager: ShardManager,
        state: RingState,
        spec: PositionedTable,
        source: str,
        timeout: float,
        batch: int,
    ) -> None:
        assert state.target is not None
        self.manager, self.spec, self.source = manager, spec, source
        self.new = state.target
        self.timeout, self.batch = timeout, batch
        self.table = spec.table
        self.pk = list(self.table.primary_key.columns)
        if not self.pk:
            raise RebalanceError(f"positioned table {spec.label!r} has no primary key; it cannot be moved")
        self.column = self.table.c[spec.column]
        self.ready: set[str] = set()

    def run(self, report: PositionedReport) -> int:
        with self.manager.connect(self.source) as conn:
            exists = table_exists(conn, self.table)
            conn.rollback()
        if not exists:
            return 0
        deadline = time.monotonic() + self.timeout
        moved = 0
        while True:
            done, kept = self._pass()
            moved += done
            if not kept:
                return moved
            report.conflicts += kept
            if time.monotonic() > deadline:
                raise RebalanceError(
                    f"{self.spec.label} on {self.source!r}: {kept} row(s) conflict with different rows "
                    f"under the same primary key on their target shard after {self.timeout:g}s; "
                    "nothing was lost (they stay on the source): run the rebalance again (--resume)"
                )
            time.sleep(RETRY_SLEEP)

    def _pass(self) -> tuple[int, int]:
        """One scan of the source; returns (rows moved, rows kept because of a conflict)."""
        xmin: Any = literal_column("xmin::text").label("shardkit_xmin")
        last: tuple[Any, ...] | None = None
        moved = kept = 0
        while True:
            query = select(*self.table.c, xmin).order_by(*self.pk).limit(self.batch)
            if last is not None:
                query = query.where(tuple_(*self.pk) > tuple_(*last))
            with self.manager.connect(self.source) as conn:
                rows: list[Row[Any]] = list(conn.execute(query))
                conn.rollback()
            if not rows:
                return moved, kept
            last = self._key(rows[-1])
            by_target: dict[str, list[Row[Any]]] = {}
            for row in rows:
                target = self.new.get_shard(row._mapping[self.column.name])
                if target != self.source:
                    by_target.setdefault(target, []).append(row)
            for target in sorted(by_target):
                group = by_target[target]
                deletable = self._copy(target, group)
                kept += len(group) - len(deletable)
                moved += self._delete(deletable)

    def _copy(self, target: str, rows: list[Row[Any]]) -> list[Row[Any]]:
        """Insert ``rows`` on ``target`` (committed); returns those the source may now delete."""
        names = [c.name for c in self.table.c]
        with self.manager.connect(target) as conn:
            with conn.begin():
                if target not in self.ready:
                    if not table_exists(conn, self.table):
                        if not self.spec.create_missing:
                            raise RebalanceError(
                                f"{self.spec.label}: table {self.table.name!r} is missing on {target!r}"
                            )
                        self.table.create(conn, checkfirst=True)
                    self.ready.add(target)
                values = [{n: row._mapping[n] for n in names} for row in rows]
                stmt = pg_insert(self.table).on_conflict_do_nothing().returning(*self.pk)
                inserted = {tuple(r) for r in conn.execute(stmt, values)}
                key = self._key
                conflicted = [r for r in rows if key(r) not in inserted]
                if not conflicted:
                    return rows
                present: dict[tuple[Any, ...], Row[Any]] = {
                    key(r): r
                    for r in conn.execute(
                        select(*self.table.c).where(tuple_(*self.pk).in_([key(r) for r in conflicted]))
                    )
                }
                deletable = [r for r in rows if key(r) in inserted]
                for row in conflicted:
                    there = present.get(key(row))
                    if there is None:
                        continue  # deleted on the target meanwhile: retried (and inserted) next pass
                    if all(there._mapping[n] == row._mapping[n] for n in names):
                        deletable.append(row)
                    elif self.spec.on_conflict is not None and self.spec.on_conflict(
                        self.manager, conn, row, there
                    ):
                        deletable.append(row)
                return deletable

    def _key(self, row: Row[Any]) -> tuple[Any, ...]:
        return tuple(row._mapping[c.name] for c in self.pk)

    def _delete(self, rows: list[Row[Any]]) -> int:
        """Delete these source rows, each only if it was not changed since it was read (xmin)."""
        if not rows:
            return 0
        xmin: Any = literal_column("xmin::text")
        wanted = [(*self._key(r), r._mapping["shardkit_xmin"]) for r in rows]
        with self.manager.connect(self.source) as conn, conn.begin():
            result = conn.execute(delete(self.table).where(tuple_(*self.pk, xmin).in_(wanted)))
        return int(result.rowcount)


__all__ = [
    "PROVIDERS",
    "ConflictHook",
    "MovedHook",
    "PositionedReport",
    "PositionedTable",
    "Provider",
    "finish_positioned",
    "move_positioned",
    "positioned_tables",
    "prepare_positioned",
    "register_positioned",
    "table_exists",
]
