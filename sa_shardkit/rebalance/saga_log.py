"""The saga log's own cut-over: log rows live at their *saga id*'s ring position, not a shard key's.

A saga's runner updates its log row in place (lease, progress, final mark) and the row must stay
unique per id fleet-wide (that is what catches an id reused with another payload), so the row
cannot be copied while it may change, nor written at its new shard before it is there. It moves
like a key does, under the source's fence: after the source's keys, in batches ordered by saga id
(text, "C" collation), each in ONE source transaction that holds the source's state row ``FOR NO
KEY UPDATE``: the batch's rows whose id changes shard are copied into each target (a killed run's
copies there are replaced) and committed there, then deleted from the source, and the source's
watermark for the table (``shardkit_ring_state.carried``) advances -- that commit is the cut-over.

Every log access routes and fences by :meth:`Placement.shard_for_value
<sa_shardkit.placement.Placement.shard_for_value>` / :meth:`~sa_shardkit.placement.Placement.fence_value`:
before its batch an id's row is read and written on the old shard (a writer holding the fence makes
the batch wait for its commit), after it on the new one. Tables whose rows are only inserted and
deleted (lookup rows) move by :mod:`.positioned` instead.

Crash safety is the key batches': targets commit before the source; a copy left on a target by a
killed run is for an id the source has not cut over, which nobody reads there (recovery skips it),
and the next run replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, Table, bindparam, cast, delete, insert, select, text
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import Text

from ..errors import RebalanceError
from ..ring_state import STATE_TABLE, value_text
from ..saga.tables import sagas_table

if TYPE_CHECKING:
    from .mover import SourceMover

LOG_BATCH = 500
"""Saga log rows per cut-over batch."""


@dataclass(frozen=True)
class FencedTable:
    """A table whose rows live at the ring position of ``table.c[column]`` and move by fenced cut-over."""

    table: Table
    column: str

    @property
    def name(self) -> str:
        return self.table.name

    def ordered(self) -> ColumnElement[Any]:
        """The column in the order batches walk it: its text form in the "C" collation (index it
        so, e.g. ``CREATE INDEX ... ((saga_id COLLATE "C"))``, or every batch sorts the table)."""
        column = self.table.c[self.column]
        if isinstance(column.type, String):
            return column.collate("C")
        return cast(column, Text).collate("C")


_fenced: dict[str, FencedTable] = {sagas_table.name: FencedTable(sagas_table, "saga_id")}


def fenced_tables() -> tuple[FencedTable, ...]:
    return tuple(_fenced.values())


def drain_fenced(mover: SourceMover) -> int:
    """Move every log row of the source whose id changes shard; returns rows moved.
    Safe to re-run after any crash (it resumes from each table's watermark)."""
    moved = 0
    for spec in mover.fenced:
        while True:
            done, count = _batch(mover, spec)
            moved += count
            if done:
                break
            mover.control.checkpoint()
    return moved


_PROGRESS = text(f"SELECT to_jsonb(st) -> 'carried' -> CAST(:t AS text) AS p FROM {STATE_TABLE} AS st")
_ADVANCE = text(
    f"UPDATE {STATE_TABLE} SET carried = COALESCE(carried, CAST('{{}}' AS jsonb))"
    " || jsonb_build_object(CAST(:t AS text), jsonb_build_object('watermark', CAST(:w AS text),"
    " 'drained', CAST(:d AS boolean))), updated_at = now()"
)


def _batch(mover: SourceMover, spec: FencedTable) -> tuple[bool, int]:
    """One cut-over of ``spec``'s next rows; (drained, rows moved)."""
    table, column = spec.table, spec.table.c[spec.column]
    with mover.held.connect(mover.source) as conn, conn.begin():
        mover._fence(conn)
        progress = conn.execute(_PROGRESS, {"t": spec.name}).scalar() or {}
        if progress.get("drained"):
            return True, 0
        watermark = progress.get("watermark")
        query = select(column).order_by(spec.ordered()).limit(LOG_BATCH)
        if watermark is not None:
            query = query.where(
                spec.ordered() > cast(bindparam("w", watermark, type_=Text), Text).collate("C")
            )
        values = list(conn.execute(query).scalars())
        if not values:
            conn.execute(_ADVANCE, {"t": spec.name, "w": watermark, "d": True})
            return True, 0
        targets = {v: mover._moves(v) for v in values}
        wanted = [v for v, t in targets.items() if t is not None]
        # re-read the moving rows locked: a write that is not fenced (a lease renewal) waits for us
        locked = select(table).where(column.in_(wanted)).with_for_update()
        by_target: dict[str, list[dict[str, Any]]] = {}
        for row in conn.execute(locked).mappings() if wanted else ():
            by_target.setdefault(str(targets[row[spec.column]]), []).append(dict(row))
        for target, target_rows in sorted(by_target.items()):
            copied = [r[spec.column] for r in target_rows]
            with mover.held.connect(target) as tconn, tconn.begin():
                tconn.execute(delete(table).where(column.in_(copied)))  # a killed run's copies
                tconn.execute(insert(table), target_rows)
        moving = [r[spec.column] for rs in by_target.values() for r in rs]
        if moving:
            deleted = conn.execute(delete(table).where(column.in_(moving))).rowcount
            if deleted != len(moving):
                raise RebalanceError(
                    f"{spec.name} on {mover.source!r}: deleting {deleted} rows but copied {len(moving)}; "
                    "rolled back"
                )
        last = value_text(values[-1])
        conn.execute(_ADVANCE, {"t": spec.name, "w": last, "d": False})
        return False, len(moving)


__all__ = ["LOG_BATCH", "FencedTable", "drain_fenced", "fenced_tables"]
