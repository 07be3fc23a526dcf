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
from ..ring import RING_SPACE, HashRing
from .tables import TableSet


@dataclass(frozen=True)
class RangeMove:
    """Keys whose ring position is in ``[start, end)`` move from ``source`` to ``target``."""

    start: int
    end: int
    source: str
    target: str

    @property
    def share(self) -> float:
        """Fraction of the ring (and so, on average, of the keys) in this range."""
        return ((self.end - self.start) % RING_SPACE) / RING_SPACE


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
        shares: dict[tuple[str, str], float] = {}
        for m in self.moves:
            shares[m.source, m.target] = shares.get((m.source, m.target), 0.0) + m.share
        return shares


def range_moves(old: HashRing, new: HashRing) -> list[RangeMove]:
    """The arcs whose owner differs between ``old`` and ``new``, adjacent arcs merged."""
    bounds = sorted({s.end for s in old.segments()} | {s.end for s in new.segments()})
    moves: list[RangeMove] = []
    for i, start in enumerate(bounds):
        end = bounds[(i + 1) % len(bounds)]
        # every position in [start, end) has the same first vnode point above it in both rings
        source, target = old.shard_for_point(start), new.shard_for_point(start)
        if source == target:
            continue
        last = moves[-1] if moves else None
        if last is not None and last.end == start and (last.source, last.target) == (source, target):
            moves[-1] = RangeMove(last.start, end, source, target)
        else:
            moves.append(RangeMove(start, end, source, target))
    if len(moves) > 1:
        first, last = moves[0], moves[-1]
        if last.end == first.start and (last.source, last.target) == (first.source, first.target):
            moves[0] = RangeMove(last.start, first.end, first.source, first.target)
            moves.pop()
    return moves


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
        for table_name, counter in per_table.items():
            for key, n in counter.items():
                if old.get_shard(key) != source:
                    continue  # a stray row: not this shard's to move (see mover)
                target = new.get_shard(key)
                if target == source:
                    continue
                rows[source, target, table_name] = rows.get((source, target, table_name), 0) + n
                if key not in seen:
                    seen.add(key)
                    keys[source, target] = keys.get((source, target), 0) + 1
    return RebalancePlan(old, new, moves, rows, keys, dict(totals))
