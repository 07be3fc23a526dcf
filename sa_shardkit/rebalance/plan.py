"""What a ring change moves: the key ranges that change shard, and how many rows per table.

A range is a half-open arc ``[start, end)`` of ring positions (``key_hash`` values), wrapping when
``start > end``. The arcs come from the two rings alone; the row counts scan the source shards
(shard keys only), so ``plan`` is cheap enough for a dry run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..manager import ShardManager
from ..ring import HashRing, MovedArc, moved_arcs, share_by_move
from .tables import TableSet

RangeMove = MovedArc
"""Keys whose ring position is in ``[start, end)`` move from ``source`` to ``target`` (the ring's arcs)."""


@dataclass(frozen=True)
class RebalancePlan:
    """The ranges that change shard between ``old`` and ``new``, with row counts when measured."""

    old: HashRing
    new: HashRing
    moves: tuple[RangeMove, ...]
    rows: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """``(source, target, table) -> rows`` that move (empty until counted)."""
    keys: dict[tuple[str, str], int] = field(default_factory=dict)
    """``(source, target) -> shard keys`` that move (empty until counted)."""
    total_rows_by_table: dict[str, int] = field(default_factory=dict)
    """Rows per table on the whole fleet, for the moved fraction."""

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.source for m in self.moves))

    @property
    def share_moved(self) -> float:
        """Fraction of the ring that changes shard (~1/N when a shard joins N-1 others)."""
        return sum(m.share for m in self.moves)

    @property
    def rows_to_move(self) -> int:
        return sum(self.rows.values())

    @property
    def total_rows(self) -> int:
        return sum(self.total_rows_by_table.values())

    def flows(self) -> dict[tuple[str, str], float]:
        """Ring share per ``(source, target)`` pair."""
        return share_by_move(self.moves)


def range_moves(old: HashRing, new: HashRing) -> list[RangeMove]:
    """The arcs whose owner differs between ``old`` and ``new``, adjacent arcs merged."""
    return moved_arcs(old, new)


def plan_rebalance(
    manager: ShardManager, old: HashRing, new: HashRing, tables: TableSet | None = None
) -> RebalancePlan:
    """The moving ranges; with ``tables``, also the rows and keys per source, target and table."""
    moves = tuple(range_moves(old, new))
    if tables is None:
        return RebalancePlan(old, new, moves)
    sources = [s for s in old.shard_ids if s in manager.shard_ids]

    def count(conn: Connection) -> tuple[dict[str, Counter[Any]], dict[str, int]]:
        per_table: dict[str, Counter[Any]] = {}
        totals: dict[str, int] = {}
        for spec in tables.sharded:
            result = conn.execute(select(spec.key, func.count()).group_by(spec.key))
            per_table[spec.name] = Counter({key: int(n) for key, n in result})
            totals[spec.name] = sum(per_table[spec.name].values())
        return per_table, totals

    counted = manager.run_on_all(count, shard_ids=sources)
    rows: dict[tuple[str, str, str], int] = {}
    keys: dict[tuple[str, str], int] = {}
    totals: Counter[str] = Counter()
    for source, (per_table, table_totals) in counted.items():
        totals.update(table_totals)
        seen: set[Any] = set()
        decided: dict[Any, str | None] = {}  # each key hashed once, whatever the number of tables
        for table_name, counter in per_table.items():
            for key, n in counter.items():
                target = decided.get(key, "")
                if target == "":
                    # a stray row (not on its old-ring shard) is not this shard's to move (see mover)
                    moving = old.get_shard(key) == source and new.get_shard(key) != source
                    target = decided[key] = new.get_shard(key) if moving else None
                if target is None:
                    continue
                rows[source, target, table_name] = rows.get((source, target, table_name), 0) + n
                if key not in seen:
                    seen.add(key)
                    keys[source, target] = keys.get((source, target), 0) + 1
    return RebalancePlan(old, new, moves, rows, keys, dict(totals))
